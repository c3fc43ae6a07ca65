//! The lab supervisor: one long-lived process that starts every lab process as its own child,
//! waits for (reaps) each of them, and ends them by PID.
//!
//! It runs in its own session (`setsid`), is a child subreaper (processes that daemonize below
//! it, or whose parent dies, are re-parented to it and reaped by it rather than by PID 1, which
//! does not reap here), and answers JSON requests on `ROOT/supervisor.sock`, one per
//! connection: ping, spawn, list, signal, shutdown. Its process table is also written to
//! `ROOT/procs.json` after every change, so `vigil-lab down` finds every process even after the
//! supervisor itself was killed.
//!
//! The supervisor's own exit: whoever started it must wait for it. `vigil-lab up` starts it
//! detached and exits, so the supervisor is then an orphan of PID 1, and on a machine whose
//! PID 1 does not reap (like this one) it stays a zombie after `down` (no memory, no files, no
//! namespaces: a process-table entry only). A caller that wants no zombie at all starts
//! `vigil-lab supervise` itself, as its own child, before `up` (which then uses it) and waits
//! for it after `down`; the integration tests do that.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::layout::{now_ms, Lab};
use crate::procfs;

/// What to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnSpec {
    /// Unique key, e.g. `hv1/agent`.
    pub name: String,
    /// The lab node it belongs to (`hv1`, `mon1`, `lab`).
    pub group: String,
    /// `agent`, `libvirt`, `monitor`, `faultfs`, `observer`, `bmc`.
    pub role: String,
    pub argv: Vec<String>,
    /// Run inside this network namespace (through `ip netns exec`).
    pub netns: Option<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr go here (appended).
    pub log: PathBuf,
    /// At shutdown, lower orders are stopped first.
    pub stop_order: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    pub at_ms: u64,
    pub code: Option<i32>,
    pub signal: Option<String>,
}

/// One process of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcEntry {
    pub name: String,
    pub group: String,
    pub role: String,
    pub pid: i32,
    /// With the PID, names the process uniquely (PIDs are reused).
    pub starttime: u64,
    /// As executed (with the `ip netns exec NS` prefix).
    pub argv: Vec<String>,
    pub netns: Option<String>,
    pub log: PathBuf,
    pub started_ms: u64,
    pub stop_order: u32,
    pub exit: Option<ExitInfo>,
}

impl ProcEntry {
    /// Not yet reaped by the supervisor.
    pub fn running(&self) -> bool {
        self.exit.is_none()
    }
    /// Running according to /proc (works without the supervisor).
    pub fn alive(&self) -> bool {
        self.exit.is_none() && procfs::alive(self.pid, Some(self.starttime))
    }
}

/// The supervisor's process table (also `procs.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcTable {
    pub supervisor_pid: i32,
    pub supervisor_starttime: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub shutting_down: bool,
    pub stopped: bool,
    /// The newest process of each name.
    pub procs: Vec<ProcEntry>,
    /// Earlier processes of the same names (newest last, bounded).
    pub history: Vec<ProcEntry>,
}

impl ProcTable {
    pub fn get(&self, name: &str) -> Option<&ProcEntry> {
        self.procs.iter().find(|p| p.name == name)
    }
    pub fn supervisor_alive(&self) -> bool {
        !self.stopped && procfs::alive(self.supervisor_pid, Some(self.supervisor_starttime))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Spawn { spec: SpawnSpec },
    List,
    Signal { name: String, signal: i32 },
    Shutdown { grace_ms: u64 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub error: Option<String>,
    pub entry: Option<ProcEntry>,
    pub table: Option<ProcTable>,
}

// ------------------------------------------------------------------------------------------
// Client side.

/// Sends one request and reads the answer.
pub fn request(lab: &Lab, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let sock = lab.socket();
    let mut s = UnixStream::connect(&sock)
        .with_context(|| format!("cannot reach the lab supervisor at {}", sock.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .context("reading the supervisor's answer")?;
    if answer.trim().is_empty() {
        bail!("the lab supervisor closed the connection without an answer");
    }
    Ok(serde_json::from_str(&answer)?)
}

/// Like [`request`], but an error answer is an error.
pub fn call(lab: &Lab, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let r = request(lab, req, timeout)?;
    if !r.ok {
        bail!(
            "lab supervisor: {}",
            r.error.unwrap_or_else(|| "request failed".into())
        );
    }
    Ok(r)
}

/// The table as last written to `procs.json`.
pub fn read_table_file(lab: &Lab) -> Option<ProcTable> {
    let text = fs::read_to_string(lab.procs_file()).ok()?;
    serde_json::from_str(&text).ok()
}

/// True when a supervisor answers on the lab's socket.
pub fn answers(lab: &Lab) -> bool {
    request(lab, &Request::Ping, Duration::from_secs(3)).is_ok_and(|r| r.ok)
}

/// The live table from the supervisor, or the file when the supervisor does not answer.
pub fn table(lab: &Lab) -> Option<ProcTable> {
    match request(lab, &Request::List, Duration::from_secs(5)) {
        Ok(Response {
            ok: true,
            table: Some(t),
            ..
        }) => Some(t),
        _ => read_table_file(lab),
    }
}

pub fn spawn(lab: &Lab, spec: SpawnSpec) -> anyhow::Result<ProcEntry> {
    let r = call(lab, &Request::Spawn { spec }, Duration::from_secs(15))?;
    r.entry.context("the supervisor answered without an entry")
}

/// Waits until the supervisor reaped the process `name`; returns its entry.
pub fn wait_exit(lab: &Lab, name: &str, timeout: Duration) -> anyhow::Result<ProcEntry> {
    let deadline = Instant::now() + timeout;
    loop {
        let t = table(lab).context("no process table")?;
        let e = t.get(name).with_context(|| format!("no process {name}"))?;
        if !e.running() {
            return Ok(e.clone());
        }
        // The supervisor is gone: /proc is the only witness left.
        if !t.supervisor_alive() && !e.alive() {
            return Ok(e.clone());
        }
        if Instant::now() >= deadline {
            bail!("{name} (pid {}) did not exit within {timeout:?}", e.pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------------------------
// Server side.

struct Inner {
    table: ProcTable,
    /// The reaper saw ECHILD (no child at all) since the last spawn.
    no_children: bool,
}

struct Shared {
    lab: Lab,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn log(msg: &str) {
    eprintln!("[{}] supervisor {}: {msg}", now_ms(), std::process::id());
}

fn persist(lab: &Lab, inner: &mut Inner) {
    inner.table.updated_ms = now_ms();
    let path = lab.procs_file();
    let tmp = path.with_extension("json.tmp");
    let res = serde_json::to_vec_pretty(&inner.table)
        .map_err(anyhow::Error::from)
        .and_then(|b| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&b)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            Ok(())
        });
    if let Err(e) = res {
        log(&format!("cannot write {}: {e:#}", path.display()));
    }
}

/// Runs the supervisor until a shutdown request or SIGTERM/SIGINT. Never returns normally.
pub fn serve(lab: Lab) -> anyhow::Result<()> {
    // Own session: no terminal signals, independent of whoever started us.
    let _ = nix::unistd::setsid();
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    std::env::set_current_dir("/")?;
    fs::create_dir_all(&lab.root)?;
    let sock = lab.socket();
    if sock.exists() {
        if answers(&lab) {
            bail!("a lab supervisor already answers on {}", sock.display());
        }
        fs::remove_file(&sock)?;
    }
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o600))?;
    let me = std::process::id() as i32;
    let shared = Arc::new(Shared {
        lab: lab.clone(),
        inner: Mutex::new(Inner {
            table: ProcTable {
                supervisor_pid: me,
                supervisor_starttime: procfs::starttime(me).unwrap_or(0),
                started_ms: now_ms(),
                ..ProcTable::default()
            },
            no_children: true,
        }),
        cv: Condvar::new(),
    });
    {
        let mut g = shared.lock();
        persist(&lab, &mut g);
    }
    log(&format!("listening on {}", sock.display()));

    let sh = shared.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper(sh))?;
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || signals(sh))?;

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let sh = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || handle(sh, stream));
            }
            Err(e) => {
                log(&format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

fn finish(shared: &Shared) -> ! {
    let _ = fs::remove_file(shared.lab.socket());
    log("exiting");
    std::process::exit(0)
}

fn signals(shared: Arc<Shared>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log(&format!("no signal handling: {e}"));
            return;
        }
    };
    let got = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<(), std::io::Error>(())
    });
    if let Err(e) = got {
        log(&format!("no signal handling: {e}"));
        return;
    }
    log("signal received: stopping every lab process");
    shutdown(&shared, Duration::from_secs(20));
    finish(&shared);
}

fn reaper(shared: Arc<Shared>) {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(status) => {
                let (pid, code, signal) = match status {
                    WaitStatus::Exited(pid, code) => (pid, Some(code), None),
                    WaitStatus::Signaled(pid, sig, _) => {
                        (pid, None, Some(sig.as_str().to_string()))
                    }
                    _ => continue,
                };
                let pid = pid.as_raw();
                let mut g = shared.lock();
                let found = g
                    .table
                    .procs
                    .iter_mut()
                    .find(|p| p.pid == pid && p.exit.is_none());
                match found {
                    Some(p) => {
                        log(&format!(
                            "{} (pid {pid}) exited: code {code:?}, signal {signal:?}",
                            p.name
                        ));
                        p.exit = Some(ExitInfo {
                            at_ms: now_ms(),
                            code,
                            signal,
                        });
                        persist(&shared.lab, &mut g);
                    }
                    None => log(&format!(
                        "reaped adopted process {pid}: code {code:?}, signal {signal:?}"
                    )),
                }
                shared.cv.notify_all();
            }
            Err(Errno::ECHILD) => {
                {
                    let mut g = shared.lock();
                    g.no_children = true;
                }
                shared.cv.notify_all();
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                log(&format!("waitpid: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(shared: Arc<Shared>, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            respond(&stream, Err(anyhow::anyhow!("bad request: {e}")));
            return;
        }
    };
    match req {
        Request::Ping => respond(&stream, Ok(Response::default())),
        Request::List => {
            let t = shared.lock().table.clone();
            respond(
                &stream,
                Ok(Response {
                    table: Some(t),
                    ..Response::default()
                }),
            )
        }
        Request::Spawn { spec } => {
            let r = do_spawn(&shared, spec).map(|e| Response {
                entry: Some(e),
                ..Response::default()
            });
            respond(&stream, r)
        }
        Request::Signal { name, signal } => {
            let r = do_signal(&shared, &name, signal).map(|e| Response {
                entry: Some(e),
                ..Response::default()
            });
            respond(&stream, r)
        }
        Request::Shutdown { grace_ms } => {
            shutdown(&shared, Duration::from_millis(grace_ms));
            let t = shared.lock().table.clone();
            respond(
                &stream,
                Ok(Response {
                    table: Some(t),
                    ..Response::default()
                }),
            );
            finish(&shared);
        }
    }
}

fn respond(mut stream: &UnixStream, r: anyhow::Result<Response>) {
    let resp = match r {
        Ok(mut r) => {
            r.ok = true;
            r
        }
        Err(e) => Response {
            ok: false,
            error: Some(format!("{e:#}")),
            ..Response::default()
        },
    };
    if let Ok(mut s) = serde_json::to_string(&resp) {
        s.push('\n');
        let _ = stream.write_all(s.as_bytes());
        let _ = stream.flush();
    }
}

fn do_spawn(shared: &Shared, spec: SpawnSpec) -> anyhow::Result<ProcEntry> {
    if spec.argv.is_empty() {
        bail!("empty argv");
    }
    let mut g = shared.lock();
    if g.table.shutting_down {
        bail!("the lab is shutting down");
    }
    if let Some(p) = g.table.get(&spec.name) {
        if p.running() {
            bail!("{} is already running (pid {})", spec.name, p.pid);
        }
    }
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = &spec.netns {
        argv.extend(["ip", "netns", "exec", ns.as_str()].map(String::from));
    }
    argv.extend(spec.argv.iter().cloned());
    if let Some(dir) = spec.log.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut logf = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening {}", spec.log.display()))?;
    let _ = writeln!(
        logf,
        "==== {} vigil-lab supervisor: starting {}: {}",
        now_ms(),
        spec.name,
        argv.join(" ")
    );
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .current_dir("/")
        .process_group(0);
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}: {}", spec.name, argv.join(" ")))?;
    let pid = child.id() as i32;
    // Reaped by the reaper thread (waitpid(-1)), never through this handle.
    drop(child);
    let entry = ProcEntry {
        name: spec.name.clone(),
        group: spec.group,
        role: spec.role,
        pid,
        starttime: procfs::starttime(pid).unwrap_or(0),
        argv,
        netns: spec.netns,
        log: spec.log,
        started_ms: now_ms(),
        stop_order: spec.stop_order,
        exit: None,
    };
    log(&format!("started {} (pid {pid})", entry.name));
    if let Some(i) = g.table.procs.iter().position(|p| p.name == spec.name) {
        let old = g.table.procs.remove(i);
        g.table.history.push(old);
        let n = g.table.history.len();
        if n > 500 {
            g.table.history.drain(..n - 500);
        }
    }
    g.table.procs.push(entry.clone());
    g.no_children = false;
    persist(&shared.lab, &mut g);
    Ok(entry)
}

fn do_signal(shared: &Shared, name: &str, signal: i32) -> anyhow::Result<ProcEntry> {
    let sig = Signal::try_from(signal).with_context(|| format!("bad signal {signal}"))?;
    let g = shared.lock();
    let p = g
        .table
        .get(name)
        .with_context(|| format!("no process {name}"))?;
    if !p.running() {
        bail!("{name} is not running");
    }
    kill(Pid::from_raw(p.pid), sig).with_context(|| format!("kill {} {}", sig, p.pid))?;
    log(&format!("sent {sig} to {name} (pid {})", p.pid));
    Ok(p.clone())
}

/// Stops every process (by stop order: SIGTERM, then SIGKILL after `grace`), then any adopted
/// orphan, and waits until the supervisor has no child left.
fn shutdown(shared: &Shared, grace: Duration) {
    {
        let mut g = shared.lock();
        if g.table.shutting_down {
            // A second request: wait for the first one to finish.
            while !g.table.stopped {
                g = shared
                    .cv
                    .wait_timeout(g, Duration::from_millis(200))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            return;
        }
        g.table.shutting_down = true;
        persist(&shared.lab, &mut g);
    }
    let orders: BTreeSet<u32> = shared
        .lock()
        .table
        .procs
        .iter()
        .filter(|p| p.running())
        .map(|p| p.stop_order)
        .collect();
    for order in orders {
        let targets: Vec<(String, i32)> = shared
            .lock()
            .table
            .procs
            .iter()
            .filter(|p| p.running() && p.stop_order == order)
            .map(|p| (p.name.clone(), p.pid))
            .collect();
        for (name, pid) in &targets {
            log(&format!("stopping {name} (pid {pid}): SIGTERM"));
            let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
        }
        if !wait_reaped(shared, &targets, grace) {
            for (name, pid) in &targets {
                log(&format!("{name} (pid {pid}) ignored SIGTERM: SIGKILL"));
                let _ = kill(Pid::from_raw(-*pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            wait_reaped(shared, &targets, Duration::from_secs(5));
        }
    }
    // Adopted orphans (QEMU of a crashed sandbox, ...).
    let me = std::process::id() as i32;
    let t0 = Instant::now();
    loop {
        let kids = procfs::children_of(me);
        if kids.is_empty() {
            break;
        }
        let sig = if t0.elapsed() < Duration::from_secs(3) {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        for k in &kids {
            let _ = kill(Pid::from_raw(*k), sig);
        }
        if t0.elapsed() > Duration::from_secs(15) {
            log(&format!("giving up on children {kids:?}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Until the reaper has collected every child, zombies included.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut g = shared.lock();
    while !g.no_children && Instant::now() < deadline {
        g = shared
            .cv
            .wait_timeout(g, Duration::from_millis(100))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    g.table.stopped = true;
    persist(&shared.lab, &mut g);
    shared.cv.notify_all();
    log("every lab process stopped");
}

/// Waits until every target was reaped; false on timeout.
fn wait_reaped(shared: &Shared, targets: &[(String, i32)], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut g = shared.lock();
    loop {
        let all = targets.iter().all(|(name, pid)| {
            g.table
                .procs
                .iter()
                .find(|p| &p.name == name && p.pid == *pid)
                .is_none_or(|p| !p.running())
        });
        if all {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        g = shared
            .cv
            .wait_timeout(g, (deadline - now).min(Duration::from_millis(100)))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let req = Request::Spawn {
            spec: SpawnSpec {
                name: "hv1/agent".into(),
                group: "hv1".into(),
                role: "agent".into(),
                argv: vec!["/bin/true".into()],
                netns: Some("vl-hv1".into()),
                env: vec![("K".into(), "V".into())],
                log: PathBuf::from("/tmp/x.log"),
                stop_order: 10,
            },
        };
        let text = serde_json::to_string(&req).expect("json");
        assert!(text.contains("\"op\":\"spawn\""), "{text}");
        let back: Request = serde_json::from_str(&text).expect("parse");
        assert!(matches!(back, Request::Spawn { spec } if spec.name == "hv1/agent"));
        let s: Request = serde_json::from_str(r#"{"op":"shutdown","grace_ms":5}"#).expect("p");
        assert!(matches!(s, Request::Shutdown { grace_ms: 5 }));
    }

    #[test]
    fn a_dead_supervisor_is_not_alive() {
        let t = ProcTable {
            supervisor_pid: std::process::id() as i32,
            supervisor_starttime: procfs::starttime(std::process::id() as i32).unwrap_or(0),
            ..ProcTable::default()
        };
        assert!(t.supervisor_alive());
        let stopped = ProcTable {
            stopped: true,
            ..t.clone()
        };
        assert!(!stopped.supervisor_alive());
        let reused = ProcTable {
            supervisor_starttime: t.supervisor_starttime + 1,
            ..t
        };
        assert!(!reused.supervisor_alive());
    }
}
