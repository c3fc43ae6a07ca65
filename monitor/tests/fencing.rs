//! `vigil_monitor::fencing` against fake fence agents (shell scripts) and against a real IPMI
//! peer: OpenIPMI's `ipmi_sim` (scripts/lab-bmc.sh) in a private network namespace, driven by
//! Debian's `fence_ipmilan`.
//!
//! The real-peer test needs root, `ip`, `ipmi_sim` and `fence_ipmilan`; without them it is
//! skipped with a message, unless the environment variable `CI` is set (then it fails).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;

use vigil_common::config::FenceHostConfig;
use vigil_monitor::fencing::{fence, FenceAction, FenceError, PowerState, OUTPUT_LIMIT};

const SECRET: &str = "s3cret-Pw";

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

fn host_cfg(agent: &Path, dir: &Path) -> FenceHostConfig {
    let mut options = BTreeMap::new();
    options.insert("ip".to_string(), "198.18.2.1".to_string());
    options.insert("username".to_string(), "admin".to_string());
    options.insert("password".to_string(), SECRET.to_string());
    options.insert("dir".to_string(), dir.display().to_string());
    FenceHostConfig {
        host: "hv1".into(),
        agent: agent.display().to_string(),
        options,
        timeout_ms: None,
        netns: None,
    }
}

/// A fake agent that records its stdin in DIR/stdin.txt and exits `code`.
fn recording_agent(dir: &Path, code: i32) -> PathBuf {
    write_script(
        dir,
        &format!("fence_fake_{code}"),
        &format!("cat > \"$(dirname \"$0\")/stdin.txt\"\necho fake agent done\nexit {code}\n"),
    )
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn off_writes_action_and_options_on_stdin_and_exit_0_is_success() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = recording_agent(tmp.path(), 0);
    let cfg = host_cfg(&agent, tmp.path());
    let out = fence(&cfg, FenceAction::Off, T).await.expect("off");
    assert_eq!(out.action, FenceAction::Off);
    assert_eq!(out.power, Some(PowerState::Off));
    assert_eq!(out.stdout.trim(), "fake agent done");
    assert!(out.took < T);
    let stdin = std::fs::read_to_string(tmp.path().join("stdin.txt")).expect("stdin.txt");
    assert_eq!(
        stdin,
        format!(
            "action=off\ndir={}\nip=198.18.2.1\npassword={SECRET}\nusername=admin\n",
            tmp.path().display()
        )
    );

    let out = fence(&cfg, FenceAction::On, T).await.expect("on");
    assert_eq!(out.power, Some(PowerState::On));
    let out = fence(&cfg, FenceAction::Reboot, T).await.expect("reboot");
    assert_eq!(out.power, None);
    let stdin = std::fs::read_to_string(tmp.path().join("stdin.txt")).expect("stdin.txt");
    assert!(stdin.starts_with("action=reboot\n"), "{stdin}");
}

#[tokio::test]
async fn status_exit_codes_follow_the_clusterlabs_convention() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let on = host_cfg(&recording_agent(tmp.path(), 0), tmp.path());
    let off = host_cfg(&recording_agent(tmp.path(), 2), tmp.path());
    let broken = host_cfg(&recording_agent(tmp.path(), 1), tmp.path());
    let r = fence(&on, FenceAction::Status, T).await.expect("status on");
    assert_eq!(r.power, Some(PowerState::On));
    let r = fence(&off, FenceAction::Status, T)
        .await
        .expect("status off");
    assert_eq!(r.power, Some(PowerState::Off));
    let e = fence(&broken, FenceAction::Status, T)
        .await
        .expect_err("status 1");
    assert!(
        matches!(e, FenceError::Failed { code: Some(1), .. }),
        "{e:?}"
    );
    // Exit 2 is "off" only for status: for off it is a failure, never proof.
    let e = fence(&off, FenceAction::Off, T).await.expect_err("off 2");
    assert!(
        matches!(
            e,
            FenceError::Failed {
                code: Some(2),
                action: FenceAction::Off,
                ..
            }
        ),
        "{e:?}"
    );
    let e = fence(&broken, FenceAction::Off, T)
        .await
        .expect_err("off 1");
    assert!(
        matches!(e, FenceError::Failed { code: Some(1), .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn failures_carry_stderr_without_the_password() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = write_script(
        tmp.path(),
        "fence_bad_login",
        "pw=$(sed -n 's/^password=//p')\necho \"Failed: login as admin with $pw refused\" >&2\nexit 1\n",
    );
    let cfg = host_cfg(&agent, tmp.path());
    let e = fence(&cfg, FenceAction::Off, T).await.expect_err("fails");
    let shown = format!("{e} / {e:?} / {cfg:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    match &e {
        FenceError::Failed { code, stderr, .. } => {
            assert_eq!(*code, Some(1));
            assert!(
                stderr.contains("Failed: login as admin with **** refused"),
                "{stderr}"
            );
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // A signal is a failure too.
    let killed = write_script(tmp.path(), "fence_killed", "cat >/dev/null\nkill -9 $$\n");
    let e = fence(&host_cfg(&killed, tmp.path()), FenceAction::Off, T)
        .await
        .expect_err("killed");
    assert!(
        matches!(
            e,
            FenceError::Failed {
                code: None,
                signal: Some(9),
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_missing_agent_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = host_cfg(Path::new("fence_vigil_does_not_exist"), tmp.path());
    let e = fence(&cfg, FenceAction::Status, T)
        .await
        .expect_err("missing");
    assert!(matches!(e, FenceError::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("fence_vigil_does_not_exist"), "{e}");
    cfg.agent = tmp.path().join("nope").display().to_string();
    let e = fence(&cfg, FenceAction::Off, T).await.expect_err("missing");
    assert!(matches!(e, FenceError::NotFound { .. }), "{e:?}");
    // Not executable counts as missing.
    let plain = tmp.path().join("fence_plain");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").expect("write");
    cfg.agent = plain.display().to_string();
    let e = fence(&cfg, FenceAction::Off, T)
        .await
        .expect_err("not executable");
    assert!(matches!(e, FenceError::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn large_output_is_bounded_and_unread_stdin_is_fine() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Never reads stdin, floods stdout and stderr (far beyond a pipe buffer).
    let agent = write_script(
        tmp.path(),
        "fence_chatty",
        "head -c 300000 /dev/zero | tr '\\0' 'x'\nhead -c 300000 /dev/zero | tr '\\0' 'y' >&2\nexit 0\n",
    );
    let out = fence(&host_cfg(&agent, tmp.path()), FenceAction::Off, T)
        .await
        .expect("off");
    assert!(
        out.stdout.len() < OUTPUT_LIMIT + 100,
        "{}",
        out.stdout.len()
    );
    assert!(
        out.stderr.len() < OUTPUT_LIMIT + 100,
        "{}",
        out.stderr.len()
    );
    assert!(
        out.stdout.contains("300000 bytes in all"),
        "{}",
        &out.stdout[out.stdout.len() - 80..]
    );
}

/// Alive = /proc/PID exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

fn read_pid(p: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "{} never written", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_timeout_kills_the_agent_and_its_children() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = write_script(
        tmp.path(),
        "fence_hang",
        "d=$(dirname \"$0\")\necho $$ > \"$d/agent.pid.tmp\" && mv \"$d/agent.pid.tmp\" \"$d/agent.pid\"\nsleep 1000 &\necho $! > \"$d/child.pid.tmp\" && mv \"$d/child.pid.tmp\" \"$d/child.pid\"\nwhile :; do sleep 1; done\n",
    );
    let mut cfg = host_cfg(&agent, tmp.path());
    cfg.timeout_ms = Some(400); // wins over the default below
    let start = Instant::now();
    let e = fence(&cfg, FenceAction::Off, Duration::from_secs(60))
        .await
        .expect_err("hangs");
    let took = start.elapsed();
    match e {
        FenceError::Timeout { after, .. } => assert_eq!(after, Duration::from_millis(400)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let agent_pid = read_pid(&tmp.path().join("agent.pid"));
    let child_pid = read_pid(&tmp.path().join("child.pid"));
    // The agent was reaped by fence(); its `sleep 1000 &` got SIGKILL with the group (it may
    // linger as a zombie of PID 1 where PID 1 does not reap).
    let deadline = Instant::now() + Duration::from_secs(2);
    while (alive(agent_pid) || alive(child_pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(agent_pid), "agent {agent_pid} still runs");
    assert!(!alive(child_pid), "agent's child {child_pid} still runs");
}

#[tokio::test]
async fn dropping_the_call_kills_the_agent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = write_script(
        tmp.path(),
        "fence_hang",
        "d=$(dirname \"$0\")\nsleep 1000 &\necho $! > \"$d/child.pid.tmp\" && mv \"$d/child.pid.tmp\" \"$d/child.pid\"\nwait\n",
    );
    let cfg = host_cfg(&agent, tmp.path());
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        fence(&cfg, FenceAction::Off, Duration::from_secs(60)),
    )
    .await;
    assert!(r.is_err(), "the call should still be running");
    let child_pid = read_pid(&tmp.path().join("child.pid"));
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(child_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(child_pid), "agent's child {child_pid} still runs");
}

// ---------------------------------------------------------------------------------------------
// A real IPMI peer.

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ends the BMC and deletes the namespace, also when the test panics.
struct Lab {
    ns: String,
    bmc_dir: PathBuf,
    script: PathBuf,
    supervisor: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut sup) = self.supervisor.take() {
            // SIGTERM by PID: the supervisor ends ipmi_sim, then exits.
            let _ = Command::new("kill")
                .args(["-TERM", &sup.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match sup.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = sup.kill();
                        let _ = sup.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // Idempotent: ends whatever is left by the PIDs it recorded.
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.bmc_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("real-BMC fencing test cannot run: {why} (CI is set)");
    }
    eprintln!("SKIPPED fence_ipmilan_against_ipmi_sim: {why}");
}

#[tokio::test]
async fn fence_ipmilan_against_ipmi_sim() {
    for p in ["ip", "ipmi_sim", "fence_ipmilan"] {
        if find_program(p).is_none() {
            return skip_or_fail(&format!(
                "{p} is missing (Debian packages iproute2, openipmi, fence-agents)"
            ));
        }
    }
    let ns = format!("vigil-fence-test-{}", std::process::id());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab-bmc.sh");
    let script = script.canonicalize().expect("scripts/lab-bmc.sh");
    let tmp = tempfile::tempdir().expect("tempdir");
    let bmc_dir = tmp.path().join("bmc");
    let mut lab = Lab {
        ns: ns.clone(),
        bmc_dir: bmc_dir.clone(),
        script: script.clone(),
        supervisor: None,
    };
    let added = Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .expect("ip");
    if !added.status.success() {
        return skip_or_fail(&format!(
            "cannot create a network namespace (root needed): {}",
            String::from_utf8_lossy(&added.stderr).trim()
        ));
    }
    run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
    run_ok(Command::new("ip").args(["-n", &ns, "addr", "add", "198.18.250.1/32", "dev", "lo"]));

    // The power script: state in a file, every off/on logged.
    let state = tmp.path().join("power.state");
    let calls = tmp.path().join("power.calls");
    std::fs::write(&state, "1\n").expect("state");
    let power = write_script(
        tmp.path(),
        "power",
        &format!(
            "case \"$1\" in\n  status) cat '{s}' ;;\n  off) echo 0 > '{s}'; echo off >> '{c}' ;;\n  on) echo 1 > '{s}'; echo on >> '{c}' ;;\n  *) exit 1 ;;\nesac\n",
            s = state.display(),
            c = calls.display()
        ),
    );

    let mut sup = Command::new("ip")
        .args(["netns", "exec", &ns, "bash"])
        .arg(&script)
        .arg("run")
        .arg(&bmc_dir)
        .args([
            "--name",
            "hv1",
            "--addr",
            "198.18.250.1",
            "--port",
            "623",
            "--power-script",
        ])
        .arg(&power)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("lab-bmc.sh run");
    let stdout = sup.stdout.take().expect("stdout");
    lab.supervisor = Some(sup);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("BMC ready within 30 s");
    assert_eq!(
        ready.trim(),
        "198.18.250.1 623",
        "lab-bmc.sh said {ready:?}"
    );

    let mut options = BTreeMap::new();
    for (k, v) in [
        ("ip", "198.18.250.1"),
        ("ipport", "623"),
        ("username", "admin"),
        ("password", "vigil"),
        ("lanplus", "1"),
        ("cipher", "3"),
        ("power_wait", "0"),
    ] {
        options.insert(k.to_string(), v.to_string());
    }
    let cfg = FenceHostConfig {
        host: "hv1".into(),
        agent: "fence_ipmilan".into(),
        options,
        timeout_ms: Some(20_000),
        netns: Some(ns.clone()),
    };
    let t = Duration::from_secs(20);

    let r = fence(&cfg, FenceAction::Status, t).await.expect("status");
    assert_eq!(r.power, Some(PowerState::On), "{r:?}");
    eprintln!("real BMC: status (on) took {:?}", r.took);

    let r = fence(&cfg, FenceAction::Off, t).await.expect("off");
    assert_eq!(r.power, Some(PowerState::Off), "{r:?}");
    eprintln!("real BMC: off took {:?}", r.took);
    let log = std::fs::read_to_string(&calls).expect("power.calls");
    assert!(
        log.lines().any(|l| l == "off"),
        "power script calls: {log:?}"
    );
    assert_eq!(std::fs::read_to_string(&state).expect("state").trim(), "0");

    let r = fence(&cfg, FenceAction::Status, t).await.expect("status");
    assert_eq!(r.power, Some(PowerState::Off), "{r:?}");
    eprintln!("real BMC: status (off, exit 2) took {:?}", r.took);

    let r = fence(&cfg, FenceAction::On, t).await.expect("on");
    assert_eq!(r.power, Some(PowerState::On), "{r:?}");
    eprintln!("real BMC: on took {:?}", r.took);
    let log = std::fs::read_to_string(&calls).expect("power.calls");
    assert_eq!(log.lines().collect::<Vec<_>>(), ["off", "on"], "{log:?}");

    let r = fence(&cfg, FenceAction::Status, t).await.expect("status");
    assert_eq!(r.power, Some(PowerState::On), "{r:?}");

    // A wrong password is a failure, and the password does not show.
    let mut bad = cfg.clone();
    bad.options
        .insert("password".into(), "wrong-Secret-1".into());
    let e = fence(&bad, FenceAction::Off, t)
        .await
        .expect_err("bad password");
    assert!(matches!(e, FenceError::Failed { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("wrong-Secret-1"), "{e:?}");
    let log = std::fs::read_to_string(&calls).expect("power.calls");
    assert_eq!(log.lines().count(), 2, "{log:?}");

    drop(lab);
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&ns),
        "namespace {ns} left behind"
    );
}
