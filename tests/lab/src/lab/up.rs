//! `vigil-lab up`: namespaces, bridge, CA and certificates, monitors, libvirt sandboxes,
//! agents, VMs (HA), host tags, and the optional parts (shared storage, BMCs, observer).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use vigil_common::tls::{self, Role};

use super::*;
use crate::cmd::run_ok;
use crate::installed::{self, Installed, Set};
use crate::layout::{
    self, bmc_addr, bmc_name, host_addr, host_name, monitor_addr, monitor_name, now_ms, ops_addr,
    vip_addr, Lab, Program, BMC_PORT, CLUSTER, MONITOR_PORT, OPS_NAME, RAFT_PORT, VM_DISK_SIZE,
    VM_MEMORY_MIB, ZONE,
};
use crate::net;
use crate::procfs;
use crate::state::{self, Components, LabState, Node, UpParams, VmSpec};
use crate::supervisor::{self, SpawnSpec};

#[derive(Debug, Clone)]
pub struct UpOpts {
    pub hosts: u32,
    pub monitors: u32,
    pub vms_per_host: u32,
    pub ha_tag: Option<String>,
    pub tagged_hosts: Option<u32>,
    pub keep_on_failure: bool,
    /// Optional components not to start even if present: faultfs, observer, bmc.
    pub without: Vec<String>,
    /// Configure the monitor with a fence agent per host (the lab's BMCs).
    pub fencing: bool,
    /// Timeout of each host's fake watchdog (`[watchdog] timeout_secs` of its agent);
    /// with `installed`, the shipped agent.toml's instead.
    pub watchdog_secs: u32,
    /// Run what the packages ship: binaries, unit command lines and configs from this root
    /// (src/installed.rs).
    pub installed: Option<PathBuf>,
}

/// Checks the machine has what the lab needs; the packages' root when `up --installed`.
fn preflight(o: &UpOpts) -> anyhow::Result<Option<Installed>> {
    for (prog, pkg) in [
        ("ip", "iproute2"),
        ("virsh", "libvirt-clients"),
        ("libvirtd", "libvirt-daemon"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("bash", "bash"),
    ] {
        if which(prog).is_none() {
            bail!("{prog} not found (package {pkg}; run scripts/setup.sh)");
        }
    }
    layout::sandbox_script()?;
    if let Some(dir) = &o.installed {
        return Ok(Some(Installed::open(dir)?));
    }
    Program::Agent.require()?;
    Program::Monitor.require()?;
    Program::Vigilctl.require()?;
    Ok(None)
}

/// Starts the supervisor unless one answers already. Detached: see supervisor.rs for the
/// consequences on a machine whose PID 1 does not reap.
fn ensure_supervisor(lab: &Lab) -> anyhow::Result<bool> {
    if supervisor::answers(lab) {
        return Ok(false);
    }
    let exe = std::env::current_exe().context("locating vigil-lab")?;
    fs::create_dir_all(&lab.root)?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.supervisor_log())?;
    let child = Command::new(exe)
        .arg("--root")
        .arg(&lab.root)
        .arg("--prefix")
        .arg(&lab.prefix)
        .arg("supervise")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir("/")
        .spawn()
        .context("starting the lab supervisor")?;
    let pid = child.id();
    drop(child);
    let t0 = Instant::now();
    while !supervisor::answers(lab) {
        if !procfs::alive(pid as i32, None) || t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "the lab supervisor (pid {pid}) did not come up; {}:\n{}",
                lab.supervisor_log().display(),
                crate::cmd::tail_file(&lab.supervisor_log(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// Empties the lab root, keeping a running supervisor's files.
fn wipe_root(lab: &Lab, keep_supervisor: bool) -> anyhow::Result<()> {
    let mounted = procfs::mounts_under(&lab.root);
    if !mounted.is_empty() {
        bail!(
            "something is still mounted under {}: {mounted:?} (run `vigil-lab down`)",
            lab.root.display()
        );
    }
    fs::create_dir_all(&lab.root)?;
    // Never empty a directory that is not a lab root (a mistyped --root must not wipe it).
    let markers = [
        "lab.json",
        "procs.json",
        "supervisor.log",
        "supervisor.sock",
    ];
    let mut entries = fs::read_dir(&lab.root)?.peekable();
    if entries.peek().is_some() && !markers.iter().any(|m| lab.root.join(m).exists()) {
        bail!(
            "{} is not empty and holds no lab (no lab.json): refusing to empty it; choose another --root",
            lab.root.display()
        );
    }
    let keep = ["supervisor.sock", "supervisor.log", "procs.json"];
    for e in fs::read_dir(&lab.root)? {
        let e = e?;
        let name = e.file_name();
        if keep_supervisor && keep.iter().any(|k| name == *k) {
            continue;
        }
        let p = e.path();
        if e.file_type()?.is_dir() {
            fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        } else {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

fn node(lab: &Lab, name: String, index: u32, addr: std::net::Ipv4Addr) -> Node {
    Node {
        netns: lab.netns(&name),
        switch_port: format!("sw-{name}"),
        name,
        index,
        addr,
    }
}

pub fn up(lab: &Lab, o: &UpOpts) -> anyhow::Result<Report> {
    require_root()?;
    if !(1..=254).contains(&o.hosts) {
        bail!("--hosts must be 1..=254");
    }
    if !(1..=254).contains(&o.monitors) {
        bail!("--monitors must be 1..=254");
    }
    if o.vms_per_host > 50 {
        bail!("--vms-per-host must be at most 50");
    }
    // The agent accepts 1..=600 (common/src/config.rs, `watchdog.timeout_secs`).
    if !(1..=600).contains(&o.watchdog_secs) {
        bail!("--watchdog-secs must be 1..=600");
    }
    let tagged = match (&o.ha_tag, o.tagged_hosts) {
        (Some(tag), Some(j)) => {
            if j > o.hosts {
                bail!("--tagged-hosts {j} is more than --hosts {}", o.hosts);
            }
            if let Err(m) = vigil_common::names::validate("ha-tag", tag) {
                bail!("{m}");
            }
            j
        }
        (Some(_), None) => bail!("--ha-tag needs --tagged-hosts J (how many hosts carry it)"),
        (None, Some(_)) => bail!("--tagged-hosts needs --ha-tag TAG"),
        (None, None) => 0,
    };
    let inst = preflight(o)?;
    // The installed lab's hosts program the shipped watchdog timeout; their fake watchdogs
    // get it as their default too.
    let watchdog_secs = match &inst {
        Some(i) => {
            let shipped = i.shipped_config(installed::AGENT_CONFIG)?;
            match installed::shipped_int(&shipped, "watchdog.timeout_secs")? {
                Some(n) => u32::try_from(n)
                    .ok()
                    .filter(|n| (1..=600).contains(n))
                    .with_context(|| {
                        format!(
                            "the shipped {} has watchdog.timeout_secs = {n}, out of range 1..=600",
                            installed::AGENT_CONFIG
                        )
                    })?,
                None => vigil_common::config::WatchdogConfig::default().timeout_secs,
            }
        }
        None => o.watchdog_secs,
    };
    let t_start = Instant::now();

    // Leftovers of an earlier lab in this root.
    if let Some(old) = LabState::load(lab)? {
        if old.state != "down" {
            let sup_alive = supervisor::read_table_file(lab).is_some_and(|t| t.supervisor_alive());
            if old.is_up() && sup_alive {
                bail!(
                    "the lab in {} is already up (run `vigil-lab down` first)",
                    lab.root.display()
                );
            }
            eprintln!(
                "vigil-lab: cleaning up an earlier lab in {} (it was {})",
                lab.root.display(),
                old.state
            );
            down(lab)?;
        }
    }
    let sup_running = supervisor::answers(lab);
    if sup_running {
        if let Some(t) = supervisor::table(lab) {
            let busy: Vec<String> = t
                .procs
                .iter()
                .filter(|p| p.running())
                .map(|p| p.name.clone())
                .collect();
            if !busy.is_empty() || t.shutting_down {
                bail!("the lab supervisor still runs {busy:?}: run `vigil-lab down` first");
            }
        }
    }

    // The whole layout, written down before anything is created.
    let hosts: Vec<Node> = (1..=o.hosts)
        .map(|i| node(lab, host_name(i), i, host_addr(i)))
        .collect();
    let monitors: Vec<Node> = (1..=o.monitors)
        .map(|j| node(lab, monitor_name(j), j, monitor_addr(j)))
        .collect();
    let mut components = Components {
        faultfs: Program::Faultfs.find().is_some() && !o.without.iter().any(|w| w == "faultfs"),
        observer: Program::Observer.find().is_some() && !o.without.iter().any(|w| w == "observer"),
        bmc: layout::bmc_script().is_some()
            && which("ipmi_sim").is_some()
            && which("fence_ipmilan").is_some()
            && !o.without.iter().any(|w| w == "bmc"),
        watchdog: Program::Watchdog.find().is_some() && !o.without.iter().any(|w| w == "watchdog"),
    };
    if components.faultfs && which("qemu-img").is_none() {
        bail!("qemu-img not found (package qemu-utils; run scripts/setup.sh): VM disks on the shared storage need it");
    }
    if components.faultfs && which("fusermount3").is_none() && which("fusermount").is_none() {
        // fuser mounts through /dev/fuse directly as root; only note it.
    }
    let bmcs: Vec<Node> = if components.bmc {
        (1..=o.hosts)
            .map(|i| node(lab, bmc_name(i), i, bmc_addr(i)))
            .collect()
    } else {
        Vec::new()
    };
    let ops = node(lab, OPS_NAME.to_string(), 1, ops_addr());
    let switch_ns = lab.switch_ns();
    let mut namespaces = vec![switch_ns.clone()];
    namespaces.extend(
        hosts
            .iter()
            .chain(&monitors)
            .chain(&bmcs)
            .chain(std::iter::once(&ops))
            .map(|n| n.netns.clone()),
    );
    let existing: Vec<&String> = namespaces.iter().filter(|n| net::ns_exists(n)).collect();
    if !existing.is_empty() {
        bail!(
            "network namespaces {existing:?} already exist (another lab with prefix {:?} under another root? \
             run `vigil-lab --root ROOT down` for it, or choose another --prefix)",
            lab.prefix
        );
    }
    wipe_root(lab, sup_running)?;
    let started_monitors: Vec<String> = monitors.iter().map(|m| m.name.clone()).collect();
    let mut notes = Vec::new();
    for (c, on, what) in [
        (
            "faultfs",
            components.faultfs,
            "vigil-faultfs (tests/faultfs)",
        ),
        (
            "observer",
            components.observer,
            "vigil-observer (tests/observer)",
        ),
        (
            "bmc",
            components.bmc,
            "scripts/lab-bmc.sh with ipmi_sim and fence_ipmilan",
        ),
        (
            "watchdog",
            components.watchdog,
            "vigil-lab-watchdog (tests/faultfs)",
        ),
    ] {
        if !on {
            let why = if o.without.iter().any(|w| w == c) {
                "disabled with --without"
            } else {
                "not available yet"
            };
            notes.push(format!("{c}: {why}: {what} missing"));
        }
    }
    let mut st = LabState {
        version: 1,
        id: state::new_lab_id()?,
        prefix: lab.prefix.clone(),
        root: lab.root.clone(),
        state: "starting".into(),
        created_ms: now_ms(),
        updated_ms: 0,
        params: UpParams {
            hosts: o.hosts,
            monitors: o.monitors,
            vms_per_host: o.vms_per_host,
            ha_tag: o.ha_tag.clone(),
            tagged_hosts: tagged,
            watchdog_secs: if components.watchdog {
                watchdog_secs
            } else {
                0
            },
        },
        switch_ns,
        namespaces,
        hosts,
        monitors,
        bmcs,
        monitors_started: started_monitors,
        vip: Some(vip_addr()),
        ops: Some(ops),
        vms: Vec::new(),
        components: components.clone(),
        mountpoints: Vec::new(),
        up_ms: None,
        up_phases: Vec::new(),
        notes,
        installed: inst.as_ref().map(|i| i.root.clone()),
    };
    st.save(lab)?;
    ensure_supervisor(lab)?;

    let mut phases: Vec<(String, u64)> = Vec::new();
    let result = up_inner(lab, &mut st, o, &mut phases);
    st.up_phases = phases.clone();
    let elapsed = t_start.elapsed();
    match result {
        Ok(cold) => {
            st.state = "up".into();
            st.up_ms = Some(elapsed.as_millis() as u64);
            st.save(lab)?;
            let text = format!(
                "lab up in {:.1} s: {} hosts, {} monitor(s) ({} running vigil-monitor), {} VMs (QEMU capabilities cache {})",
                elapsed.as_secs_f64(),
                st.hosts.len(),
                st.monitors.len(),
                st.monitors_started.len(),
                st.vms.len(),
                if cold { "cold" } else { "warm" }
            );
            record_event(
                lab,
                &st,
                state::Event::new(
                    now_ms(),
                    "lab",
                    "up",
                    None,
                    &text,
                    json!({"elapsed_ms": elapsed.as_millis() as u64}),
                ),
            );
            components = st.components.clone();
            let mut human = String::new();
            human.push_str(&format!("{text}\n"));
            if let Some(dir) = &st.installed {
                human.push_str(&format!(
                    "  installed: binaries, unit command lines and edited configs from {}\n",
                    dir.display()
                ));
            }
            for (p, ms) in &phases {
                human.push_str(&format!("  {p:<22} {:>7.2} s\n", *ms as f64 / 1000.0));
            }
            for h in &st.hosts {
                human.push_str(&format!(
                    "  {:<6} {:<10} {:<15} {}\n",
                    h.name,
                    h.netns,
                    h.addr,
                    lab.libvirt_uri(&h.name)
                ));
            }
            for m in &st.monitors {
                human.push_str(&format!(
                    "  {:<6} {:<10} {:<15} {}\n",
                    m.name,
                    m.netns,
                    m.addr,
                    if st.monitors_started.contains(&m.name) {
                        "vigil-monitor"
                    } else {
                        "(no monitor)"
                    }
                ));
            }
            if let (Some(vip), Some(ops)) = (st.vip, &st.ops) {
                human.push_str(&format!(
                    "  {:<6} {:<10} {:<15} the operator's machine (vigil-lab ctl runs here, through the VIP {vip})\n",
                    ops.name, ops.netns, ops.addr
                ));
            }
            for b in &st.bmcs {
                human.push_str(&format!(
                    "  {:<6} {:<10} {:<15} BMC of hv{} (IPMI on udp {BMC_PORT}, fence from a monitor namespace)\n",
                    b.name, b.netns, b.addr, b.index
                ));
            }
            for n in &st.notes {
                human.push_str(&format!("  note: {n}\n"));
            }
            Ok(Report::new(
                json!({
                    "ok": true,
                    "root": lab.root,
                    "prefix": lab.prefix,
                    "id": st.id,
                    "elapsed_ms": elapsed.as_millis() as u64,
                    "caps_cache": if cold { "cold" } else { "warm" },
                    "phases": phases.iter().map(|(p, ms)| json!({"phase": p, "ms": ms})).collect::<Vec<_>>(),
                    "hosts": st.hosts.iter().map(|h| json!({
                        "name": h.name, "netns": h.netns, "addr": h.addr.to_string(),
                        "libvirt_uri": lab.libvirt_uri(&h.name),
                        "tags": if (h.index) <= tagged { o.ha_tag.clone().into_iter().collect::<Vec<_>>() } else { vec![] },
                    })).collect::<Vec<_>>(),
                    "monitors": st.monitors.iter().map(|m| json!({
                        "name": m.name, "netns": m.netns, "addr": m.addr.to_string(),
                        "running": st.monitors_started.contains(&m.name),
                    })).collect::<Vec<_>>(),
                    "vms": st.vms,
                    "components": components,
                    "notes": st.notes,
                    "installed": st.installed,
                }),
                human,
            ))
        }
        Err(e) => {
            st.state = "failed".into();
            let _ = st.save(lab);
            record_event(
                lab,
                &st,
                state::Event::new(
                    now_ms(),
                    "lab",
                    "up-failed",
                    None,
                    &format!("{e:#}"),
                    Value::Null,
                ),
            );
            if o.keep_on_failure {
                eprintln!("vigil-lab: up failed; the lab is left as it is (--keep-on-failure); run `vigil-lab down` to remove it");
            } else {
                eprintln!(
                    "vigil-lab: up failed: tearing the lab down (logs stay in {})",
                    lab.logs_dir().display()
                );
                if let Err(d) = down(lab) {
                    eprintln!("vigil-lab: down after the failed up: {d:#}");
                }
            }
            Err(e)
        }
    }
}

/// Returns whether the QEMU capabilities cache was cold.
fn up_inner(
    lab: &Lab,
    st: &mut LabState,
    o: &UpOpts,
    phases: &mut Vec<(String, u64)>,
) -> anyhow::Result<bool> {
    let inst = installed(st)?;
    let mut t = Instant::now();
    let mut phase = |name: &str, t: &mut Instant| {
        phases.push((name.to_string(), t.elapsed().as_millis() as u64));
        *t = Instant::now();
    };

    // Network.
    net::create_switch(&st.switch_ns)?;
    for n in st
        .hosts
        .iter()
        .chain(&st.monitors)
        .chain(&st.bmcs)
        .chain(&st.ops)
    {
        net::create_node(&st.switch_ns, n)?;
    }
    phase("network", &mut t);

    // Certificates and configuration files.
    let ca = lab.ca_dir();
    let tls_dir = lab.tls_dir();
    tls::init_ca(&ca, "vigil-lab")?;
    tls::issue_cert(&ca, Role::Admin, "admin", &tls_dir, &[], 825)?;
    for m in &st.monitors {
        tls::issue_cert(
            &ca,
            Role::Monitor,
            &m.name,
            &tls_dir,
            &[m.addr.to_string()],
            825,
        )?;
        match &inst {
            Some(i) => write_installed_monitor_config(lab, i, m, st, o)?,
            None => write_monitor_config(lab, m, st, o)?,
        }
    }
    for h in &st.hosts {
        tls::issue_cert(&ca, Role::Agent, &h.name, &tls_dir, &[], 825)?;
        match &inst {
            Some(i) => write_installed_agent_config(lab, i, st, h)?,
            None => write_agent_config(lab, st, h)?,
        }
        fs::create_dir_all(lab.host_dir(&h.name).join("vms"))?;
        set_power(lab, &h.name, true);
    }
    if let Some(i) = &inst {
        check_installed_configs(lab, i, st)?;
    }
    phase("certificates+configs", &mut t);

    // Shared storage first: the hosts' mount namespaces are copies taken when they start.
    if st.components.faultfs {
        start_faultfs(lab, st)?;
        st.save(lab)?;
        phase("storage (faultfs)", &mut t);
    }

    // The hosts' watchdogs: mounted before any agent starts (each agent's mount namespace is
    // a copy taken when `ip netns exec` starts it).
    if st.components.watchdog {
        start_watchdogs(lab, st)?;
        st.save(lab)?;
        phase("watchdogs", &mut t);
    }

    // Monitors: the first creates the cluster with every monitor as a voter, the others
    // start empty and are filled by its replication.
    for (k, name) in st.monitors_started.clone().iter().enumerate() {
        let m = st.monitor(name)?.clone();
        fs::create_dir_all(lab.monitor_dir(&m.name).join("data"))?;
        let start = if k == 0 {
            MonitorStart::Init
        } else {
            MonitorStart::Join
        };
        supervisor::spawn(lab, monitor_spec(lab, st, &m, start)?)?;
    }

    // Libvirt sandboxes: with a cold capabilities cache the first one probes QEMU (~20 s) and
    // fills the cache; the others then start warm instead of probing in parallel on 2 cores.
    let cold = caps_cache_cold();
    let hosts = st.hosts.clone();
    let first = if cold { 1 } else { 0 };
    for h in &hosts[..first] {
        start_sandbox(lab, st, h)?;
        wait_sandbox(lab, h, sandbox_timeout())?;
    }
    for h in &hosts[first..] {
        start_sandbox(lab, st, h)?;
    }
    for h in &hosts[first..] {
        wait_sandbox(lab, h, sandbox_timeout())?;
    }
    phase(
        if cold {
            "libvirt (cold cache)"
        } else {
            "libvirt"
        },
        &mut t,
    );

    for h in &hosts {
        start_agent_process(lab, st, h)?;
    }
    if st.components.bmc {
        start_bmcs(lab, st)?;
    }
    if st.components.observer {
        start_observer(lab, st)?;
    }
    wait_monitor_answers(lab, st, Duration::from_secs(30))?;
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    wait_liveness(lab, st, &names, "up", Duration::from_secs(60))?;
    phase("agents up", &mut t);

    // VMs: hosts in parallel, each host's VMs one after the other.
    let script = layout::sandbox_script()?;
    let mut vms = Vec::new();
    for h in &hosts {
        for k in 1..=o.vms_per_host {
            vms.push(VmSpec {
                name: format!("{}-vm{k}", h.name),
                host: h.name.clone(),
            });
        }
    }
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                let mine: Vec<&VmSpec> = vms.iter().filter(|v| v.host == h.name).collect();
                let script = &script;
                let disks = st.components.faultfs;
                s.spawn(move || -> anyhow::Result<()> {
                    for vm in mine {
                        define_and_start_vm(lab, script, &h.name, &vm.name, disks)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("VM start thread panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    st.vms = vms.clone();
    st.save(lab)?;
    phase("vms started", &mut t);

    // HA: the monitor must know each VM (from the agents' inventories) before it can mark it.
    if !vms.is_empty() {
        wait_vms_running(lab, st, &vms, Duration::from_secs(60))?;
        for vm in &vms {
            ctl_ok(lab, st, &["vm", "ha", "enable", &vm.name])?;
        }
    }
    if let Some(tag) = &o.ha_tag {
        for h in hosts.iter().take(st.params.tagged_hosts as usize) {
            ctl_ok(lab, st, &["host", "tag", "add", &h.name, tag])?;
        }
    }
    phase("ha+tags", &mut t);
    Ok(cold)
}

fn write_monitor_config(lab: &Lab, m: &Node, st: &LabState, o: &UpOpts) -> anyhow::Result<()> {
    let dir = lab.monitor_dir(&m.name);
    fs::create_dir_all(&dir)?;
    let tls_dir = lab.tls_dir();
    let text = format!(
        "# written by vigil-lab up\nnode_id = {id}\ndata_dir = \"{data}\"\n# every address of the namespace, so that the VIP answers too; the own address is what\n# followers name when they redirect\nlisten = \"0.0.0.0:{port}\"\nadvertise = \"{addr}:{port}\"\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[detector]\nheartbeat_interval_ms = 200\nsuspect_after_ms = 500\ndown_after_ms = 1000\n",
        id = m.index,
        data = dir.join("data").display(),
        addr = m.addr,
        port = MONITOR_PORT,
        ca = tls_dir.join("ca.crt").display(),
        cert = tls_dir.join(format!("{}.crt", m.name)).display(),
        key = tls_dir.join(format!("{}.key", m.name)).display(),
    );
    let mut text = text;
    // Raft between the monitors (a one-monitor lab is a cluster of one, on the same port).
    text.push_str(&format!("\n[raft]\nlisten = \"{}:{RAFT_PORT}\"\n", m.addr));
    if m.index == 1 {
        // Read by `--init` only: the cluster starts with every monitor as a voter.
        for p in st.monitors.iter().filter(|p| p.name != m.name) {
            text.push_str(&format!(
                "[[raft.peers]]\nid = {}\naddr = \"{}:{RAFT_PORT}\"\n",
                p.index, p.addr
            ));
        }
    }
    if let Some(vip) = st.vip {
        // The VIP on the lab bridge: every machine of the lab reaches it.
        text.push_str(&format!(
            "\n[vip]\naddress = \"{vip}\"\nprefix = 32\ninterface = \"{}\"\n",
            net::NODE_IF
        ));
    }
    if let Some(tag) = &o.ha_tag {
        text.push_str(&format!("\n[recovery]\nha_tag = \"{tag}\"\n"));
    }
    if o.fencing {
        // fence_ipmilan runs in the monitor's own namespace, which reaches every BMC on the
        // lab bridge; power_wait=0: ipmi_sim powers off at once (the agent still reads the
        // state back before it exits 0).
        text.push_str("\n[fencing]\ntimeout_ms = 15000\n");
        for h in &st.hosts {
            text.push_str(&format!(
                "\n[[fencing.hosts]]\nhost = \"{name}\"\nagent = \"fence_ipmilan\"\n[fencing.hosts.options]\nip = \"{ip}\"\nipport = \"{BMC_PORT}\"\nusername = \"admin\"\npassword = \"vigil\"\nlanplus = \"1\"\ncipher = \"3\"\npower_wait = \"0\"\n",
                name = h.name,
                ip = crate::layout::bmc_addr(h.index),
            ));
        }
    }
    if st.components.faultfs {
        // The leader's record and the fence slots go straight to the backing directory: the
        // monitor is not a hypervisor, and storage faults are injected per host.
        text.push_str(&format!(
            "\n[storage]\ninterval_ms = 250\ndeadline_ms = 1000\n[[storage.pools]]\nname = \"{POOL}\"\npath = \"{}\"\n",
            lab.storage_backing().display()
        ));
    }
    fs::write(dir.join("monitor.toml"), text)?;
    Ok(())
}

/// The name of the lab's shared primary storage pool.
pub const POOL: &str = "primary";

fn write_agent_config(lab: &Lab, st: &LabState, h: &Node) -> anyhow::Result<()> {
    let dir = lab.host_dir(&h.name);
    fs::create_dir_all(dir.join("agent-state"))?;
    let tls_dir = lab.tls_dir();
    let monitors: Vec<String> = st
        .client_endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let text = format!(
        "# written by vigil-lab up\nhost = \"{name}\"\nzone = \"{ZONE}\"\ncluster = \"{CLUSTER}\"\nmonitors = [{mons}]\nreconnect_ms = 200\nlibvirt_uri = \"{uri}\"\npoll_interval_ms = 1000\nstate_dir = \"{state}\"\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        name = h.name,
        mons = monitors.join(", "),
        uri = lab.libvirt_uri(&h.name),
        state = dir.join("agent-state").display(),
        ca = tls_dir.join("ca.crt").display(),
        cert = tls_dir.join(format!("{}.crt", h.name)).display(),
        key = tls_dir.join(format!("{}.key", h.name)).display(),
    );
    let mut text = text;
    if st.components.watchdog {
        // The host's own fake watchdog; its expiry is that host's power loss (crash-host).
        text.push_str(&format!(
            "\n[watchdog]\ndevice = \"{}\"\ntimeout_secs = {}\n",
            lab.host_watchdog_device(&h.name).display(),
            st.params.watchdog_secs
        ));
    }
    if st.components.faultfs {
        // Each host reaches the pool through its own faultfs view (faults are per host).
        text.push_str(&format!(
            "\n[storage]\ninterval_ms = 250\ndeadline_ms = 1000\n[[storage.pools]]\nname = \"{POOL}\"\npath = \"{}\"\n",
            lab.host_storage_mount(&h.name).display()
        ));
    }
    fs::write(dir.join("agent.toml"), text)?;
    Ok(())
}

/// `up --installed`: the shipped monitor.toml with only [`installed::MONITOR_KEYS`] set
/// (the same values [`write_monitor_config`] gives, without its faster detector, fencing
/// timeout and storage cycle: those stay as shipped).
fn write_installed_monitor_config(
    lab: &Lab,
    i: &Installed,
    m: &Node,
    st: &LabState,
    o: &UpOpts,
) -> anyhow::Result<()> {
    let dir = lab.monitor_dir(&m.name);
    fs::create_dir_all(dir.join("data"))?;
    let tls_dir = lab.tls_dir();
    let p = |f: &Path| path_str(f);
    let mut sets = vec![
        ("node_id", Set::int(i64::from(m.index))),
        ("data_dir", Set::str(p(&dir.join("data")))),
        ("advertise", Set::str(format!("{}:{MONITOR_PORT}", m.addr))),
        ("tls.ca", Set::str(p(&tls_dir.join("ca.crt")))),
        (
            "tls.cert",
            Set::str(p(&tls_dir.join(format!("{}.crt", m.name)))),
        ),
        (
            "tls.key",
            Set::str(p(&tls_dir.join(format!("{}.key", m.name)))),
        ),
        ("raft.listen", Set::str(format!("{}:{RAFT_PORT}", m.addr))),
    ];
    let peers: Vec<toml_edit::Table> = st
        .monitors
        .iter()
        .filter(|q| m.index == 1 && q.name != m.name)
        .map(|q| {
            installed::table(&[
                ("id", i64::from(q.index).into()),
                ("addr", format!("{}:{RAFT_PORT}", q.addr).into()),
            ])
        })
        .collect();
    if !peers.is_empty() {
        sets.push(("raft.peers", Set::Tables(peers)));
    }
    if let Some(vip) = st.vip {
        sets.push(("vip.address", Set::str(vip.to_string())));
        sets.push(("vip.interface", Set::str(net::NODE_IF)));
    }
    if let Some(tag) = &o.ha_tag {
        sets.push(("recovery.ha_tag", Set::str(tag.clone())));
    }
    if o.fencing {
        let hosts = st
            .hosts
            .iter()
            .map(|h| {
                let mut t = installed::table(&[
                    ("host", h.name.clone().into()),
                    ("agent", "fence_ipmilan".into()),
                ]);
                let mut opts = installed::table(&[
                    ("ip", crate::layout::bmc_addr(h.index).to_string().into()),
                    ("ipport", BMC_PORT.to_string().into()),
                    ("username", "admin".into()),
                    ("password", "vigil".into()),
                    ("lanplus", "1".into()),
                    // ipmi_sim answers no "Get Channel Cipher Suites" (lab-notes.md) and
                    // powers off at once: properties of the lab's BMCs, set per entry.
                    ("cipher", "3".into()),
                    ("power_wait", "0".into()),
                ]);
                opts.set_implicit(false);
                t.insert("options", toml_edit::Item::Table(opts));
                t
            })
            .collect();
        sets.push(("fencing.hosts", Set::Tables(hosts)));
    }
    if st.components.faultfs {
        sets.push((
            "storage.pools",
            Set::Tables(vec![installed::table(&[
                ("name", POOL.into()),
                ("path", p(&lab.storage_backing()).into()),
            ])]),
        ));
    }
    let shipped = i.shipped_config(installed::MONITOR_CONFIG)?;
    let text = installed::edit_config(
        installed::MONITOR_CONFIG,
        &shipped,
        installed::MONITOR_KEYS,
        sets,
    )?;
    fs::write(dir.join("monitor.toml"), text)?;
    Ok(())
}

/// `up --installed`: the shipped agent.toml with only [`installed::AGENT_KEYS`] set.
fn write_installed_agent_config(
    lab: &Lab,
    i: &Installed,
    st: &LabState,
    h: &Node,
) -> anyhow::Result<()> {
    let dir = lab.host_dir(&h.name);
    fs::create_dir_all(dir.join("agent-state"))?;
    let tls_dir = lab.tls_dir();
    let p = |f: &Path| path_str(f);
    let mut sets = vec![
        ("monitors", Set::strs(&st.client_endpoints())),
        ("libvirt_uri", Set::str(lab.libvirt_uri(&h.name))),
        ("state_dir", Set::str(p(&dir.join("agent-state")))),
        ("tls.ca", Set::str(p(&tls_dir.join("ca.crt")))),
        (
            "tls.cert",
            Set::str(p(&tls_dir.join(format!("{}.crt", h.name)))),
        ),
        (
            "tls.key",
            Set::str(p(&tls_dir.join(format!("{}.key", h.name)))),
        ),
        (
            "watchdog.device",
            if st.components.watchdog {
                Set::str(p(&lab.host_watchdog_device(&h.name)))
            } else {
                Set::Remove
            },
        ),
    ];
    if st.components.faultfs {
        sets.push((
            "storage.pools",
            Set::Tables(vec![installed::table(&[
                ("name", POOL.into()),
                ("path", p(&lab.host_storage_mount(&h.name)).into()),
            ])]),
        ));
    }
    let shipped = i.shipped_config(installed::AGENT_CONFIG)?;
    let text = installed::edit_config(
        installed::AGENT_CONFIG,
        &shipped,
        installed::AGENT_KEYS,
        sets,
    )?;
    fs::write(dir.join("agent.toml"), text)?;
    Ok(())
}

/// What the shipped files tell an operator to run after editing: `vigil-monitor --check`
/// and `vigil-agent --check` (the agent's reads its certificate too), with the installed
/// binaries, on every file the lab wrote.
fn check_installed_configs(lab: &Lab, i: &Installed, st: &LabState) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for m in &st.monitors {
        runs.push((Program::Monitor, monitor_config_path(lab, m)));
    }
    for h in &st.hosts {
        runs.push((Program::Agent, agent_config_path(lab, h)));
    }
    for (prog, file) in runs {
        let argv = [
            path_str(&i.bin(prog)?),
            "--check".into(),
            "--config".into(),
            path_str(&file),
        ];
        let out = crate::cmd::run(&argv, Duration::from_secs(20))?;
        if !out.ok() {
            bail!(
                "{} rejects the lab's edit of the shipped config ({}): {}{}",
                argv.join(" "),
                out.status,
                out.stdout,
                out.stderr
            );
        }
    }
    Ok(())
}

/// Defines and starts a VM; with `disk`, on a new qcow2 on the shared storage (created in the
/// backing directory, used by QEMU through the host's faultfs view at the common path).
fn define_and_start_vm(
    lab: &Lab,
    script: &Path,
    host: &str,
    vm: &str,
    disk: bool,
) -> anyhow::Result<()> {
    let mut argv = vec![
        "bash".to_string(),
        path_str(script),
        "domain-xml".into(),
        vm.into(),
        VM_MEMORY_MIB.to_string(),
    ];
    if disk {
        let image = lab.vm_disk_backing(vm);
        let _ = fs::remove_file(&image);
        run_ok(
            &[
                "qemu-img".to_string(),
                "create".into(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                path_str(&image),
                VM_DISK_SIZE.into(),
            ],
            Duration::from_secs(30),
        )
        .with_context(|| format!("creating the disk of {vm}"))?;
        argv.push(path_str(&lab.vm_disk_shared(vm)));
    }
    let xml = run_ok(&argv, Duration::from_secs(10))?;
    let file = lab.host_dir(host).join("vms").join(format!("{vm}.xml"));
    fs::write(&file, xml)?;
    let uri = lab.libvirt_uri(host);
    run_ok(
        &["virsh", "-q", "-c", &uri, "define", &path_str(&file)],
        Duration::from_secs(30),
    )
    .with_context(|| format!("defining {vm} on {host}"))?;
    run_ok(
        &["virsh", "-q", "-c", &uri, "start", vm],
        Duration::from_secs(120),
    )
    .with_context(|| format!("starting {vm} on {host}"))?;
    Ok(())
}

fn wait_vms_running(
    lab: &Lab,
    st: &LabState,
    vms: &[VmSpec],
    timeout: Duration,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut last;
    loop {
        match ctl_json(lab, st, &["vm", "list"]) {
            Ok(v) => {
                let list = v.as_array().cloned().unwrap_or_default();
                let missing: Vec<&str> = vms
                    .iter()
                    .filter(|vm| {
                        !list.iter().any(|x| {
                            x["name"].as_str() == Some(&vm.name)
                                && x["state"].as_str() == Some("running")
                        })
                    })
                    .map(|vm| vm.name.as_str())
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                last = format!("not running yet: {missing:?}");
            }
            Err(e) => last = format!("{e:#}"),
        }
        if t0.elapsed() >= timeout {
            bail!("the monitor does not see every VM running after {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_faultfs(lab: &Lab, st: &mut LabState) -> anyhow::Result<()> {
    let bin = Program::Faultfs.require()?;
    let backing = lab.storage_backing();
    fs::create_dir_all(&backing)?;
    // The common mount point: stays empty here; each sandbox binds its host's view on it.
    fs::create_dir_all(lab.storage_shared())?;
    for h in st.hosts.clone() {
        let mp = lab.host_storage_mount(&h.name);
        fs::create_dir_all(&mp)?;
        st.mountpoints.push(mp.clone());
        let name = proc_name(&h.name, "faultfs");
        supervisor::spawn(
            lab,
            SpawnSpec {
                log: lab.log_file(&name),
                name,
                group: h.name.clone(),
                role: "faultfs".into(),
                argv: vec![
                    path_str(&bin),
                    "mount".into(),
                    "--backing".into(),
                    path_str(&backing),
                    "--mountpoint".into(),
                    path_str(&mp),
                    "--control".into(),
                    path_str(&lab.host_faultfs_socket(&h.name)),
                    "--name".into(),
                    h.name.clone(),
                ],
                netns: None,
                env: lab_env(st),
                stop_order: ORDER_FAULTFS,
            },
        )?;
    }
    st.save(lab)?;
    let t0 = Instant::now();
    for mp in &st.mountpoints {
        while !procfs::mounts_under(mp).contains(mp) {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("vigil-faultfs did not mount {} within 20 s", mp.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// One `vigil-lab-watchdog serve` per host, in the root namespaces (its FUSE mount must be in
/// every copy of the mount namespace, and `crash-host`, which kills everything in the host's
/// network namespace, must not kill it); its expiry runs `vigil-lab crash-host H --source
/// watchdog` and records `watchdog-reset` in the timeline (and a mark in the observer's).
fn start_watchdogs(lab: &Lab, st: &mut LabState) -> anyhow::Result<()> {
    let bin = Program::Watchdog.require()?;
    let exe = std::env::current_exe().context("locating vigil-lab")?;
    for h in st.hosts.clone() {
        let mp = lab.host_watchdog_dir(&h.name);
        fs::create_dir_all(&mp)?;
        st.mountpoints.push(mp.clone());
        let name = proc_name(&h.name, "watchdog");
        let mut argv = vec![
            path_str(&bin),
            "serve".into(),
            "--mountpoint".into(),
            path_str(&mp),
            "--control".into(),
            path_str(&lab.host_watchdog_socket(&h.name)),
            "--name".into(),
            h.name.clone(),
            "--timeout-secs".into(),
            st.params.watchdog_secs.to_string(),
            "--timeline".into(),
            path_str(&lab.timeline()),
        ];
        if st.components.observer {
            if let Some(d) = lab.observer_timeline().parent() {
                fs::create_dir_all(d)?;
            }
            argv.push("--mark".into());
            argv.push(path_str(&lab.observer_timeline()));
        }
        argv.extend([
            "--".into(),
            path_str(&exe),
            "--root".into(),
            path_str(&lab.root),
            "--prefix".into(),
            lab.prefix.clone(),
            "crash-host".into(),
            h.name.clone(),
            "--source".into(),
            "watchdog".into(),
        ]);
        supervisor::spawn(
            lab,
            SpawnSpec {
                log: lab.log_file(&name),
                name,
                group: h.name.clone(),
                role: "watchdog".into(),
                argv,
                netns: None,
                env: lab_env(st),
                stop_order: ORDER_WATCHDOG,
            },
        )?;
    }
    st.save(lab)?;
    let t0 = Instant::now();
    for h in &st.hosts {
        let mp = lab.host_watchdog_dir(&h.name);
        loop {
            let mounted = procfs::mounts_under(&mp).contains(&mp);
            if mounted && watchdog_ctl(lab, &h.name, "status").is_ok() {
                break;
            }
            let name = proc_name(&h.name, "watchdog");
            if let Some(e) = supervisor::table(lab).and_then(|t| t.get(&name).cloned()) {
                if !e.running() {
                    bail!(
                        "the watchdog of {} exited during start-up; {}:\n{}",
                        h.name,
                        e.log.display(),
                        crate::cmd::tail_file(&e.log, 20)
                    );
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("the watchdog of {} was not ready within 20 s", h.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn start_bmcs(lab: &Lab, st: &LabState) -> anyhow::Result<()> {
    let script = layout::bmc_script().context("scripts/lab-bmc.sh missing")?;
    let exe = std::env::current_exe()?;
    for (h, b) in st.hosts.iter().zip(&st.bmcs) {
        let dir = lab.bmc_dir(&h.name);
        fs::create_dir_all(&dir)?;
        let power = lab.host_dir(&h.name).join("power.sh");
        fs::write(
            &power,
            format!(
                "#!/bin/sh\n# The BMC's power control of lab host {host}: status | off | on.\nexec '{exe}' --root '{root}' --prefix '{prefix}' power-hook {host} \"$@\"\n",
                host = h.name,
                exe = exe.display(),
                root = lab.root.display(),
                prefix = lab.prefix,
            ),
        )?;
        fs::set_permissions(&power, fs::Permissions::from_mode(0o755))?;
        let _ = fs::remove_file(dir.join("ready"));
        let name = proc_name(&h.name, "bmc");
        supervisor::spawn(
            lab,
            SpawnSpec {
                log: lab.log_file(&name),
                name,
                group: h.name.clone(),
                role: "bmc".into(),
                argv: vec![
                    "bash".into(),
                    path_str(&script),
                    "run".into(),
                    path_str(&dir),
                    "--name".into(),
                    h.name.clone(),
                    "--addr".into(),
                    b.addr.to_string(),
                    "--port".into(),
                    BMC_PORT.to_string(),
                    "--power-script".into(),
                    path_str(&power),
                ],
                netns: Some(b.netns.clone()),
                env: lab_env(st),
                stop_order: ORDER_BMC,
            },
        )?;
    }
    let t0 = Instant::now();
    for h in &st.hosts {
        let ready = lab.bmc_dir(&h.name).join("ready");
        while !ready.is_file() {
            let name = proc_name(&h.name, "bmc");
            if let Some(e) = supervisor::table(lab).and_then(|t| t.get(&name).cloned()) {
                if !e.running() {
                    bail!(
                        "the BMC of {} exited during start-up; {}:\n{}",
                        h.name,
                        e.log.display(),
                        crate::cmd::tail_file(&e.log, 20)
                    );
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the BMC of {} was not ready within 30 s", h.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn start_observer(lab: &Lab, st: &LabState) -> anyhow::Result<()> {
    let bin = Program::Observer.require()?;
    let out = lab.observer_timeline();
    if let Some(d) = out.parent() {
        fs::create_dir_all(d)?;
    }
    let mut argv = vec![
        path_str(&bin),
        "watch".into(),
        "--out".into(),
        path_str(&out),
    ];
    for h in &st.hosts {
        argv.push("--host".into());
        argv.push(format!(
            "{}={},{}",
            h.name,
            lab.libvirt_uri(&h.name),
            lab.qemu_pid_dir(&h.name).display()
        ));
    }
    let name = "lab/observer".to_string();
    supervisor::spawn(
        lab,
        SpawnSpec {
            log: lab.log_file(&name),
            name,
            group: "lab".into(),
            role: "observer".into(),
            argv,
            netns: None,
            env: lab_env(st),
            stop_order: ORDER_OBSERVER,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_state(lab: &Lab, watchdog: bool) -> LabState {
        LabState {
            root: lab.root.clone(),
            prefix: lab.prefix.clone(),
            params: UpParams {
                hosts: 1,
                monitors: 1,
                watchdog_secs: if watchdog { 2 } else { 0 },
                ..UpParams::default()
            },
            hosts: vec![node(lab, host_name(1), 1, host_addr(1))],
            monitors: vec![node(lab, monitor_name(1), 1, monitor_addr(1))],
            monitors_started: vec![monitor_name(1)],
            components: Components {
                watchdog,
                ..Components::default()
            },
            ..LabState::default()
        }
    }

    #[test]
    fn the_agent_config_names_the_hosts_own_watchdog_and_the_lab_timeout() {
        let root = std::env::temp_dir().join(format!("vigil-lab-unit-{}", std::process::id()));
        let lab = Lab::new(root.clone(), "vu".into()).expect("lab");
        for watchdog in [true, false] {
            let st = lab_state(&lab, watchdog);
            write_agent_config(&lab, &st, &st.hosts[0]).expect("write agent.toml");
            let path = lab.host_dir("hv1").join("agent.toml");
            let cfg = vigil_common::config::AgentConfig::load(&path).expect("the agent accepts it");
            if watchdog {
                assert_eq!(
                    cfg.watchdog.device.as_deref(),
                    Some(lab.host_watchdog_device("hv1").as_path())
                );
                assert_eq!(cfg.watchdog.timeout_secs, 2);
            } else {
                assert_eq!(cfg.watchdog.device, None, "--without watchdog: no device");
            }
        }
        let _ = fs::remove_dir_all(&root);
    }
}
