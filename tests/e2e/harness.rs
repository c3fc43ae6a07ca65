#![allow(dead_code)]
//! Test harness (included by every test and bench of this crate with `#[path]`): a throwaway PKI, and monitors, agents and vigilctl as real processes.
//!
//! Every process is our own child, ended by its PID when its handle drops (also when a test
//! fails), and everything lives in a temporary directory on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_common::tls::{self, Role, TlsPaths};

/// A simulated agent's QUIC client config, from a certificate for `name` issued in memory by
/// `ca` (load generators and seeders run thousands of agents: no files).
pub fn agent_client_config(
    ca: &tls::CaSigner,
    name: &str,
    keep_alive: Option<Duration>,
) -> quinn::ClientConfig {
    let (cert, key) = ca.issue(Role::Agent, name, &[], 2).expect("issue");
    let material = tls::TlsMaterial::from_pem(&ca.cert_pem, &cert, &key).expect("material");
    tls::client_config(
        material,
        vigil_common::wire::ALPN_AGENT,
        tls::TransportTuning {
            idle_timeout: Duration::from_secs(30),
            keep_alive,
        },
    )
    .expect("client config")
}

/// Fixed facts of a simulated hypervisor called `name` (64 CPUs, 512 GiB).
pub fn sim_facts(name: &str) -> vigil_common::wire::HostFacts {
    vigil_common::wire::HostFacts {
        hostname: name.to_string(),
        cpus: 64,
        memory_total_bytes: 512 << 30,
        memory_available_bytes: 300 << 30,
        load_avg: [1.0, 1.0, 1.0],
        uptime_s: 100_000,
        boot_id: "00000000-0000-0000-0000-000000000000".into(),
    }
}

/// The hello of a simulated agent for host `name` (zone `z`, cluster `c`, no pools) with
/// `facts`, as the benchmarks send it.
pub fn sim_hello(name: &str, facts: vigil_common::wire::HostFacts) -> vigil_common::wire::Hello {
    vigil_common::wire::Hello {
        host: name.to_string(),
        agent_version: "bench".into(),
        zone: "z".into(),
        cluster: "c".into(),
        facts,
        instance: 1,
        pools: vec![],
    }
}

/// Paths of the binaries under test.
pub fn bin(name: &str) -> PathBuf {
    let exe = match name {
        "monitor" => env!("CARGO_BIN_EXE_e2e-vigil-monitor"),
        "agent" => env!("CARGO_BIN_EXE_e2e-vigil-agent"),
        "vigilctl" => env!("CARGO_BIN_EXE_e2e-vigilctl"),
        other => panic!("no binary {other}"),
    };
    PathBuf::from(exe)
}

/// A free UDP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a free port");
    s.local_addr().expect("local addr").port()
}

/// The leader that every `vigilctl server list` answer in `lists` agrees on, when each
/// lists `n` voters with exactly one leader among them (`None` for a missing answer).
pub fn agreed_leader_of(lists: impl IntoIterator<Item = Option<Value>>, n: usize) -> Option<u64> {
    let mut leader = None;
    for v in lists {
        let v = v?;
        let s: Vec<Value> = v["servers"].as_array().cloned().unwrap_or_default();
        if s.len() != n || !s.iter().all(|x| x["voter"] == true) {
            return None;
        }
        let leaders: Vec<u64> = s
            .iter()
            .filter(|x| x["state"] == "leader")
            .filter_map(|x| x["id"].as_u64())
            .collect();
        let l = v["leader"].as_u64()?;
        if leaders != [l] || leader.is_some_and(|x| x != l) {
            return None;
        }
        leader = Some(l);
    }
    leader
}

/// Polls `f` every 50 ms until it returns `Some`, or gives up after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster CA and certificates in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        tls::init_ca(&dir.path().join("ca"), "test").expect("init CA");
        Pki { dir }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issues (once) and returns the TLS paths of `name` with `role`, valid for the
    /// production default of 825 days (well outside the 30-day expiry warning).
    pub fn issue(&self, role: Role, name: &str) -> TlsPaths {
        self.issue_days(role, name, 825)
    }

    /// Issues (once) a certificate valid for `days` into the shared `certs` directory (so a
    /// later [`Pki::issue`] of the same name, for example by [`MonitorProc`], reuses it).
    pub fn issue_days(&self, role: Role, name: &str, days: u32) -> TlsPaths {
        let out = self.dir.path().join("certs");
        let cert = out.join(format!("{name}.crt"));
        if !cert.exists() {
            tls::issue_cert(&self.ca_dir(), role, name, &out, &[], days).expect("issue cert");
        }
        TlsPaths {
            ca: out.join("ca.crt"),
            cert,
            key: out.join(format!("{name}.key")),
            crl: None,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// Fast detector settings for tests.
pub const DETECTOR_TOML: &str =
    "[detector]\nheartbeat_interval_ms = 100\nsuspect_after_ms = 300\ndown_after_ms = 600\n";

fn toml_tls(t: &TlsPaths) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        t.ca.display().to_string(),
        t.cert.display().to_string(),
        t.key.display().to_string()
    )
}

/// A child process ended (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("clone log");
        cmd.stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn");
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, like a crash, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful) and wait up to 10 s, then SIGKILL.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGHUP: the daemons reload their certificates (and the monitor its CRL).
    pub fn hup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {} failed", self.pid());
    }

    /// Whether it already exited, and how.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A monitor process with its own data directory.
pub struct MonitorProc {
    pub proc_: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub config: PathBuf,
}

impl MonitorProc {
    /// Writes a config into `dir` and starts the monitor.
    pub fn start(pki: &Pki, dir: &Path, extra_toml: &str) -> MonitorProc {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_at(pki, dir, addr, extra_toml)
    }

    /// Writes a config into `dir` and starts the monitor with `--init` (a new cluster).
    pub fn start_at(pki: &Pki, dir: &Path, addr: SocketAddr, extra_toml: &str) -> MonitorProc {
        let (config, data_dir) = Self::write_config(pki, dir, addr, extra_toml);
        Self::spawn_with(config, addr, data_dir, dir, true)
    }

    /// Writes `dir/monitor.toml` (data directory `dir/data`); returns (config, data_dir).
    pub fn write_config(
        pki: &Pki,
        dir: &Path,
        addr: SocketAddr,
        extra_toml: &str,
    ) -> (PathBuf, PathBuf) {
        Self::write_config_as(pki, dir, addr, 1, "mon1", extra_toml)
    }

    /// [`MonitorProc::write_config`] for Raft node `node_id` with the monitor certificate
    /// named `cert_name` (`mon<node_id>` unless a test wants them to disagree).
    pub fn write_config_as(
        pki: &Pki,
        dir: &Path,
        addr: SocketAddr,
        node_id: u64,
        cert_name: &str,
        extra_toml: &str,
    ) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let t = pki.issue(Role::Monitor, cert_name);
        let data_dir = dir.join("data");
        let config = dir.join("monitor.toml");
        std::fs::write(
            &config,
            format!(
                "node_id = {node_id}\ndata_dir = {:?}\nlisten = \"{addr}\"\n{extra_toml}\n{}",
                data_dir.display().to_string(),
                toml_tls(&t)
            ),
        )
        .expect("write config");
        (config, data_dir)
    }

    /// Starts a monitor on an existing config; `init`: with `--init` (first start of a new
    /// cluster only: the monitor refuses it on an existing database, and refuses to start
    /// without it on a missing one).
    pub fn spawn_with(
        config: PathBuf,
        addr: SocketAddr,
        data_dir: PathBuf,
        dir: &Path,
        init: bool,
    ) -> MonitorProc {
        let flags: &[&str] = if init { &["--init"] } else { &[] };
        Self::spawn_flags(config, addr, data_dir, dir, flags)
    }

    /// Starts a monitor on an existing config with extra command-line flags (`--join`).
    pub fn spawn_flags(
        config: PathBuf,
        addr: SocketAddr,
        data_dir: PathBuf,
        dir: &Path,
        flags: &[&str],
    ) -> MonitorProc {
        let mut cmd = Command::new(bin("monitor"));
        cmd.arg("--config").arg(&config).args(flags);
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let proc_ = Proc::spawn(cmd, dir.join(format!("monitor-{n}.log")));
        MonitorProc {
            proc_,
            addr,
            data_dir,
            config,
        }
    }

    /// Starts the same monitor again (same config and data directory, without `--init`).
    pub fn restart(&mut self, crash: bool) {
        if crash {
            self.proc_.kill();
        } else {
            self.proc_.terminate();
        }
        let dir = self.config.parent().expect("config dir").to_path_buf();
        let fresh = Self::spawn_with(
            self.config.clone(),
            self.addr,
            self.data_dir.clone(),
            &dir,
            false,
        );
        *self = fresh;
    }
}

/// An agent process.
pub struct AgentProc {
    pub proc_: Proc,
    pub host: String,
}

impl AgentProc {
    pub fn start(pki: &Pki, dir: &Path, host: &str, monitor: SocketAddr, extra: &str) -> AgentProc {
        let t = pki.issue(Role::Agent, host);
        Self::start_with_tls(&t, dir, host, monitor, extra)
    }

    pub fn start_with_tls(
        t: &TlsPaths,
        dir: &Path,
        host: &str,
        monitor: SocketAddr,
        extra: &str,
    ) -> AgentProc {
        Self::start_listing(t, dir, host, &[monitor], extra)
    }

    /// An agent whose config lists every address of `monitors`, in that order.
    pub fn start_with_monitors(
        pki: &Pki,
        dir: &Path,
        host: &str,
        monitors: &[SocketAddr],
        extra: &str,
    ) -> AgentProc {
        let t = pki.issue(Role::Agent, host);
        Self::start_listing(&t, dir, host, monitors, extra)
    }

    fn start_listing(
        t: &TlsPaths,
        dir: &Path,
        host: &str,
        monitors: &[SocketAddr],
        extra: &str,
    ) -> AgentProc {
        std::fs::create_dir_all(dir).expect("mkdir");
        let config = dir.join(format!("agent-{host}.toml"));
        let list = monitors
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "monitors = [{list}]\nreconnect_ms = 100\nstate_dir = {:?}\n{}\n{extra}\n{}",
                dir.join(format!("agent-{host}-state"))
                    .display()
                    .to_string(),
                if extra.contains("libvirt_") {
                    ""
                } else {
                    "libvirt_enabled = false"
                },
                toml_tls(t)
            ),
        )
        .expect("write agent config");
        let mut cmd = Command::new(bin("agent"));
        cmd.arg("--config").arg(&config);
        AgentProc {
            proc_: Proc::spawn(cmd, dir.join(format!("agent-{host}.log"))),
            host: host.to_string(),
        }
    }
}

/// Runs vigilctl against a monitor with an admin certificate.
pub struct Ctl {
    pub tls: TlsPaths,
    pub monitors: Vec<SocketAddr>,
}

impl Ctl {
    pub fn new(pki: &Pki, monitors: Vec<SocketAddr>) -> Ctl {
        Ctl {
            tls: pki.issue(Role::Admin, "operator"),
            monitors,
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// [`Ctl::run`] with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let list: Vec<String> = self.monitors.iter().map(|m| m.to_string()).collect();
        Command::new(bin("vigilctl"))
            .envs(env.iter().copied())
            .arg("--monitor")
            .arg(list.join(","))
            .arg("--ca")
            .arg(&self.tls.ca)
            .arg("--cert")
            .arg(&self.tls.cert)
            .arg("--key")
            .arg(&self.tls.key)
            .arg("--timeout")
            .arg("3")
            .args(args)
            .output()
            .expect("run vigilctl")
    }

    /// Runs with `--json` and parses the answer; `Err(stderr)` if the command failed.
    pub fn json(&self, args: &[&str]) -> Result<Value, String> {
        self.json_env(args, &[])
    }

    /// [`Ctl::json`] with extra environment variables.
    pub fn json_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Value, String> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run_env(&a, env);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad json: {e}"))
    }

    /// Waits until the monitor answers `status`.
    pub fn wait_ready(&self, timeout: Duration) -> Value {
        let mut last = String::new();
        wait_for(timeout, || match self.json(&["status"]) {
            Ok(v) => Some(v),
            Err(e) => {
                last = e;
                None
            }
        })
        .unwrap_or_else(|| panic!("monitor not ready within {timeout:?}: {last}"))
    }

    /// Waits until `mon` answers `status`, or says why not: the monitor exited (its exit
    /// status and the end of its log, where a refused config is named), or it did not
    /// answer within `timeout`. For benchmarks, which must fail loudly rather than measure
    /// a monitor that never started.
    pub fn wait_started(&self, mon: &mut MonitorProc, timeout: Duration) -> Result<Value, String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(exit) = mon.proc_.try_exit() {
                return Err(format!(
                    "the monitor exited ({exit}) before answering status; its log ({}) ends:\n{}",
                    mon.proc_.log.display(),
                    log_tail(&mon.proc_.log_text(), 20)
                ));
            }
            let last = match self.json(&["status"]) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if Instant::now() >= end {
                return Err(format!(
                    "the monitor did not answer status within {timeout:?} (last error: {}); its log ({}) ends:\n{}",
                    last.trim(),
                    mon.proc_.log.display(),
                    log_tail(&mon.proc_.log_text(), 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The liveness of `host`, if the monitor knows it.
    pub fn liveness(&self, host: &str) -> Option<String> {
        let v = self.json(&["host", "show", host]).ok()?;
        v.get("liveness")?.as_str().map(String::from)
    }

    /// Events as (host, message) pairs.
    pub fn events(&self) -> Vec<Value> {
        self.json(&["events", "--limit", "1000"])
            .ok()
            .and_then(|v| v.get("events").and_then(|e| e.as_array().cloned()))
            .unwrap_or_default()
    }
}

/// The last `n` lines of `text`.
pub fn log_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether benchmarks run at their tiny size (`VIGIL_BENCH_TINY=1`: a few agents, one run
/// per path), as CI runs them so that none stops working unnoticed.
pub fn bench_tiny() -> bool {
    std::env::var("VIGIL_BENCH_TINY").is_ok_and(|v| v == "1")
}
