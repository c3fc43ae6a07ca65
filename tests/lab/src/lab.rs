//! What the verbs share: process specs of the lab's programs, host start-up pieces, vigilctl
//! against the lab, the timeline; and the verbs themselves, one module each.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::cmd::{run, run_ok};
use crate::installed::{self, Installed};
use crate::layout::{self, Lab, Program, LAB_ID_ENV};
use crate::state::{self, LabState, Node};
use crate::supervisor::{self, SpawnSpec};

mod down;
mod status;
mod up;

pub use down::down;
pub use status::{host_pids, qemu_pids, status};
pub use up::{up, UpOpts};

/// Stop order of each role at shutdown (lower first).
pub const ORDER_AGENT: u32 = 10;
/// After the agents (which may close it with the magic 'V'); `down` switches every watchdog
/// off before anything stops, so none resets a host while the lab goes down.
pub const ORDER_WATCHDOG: u32 = 15;
pub const ORDER_BMC: u32 = 20;
pub const ORDER_LIBVIRT: u32 = 30;
pub const ORDER_OBSERVER: u32 = 35;
pub const ORDER_MONITOR: u32 = 40;
pub const ORDER_FAULTFS: u32 = 50;

/// A verb's result: a JSON document (`--json`) and the human text.
pub struct Report {
    pub json: Value,
    pub text: String,
}

impl Report {
    pub fn new(json: Value, text: impl Into<String>) -> Report {
        Report {
            json,
            text: text.into(),
        }
    }
}

pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("vigil-lab must run as root (network and mount namespaces, libvirt, QEMU)");
    }
    Ok(())
}

/// The lab's state, which must say `up`.
pub fn load_up(lab: &Lab) -> anyhow::Result<LabState> {
    let st = LabState::load(lab)?.with_context(|| {
        format!(
            "no lab in {} (run `vigil-lab up` first)",
            lab.root.display()
        )
    })?;
    if !st.is_up() {
        bail!(
            "the lab in {} is {}, not up (run `vigil-lab up`)",
            lab.root.display(),
            st.state
        );
    }
    Ok(st)
}

pub fn proc_name(group: &str, role: &str) -> String {
    format!("{group}/{role}")
}

/// Environment for every lab process: the lab id marker, and the knobs of the scripts.
fn lab_env(st: &LabState) -> Vec<(String, String)> {
    let mut v = vec![
        (LAB_ID_ENV.to_string(), st.id.clone()),
        // Plain log files (tracing-subscriber honours NO_COLOR).
        ("NO_COLOR".to_string(), "1".to_string()),
    ];
    for k in [
        "VIGIL_LIBVIRT_CACHE",
        "VIGIL_SANDBOX_TIMEOUT",
        "VIGIL_SANDBOX_STOP_TIMEOUT",
        "VIGIL_BMC_POWER_TIMEOUT",
        "VIGIL_BMC_READY_TIMEOUT",
        "RUST_LOG",
    ] {
        if let Ok(val) = std::env::var(k) {
            v.push((k.to_string(), val));
        }
    }
    v
}

pub(crate) fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The packages' root of a lab made with `up --installed DIR`.
pub fn installed(st: &LabState) -> anyhow::Result<Option<Installed>> {
    st.installed.as_deref().map(Installed::open).transpose()
}

/// Where the lab's agent, monitor or vigilctl comes from: the installed packages (`up
/// --installed`), or the build ([`Program::require`]).
pub fn program(st: &LabState, p: Program) -> anyhow::Result<PathBuf> {
    match installed(st)? {
        Some(i) => i.bin(p),
        None => p.require(),
    }
}

pub fn agent_config_path(lab: &Lab, host: &Node) -> PathBuf {
    lab.host_dir(&host.name).join("agent.toml")
}

pub fn monitor_config_path(lab: &Lab, mon: &Node) -> PathBuf {
    lab.monitor_dir(&mon.name).join("monitor.toml")
}

// ------------------------------------------------------------------------------------------
// Process specs.

pub fn sandbox_spec(lab: &Lab, st: &LabState, host: &Node) -> anyhow::Result<SpawnSpec> {
    let name = proc_name(&host.name, "libvirt");
    let mut env = lab_env(st);
    if st.components.faultfs {
        // This host's own faultfs view, at the path common to every host.
        env.push((
            "VIGIL_SANDBOX_BIND".into(),
            format!(
                "{}:{}",
                path_str(&lab.host_storage_mount(&host.name)),
                path_str(&lab.storage_shared())
            ),
        ));
    }
    Ok(SpawnSpec {
        log: lab.log_file(&name),
        name,
        group: host.name.clone(),
        role: "libvirt".into(),
        argv: vec![
            "bash".into(),
            path_str(&layout::sandbox_script()?),
            "run".into(),
            path_str(&lab.libvirt_dir(&host.name)),
        ],
        netns: Some(host.netns.clone()),
        env,
        stop_order: ORDER_LIBVIRT,
    })
}

pub fn agent_spec(lab: &Lab, st: &LabState, host: &Node) -> anyhow::Result<SpawnSpec> {
    let name = proc_name(&host.name, "agent");
    Ok(SpawnSpec {
        log: lab.log_file(&name),
        name,
        group: host.name.clone(),
        role: "agent".into(),
        argv: match installed(st)? {
            // The unit's command line (`ExecStart=`), with the lab's edit of the config.
            Some(i) => i.command(
                installed::AGENT_UNIT,
                "ExecStart",
                installed::AGENT_CONFIG,
                &agent_config_path(lab, host),
            )?,
            None => vec![
                path_str(&Program::Agent.require()?),
                "--config".into(),
                path_str(&agent_config_path(lab, host)),
            ],
        },
        netns: Some(host.netns.clone()),
        env: lab_env(st),
        stop_order: ORDER_AGENT,
    })
}

/// Starts a host's agent as systemd would: with `up --installed`, the unit's
/// `ExecStartPre=` first (vigil-watchdog-setup on the lab's agent.toml: it names the
/// host's fake watchdog, which exists, so it never loads softdog; it only reports), then
/// [`agent_spec`].
pub fn start_agent_process(
    lab: &Lab,
    st: &LabState,
    host: &Node,
) -> anyhow::Result<supervisor::ProcEntry> {
    if let Some(i) = installed(st)? {
        let pre = i.command(
            installed::AGENT_UNIT,
            "ExecStartPre",
            installed::AGENT_CONFIG,
            &agent_config_path(lab, host),
        )?;
        let out = run(&pre, Duration::from_secs(30))?;
        let log = lab.log_file(&proc_name(&host.name, "agent"));
        if let Some(d) = log.parent() {
            fs::create_dir_all(d)?;
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let _ = write!(
            f,
            "ExecStartPre {}:\n{}{}",
            pre.join(" "),
            out.stdout,
            out.stderr
        );
        if !out.ok() {
            // The helper is written never to fail the start: a failure is its defect.
            bail!(
                "the unit's ExecStartPre {} failed ({}): {}{}",
                pre.join(" "),
                out.status,
                out.stdout,
                out.stderr
            );
        }
    }
    supervisor::spawn(lab, agent_spec(lab, st, host)?)
}

/// How a monitor process starts (the flag it is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorStart {
    /// `--init`: creates the cluster, with every lab monitor as a voter; refused on an
    /// existing database. Only `up` passes it, to the first monitor.
    Init,
    /// `--join`: an empty database that the first monitor's replication fills (`up`, every
    /// other monitor).
    Join,
    /// No flag: opens the database an earlier start created (`restart-monitor`).
    Existing,
}

/// The monitor's process.
pub fn monitor_spec(
    lab: &Lab,
    st: &LabState,
    mon: &Node,
    start: MonitorStart,
) -> anyhow::Result<SpawnSpec> {
    let name = proc_name(&mon.name, "monitor");
    let mut argv = match installed(st)? {
        // The unit's command line (`ExecStart=`); the first start's flag as docs/packaging.md
        // gives it (`vigil-monitor --init`, by hand, before the unit runs).
        Some(i) => i.command(
            installed::MONITOR_UNIT,
            "ExecStart",
            installed::MONITOR_CONFIG,
            &monitor_config_path(lab, mon),
        )?,
        None => vec![
            path_str(&Program::Monitor.require()?),
            "--config".into(),
            path_str(&monitor_config_path(lab, mon)),
        ],
    };
    match start {
        MonitorStart::Init => argv.push("--init".into()),
        MonitorStart::Join => argv.push("--join".into()),
        MonitorStart::Existing => {}
    }
    Ok(SpawnSpec {
        log: lab.log_file(&name),
        name,
        group: mon.name.clone(),
        role: "monitor".into(),
        argv,
        netns: Some(mon.netns.clone()),
        env: lab_env(st),
        stop_order: ORDER_MONITOR,
    })
}

// ------------------------------------------------------------------------------------------
// Host start-up pieces, shared by `up` and `power-on`.

/// Starts a host's libvirt sandbox (its stale URI file removed first).
pub fn start_sandbox(lab: &Lab, st: &LabState, host: &Node) -> anyhow::Result<()> {
    let _ = fs::remove_file(lab.libvirt_dir(&host.name).join("uri"));
    supervisor::spawn(lab, sandbox_spec(lab, st, host)?)?;
    Ok(())
}

/// Waits until the sandbox's libvirtd answers (the script writes DIR/uri then).
pub fn wait_sandbox(lab: &Lab, host: &Node, timeout: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let uri = lab.libvirt_dir(&host.name).join("uri");
    let name = proc_name(&host.name, "libvirt");
    loop {
        if uri.is_file() {
            return Ok(t0.elapsed());
        }
        if let Some(t) = supervisor::table(lab) {
            if let Some(e) = t.get(&name) {
                if !e.running() {
                    bail!(
                        "the libvirt sandbox of {} exited during start-up ({:?}); its log {}:\n{}",
                        host.name,
                        e.exit,
                        e.log.display(),
                        crate::cmd::tail_file(&e.log, 30)
                    );
                }
            }
        }
        if t0.elapsed() >= timeout {
            bail!(
                "the libvirt sandbox of {} did not answer within {timeout:?} (log {})",
                host.name,
                lab.log_file(&name).display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sandbox_timeout() -> Duration {
    let s = std::env::var("VIGIL_SANDBOX_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(180);
    Duration::from_secs(s + 30)
}

/// True when the shared QEMU capabilities cache holds nothing (the first libvirtd probes ~20 s).
fn caps_cache_cold() -> bool {
    let dir = std::env::var("VIGIL_LIBVIRT_CACHE")
        .unwrap_or_else(|_| "/var/cache/vigil/libvirt-qemu-caps".into());
    !fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "xml"))
        })
        .unwrap_or(false)
}

pub fn set_power(lab: &Lab, host: &str, on: bool) {
    let _ = fs::write(lab.power_file(host), if on { "on\n" } else { "off\n" });
}

pub fn power_is_on(lab: &Lab, host: &str) -> bool {
    fs::read_to_string(lab.power_file(host))
        .map(|s| s.trim() != "off")
        .unwrap_or(true)
}

// ------------------------------------------------------------------------------------------
// The hosts' fake watchdogs (vigil-lab-watchdog, one per host).

/// Sends one command (`status`, `off`, `reset`) to a host's watchdog; returns its `ok ...`
/// answer's fields.
pub fn watchdog_ctl(lab: &Lab, host: &str, command: &str) -> anyhow::Result<Vec<(String, String)>> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let sock = lab.host_watchdog_socket(host);
    let s = UnixStream::connect(&sock).with_context(|| {
        format!(
            "the watchdog of {host} does not answer on {}",
            sock.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .with_context(|| format!("reading the answer of {host}'s watchdog"))?;
    let Some(rest) = line.trim().strip_prefix("ok ") else {
        bail!(
            "the watchdog of {host} refused {command:?}: {}",
            line.trim()
        );
    };
    Ok(rest
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// A host's watchdog state as JSON (`{"state": "armed", "timeout_secs": 2, ...}`), or
/// `{"error": ...}` when it does not answer.
pub fn watchdog_status(lab: &Lab, host: &str) -> Value {
    match watchdog_ctl(lab, host, "status") {
        Ok(fields) => {
            let mut m = serde_json::Map::new();
            for (k, v) in fields {
                let val = if v == "-" {
                    Value::Null
                } else if let Ok(n) = v.parse::<u64>() {
                    Value::from(n)
                } else {
                    Value::from(v)
                };
                m.insert(k, val);
            }
            Value::Object(m)
        }
        Err(e) => serde_json::json!({"error": format!("{e:#}")}),
    }
}

// ------------------------------------------------------------------------------------------
// vigilctl against the lab.

/// argv of `vigilctl` run on the operator's machine (`ops`; older labs: a monitor
/// namespace) with the lab's admin certificate, given the VIP first and then every monitor.
pub fn vigilctl_argv(lab: &Lab, st: &LabState, args: &[String]) -> anyhow::Result<Vec<String>> {
    let ns = st
        .ops
        .iter()
        .chain(&st.monitors)
        .next()
        .context("the lab has no monitor")?
        .netns
        .clone();
    let tls_dir = lab.tls_dir();
    let mut v: Vec<String> = vec![
        "ip".into(),
        "netns".into(),
        "exec".into(),
        ns,
        path_str(&program(st, Program::Vigilctl)?),
    ];
    for ep in st.client_endpoints() {
        v.push("--monitor".into());
        v.push(ep);
    }
    for (flag, file) in [
        ("--ca", "ca.crt"),
        ("--cert", "admin.crt"),
        ("--key", "admin.key"),
    ] {
        v.push(flag.into());
        v.push(path_str(&tls_dir.join(file)));
    }
    v.extend(args.iter().cloned());
    Ok(v)
}

/// Runs `vigilctl --json ARGS` and parses its answer.
pub fn ctl_json(lab: &Lab, st: &LabState, args: &[&str]) -> anyhow::Result<Value> {
    let mut a: Vec<String> = vec!["--json".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    let out = run_ok(&vigilctl_argv(lab, st, &a)?, Duration::from_secs(15))?;
    serde_json::from_str(&out).with_context(|| format!("vigilctl printed no JSON: {out}"))
}

/// Runs `vigilctl ARGS`, which must succeed.
pub fn ctl_ok(lab: &Lab, st: &LabState, args: &[&str]) -> anyhow::Result<String> {
    let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run_ok(&vigilctl_argv(lab, st, &a)?, Duration::from_secs(15))
}

/// `vigil-lab ctl -- ARGS`: vigilctl with the terminal; returns its exit code.
pub fn ctl_passthrough(lab: &Lab, args: &[String], json: bool) -> anyhow::Result<i32> {
    let st = LabState::load(lab)?.with_context(|| format!("no lab in {}", lab.root.display()))?;
    let mut a = Vec::new();
    if json {
        a.push("--json".to_string());
    }
    a.extend(args.iter().cloned());
    let argv = vigilctl_argv(lab, &st, &a)?;
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .status()
        .context("running vigilctl")?;
    Ok(status.code().unwrap_or(1))
}

/// Host liveness as the monitor sees it: name → liveness.
pub fn host_liveness(lab: &Lab, st: &LabState) -> anyhow::Result<Vec<(String, String)>> {
    let v = ctl_json(lab, st, &["host", "list"])?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    (
                        h["name"].as_str().unwrap_or("").to_string(),
                        h["liveness"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until the monitor sees every host in `hosts` with liveness `want`.
pub fn wait_liveness(
    lab: &Lab,
    st: &LabState,
    hosts: &[&str],
    want: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut last;
    loop {
        match host_liveness(lab, st) {
            Ok(l) => {
                let ok = hosts
                    .iter()
                    .all(|h| l.iter().any(|(n, s)| n == h && s == want));
                if ok {
                    return Ok(t0.elapsed());
                }
                last = format!("{l:?}");
            }
            Err(e) => last = format!("{e:#}"),
        }
        if t0.elapsed() >= timeout {
            bail!("hosts {hosts:?} not {want} after {timeout:?}; last answer: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the monitor answers `status`.
pub fn wait_monitor_answers(lab: &Lab, st: &LabState, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        match ctl_json(lab, st, &["status"]) {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() >= timeout => {
                return Err(e.context(format!("the monitor did not answer within {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Timeline.

/// Records an event in the lab's timeline and, when the observer exists, in its timeline too.
pub fn record_event(lab: &Lab, st: &LabState, ev: state::Event) -> state::Event {
    if let Err(e) = state::record(lab, &ev) {
        eprintln!("vigil-lab: warning: cannot write the timeline: {e:#}");
    }
    if st.components.observer {
        if let Some(obs) = Program::Observer.find() {
            let out = lab.observer_timeline();
            let _ = run(
                &[
                    path_str(&obs),
                    "mark".into(),
                    "--out".into(),
                    path_str(&out),
                    "--kind".into(),
                    ev.kind.clone(),
                    "--text".into(),
                    format!(
                        "{} {}: {}",
                        ev.verb,
                        ev.target.as_deref().unwrap_or("-"),
                        ev.text
                    ),
                ],
                Duration::from_secs(5),
            );
        }
    }
    ev
}

/// A program on PATH or in the sbin directories.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file());
    found
}

/// Writes `text` to stdout, flushing (the ctl verb interleaves with vigilctl's output).
pub fn print_flush(text: &str) {
    let mut o = std::io::stdout();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}
