//! The Vagrant lab (issue 13, item 6), checked where no box can boot:
//!
//! - `vagrant validate` accepts vagrant/Vagrantfile with the libvirt provider (vagrant-libvirt
//!   from Debian, no `vagrant plugin install`), with KVM and with `VIGIL_VAGRANT_QEMU=1`, and
//!   refuses a bad setting with a message naming it. Skipped (with a message) only where vagrant
//!   is missing and `CI` is not `true`; under CI a missing vagrant fails, naming it;
//! - the provisioning scripts (vagrant/provision/*.sh) are shellcheck-clean (same rule for a
//!   missing shellcheck);
//! - the scripts run inside a clean Debian 12 root (mmdebstrap, the base tarball of
//!   packaging.rs, cached in /var/cache/vigil-test) with the .debs installed, twice (they are
//!   idempotent), with `VIGIL_PROVISION_NO_START=1` (systemd is not PID 1 there) and
//!   `VIGIL_PROVISION_OFFLINE=1` (the root has no archive): afterwards the configs and
//!   certificates are where the units read them, with the owners and modes the daemons need,
//!   `vigil-monitor --check` (as the unit's `vigil` user) and `vigil-agent --check` accept
//!   them, units are enabled and none started; bad arguments fail with a message naming them;
//! - with starting allowed, in a private network namespace (`unshare --net`, a veth holding
//!   mon1's address), monitor.sh creates the database with `vigil-monitor --init` as user
//!   vigil and restarts the unit, and creates nothing on a second run.
//!
//! Needs root for the Debian root (skips without). Temporary directories are removed on drop;
//! nothing is mounted; the host's network configuration is never touched (the scripts write
//! /etc/hosts, /etc/fstab and /etc/exports.d inside the root only; the veth lives and dies
//! with its namespace).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::*;

fn lab() -> PathBuf {
    workspace().join("vagrant")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` runs; without it: skip (false) outside CI, fail under CI.
fn have_tool(tool: &str, version_arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !in_ci(),
            "{tool} is not installed, and CI=true: scripts/setup.sh installs it"
        );
        eprintln!("skipping: {tool} is not installed (scripts/setup.sh installs it)");
    }
    ok
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read_dir").flatten() {
        if e.file_type().expect("file type").is_file() {
            place(&e.path(), &to.join(e.file_name()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// vagrant validate

/// The Vagrantfile and its scripts in a temporary directory (`vagrant validate` creates
/// .vagrant/ and the Vagrantfile .lab/pki next to itself: not in the source tree).
struct LabCopy {
    dir: tempfile::TempDir,
    packages: tempfile::TempDir,
}

fn lab_copy(vagrantfile: &str) -> LabCopy {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("Vagrantfile"), vagrantfile).expect("write Vagrantfile");
    copy_dir(&lab().join("provision"), &dir.path().join("provision"));
    // An existing (empty) package directory: the upload of the .debs is validated too.
    let packages = tempfile::tempdir().expect("tempdir");
    LabCopy { dir, packages }
}

fn validate(copy: &LabCopy, env: &[(&str, &str)]) -> Output {
    vagrant(copy, &["validate"], env)
}

fn vagrant(copy: &LabCopy, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("vagrant");
    cmd.args(args)
        .current_dir(copy.dir.path())
        .env("VIGIL_PACKAGES", copy.packages.path())
        .env("VIGILCTL", "/nonexistent/vigilctl")
        .env_remove("VAGRANT_DEFAULT_PROVIDER")
        .env_remove("VIGIL_VAGRANT_QEMU")
        .env_remove("VIGIL_FENCE_USER")
        .env_remove("VIGIL_FENCE_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    output(&mut cmd)
}

#[test]
fn vagrant_validate_accepts_the_lab_and_refuses_bad_settings() {
    if !have_tool("vagrant", "--version") {
        return;
    }
    let t0 = std::time::Instant::now();
    let vagrantfile = fs::read_to_string(lab().join("Vagrantfile")).expect("vagrant/Vagrantfile");
    let copy = lab_copy(&vagrantfile);
    let key = copy.dir.path().join("id_fence");
    fs::write(&key, "not a key: validate only checks the file exists\n").expect("write key");
    let key = key.to_string_lossy().into_owned();
    for env in [
        &[][..],
        &[("VIGIL_VAGRANT_QEMU", "1")][..],
        &[
            ("VIGIL_FENCE_USER", "vigil-fence"),
            ("VIGIL_FENCE_KEY", key.as_str()),
        ][..],
    ] {
        let out = validate(&copy, env);
        assert!(
            out.status.success() && text(&out).contains("validated successfully"),
            "vagrant validate with {env:?}:\n{}",
            text(&out)
        );
    }
    for (env, says) in [
        (
            &[("VIGIL_VAGRANT_QEMU", "yes")][..],
            "VIGIL_VAGRANT_QEMU=\"yes\": expected 0 or 1",
        ),
        (
            &[("VIGIL_FENCE_USER", "vigil-fence")][..],
            "VIGIL_FENCE_USER and VIGIL_FENCE_KEY go together",
        ),
        (
            &[
                ("VIGIL_FENCE_USER", "vigil-fence"),
                ("VIGIL_FENCE_KEY", "/nonexistent/key"),
            ][..],
            "VIGIL_FENCE_KEY=/nonexistent/key: no such file",
        ),
    ] {
        let out = validate(&copy, env);
        assert!(
            !out.status.success() && text(&out).contains(says),
            "vagrant validate with {env:?} must fail saying {says:?}:\n{}",
            text(&out)
        );
    }
    // The libvirt provider's own settings are checked too (the Debian vagrant-libvirt plugin
    // is loaded without `vagrant plugin install`): an unknown one is refused.
    let bad = lab_copy(
        &vagrantfile.replace("lv.cpus = 1\n", "lv.cpus = 1\n    lv.no_such_setting = 1\n"),
    );
    let out = validate(&bad, &[]);
    assert!(
        !out.status.success()
            && text(&out).contains("Libvirt Provider")
            && text(&out).contains("no_such_setting"),
        "vagrant-libvirt validates its settings:\n{}",
        text(&out)
    );
    // `vagrant up` stops in its trigger, before libvirt is asked anything, without the .debs
    // or without vigilctl: a message, no Ruby backtrace.
    let out = vagrant(&copy, &["up", "mon1"], &[]);
    let said = text(&out);
    assert!(
        !out.status.success()
            && said.contains(&format!(
                "no vigil-agent and vigil-monitor .debs in {}: run packaging/build.sh",
                copy.packages.path().display()
            ))
            && !said.contains(".rb:"),
        "vagrant up without packages:\n{said}"
    );
    for p in ["vigil-agent", "vigil-monitor"] {
        fs::write(
            copy.packages.path().join(format!("{p}_0.1.0-1_amd64.deb")),
            "",
        )
        .expect("write a stand-in .deb");
    }
    let out = vagrant(&copy, &["up", "mon1"], &[]);
    let said = text(&out);
    assert!(
        !out.status.success()
            && said.contains("/nonexistent/vigilctl not found: set VIGILCTL")
            && said.contains("vagrant/provision/certs.sh failed")
            && !said.contains(".rb:"),
        "vagrant up without vigilctl:\n{said}"
    );
    println!("vagrant validate and up: 9 runs in {:?}", t0.elapsed());
}

#[test]
fn provisioning_scripts_are_shellcheck_clean() {
    if !have_tool("shellcheck", "--version") {
        return;
    }
    let mut scripts: Vec<PathBuf> = fs::read_dir(lab().join("provision"))
        .expect("vagrant/provision")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 6, "the scripts: {scripts:?}");
    run(Command::new("shellcheck")
        .arg("-x")
        .args(&scripts)
        .current_dir(workspace()));
    for s in &scripts {
        let body = fs::read_to_string(s).expect("read script");
        if s.file_name().is_some_and(|n| n != "lib.sh") {
            assert!(
                body.contains("\nset -euo pipefail\n"),
                "{} lacks set -euo pipefail",
                s.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The provisioning scripts in a clean Debian root

/// The .debs of this test profile's binaries (as packaging.rs builds them), in `out`.
fn build_debs(stage: &Path, out: &Path) {
    let target = stage.join("target");
    for (name, built) in BINARIES {
        place(Path::new(built), &target.join("release").join(name));
    }
    fs::create_dir_all(out).expect("mkdir");
    for p in ["vigil-agent", "vigil-monitor"] {
        let dest = out.join(format!("{p}_0.1.0-1_amd64.deb"));
        run(Command::new("cargo")
            .args(["deb", "--no-build", "--fast", "-p", p])
            .args(["--deb-version", "0.1.0-1"])
            .arg("-o")
            .arg(&dest)
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace()));
        assert!(dest.exists(), "cargo deb made no {}", dest.display());
    }
}

/// A clean Debian root in a temporary directory (removed on drop; nothing is mounted).
struct Chroot {
    dir: tempfile::TempDir,
}

impl Chroot {
    fn new() -> Chroot {
        Chroot {
            dir: debian_root("vigil-vagrant-root-"),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    fn cmd(&self, script: &str) -> Command {
        let mut c = Command::new("chroot");
        c.arg(self.dir.path())
            .args(["/bin/bash", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("VIGIL_PROVISION_NO_START", "1")
            .env("VIGIL_PROVISION_OFFLINE", "1");
        c
    }

    /// `bash -c SCRIPT` inside the root; its stdout and stderr; panics on failure.
    fn sh(&self, script: &str) -> String {
        text(&run(&mut self.cmd(script)))
    }

    /// `bash -c SCRIPT` must fail; returns what it said.
    fn fails(&self, script: &str) -> String {
        let out = output(&mut self.cmd(script));
        assert!(
            !out.status.success(),
            "{script} should have failed:\n{}",
            text(&out)
        );
        text(&out)
    }

    fn read(&self, p: &str) -> String {
        fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }
}

/// The lab's provisioning, as the Vagrantfile runs it, on one root that is the NFS server, a
/// monitor (node 1 of 3, with the VIP and fence_virsh) and a hypervisor at once.
const PROVISION: &str = "set -e
P=/tmp/vigil-provision
bash $P/common.sh --debs /tmp/vigil-packages --package vigil-monitor --package vigil-agent \
  --host nfs=198.18.10.5 --host mon1=198.18.10.11 --host mon2=198.18.10.12 --host hv1=198.18.10.21
bash $P/certs.sh /root/pki monitor:mon1:198.18.10.11,198.18.10.10 agent:hv1:198.18.10.21 admin:admin
bash $P/nfs.sh --export /srv/primary --clients 198.18.10.0/24
bash $P/monitor.sh --node-id 1 --address 198.18.10.11 --tls-dir /root/pki \
  --peer 2=198.18.10.12 --peer 3=198.18.10.13 --vip 198.18.10.10 --interface eth1 \
  --fence hv1=vigil-lab-hv1 --fence-ip 198.18.10.1 --fence-user vigil-fence --fence-key /root/id_fence
bash $P/hypervisor.sh --name hv1 --tls-dir /root/pki --nfs 198.18.10.5:/srv/primary \
  --monitor 198.18.10.10 --monitor 198.18.10.11 --monitor 198.18.10.12 --monitor 198.18.10.13
";

/// What an operator reads back: (path, owner:group mode, content) of the files the units use.
fn snapshot(c: &Chroot) -> String {
    c.sh("cd / && for f in /etc/vigil/monitor.toml /etc/vigil/agent.toml /etc/vigil/tls/* \
          /etc/vigil/fence/id_fence /etc/ssh/ssh_config.d/vigil-fence.conf /etc/exports.d/vigil.exports \
          /etc/hosts /etc/fstab /etc/profile.d/vigil-lab.sh /root/pki/ca/ca.key; do \
          printf '%s %s %s\\n' \"$f\" \"$(stat -c '%U:%G %a' \"$f\")\" \"$(sha256sum <\"$f\" | cut -c1-16)\"; done")
}

#[test]
fn provisioning_scripts_configure_a_clean_debian_root() {
    if !is_root() {
        eprintln!(
            "skipping: the provisioning scripts run in a clean Debian root, which needs root (chroot, device nodes)"
        );
        return;
    }
    let t0 = std::time::Instant::now();
    let stage = tempfile::tempdir().expect("tempdir");
    let c = Chroot::new();
    build_debs(stage.path(), &c.path("/tmp/vigil-packages"));
    copy_dir(&lab().join("provision"), &c.path("/tmp/vigil-provision"));
    fs::write(c.path("/root/id_fence"), "a stand-in SSH key\n").expect("write the fence key");
    // A box's own /etc/hosts (the minbase root has none): the lab's block goes below it.
    fs::write(c.path("/etc/hosts"), "127.0.0.1\tlocalhost\n").expect("write /etc/hosts");
    // systemd is not PID 1 here (nor installed): a stand-in systemctl records what the
    // scripts (and the packages' maintainer scripts) ask of it.
    c.sh("printf '%s\\n' '#!/bin/sh' 'echo \"$*\" >>/var/log/systemctl.calls' \
          'case \"$*\" in *MainPID*) echo 0 ;; esac' >/usr/bin/systemctl && chmod 755 /usr/bin/systemctl");
    println!("root and .debs ready in {:?}", t0.elapsed());

    let first = c.sh(PROVISION);
    let after_first = snapshot(&c);
    let calls_first = c.read("/var/log/systemctl.calls");
    // Idempotent: a second run changes nothing (same files, same certificates, no new CA).
    let second = c.sh(PROVISION);
    assert_eq!(
        snapshot(&c),
        after_first,
        "a second provisioning run changed files:\n{second}"
    );
    assert!(
        second.contains("vigil-monitor 0.1.0-1 already installed") && !second.contains("issuing"),
        "the second run installs and issues nothing:\n{second}"
    );
    println!("provisioned twice in {:?}", t0.elapsed());

    // Nothing started: only enabled (systemctl start needs systemd as PID 1).
    for unit in [
        "vigil-monitor.service",
        "vigil-agent.service",
        "nfs-server.service",
        "libvirtd.service",
    ] {
        assert!(
            calls_first.contains(&format!("enable {unit}")),
            "{unit} is enabled:\n{calls_first}"
        );
    }
    let calls = c.read("/var/log/systemctl.calls");
    assert!(
        !calls.contains("start"),
        "VIGIL_PROVISION_NO_START=1 starts no unit:\n{calls}"
    );
    for skipped in [
        "not creating the monitor database",
        "not mounting /mnt/primary",
        "not exporting /srv/primary",
        "VIGIL_PROVISION_OFFLINE=1: not installing",
    ] {
        assert!(
            first.contains(skipped),
            "the log says {skipped:?}:\n{first}"
        );
    }
    assert!(
        !c.path("/var/lib/vigil/monitor/raft.redb").exists(),
        "no database without a start"
    );

    // Where the units read them, with the owners and modes the daemons need.
    let modes = c.sh(
        "stat -c '%n %U:%G %a' /etc/vigil/monitor.toml /etc/vigil/agent.toml \
                      /etc/vigil/tls/ca.crt /etc/vigil/tls/monitor.crt /etc/vigil/tls/monitor.key \
                      /etc/vigil/tls/agent.crt /etc/vigil/tls/agent.key /etc/vigil/tls/admin.key \
                      /etc/vigil/fence/id_fence /root/pki/ca/ca.key",
    );
    assert_eq!(
        modes,
        "/etc/vigil/monitor.toml root:vigil 640\n/etc/vigil/agent.toml root:root 644\n\
         /etc/vigil/tls/ca.crt root:root 644\n/etc/vigil/tls/monitor.crt root:root 644\n\
         /etc/vigil/tls/monitor.key root:vigil 640\n/etc/vigil/tls/agent.crt root:root 644\n\
         /etc/vigil/tls/agent.key root:root 600\n/etc/vigil/tls/admin.key root:root 600\n\
         /etc/vigil/fence/id_fence vigil:vigil 600\n/root/pki/ca/ca.key root:root 600\n",
        "owners and modes"
    );
    // The configs are the ones the units name, and the daemons accept them: the monitor's as
    // its unit runs it (user vigil, which must read the config and its key).
    for unit in ["vigil-monitor", "vigil-agent"] {
        let text = c.read(&format!("/lib/systemd/system/{unit}.service"));
        assert!(
            text.contains(&format!("--config /etc/vigil/{}.toml", &unit[6..])),
            "{unit}.service reads /etc/vigil/{}.toml",
            &unit[6..]
        );
    }
    let check = c.sh("runuser -u vigil -- vigil-monitor --check --config /etc/vigil/monitor.toml");
    assert!(
        check.contains("/etc/vigil/monitor.toml is valid"),
        "vigil-monitor --check: {check}"
    );
    c.sh("runuser -u vigil -- cat /etc/vigil/tls/monitor.key >/dev/null");
    let check = c.sh("vigil-agent --check --config /etc/vigil/agent.toml");
    assert!(
        check.contains("host hv1, zone default, cluster default")
            && check.contains("198.18.10.10:7440")
            && check.contains("198.18.10.13:7440"),
        "vigil-agent --check: {check}"
    );
    let shown = c.sh("vigilctl cert show /etc/vigil/tls/monitor.crt; vigilctl cert show /etc/vigil/tls/agent.crt; vigilctl cert show /etc/vigil/tls/admin.crt");
    for says in [
        "monitor certificate for mon1",
        "agent certificate for hv1",
        "admin certificate for admin",
    ] {
        assert!(shown.contains(says), "vigilctl cert show: {shown}");
    }

    // The contents an operator checks first.
    let monitor = c.read("/etc/vigil/monitor.toml");
    for line in [
        "node_id = 1\n",
        "advertise = \"198.18.10.11:7440\"",
        "listen = \"198.18.10.11:7441\"",
        "addr = \"198.18.10.12:7441\"",
        "addr = \"198.18.10.13:7441\"",
        "[vip]\naddress = \"198.18.10.10\"\ninterface = \"eth1\"",
        "agent = \"fence_virsh\"",
        "plug = \"vigil-lab-hv1\"",
        "identity_file = \"/etc/vigil/fence/id_fence\"",
    ] {
        assert!(
            monitor.contains(line),
            "monitor.toml lacks {line:?}:\n{monitor}"
        );
    }
    let agent = c.read("/etc/vigil/agent.toml");
    for line in [
        "host = \"hv1\"",
        "path = \"/mnt/primary\"",
        "device = \"/dev/watchdog\"",
    ] {
        assert!(agent.contains(line), "agent.toml lacks {line:?}:\n{agent}");
    }
    assert_eq!(
        c.read("/etc/exports.d/vigil.exports"),
        "/srv/primary 198.18.10.0/24(rw,sync,no_subtree_check,no_root_squash)\n"
    );
    let fstab = c.read("/etc/fstab");
    assert_eq!(
        fstab
            .matches("198.18.10.5:/srv/primary /mnt/primary nfs4")
            .count(),
        1,
        "one fstab line for the pool:\n{fstab}"
    );
    let hosts = c.read("/etc/hosts");
    assert_eq!(
        hosts.matches("# vigil-lab").count(),
        4,
        "/etc/hosts:\n{hosts}"
    );
    assert!(
        hosts.contains("localhost"),
        "the root's own lines stay:\n{hosts}"
    );
    assert!(c.read("/etc/profile.d/vigil-lab.sh").contains(
        "VIGIL_MONITORS=198.18.10.10:7440,198.18.10.11:7440,198.18.10.12:7440,198.18.10.13:7440"
    ));

    // Bad input: a clear error naming the argument, and nothing half-written.
    let p = "/tmp/vigil-provision";
    for (script, says) in [
        (format!("bash {p}/monitor.sh --node-id 0 --address 198.18.10.11 --tls-dir /root/pki"), "--node-id: '0' is not a positive integer"),
        (format!("bash {p}/monitor.sh --node-id 2 --address 198.18.10.12 --tls-dir /root/pki"), "--tls-dir /root/pki has no mon2.crt"),
        (format!("bash {p}/monitor.sh --node-id 1 --address 198.18.10.300 --tls-dir /root/pki"), "--address: '198.18.10.300' is not an IPv4 address"),
        (format!("bash {p}/monitor.sh --node-id 1 --address 198.18.10.11 --tls-dir /root/pki --vip 198.18.10.10"), "no interface holds 198.18.10.11: pass --interface"),
        (format!("bash {p}/monitor.sh --node-id 1 --address 198.18.10.11 --tls-dir /root/pki --fence hv1=d"), "missing --fence-ip"),
        (format!("bash {p}/hypervisor.sh --name hv1 --tls-dir /root/pki"), "missing --monitor"),
        (format!("bash {p}/hypervisor.sh --name hv1 --tls-dir /root/pki --monitor 198.18.10.10 --nfs nfs-server"), "--nfs nfs-server: expected SERVER:/PATH"),
        (format!("bash {p}/hypervisor.sh --name HV_1 --tls-dir /root/pki --monitor 198.18.10.10"), "--name: 'HV_1' is not a host name"),
        (format!("bash {p}/certs.sh /root/pki monitor:m1"), "a monitor's certificate is named mon<node_id>"),
        (format!("bash {p}/certs.sh /root/pki root:hv1"), "role 'root' is not agent, monitor, admin or viewer"),
        (format!("bash {p}/common.sh --debs /nonexistent"), "--debs /nonexistent: no such directory"),
        (format!("bash {p}/common.sh --debs /tmp --package vigil-agent"), "no vigil-agent_*_amd64.deb in /tmp"),
        (format!("bash {p}/nfs.sh --export srv --clients 198.18.10.0/24"), "--export srv: an absolute path"),
        (format!("bash {p}/nfs.sh --export /srv/primary --clients 198.18.10.0"), "expected IPV4/PREFIX"),
        (format!("bash {p}/nfs.sh --export"), "--export needs a value"),
        (format!("bash {p}/nfs.sh --bogus 1"), "unknown argument '--bogus'"),
    ] {
        let said = c.fails(&script);
        assert!(said.contains(says), "{script}: expected {says:?}, got:\n{said}");
    }
    assert_eq!(
        snapshot(&c),
        after_first,
        "a refused run changed the provisioned files"
    );

    // Starting allowed (no VIGIL_PROVISION_NO_START), in a private network namespace with an
    // eth1 (a veth) holding mon1's address (the host's network is never touched): monitor.sh
    // creates the database with a short `vigil-monitor --init` as user vigil, then restarts
    // the unit; a second run creates nothing.
    let bootstrap = format!(
        "ip link set lo up && ip link add eth1 type veth peer name eth1-peer && ip link set eth1-peer up && ip link set eth1 up \
         && ip addr add 198.18.10.11/24 dev eth1 \
         && chroot {root} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin VIGIL_PROVISION_OFFLINE=1 \
            bash {p}/monitor.sh --node-id 1 --address 198.18.10.11 --tls-dir /root/pki \
            --peer 2=198.18.10.12 --peer 3=198.18.10.13 --vip 198.18.10.10 --interface eth1 \
            --fence hv1=vigil-lab-hv1 --fence-ip 198.18.10.1 --fence-user vigil-fence --fence-key /root/id_fence",
        root = c.path("/").display()
    );
    for round in 1..=2 {
        let out = text(&run(Command::new("unshare")
            .args(["--net", "--fork", "--", "bash", "-c"])
            .arg(&bootstrap)));
        assert!(
            !out.contains("NO_START"),
            "round {round} starts things:\n{out}"
        );
        assert_eq!(
            c.sh("stat -c '%U:%G' /var/lib/vigil/monitor/raft.redb"),
            "vigil:vigil\n",
            "round {round}: the database, the vigil user's:\n{out}"
        );
        let restarts = c
            .read("/var/log/systemctl.calls")
            .matches("restart vigil-monitor.service")
            .count();
        assert_eq!(
            restarts, round,
            "round {round}: one restart of the unit per run"
        );
    }
    println!("provisioning checked in {:?}", t0.elapsed());
}
