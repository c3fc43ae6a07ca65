//! `vigil-observer watch`: one thread per host that follows its libvirt and writes every change.
//!
//! Two independent sources per host, so that one missing never hides a change:
//! - lifecycle events through the agent's libvirt backend ([`vigil_agent::libvirt::Hypervisor`],
//!   its own connection, re-registered after every reconnect); their timestamps are taken in the
//!   libvirt callback;
//! - a poll every `poll` of the host's *active* domains (`virConnectListAllDomains(ACTIVE)`: one
//!   RPC however many domains) on a connection of its own, served by a worker thread so that a
//!   hung libvirtd never stalls the watcher: no answer within `deadline` counts as unreachable.
//!   While a poll fails or has waited longer than `poll`, the known qemu processes are checked.
//!
//! A domain is running while libvirt counts it active (running, paused, ...: its qemu exists).
//! When the host's libvirtd cannot be reached, its domains are **not** assumed stopped: each one
//! stays running until its qemu process (PID and start time, taken from libvirt's pid file
//! `PIDDIR/NAME.pid` while the host was reachable) is gone from /proc, or until libvirt, reachable
//! again, says so. Without a PIDDIR, or before a pid file was seen, that takes libvirt's word.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::mpsc as tokio_mpsc;
use vigil_agent::libvirt::Hypervisor;
use vigil_common::domain::DomainEvent;
use virt::connect::Connect;
use virt::sys;

use crate::procs::{self, ProcId};
use crate::timeline::{now_ms, Record, Writer, HOST_REACHABLE, HOST_UNREACHABLE};

/// One `--host NAME=URI[,PIDDIR]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    pub uri: String,
    /// libvirt's qemu pid-file directory of that host (`.../run/libvirt/qemu`).
    pub pid_dir: Option<PathBuf>,
}

impl std::str::FromStr for HostSpec {
    type Err = anyhow::Error;

    /// `NAME=URI` or `NAME=URI,PIDDIR` (PIDDIR absolute; the URI itself may contain `=`).
    fn from_str(s: &str) -> anyhow::Result<HostSpec> {
        let Some((name, rest)) = s.split_once('=') else {
            bail!("--host wants NAME=URI[,PIDDIR], got {s:?}");
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            bail!("--host {s:?}: NAME must be [A-Za-z0-9_.-]+");
        }
        let (uri, pid_dir) = match rest.rsplit_once(',') {
            Some((uri, dir)) if dir.starts_with('/') => (uri, Some(PathBuf::from(dir))),
            _ => (rest, None),
        };
        if uri.is_empty() || !uri.contains(':') {
            bail!("--host {s:?}: {uri:?} is not a libvirt URI");
        }
        Ok(HostSpec {
            name: name.to_string(),
            uri: uri.to_string(),
            pid_dir,
        })
    }
}

/// Timing of the watcher.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Poll interval.
    pub poll: Duration,
    /// A poll without an answer after this long counts as libvirtd unreachable.
    pub deadline: Duration,
}

/// What one poll found: the active domains as (uuid, name), or why libvirt could not be asked.
type PollResult = Result<Vec<(String, String)>, String>;

/// A poll's answer with the times it was asked (`issued_ms`) and answered (`done_ms`).
struct Answer {
    issued_ms: u64,
    done_ms: u64,
    result: PollResult,
}

/// Asks the poll worker thread; at most one request outstanding. A late answer is still used:
/// it carries the times it was asked and answered.
struct Poller {
    req: SyncSender<()>,
    rep: Receiver<Answer>,
    pending_since: Option<Instant>,
}

impl Poller {
    fn start(host: &str, uri: &str) -> anyhow::Result<Poller> {
        let (req_tx, req_rx) = mpsc::sync_channel::<()>(1);
        let (rep_tx, rep_rx) = mpsc::channel::<Answer>();
        let uri = uri.to_string();
        std::thread::Builder::new()
            .name(format!("poll-{host}"))
            .spawn(move || poll_worker(&uri, &req_rx, &rep_tx))
            .context("spawn the poll thread")?;
        Ok(Poller {
            req: req_tx,
            rep: rep_rx,
            pending_since: None,
        })
    }

    /// The answer to the outstanding (or a new) request, or `None` when there is none after
    /// waiting at most `wait` now.
    fn ask(&mut self, wait: Duration) -> Option<Answer> {
        if self.pending_since.is_none() {
            if self.req.try_send(()).is_err() {
                return None;
            }
            self.pending_since = Some(Instant::now());
        }
        match self.rep.recv_timeout(wait) {
            Ok(a) => {
                self.pending_since = None;
                Some(a)
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// How long the outstanding request has waited.
    fn waiting(&self) -> Option<Duration> {
        self.pending_since.map(|t| t.elapsed())
    }
}

fn poll_worker(uri: &str, req: &Receiver<()>, rep: &mpsc::Sender<Answer>) {
    let mut conn: Option<Connect> = None;
    while req.recv().is_ok() {
        let issued_ms = now_ms();
        let result = poll_once(uri, &mut conn);
        let answer = Answer {
            issued_ms,
            done_ms: now_ms(),
            result,
        };
        if rep.send(answer).is_err() {
            break;
        }
    }
    if let Some(mut c) = conn.take() {
        let _ = c.close();
    }
}

fn poll_once(uri: &str, conn: &mut Option<Connect>) -> PollResult {
    if conn.is_none() {
        let c = Connect::open(Some(uri)).map_err(|e| format!("cannot connect: {e}"))?;
        // Needs the event loop (registered before any connection): a peer that stops
        // answering is dropped after ~6 s instead of never.
        let _ = c.set_keep_alive(2, 2);
        *conn = Some(c);
    }
    let Some(c) = conn.as_ref() else {
        return Err("not connected".into());
    };
    match c.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE) {
        Ok(doms) => Ok(doms
            .iter()
            .filter_map(|d| {
                let uuid = d.get_uuid_string().ok()?.to_ascii_lowercase();
                let name = d.get_name().ok()?;
                Some((uuid, name))
            })
            .collect()),
        Err(e) => {
            if let Some(mut c) = conn.take() {
                let _ = c.close();
            }
            Err(format!("list domains: {e}"))
        }
    }
}

/// What the watcher believes about one domain on one host.
#[derive(Debug)]
struct Dom {
    name: String,
    running: bool,
    /// When the last change was observed (event time, or the poll's time).
    changed_ms: u64,
    /// Its qemu, once the pid file was read while it ran.
    qemu: Option<ProcId>,
    /// The qemu whose death ended the last instance while libvirtd did not answer: until
    /// libvirtd stops listing the domain, a poll that lists it is that instance dying.
    died: Option<ProcId>,
}

/// Whether a poll that lists a stopped domain as active shows a new instance. libvirtd goes
/// on listing a domain for a moment after its qemu died (during a destroy, or while it
/// cleans up): after a death seen through the pid, only a live qemu other than the dead one
/// is a new instance. (Before this, such a poll was counted as a restart in place, and a
/// destroyed VM showed two instances on its host.)
fn revived_by_poll(died: Option<ProcId>, live: Option<ProcId>) -> bool {
    match died {
        None => true,
        Some(dead) => live.is_some_and(|q| q != dead),
    }
}

/// The watcher of one host.
pub struct HostWatch {
    spec: HostSpec,
    timing: Timing,
    out: Arc<Writer>,
    stop: Arc<AtomicBool>,
    /// Keeps the backend (and its event registration) alive.
    _hv: Hypervisor,
    events: Option<tokio_mpsc::Receiver<DomainEvent>>,
    poller: Poller,
    /// `None` until the first poll.
    reachable: Option<bool>,
    doms: HashMap<String, Dom>,
}

impl HostWatch {
    /// Opens the event backend and the poll worker of `spec`; [`HostWatch::run`] does the rest.
    pub fn new(
        spec: HostSpec,
        timing: Timing,
        out: Arc<Writer>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<HostWatch> {
        let hv = Hypervisor::open(&spec.uri, Duration::from_secs(10));
        let events = hv.events();
        if events.is_none() {
            tracing::warn!(host = %spec.name, "no lifecycle events: polling only");
        }
        let poller = Poller::start(&spec.name, &spec.uri)?;
        Ok(HostWatch {
            spec,
            timing,
            out,
            stop,
            _hv: hv,
            events,
            poller,
            reachable: None,
            doms: HashMap::new(),
        })
    }

    /// Starts [`HostWatch::run`] on a thread of its own.
    pub fn spawn(self) -> anyhow::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("watch-{}", self.spec.name))
            .spawn(move || self.run())
            .context("spawn a host watcher")
    }

    /// Watches until the stop flag is set.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let tick = Instant::now();
            self.drain_events();
            let answered = match self.poller.ask(self.timing.poll.min(self.timing.deadline)) {
                Some(Answer {
                    issued_ms,
                    done_ms,
                    result: Ok(active),
                }) => {
                    // Events that arrived while the poll ran come first: they carry exact times.
                    self.drain_events();
                    self.on_active(issued_ms, done_ms, &active);
                    true
                }
                Some(Answer { result: Err(e), .. }) => {
                    self.on_unreachable(e);
                    false
                }
                None => {
                    let waited = self.poller.waiting().unwrap_or_default();
                    if waited >= self.timing.deadline {
                        self.on_unreachable(format!(
                            "libvirtd gave no answer for {} ms",
                            waited.as_millis()
                        ));
                    }
                    false
                }
            };
            if answered {
                self.learn_qemus();
            } else {
                // libvirtd failed or is slow: a qemu that is gone is proof on its own.
                self.check_qemus();
            }
            if let Some(rest) = self.timing.poll.checked_sub(tick.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }

    fn emit(&self, rec: &Record) {
        self.out.write(rec);
    }

    /// Records a change of `uuid` unless the domain is already in that state.
    fn change(
        &mut self,
        t_ms: u64,
        uuid: &str,
        name: &str,
        running: bool,
        source: &str,
        detail: String,
    ) {
        let dom = self.doms.entry(uuid.to_string()).or_insert_with(|| Dom {
            name: name.to_string(),
            running: false,
            changed_ms: 0,
            qemu: None,
            died: None,
        });
        if dom.running == running {
            return;
        }
        dom.running = running;
        dom.changed_ms = t_ms;
        dom.name = name.to_string();
        dom.qemu = None;
        if running {
            dom.died = None;
        }
        let mut rec = Record::vm(t_ms, &self.spec.name, uuid, name, running, source, detail);
        if running {
            if let Some(dir) = &self.spec.pid_dir {
                dom.qemu = procs::qemu_of(dir, name);
                rec.pid = dom.qemu.map(|q| q.pid);
            }
        }
        self.emit(&rec);
    }

    fn drain_events(&mut self) {
        let mut got = Vec::new();
        if let Some(rx) = self.events.as_mut() {
            while let Ok(ev) = rx.try_recv() {
                got.push(ev);
            }
        }
        for ev in got {
            self.on_event(&ev);
        }
    }

    fn on_event(&mut self, ev: &DomainEvent) {
        let running = match ev.raw_event {
            // STARTED, SUSPENDED, RESUMED: qemu exists.
            2..=4 => true,
            // STOPPED: qemu is gone.
            5 => false,
            _ => return,
        };
        let uuid = ev.uuid.to_ascii_lowercase();
        // An event older than what a poll already saw changes nothing.
        if self
            .doms
            .get(&uuid)
            .is_some_and(|d| ev.at_ms < d.changed_ms)
        {
            return;
        }
        let detail = event_detail(ev.raw_event, ev.raw_detail);
        self.change(ev.at_ms, &uuid, &ev.name, running, "event", detail);
    }

    fn on_active(&mut self, issued_ms: u64, done_ms: u64, active: &[(String, String)]) {
        if self.reachable == Some(false) {
            self.emit(&Record::host(
                done_ms,
                &self.spec.name,
                HOST_REACHABLE,
                "libvirtd answers again".into(),
            ));
        }
        self.reachable = Some(true);
        // A domain whose last change was seen after this poll was asked keeps that state.
        let fresh = |d: Option<&Dom>| d.is_none_or(|d| d.changed_ms <= issued_ms);
        for (uuid, name) in active {
            let dom = self.doms.get(uuid);
            if let Some(died) = dom.and_then(|d| d.died) {
                let live = self
                    .spec
                    .pid_dir
                    .as_deref()
                    .and_then(|dir| procs::qemu_of(dir, name));
                if !revived_by_poll(Some(died), live) {
                    continue;
                }
            }
            if fresh(dom) && !dom.is_some_and(|d| d.running) {
                // Started at some time before the answer; the ask time is the earlier bound.
                self.change(issued_ms, uuid, name, true, "poll", "active (poll)".into());
            }
        }
        let gone: Vec<(String, String)> = self
            .doms
            .iter()
            .filter(|(u, d)| d.running && fresh(Some(d)) && !active.iter().any(|(a, _)| a == *u))
            .map(|(u, d)| (u.clone(), d.name.clone()))
            .collect();
        // libvirtd no longer lists them: their dying is over.
        for (uuid, d) in self.doms.iter_mut() {
            if !d.running && !active.iter().any(|(a, _)| a == uuid) {
                d.died = None;
            }
        }
        for (uuid, name) in gone {
            // Stopped at some time before the answer: the answer time is the later bound.
            self.change(
                done_ms,
                &uuid,
                &name,
                false,
                "poll",
                "not active (poll)".into(),
            );
        }
    }

    fn on_unreachable(&mut self, why: String) {
        if self.reachable == Some(false) {
            return;
        }
        self.reachable = Some(false);
        let mut unknown: Vec<&str> = self
            .doms
            .values()
            .filter(|d| d.running && d.qemu.is_none())
            .map(|d| d.name.as_str())
            .collect();
        unknown.sort_unstable();
        let mut detail = why;
        if !unknown.is_empty() {
            detail.push_str(&format!(
                "; no qemu pid known for {} (kept running)",
                unknown.join(", ")
            ));
        }
        self.emit(&Record::host(
            now_ms(),
            &self.spec.name,
            HOST_UNREACHABLE,
            detail,
        ));
    }

    /// While libvirtd fails or does not answer: a domain stops when its qemu process is gone.
    fn check_qemus(&mut self) {
        let gone: Vec<(String, String, ProcId)> = self
            .doms
            .iter()
            .filter_map(|(u, d)| {
                let q = d.qemu?;
                (d.running && !q.alive()).then(|| (u.clone(), d.name.clone(), q))
            })
            .collect();
        for (uuid, name, dead) in gone {
            let detail = format!("qemu pid {} gone while libvirtd does not answer", dead.pid);
            self.change(now_ms(), &uuid, &name, false, "pid", detail);
            if let Some(d) = self.doms.get_mut(&uuid) {
                d.died = Some(dead);
            }
        }
    }

    /// While libvirtd answers: learn the qemu of running domains whose pid file was not there
    /// yet (written to the timeline, so `check` knows each instance's pid), and notice a
    /// running domain whose qemu is another process than the one learned (a restart that no
    /// event or poll showed): that ends one instance and starts another.
    fn learn_qemus(&mut self) {
        let Some(dir) = self.spec.pid_dir.clone() else {
            return;
        };
        let host = self.spec.name.clone();
        let mut recs = Vec::new();
        for (uuid, d) in self.doms.iter_mut() {
            if !d.running {
                continue;
            }
            match d.qemu {
                None => {
                    if let Some(q) = procs::qemu_of(&dir, &d.name) {
                        d.qemu = Some(q);
                        let detail = format!("qemu pid {} (pid file read after the start)", q.pid);
                        let mut rec =
                            Record::vm(now_ms(), &host, uuid, &d.name, true, "pid", detail);
                        rec.pid = Some(q.pid);
                        recs.push(rec);
                    }
                }
                Some(old) if !old.alive() => {
                    if let Some(q) = procs::qemu_of(&dir, &d.name).filter(|q| *q != old) {
                        let t = now_ms();
                        let mut stop = Record::vm(
                            t,
                            &host,
                            uuid,
                            &d.name,
                            false,
                            "pid",
                            format!("qemu pid {} gone, replaced by pid {}", old.pid, q.pid),
                        );
                        stop.pid = Some(old.pid);
                        let mut start = Record::vm(
                            t,
                            &host,
                            uuid,
                            &d.name,
                            true,
                            "pid",
                            format!("qemu pid {} (replaced pid {})", q.pid, old.pid),
                        );
                        start.pid = Some(q.pid);
                        recs.push(stop);
                        recs.push(start);
                        d.qemu = Some(q);
                        d.changed_ms = t;
                    }
                }
                Some(_) => {}
            }
        }
        for r in &recs {
            self.emit(r);
        }
    }
}

/// "started/booted", "stopped/destroyed", ... from libvirt's raw event and detail codes.
pub fn event_detail(event: i32, detail: i32) -> String {
    let (ev, details): (&str, &[&str]) = match event {
        0 => ("defined", &[]),
        1 => ("undefined", &[]),
        2 => (
            "started",
            &[
                "booted",
                "migrated",
                "restored",
                "from_snapshot",
                "wakeup",
                "recreated",
            ],
        ),
        3 => (
            "suspended",
            &[
                "paused",
                "migrated",
                "ioerror",
                "watchdog",
                "restored",
                "from_snapshot",
                "api_error",
                "postcopy",
                "postcopy_failed",
            ],
        ),
        4 => (
            "resumed",
            &[
                "unpaused",
                "migrated",
                "from_snapshot",
                "postcopy",
                "postcopy_failed",
            ],
        ),
        5 => (
            "stopped",
            &[
                "shutdown",
                "destroyed",
                "crashed",
                "migrated",
                "saved",
                "failed",
                "from_snapshot",
            ],
        ),
        _ => ("event", &[]),
    };
    let d = usize::try_from(detail)
        .ok()
        .and_then(|i| details.get(i).copied());
    match d {
        Some(d) => format!("{ev}/{d}"),
        None => format!("{ev}/{detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The observer counted a destroyed VM twice on its host (CI, observer two_hosts test):
    /// its qemu was seen gone while libvirtd was busy with the destroy, and the next poll,
    /// which libvirtd answered before it finished cleaning up, still listed the domain — a
    /// second instance "started" that no qemu ran.
    #[test]
    fn a_poll_that_lists_a_domain_whose_qemu_died_is_not_a_new_instance() {
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep")
        };
        let mut first = spawn();
        let dead = procs::live(first.id()).expect("the first stand-in qemu is alive");
        first.kill().expect("kill");
        first.wait().expect("wait");
        assert!(!dead.alive());
        // libvirtd still lists it and no live qemu runs it: the same instance, dying.
        assert!(!revived_by_poll(Some(dead), None));
        // A live qemu other than the dead one: a new instance.
        let mut second = spawn();
        let live = procs::live(second.id());
        assert!(live.is_some());
        assert!(revived_by_poll(Some(dead), live));
        let _ = second.kill();
        let _ = second.wait();
        // Without a death seen through the pid, a poll's word is taken.
        assert!(revived_by_poll(None, None));
    }

    #[test]
    fn host_specs_parse() {
        let h: HostSpec = "hv1=qemu+unix:///system?socket=/tmp/a/run/libvirt/libvirt-sock"
            .parse()
            .expect("plain");
        assert_eq!(h.name, "hv1");
        assert_eq!(
            h.uri,
            "qemu+unix:///system?socket=/tmp/a/run/libvirt/libvirt-sock"
        );
        assert_eq!(h.pid_dir, None);
        let h: HostSpec =
            "hv2=qemu+unix:///system?socket=/tmp/b/run/libvirt/libvirt-sock,/tmp/b/run/libvirt/qemu"
                .parse()
                .expect("with piddir");
        assert_eq!(h.pid_dir, Some(PathBuf::from("/tmp/b/run/libvirt/qemu")));
        assert!("nouri".parse::<HostSpec>().is_err());
        assert!("bad name=test:///default".parse::<HostSpec>().is_err());
    }

    #[test]
    fn event_details_are_named() {
        assert_eq!(event_detail(2, 0), "started/booted");
        assert_eq!(event_detail(5, 5), "stopped/failed");
        assert_eq!(event_detail(5, 99), "stopped/99");
    }
}
