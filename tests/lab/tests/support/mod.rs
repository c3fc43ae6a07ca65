//! What every lab test needs: the prerequisites check, and a supervisor that the test owns
//! (its child, so nothing is left as a zombie) with a guard that tears the lab down on drop,
//! also on panic. Each test passes its own root and `vigil-lab` command builder, so tests
//! never share a lab.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn which(prog: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .any(|d| Path::new(d).join(prog).is_file());
    found
}

/// Why a lab test cannot run here (not root, or one of `progs` missing), if it cannot.
pub fn missing_prerequisite(progs: &[&str]) -> Option<String> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if uid != 0 {
        return Some("not root".into());
    }
    progs
        .iter()
        .find(|p| !which(p))
        .map(|p| format!("{p} not found"))
}

/// `true` when the test should skip (outside CI); panics under `CI`.
/// What a lab with BMCs and fencing needs on this machine.
pub const FENCED_LAB_PROGS: &[&str] = &[
    "ip",
    "libvirtd",
    "virsh",
    "qemu-system-x86_64",
    "ipmi_sim",
    "fence_ipmilan",
];

/// Wall-clock Unix milliseconds, the observer's and the lab timeline's time base.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn skip(test: &str, progs: &[&str]) -> bool {
    let Some(why) = missing_prerequisite(progs) else {
        return false;
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run under CI: {why}");
    }
    eprintln!("skipping {test}: {why}");
    true
}

/// Runs `down` when dropped (also on panic), then waits for the supervisor this test owns.
pub struct Guard {
    pub supervisor: Option<Child>,
    down: Box<dyn Fn() -> Output>,
    lab_cmd: fn(&[&str]) -> Command,
}

impl Guard {
    /// On a failing test, before `down`: what an operator would look at first, short enough
    /// to stay in the part of the log CI keeps: the independent observer's verdict (every
    /// QEMU instance and gap) and the monitor's newest events.
    fn report_failure(&self) {
        for args in [
            &["check"][..],
            &["ctl", "--", "--timeout", "3", "events", "--limit", "40"][..],
        ] {
            match (self.lab_cmd)(args).output() {
                Ok(o) => eprintln!(
                    "--- on failure: vigil-lab {} ({})\n{}{}",
                    args.join(" "),
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("--- on failure: vigil-lab {}: {e}", args.join(" ")),
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report_failure();
        }
        if !(self.down)().status.success() {
            eprintln!("guard: down failed");
        }
        if let Some(mut c) = self.supervisor.take() {
            let t0 = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        eprintln!("guard: supervisor exited: {st}");
                        break;
                    }
                    Ok(None) if t0.elapsed() < Duration::from_secs(60) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("guard: the supervisor did not exit: killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Starts `vigil-lab supervise` as this test's child and waits for its socket under `root`.
pub fn start_supervisor(
    root: &str,
    lab_cmd: fn(&[&str]) -> Command,
    down: impl Fn() -> Output + 'static,
) -> Guard {
    std::fs::create_dir_all(root).expect("lab root");
    let log = std::fs::File::create(PathBuf::from(root).join("test-supervisor.log"))
        .expect("supervisor log");
    let sup = lab_cmd(&["supervise"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the supervisor");
    let guard = Guard {
        supervisor: Some(sup),
        down: Box::new(down),
        lab_cmd,
    };
    let sock = PathBuf::from(root).join("supervisor.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no supervisor socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

/// `vigil-lab` for one test's lab (its own root and prefix), with the helpers every failover
/// test needs: vigilctl through the lab, VM placement waits, the event log.
#[derive(Clone, Copy)]
pub struct LabCli {
    pub root: &'static str,
    pub prefix: &'static str,
}

/// How many characters of one verb's output go to the test log (`VIGIL_LAB_VERBOSE=1`: all).
const ECHO_CHARS: usize = 1500;

/// Echoes a verb and a short form of its output to the test log: JSON on one line, cut at
/// [`ECHO_CHARS`]. The log CI keeps of a failing test is short; a verb's full pretty JSON
/// (the status of a lab is ~700 lines) would push the panic message out of it. The
/// assertions print the JSON they check.
pub fn echo(args: &[&str], o: &Output, took: std::time::Duration) {
    let full = std::env::var_os("VIGIL_LAB_VERBOSE").is_some();
    let short = |b: &[u8]| -> String {
        let text = match serde_json::from_slice::<serde_json::Value>(b) {
            Ok(v) => v.to_string(),
            Err(_) => String::from_utf8_lossy(b).trim_end().to_string(),
        };
        if full || text.chars().count() <= ECHO_CHARS {
            text
        } else {
            let cut: String = text.chars().take(ECHO_CHARS).collect();
            format!("{cut} [… {} more chars]", text.chars().count() - ECHO_CHARS)
        }
    };
    eprintln!(
        "$ vigil-lab {} -> {} in {} ms\n{}\n{}",
        args.join(" "),
        o.status,
        took.as_millis(),
        short(&o.stdout),
        short(&o.stderr)
    );
}

impl LabCli {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vigil-lab"));
        c.args(args)
            .env("VIGIL_LAB_DIR", self.root)
            .env("VIGIL_LAB_PREFIX", self.prefix)
            .env("VIGIL_AGENT_BIN", env!("CARGO_BIN_EXE_lab-vigil-agent"))
            .env("VIGIL_MONITOR_BIN", env!("CARGO_BIN_EXE_lab-vigil-monitor"))
            .env("VIGILCTL_BIN", env!("CARGO_BIN_EXE_lab-vigilctl"))
            .stdin(std::process::Stdio::null());
        c
    }

    /// `vigilctl --json --timeout 2 ARGS` asking `monitor` (`mon2`) and no other, from the
    /// operator's machine: what that monitor itself answers (its own view for `status`,
    /// `server list` and `host show`; no VIP, no fallback to another monitor). `None` if it
    /// fails.
    pub fn ctl_json_at(&self, monitor: &str, args: &[&str]) -> Option<serde_json::Value> {
        let lab = vigil_lab::layout::Lab::new(self.root.into(), self.prefix.into()).ok()?;
        let st = vigil_lab::state::LabState::load(&lab).ok()??;
        let mon = st.monitor(monitor).ok()?;
        let ns = st.ops.as_ref().unwrap_or(mon).netns.clone();
        let tls = lab.tls_dir();
        let endpoint = format!("{}:{}", mon.addr, vigil_lab::layout::MONITOR_PORT);
        let o = Command::new("ip")
            .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_lab-vigilctl")])
            .args(["--monitor", &endpoint])
            .arg("--ca")
            .arg(tls.join("ca.crt"))
            .arg("--cert")
            .arg(tls.join("admin.crt"))
            .arg("--key")
            .arg(tls.join("admin.key"))
            .args(["--json", "--timeout", "2"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Runs a verb, echoing it and its output to the test log.
    pub fn run(&self, args: &[&str]) -> Output {
        let t0 = std::time::Instant::now();
        let o = self.cmd(args).output().expect("run vigil-lab");
        echo(args, &o, t0.elapsed());
        o
    }

    /// Runs a verb that must succeed.
    pub fn ok(&self, args: &[&str]) {
        assert!(self.run(args).status.success(), "vigil-lab {args:?} failed");
    }

    /// `vigilctl --json ARGS` inside the lab; `None` if it fails.
    pub fn ctl_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut a = vec!["ctl", "--", "--json", "--timeout", "2"];
        a.extend_from_slice(args);
        let o = self.cmd(&a).output().ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Waits until `vm` runs on `host` with `generation`; returns how long since `since`.
    pub fn wait_vm_on(&self, vm: &str, host: &str, generation: u64, since: Instant) -> Duration {
        let end = Instant::now() + Duration::from_secs(90);
        let mut last = None;
        while Instant::now() < end {
            if let Some(v) = self.ctl_json(&["vm", "show", vm]) {
                if v["host"] == host && v["state"] == "running" && v["generation"] == generation {
                    return since.elapsed();
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let events = self.ctl_json(&["events", "--limit", "60"]);
        panic!("{vm} never ran on {host} with generation {generation}; last view {last:#?}\nevents {events:#?}");
    }

    /// The replicated event log's messages, oldest first.
    pub fn event_messages(&self) -> Vec<String> {
        self.ctl_json(&["events", "--limit", "1000"])
            .and_then(|v| v["events"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["message"].as_str().map(String::from))
            .collect()
    }

    /// Waits until the event log holds a message containing `what`; returns every message.
    /// Liveness (`host show`) is the leader's own view and the event log is replicated: an
    /// event of the same change commits a Raft round later, so a test that saw the state
    /// waits for its event (failover read the log in between once).
    pub fn wait_event(&self, what: &str) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let msgs = self.event_messages();
            if msgs.iter().any(|m| m.contains(what)) {
                return msgs;
            }
            assert!(Instant::now() < end, "no event \"{what}\": {msgs:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `host` is up again in the monitor's view.
    pub fn wait_host_up(&self, host: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let h = self.ctl_json(&["host", "show", host]);
            if h.as_ref().is_some_and(|h| h["liveness"] == "up") {
                return;
            }
            assert!(Instant::now() < end, "{host} did not come up: {h:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The failover tests' lab: 3 hosts with BMCs and fencing, 1 monitor, 1 HA VM per host,
    /// hv1 carrying the ha_tag `ha`; returns once every VM's definition is stored (relocation
    /// needs it).
    pub fn up_three_hosts_fenced(&self) {
        self.up_three_hosts_fenced_with(&[]);
    }

    /// [`Self::up_three_hosts_fenced`] with more `up` options.
    pub fn up_three_hosts_fenced_with(&self, extra: &[&str]) {
        self.up_three_hosts_fenced_monitors("1", extra);
    }

    /// [`Self::up_three_hosts_fenced_with`] with `monitors` monitors (a Raft cluster and the
    /// VIP when more than one).
    pub fn up_three_hosts_fenced_monitors(&self, monitors: &str, extra: &[&str]) {
        let mut args = vec![
            "up",
            "--hosts",
            "3",
            "--monitors",
            monitors,
            "--vms-per-host",
            "1",
            "--ha-tag",
            "ha",
            "--tagged-hosts",
            "1",
            "--fencing",
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
        self.wait_definitions(&["hv1-vm1", "hv2-vm1", "hv3-vm1"]);
    }

    /// Waits until `vm` runs somewhere other than `from` with generation `generation`;
    /// returns how long since `since`.
    pub fn wait_moved(&self, vm: &str, from: &str, generation: u64, since: Instant) -> Duration {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.ctl_json(&["vm", "show", vm]) {
                if v["host"] != from && v["generation"] == generation && v["state"] == "running" {
                    return since.elapsed();
                }
            }
            assert!(
                Instant::now() < end,
                "{vm} never moved off {from}: {:#?}",
                self.event_messages()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every HA VM's definition is stored (relocation needs it).
    pub fn wait_definitions(&self, vms: &[&str]) {
        let end = Instant::now() + Duration::from_secs(30);
        for vm in vms {
            while !self
                .ctl_json(&["vm", "show", vm])
                .is_some_and(|v| v["definition_stored"] == true)
            {
                assert!(Instant::now() < end, "definition of {vm} never stored");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The lab's own timeline (`ROOT/timeline.jsonl`): faults, watchdog resets, lab events.
    pub fn lab_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(Path::new(self.root).join("timeline.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Unix ms of the last lab event `verb` (e.g. `crash-host`, `kill-agent`,
    /// `watchdog-reset`) aimed at `target`.
    pub fn last_event_ms(&self, verb: &str, target: &str) -> Option<u64> {
        self.lab_events()
            .iter()
            .filter(|e| e["verb"] == verb && e["target"] == target)
            .filter_map(|e| e["ts_ms"].as_u64())
            .max()
    }

    /// Unix ms of every watchdog reset of `host` (`vigil-lab-watchdog` expiries).
    pub fn watchdog_resets(&self, host: &str) -> Vec<u64> {
        self.lab_events()
            .iter()
            .filter(|e| e["verb"] == "watchdog-reset" && e["target"] == host)
            .filter_map(|e| e["ts_ms"].as_u64())
            .collect()
    }

    /// `host` as `vigil-lab status --json` shows it (`watchdog`, `domains_running`, ...);
    /// `Null` when the lab has no such host.
    pub fn host_status(&self, host: &str) -> serde_json::Value {
        let o = self
            .cmd(&["--json", "status"])
            .output()
            .expect("vigil-lab status");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["hosts"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == host))
            .cloned()
            .unwrap_or_default()
    }

    /// `host`'s watchdog as `vigil-lab status --json` shows it (`state`, `timeout_secs`,
    /// `left_ms`, ...); `Null` when the lab has none.
    pub fn watchdog_status(&self, host: &str) -> serde_json::Value {
        self.host_status(host)["watchdog"].clone()
    }

    /// The live monitor whose namespace holds the VIP (the leader), waiting up to 30 s for
    /// exactly one.
    pub fn vip_holder(&self) -> String {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self
                .cmd(&["--json", "status"])
                .output()
                .expect("vigil-lab status");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            let holders: Vec<String> = v["monitors"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|m| m["holds_vip"] == true && m["monitor"]["alive"] == true)
                .filter_map(|m| m["name"].as_str().map(String::from))
                .collect();
            if holders.len() == 1 {
                return holders[0].clone();
            }
            assert!(
                Instant::now() < end,
                "no single live VIP holder: {holders:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `host`'s watchdog is in `state` (`armed` once its agent opened it).
    pub fn wait_watchdog(&self, host: &str, state: &str, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let w = self.watchdog_status(host);
            if w["state"] == state {
                return;
            }
            assert!(
                Instant::now() < end,
                "the watchdog of {host} is not {state} after {within:?}: {w}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The observer's check over its timeline so far (the library `vigil-observer check`
    /// uses).
    pub fn observer_report(&self) -> vigil_observer::check::Report {
        let path = Path::new(self.root).join("observer/timeline.jsonl");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no observer timeline {}: {e}", path.display()));
        vigil_observer::check::check_text(&text)
    }

    /// The observer saw `vm` start exactly one QEMU instance at or after `after_ms` (Unix ms),
    /// on `on` when given; returns it. Waits up to 60 s for the start, then another 2 s for a
    /// second one that must not come.
    pub fn assert_started_exactly_once(
        &self,
        vm: &str,
        on: Option<&str>,
        after_ms: u64,
    ) -> vigil_observer::check::Interval {
        let end = Instant::now() + Duration::from_secs(60);
        while self.observer_report().starts_since(vm, after_ms).is_empty() {
            assert!(
                Instant::now() < end,
                "the observer saw no start of {vm} after {after_ms}:\n{}",
                vigil_observer::check::render(&self.observer_report())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        let r = self.observer_report();
        let starts = r.starts_since(vm, after_ms);
        assert_eq!(
            starts.len(),
            1,
            "{vm} must start exactly once after {after_ms}: {starts:#?}\n{}",
            vigil_observer::check::render(&r)
        );
        if let Some(host) = on {
            assert_eq!(
                starts[0].host, host,
                "{vm} started on the wrong host: {:#?}",
                starts[0]
            );
        }
        starts[0].clone()
    }

    /// The observer saw no VM stop on any of `hosts` (every host when empty) at or after
    /// `since_ms` (Unix ms).
    pub fn assert_not_stopped(&self, hosts: &[&str], since_ms: u64) {
        let r = self.observer_report();
        let stops = r.stops_since(hosts, since_ms);
        assert!(
            stops.is_empty(),
            "VMs stopped on {hosts:?} since {since_ms}: {stops:#?}\n{}",
            vigil_observer::check::render(&r)
        );
    }

    /// The independent observer found no VM running twice.
    pub fn assert_no_duplicates(&self) {
        let check = self.run(&["check"]);
        if !check.status.success() {
            // What Vigil decided, for the post-mortem (the lab is torn down after the panic).
            for m in self.event_messages() {
                eprintln!("event: {m}");
            }
            // Every monitor's log (any of them may have led), its newest lines.
            let logs = Path::new(self.root).join("logs");
            let mut names: Vec<PathBuf> = std::fs::read_dir(&logs)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with("-monitor.log"))
                })
                .collect();
            names.sort();
            for log in names {
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(200)..].join("\n");
                    eprintln!("--- {} (last 200 lines)\n{tail}", log.display());
                }
            }
        }
        assert!(check.status.success(), "duplicate detected by the observer");
        assert!(String::from_utf8_lossy(&check.stdout).contains("duplicates: none"));
    }
}
