//! The fault verbs. Each records itself in the lab's timeline with the Unix-ms time at which
//! the fault took effect.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::cmd::{run, run_ok};
use crate::lab::{
    host_pids, installed, load_up, monitor_config_path, monitor_spec, path_str, power_is_on,
    proc_name, qemu_pids, record_event, sandbox_timeout, set_power, start_agent_process,
    start_sandbox, wait_monitor_answers, wait_sandbox, watchdog_ctl, MonitorStart, Report,
};
use crate::layout::{self, now_ms, Lab, Program};
use crate::net;
use crate::procfs;
use crate::state::{LabState, Node};
use crate::supervisor;

fn fault(
    lab: &Lab,
    st: &LabState,
    ts: u64,
    verb: &str,
    target: &str,
    text: String,
    detail: Value,
) -> Report {
    let ev = record_event(
        lab,
        st,
        crate::state::Event::new(ts, "fault", verb, Some(target), &text, detail),
    );
    Report::new(
        json!({"ok": true, "event": ev}),
        format!("{ts} {verb} {target}: {text}"),
    )
}

/// `crash-host H`: SIGKILL to every process of the host at once (agent, libvirtd, virtlogd, the
/// sandbox's keeper and script, every QEMU): a power loss.
pub fn crash_host(lab: &Lab, host: &str, source: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let h = st.host(host)?.clone();
    let ino = procfs::netns_inode(&h.netns)
        .with_context(|| format!("the namespace {} of {host} is missing", h.netns))?;
    let pids = host_pids(lab, &st, &h);
    if pids.is_empty() {
        bail!("{host} has no running process (crashed already? `vigil-lab power-on {host}`)");
    }
    let qemu: Vec<(String, i32)> = qemu_pids(lab, host)
        .into_iter()
        .filter(|(_, p)| pids.contains(p))
        .collect();
    // A QEMU whose I/O request the host's faultfs holds ("hang") cannot die of SIGKILL until
    // the request is answered: such a host's view goes to "eio" right after the kill (nothing
    // of the host is alive to see it) and back to "hang" once the host is gone.
    let hung = st.components.faultfs && storage_mode(lab, host).as_deref() == Some("hang");
    // A machine without power has no running watchdog either: it must not "reset" the host
    // again later (first, so that it cannot fire between the kill and this).
    let watchdog = if st.components.watchdog {
        match watchdog_ctl(lab, host, "off") {
            Ok(_) => "off",
            Err(e) => {
                eprintln!("vigil-lab: warning: switching {host}'s watchdog off: {e:#}");
                "did not answer"
            }
        }
    } else {
        "none"
    };
    let ts = now_ms();
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    set_power(lab, host, false);
    if let Err(e) = crate::net::set_nic(&h, false) {
        eprintln!("vigil-lab: warning: taking {host}'s NIC down: {e:#}");
    }
    if hung {
        if let Err(e) = set_storage_mode(lab, host, "eio") {
            eprintln!("vigil-lab: warning: releasing {host}'s hung storage: {e:#}");
        }
    }
    let released = hung;
    // Until nothing of the host is left alive (the supervisor reaps them).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: BTreeSet<i32> = procfs::pids_in_netns(ino)
            .into_iter()
            .chain(pids.iter().copied().filter(|p| procfs::alive(*p, None)))
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            if released {
                let _ = set_storage_mode(lab, host, "hang");
            }
            bail!("processes of {host} survived SIGKILL: {left:?}");
        }
        for p in &left {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if released {
        set_storage_mode(lab, host, "hang")
            .with_context(|| format!("restoring {host}'s storage fault (hang)"))?;
    }
    forget_sandbox_namespace(lab, host);
    Ok(fault(
        lab,
        &st,
        ts,
        "crash-host",
        host,
        format!(
            "power loss: SIGKILL to {} process(es) at once, {} QEMU ({})",
            pids.len(),
            qemu.len(),
            qemu.iter()
                .map(|(d, p)| format!("{d}={p}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        json!({"pids": pids, "qemu": qemu, "source": source, "watchdog": watchdog}),
    ))
}

/// The mode (`ok`, `eio`, `hang`) of a host's faultfs instance, if it answers.
fn storage_mode(lab: &Lab, host: &str) -> Option<String> {
    let bin = Program::Faultfs.find()?;
    let o = run(
        &[
            bin.to_string_lossy().into_owned(),
            "ctl".into(),
            "--control".into(),
            lab.host_faultfs_socket(host).to_string_lossy().into_owned(),
            "status".into(),
        ],
        Duration::from_secs(5),
    )
    .ok()?;
    if !o.ok() {
        return None;
    }
    o.stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mode="))
        .map(String::from)
}

/// Switches a host's faultfs instance to `mode`.
fn set_storage_mode(lab: &Lab, host: &str, mode: &str) -> anyhow::Result<()> {
    let bin = Program::Faultfs.require()?;
    let o = run(
        &[
            bin.to_string_lossy().into_owned(),
            "ctl".into(),
            "--control".into(),
            lab.host_faultfs_socket(host).to_string_lossy().into_owned(),
            mode.into(),
        ],
        Duration::from_secs(10),
    )?;
    if !o.ok() {
        bail!(
            "vigil-faultfs ctl {mode} for {host} failed: {}{}",
            o.stdout.trim(),
            o.stderr.trim()
        );
    }
    Ok(())
}

/// A power loss wipes /run; here it must at least wipe the sandbox's record of its mount
/// namespace (DIR/mntns) and daemons (DIR/pids). Otherwise the next `libvirt-sandbox.sh run`
/// may refuse to start: namespace inode numbers are reused at once, so the next new mount
/// namespace (often that of `ip netns exec` starting the sandbox itself) can carry the dead
/// sandbox's number and look like "a sandbox is already running".
fn forget_sandbox_namespace(lab: &Lab, host: &str) {
    let d = lab.libvirt_dir(host);
    for f in ["mntns", "pids"] {
        let _ = std::fs::remove_file(d.join(f));
    }
}

/// `power-on H`: after a crash, the host's libvirt sandbox and agent start again, empty.
pub fn power_on(lab: &Lab, host: &str, source: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let h = st.host(host)?.clone();
    let live = host_pids(lab, &st, &h);
    if !live.is_empty() {
        bail!(
            "{host} is running ({} process(es) in {}): crash it first",
            live.len(),
            h.netns
        );
    }
    let t0 = Instant::now();
    let ts = now_ms();
    crate::net::set_nic(&h, true).with_context(|| format!("bringing {host}'s NIC up"))?;
    if st.components.watchdog {
        // A fresh boot: the watchdog disarmed, back to its default timeout, for the new agent.
        watchdog_ctl(lab, host, "reset")
            .with_context(|| format!("resetting {host}'s watchdog for the power-on"))?;
    }
    forget_sandbox_namespace(lab, host);
    start_sandbox(lab, &st, &h)?;
    wait_sandbox(lab, &h, sandbox_timeout())?;
    start_agent_process(lab, &st, &h)?;
    set_power(lab, host, true);
    Ok(fault(
        lab,
        &st,
        ts,
        "power-on",
        host,
        format!(
            "powered on: libvirt and agent started in {} ms, no domain running",
            t0.elapsed().as_millis()
        ),
        json!({"source": source, "start_ms": t0.elapsed().as_millis() as u64}),
    ))
}

fn running_entry(lab: &Lab, name: &str) -> anyhow::Result<supervisor::ProcEntry> {
    let t = supervisor::table(lab).context("the lab has no process table")?;
    match t.get(name) {
        Some(e) if e.alive() => Ok(e.clone()),
        Some(_) => bail!("{name} is not running"),
        None => bail!("no process {name}"),
    }
}

/// SIGKILL to one lab process, then wait until the supervisor reaped it.
fn kill_proc(lab: &Lab, name: &str) -> anyhow::Result<(u64, supervisor::ProcEntry)> {
    let e = running_entry(lab, name)?;
    let ts = now_ms();
    kill(Pid::from_raw(e.pid), Signal::SIGKILL).with_context(|| format!("kill {}", e.pid))?;
    supervisor::wait_exit(lab, name, Duration::from_secs(10))?;
    Ok((ts, e))
}

pub fn kill_agent(lab: &Lab, host: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    st.host(host)?;
    let (ts, e) = kill_proc(lab, &proc_name(host, "agent"))?;
    Ok(fault(
        lab,
        &st,
        ts,
        "kill-agent",
        host,
        format!("SIGKILL to the agent (pid {}); its VMs keep running", e.pid),
        json!({"pid": e.pid}),
    ))
}

/// `stop-agent H`: SIGTERM to the agent, as `systemctl stop vigil-agent` does (its VMs keep
/// running; the agent disarms the host watchdog only if none of them is HA).
pub fn stop_agent(lab: &Lab, host: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    st.host(host)?;
    let name = proc_name(host, "agent");
    let e = running_entry(lab, &name)?;
    let ts = now_ms();
    kill(Pid::from_raw(e.pid), Signal::SIGTERM).with_context(|| format!("kill -TERM {}", e.pid))?;
    supervisor::wait_exit(lab, &name, Duration::from_secs(15))?;
    Ok(fault(
        lab,
        &st,
        ts,
        "stop-agent",
        host,
        format!(
            "SIGTERM to the agent (pid {}), as systemctl stop; it exited",
            e.pid
        ),
        json!({"pid": e.pid}),
    ))
}

pub fn start_agent(lab: &Lab, host: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let h = st.host(host)?.clone();
    if !power_is_on(lab, host) {
        bail!("{host} is powered off: use `vigil-lab power-on {host}`");
    }
    let ts = now_ms();
    let e = start_agent_process(lab, &st, &h)?;
    Ok(fault(
        lab,
        &st,
        ts,
        "start-agent",
        host,
        format!("agent started (pid {})", e.pid),
        json!({"pid": e.pid}),
    ))
}

fn started_monitor(st: &LabState, mon: &str) -> anyhow::Result<Node> {
    let m = st.monitor(mon)?.clone();
    if !st.monitors_started.contains(&m.name) {
        bail!("{mon} runs no vigil-monitor in this lab");
    }
    Ok(m)
}

/// `kill-monitor M`: SIGKILL to vigil-monitor, then what the packaged unit's
/// `ExecStopPost=vigil-monitor --drop-vip` does after any exit (a SIGKILLed process cannot
/// remove the VIP itself, and its kernel would go on answering ARP for it).
pub fn kill_monitor(lab: &Lab, mon: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let m = started_monitor(&st, mon)?;
    let (ts, e) = kill_proc(lab, &proc_name(mon, "monitor"))?;
    let config = monitor_config_path(lab, &m);
    let mut argv = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        m.netns.clone(),
    ];
    match installed(&st)? {
        // `up --installed`: the unit's own ExecStopPost= line.
        Some(i) => argv.extend(i.command(
            crate::installed::MONITOR_UNIT,
            "ExecStopPost",
            crate::installed::MONITOR_CONFIG,
            &config,
        )?),
        None => argv.extend([
            path_str(&Program::Monitor.require()?),
            "--config".into(),
            path_str(&config),
            "--drop-vip".into(),
        ]),
    }
    let dropped = match run_ok(&argv, Duration::from_secs(10)) {
        Ok(_) => "ExecStopPost's --drop-vip removed the VIP if it held it".to_string(),
        Err(e) => format!("ExecStopPost's --drop-vip failed: {e:#}"),
    };
    Ok(fault(
        lab,
        &st,
        ts,
        "kill-monitor",
        mon,
        format!("SIGKILL to vigil-monitor (pid {}); {dropped}", e.pid),
        json!({"pid": e.pid}),
    ))
}

/// `restart-monitor M`: SIGTERM (if it runs), then start it again and wait until it answers.
pub fn restart_monitor(lab: &Lab, mon: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let m = started_monitor(&st, mon)?;
    let name = proc_name(mon, "monitor");
    let ts = now_ms();
    let mut was = None;
    if let Ok(e) = running_entry(lab, &name) {
        was = Some(e.pid);
        let _ = kill(Pid::from_raw(e.pid), Signal::SIGTERM);
        if supervisor::wait_exit(lab, &name, Duration::from_secs(10)).is_err() {
            let _ = kill(Pid::from_raw(e.pid), Signal::SIGKILL);
            supervisor::wait_exit(lab, &name, Duration::from_secs(5))?;
        }
    }
    let t0 = Instant::now();
    // Never --init here: the monitor must find the cluster `up` created.
    let e = supervisor::spawn(lab, monitor_spec(lab, &st, &m, MonitorStart::Existing)?)?;
    wait_monitor_answers(lab, &st, Duration::from_secs(30))?;
    Ok(fault(
        lab,
        &st,
        ts,
        "restart-monitor",
        mon,
        format!(
            "vigil-monitor {} (pid {}), answering {} ms after the start",
            match was {
                Some(p) => format!("restarted (was pid {p})"),
                None => "started (was not running)".into(),
            },
            e.pid,
            t0.elapsed().as_millis()
        ),
        json!({"pid": e.pid, "previous_pid": was}),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionFrom {
    Monitors,
    All,
}

/// The node a partition or heal is about: a host, or a monitor (a split of the monitors).
fn partitionable(st: &LabState, name: &str) -> anyhow::Result<Node> {
    match st.host(name) {
        Ok(h) => Ok(h.clone()),
        Err(e) => st.monitor(name).cloned().map_err(|_| {
            e.context(format!(
                "{name} is neither a host nor a monitor of this lab (monitors: {})",
                crate::state::names(&st.monitors)
            ))
        }),
    }
}

pub fn partition(lab: &Lab, host: &str, from: PartitionFrom) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let h = partitionable(&st, host)?;
    let ts = now_ms();
    let text = match from {
        PartitionFrom::Monitors => {
            net::partition_from_monitors(&st, &h)?;
            format!(
                "cut from the {}monitors ({}), both directions, silently; processes keep running",
                if st.monitors.iter().any(|m| m.name == h.name) {
                    "other "
                } else {
                    ""
                },
                st.monitors
                    .iter()
                    .filter(|m| m.name != h.name)
                    .map(|m| m.addr.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
        PartitionFrom::All => {
            net::partition_from_all(&st, &h)?;
            format!(
                "cut from everything (switch port {} down); processes keep running",
                h.switch_port
            )
        }
    };
    Ok(fault(
        lab,
        &st,
        ts,
        "partition",
        host,
        text,
        json!({"from": match from { PartitionFrom::Monitors => "monitors", PartitionFrom::All => "all" }}),
    ))
}

pub fn heal(lab: &Lab, host: &str) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let h = partitionable(&st, host)?;
    let before = net::partition_state(&st, &h);
    net::heal(&st, &h)?;
    let ts = now_ms();
    Ok(fault(
        lab,
        &st,
        ts,
        "heal",
        host,
        format!("network healed (was {})", serde_json::to_value(before)?),
        json!({"was": before}),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageAction {
    Fail,
    Hang,
    Heal,
}

pub fn storage(lab: &Lab, action: StorageAction, host: Option<&str>) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let Some(bin) = Program::Faultfs.find() else {
        bail!("storage faults are not available yet: tests/faultfs missing (no vigil-faultfs next to vigil-lab, in VIGIL_BIN_DIR or VIGIL_FAULTFS_BIN)");
    };
    if !st.components.faultfs {
        bail!("storage faults are not available: this lab was started without vigil-faultfs (it was missing or disabled at `up`)");
    }
    let hosts: Vec<Node> = match host {
        Some(h) => vec![st.host(h)?.clone()],
        None => st.hosts.clone(),
    };
    let word = match action {
        StorageAction::Fail => "eio",
        StorageAction::Hang => "hang",
        StorageAction::Heal => "ok",
    };
    let ts = now_ms();
    let mut answers = Vec::new();
    for h in &hosts {
        let o = run(
            &[
                bin.to_string_lossy().into_owned(),
                "ctl".into(),
                "--control".into(),
                lab.host_faultfs_socket(&h.name)
                    .to_string_lossy()
                    .into_owned(),
                word.into(),
            ],
            Duration::from_secs(10),
        )?;
        if !o.ok() {
            bail!(
                "vigil-faultfs ctl {word} for {} failed: {}{}",
                h.name,
                o.stdout.trim(),
                o.stderr.trim()
            );
        }
        answers.push(json!({"host": h.name, "answer": o.stdout.trim()}));
    }
    let target = host.unwrap_or("all");
    Ok(fault(
        lab,
        &st,
        ts,
        &format!(
            "storage-{}",
            match action {
                StorageAction::Fail => "fail",
                StorageAction::Hang => "hang",
                StorageAction::Heal => "heal",
            }
        ),
        target,
        format!(
            "shared storage set to {word} for {}",
            hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ),
        json!({"answers": answers}),
    ))
}

/// `bmc H ACTION [key=value...]`: fence_ipmilan against the host's BMC from a monitor's
/// namespace (through `lab-bmc.sh fence`).
pub fn bmc(lab: &Lab, host: &str, action: &str, extra: &[String]) -> anyhow::Result<Report> {
    let st = load_up(lab)?;
    let Some(script) = layout::bmc_script() else {
        bail!("BMC fencing is not available yet: scripts/lab-bmc.sh missing");
    };
    if !st.components.bmc {
        bail!("BMC fencing is not available: this lab was started without BMCs (scripts/lab-bmc.sh, ipmi_sim or fence_ipmilan was missing, or disabled at `up`)");
    }
    let h = st.host(host)?.clone();
    let ns = st
        .monitors
        .first()
        .context("the lab has no monitor")?
        .netns
        .clone();
    let mut argv = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        ns.clone(),
        "bash".into(),
        script.to_string_lossy().into_owned(),
        "fence".into(),
        lab.bmc_dir(&h.name).to_string_lossy().into_owned(),
        action.into(),
    ];
    argv.extend(extra.iter().cloned());
    let ts = now_ms();
    let t0 = Instant::now();
    let o = run(&argv, Duration::from_secs(90))?;
    let code = o.status.code().unwrap_or(-1);
    let ms = t0.elapsed().as_millis() as u64;
    let text = format!(
        "fence_ipmilan action={action} from {ns}: exit {code} in {ms} ms{}",
        if o.stdout.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", o.stdout.trim().replace('\n', " | "))
        }
    );
    let mutating = !matches!(action, "status" | "monitor" | "list");
    let detail = json!({"action": action, "exit": code, "ms": ms,
                        "stdout": o.stdout, "stderr": o.stderr});
    let report = if mutating {
        fault(lab, &st, ts, &format!("bmc-{action}"), host, text, detail)
    } else {
        Report::new(json!({"ok": true, "result": detail}), text)
    };
    // The fence-agent convention: 0 done / on, 2 status: off, anything else a failure.
    if code != 0 && !(action == "status" && code == 2) {
        bail!(
            "{}; stderr: {}",
            report.text,
            o.stderr.trim().replace('\n', " | ")
        );
    }
    Ok(report)
}

/// Called by the BMC (through the host's power.sh): `status` prints 1/0, `off` crashes the host,
/// `on` powers it on.
pub fn power_hook(lab: &Lab, host: &str, args: &[String]) -> anyhow::Result<i32> {
    let words: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let verb = match words.as_slice() {
        ["status"] | [_, "get", "power"] => "status",
        ["off"] | [_, "set", "power", "0"] => "off",
        ["on"] | [_, "set", "power", "1"] => "on",
        other => bail!("power-hook: unknown request {other:?}"),
    };
    let on = power_is_on(lab, host);
    match verb {
        "status" => println!("{}", if on { 1 } else { 0 }),
        "off" if on => {
            crash_host(lab, host, "bmc")?;
        }
        "on" if !on => {
            power_on(lab, host, "bmc")?;
        }
        _ => {}
    }
    Ok(0)
}

/// `check`: the observer's duplicate check over its timeline.
pub fn check(lab: &Lab) -> anyhow::Result<i32> {
    let Some(bin) = Program::Observer.find() else {
        bail!("check is not available yet: tests/observer missing (no vigil-observer next to vigil-lab, in VIGIL_BIN_DIR or VIGIL_OBSERVER_BIN)");
    };
    let status = std::process::Command::new(bin)
        .arg("check")
        .arg(lab.observer_timeline())
        .stdin(std::process::Stdio::null())
        .status()?;
    Ok(status.code().unwrap_or(1))
}

/// `reach FROM TO`: can node FROM open a TCP connection to node TO (a refusal counts as
/// reachable: the peer answered)?
pub fn reach(lab: &Lab, from: &str, to: &str, timeout_ms: u64) -> anyhow::Result<(bool, Report)> {
    let st = crate::state::LabState::load(lab)?.context("no lab")?;
    let a = st.node(from)?.clone();
    let b = st.node(to)?.clone();
    let exe = std::env::current_exe()?;
    let o = run(
        &[
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            a.netns.clone(),
            exe.to_string_lossy().into_owned(),
            "probe-tcp".into(),
            format!("{}:9", b.addr),
            "--timeout-ms".into(),
            timeout_ms.to_string(),
        ],
        Duration::from_millis(timeout_ms + 10_000),
    )?;
    let reachable = o.ok();
    let how = o.stdout.trim().to_string();
    Ok((
        reachable,
        Report::new(
            json!({"ok": true, "from": from, "to": to, "reachable": reachable, "how": how}),
            format!(
                "{from} -> {to} ({}): {} ({how})",
                b.addr,
                if reachable {
                    "reachable"
                } else {
                    "unreachable"
                }
            ),
        ),
    ))
}

/// Runs inside a namespace: exit 0 when ADDR answered (accepted or refused), 1 otherwise.
pub fn probe_tcp(addr: SocketAddr, timeout_ms: u64) -> i32 {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(timeout_ms.max(1))) {
        Ok(_) => {
            println!("connected");
            0
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            println!("refused");
            0
        }
        Err(e) => {
            println!("{e}");
            1
        }
    }
}
