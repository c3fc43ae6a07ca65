//! `vigil-observer check`: reads a timeline and tells whether any VM ran on two hosts at once,
//! and how long each VM was down between losing it and having it running again.
//!
//! Per VM (uuid) and host, "running" and "stopped" lines make running intervals
//! `[start, end)`; an interval still open when the timeline ends lasts until its last line. Two
//! intervals of one VM on different hosts overlap when each starts before the other ends:
//! touching intervals (one stops at t, the other starts at t) do not. Host lines do not end
//! intervals: a host whose libvirtd became unreachable keeps its domains running in the timeline
//! until the watcher proved their qemu gone (see `watch`), so an overlap with such a host is a
//! failure too, reported with a note.
//!
//! Each interval is one QEMU *instance* (one qemu process): a `running` line that names a
//! different qemu PID than the open interval's ends that interval and opens another (a restart
//! that no stop line showed), so a VM restarted in place between two looks still counts twice.
//! [`Report::vm`], [`Report::starts_since`] and [`Report::stops_since`] answer "started exactly
//! once after the fault, on hv1" and "nothing on the other hosts stopped".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::timeline::{Record, HOST_REACHABLE, HOST_UNREACHABLE, RUNNING, STOPPED};

/// One stretch of time during which a VM ran on one host: one QEMU instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interval {
    pub host: String,
    pub start_ms: u64,
    /// The stop, or the end of the timeline when `open`.
    pub end_ms: u64,
    /// The stop; `None` while it still runs at the end of the timeline.
    pub stop_ms: Option<u64>,
    /// Still running when the timeline ends.
    pub open: bool,
    /// Its qemu process, once the watcher read libvirt's pid file.
    pub pid: Option<u32>,
    /// How the start and the stop were seen ("event started/booted", "pid ...").
    pub started_by: String,
    pub stopped_by: Option<String>,
}

/// A VM that ran on two hosts at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overlap {
    pub uuid: String,
    pub name: String,
    pub hosts: [String; 2],
    pub from_ms: u64,
    pub to_ms: u64,
    pub duration_ms: u64,
    /// Still running on both when the timeline ends.
    pub open: bool,
    /// E.g. that one host's libvirtd was unreachable (qemu not proven gone).
    pub notes: Vec<String>,
}

/// A mark (`{"t_ms", KIND: TEXT}`) from the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mark {
    pub t_ms: u64,
    pub kind: String,
    pub text: String,
}

/// The time between losing a VM and having it running again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub uuid: String,
    pub name: String,
    pub lost_host: String,
    /// When it was last seen stopping (the end of its last running interval).
    pub lost_ms: u64,
    pub back_host: Option<String>,
    /// When it was running again; `None`: not within the timeline.
    pub back_ms: Option<u64>,
    /// `back_ms - lost_ms`, or up to the end of the timeline when it never came back.
    pub gap_ms: u64,
    /// From the last `fault` mark since the lost interval began (up to `back_ms`) to `back_ms`.
    pub fault_to_back_ms: Option<u64>,
    /// Marks from the start of the lost interval to `back_ms` (or the end).
    pub marks: Vec<Mark>,
}

/// Per VM: its intervals, one per QEMU instance, by start time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmReport {
    pub uuid: String,
    pub name: String,
    /// How many QEMU instances (intervals) the timeline shows.
    pub instances: usize,
    pub intervals: Vec<Interval>,
}

impl VmReport {
    /// The instances that started at or after `t_ms`.
    pub fn starts_since(&self, t_ms: u64) -> Vec<&Interval> {
        self.intervals
            .iter()
            .filter(|i| i.start_ms >= t_ms)
            .collect()
    }

    /// The instances that stopped at or after `t_ms` (a stop seen, not the timeline's end).
    pub fn stops_since(&self, t_ms: u64) -> Vec<&Interval> {
        self.intervals
            .iter()
            .filter(|i| i.stop_ms.is_some_and(|s| s >= t_ms))
            .collect()
    }
}

/// A host's unreachable spell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreachable {
    pub host: String,
    pub from_ms: u64,
    pub to_ms: Option<u64>,
    pub detail: String,
}

/// Everything `check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No overlap.
    pub ok: bool,
    pub first_ms: u64,
    pub last_ms: u64,
    pub hosts: Vec<String>,
    pub vms: Vec<VmReport>,
    pub overlaps: Vec<Overlap>,
    pub gaps: Vec<Gap>,
    pub unreachable: Vec<Unreachable>,
    pub marks: Vec<Mark>,
    /// Lines that were not timeline records (line number: error).
    pub bad_lines: Vec<String>,
}

impl Report {
    /// A VM by name (or uuid).
    pub fn vm(&self, name_or_uuid: &str) -> Option<&VmReport> {
        self.vms
            .iter()
            .find(|v| v.name == name_or_uuid || v.uuid == name_or_uuid)
    }

    /// The instances of `vm` that started at or after `t_ms` (empty when the VM is unknown).
    pub fn starts_since(&self, vm: &str, t_ms: u64) -> Vec<&Interval> {
        self.vm(vm)
            .map(|v| v.starts_since(t_ms))
            .unwrap_or_default()
    }

    /// Every instance on one of `hosts` (all hosts when empty) that stopped at or after
    /// `t_ms`: (VM name, instance).
    pub fn stops_since(&self, hosts: &[&str], t_ms: u64) -> Vec<(&str, &Interval)> {
        self.vms
            .iter()
            .flat_map(|v| {
                v.stops_since(t_ms)
                    .into_iter()
                    .map(move |i| (v.name.as_str(), i))
            })
            .filter(|(_, i)| hosts.is_empty() || hosts.contains(&i.host.as_str()))
            .collect()
    }
}

/// Parses timeline text (JSON lines); unparsable lines are listed, not fatal.
pub fn parse(text: &str) -> (Vec<Record>, Vec<String>) {
    let mut recs = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => recs.push(r),
            Err(e) => bad.push(format!("line {}: {e}", i + 1)),
        }
    }
    (recs, bad)
}

/// Analyses a timeline's text.
pub fn check_text(text: &str) -> Report {
    let (recs, bad) = parse(text);
    let mut report = check(&recs);
    report.bad_lines = bad;
    report
}

/// Analyses timeline records (in file order; sorted by time here, stably).
pub fn check(records: &[Record]) -> Report {
    let mut recs: Vec<&Record> = records.iter().collect();
    recs.sort_by_key(|r| r.t_ms);
    let first_ms = recs.first().map(|r| r.t_ms).unwrap_or(0);
    let last_ms = recs.last().map(|r| r.t_ms).unwrap_or(0);

    let mut hosts = BTreeSet::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    // (uuid, host) -> open interval: start, how it started, its qemu pid
    let mut open: BTreeMap<(String, String), (u64, String, Option<u32>)> = BTreeMap::new();
    let mut intervals: BTreeMap<String, Vec<Interval>> = BTreeMap::new();
    let mut marks = Vec::new();
    let mut unreachable: Vec<Unreachable> = Vec::new();

    for r in &recs {
        if let Some(h) = &r.host {
            hosts.insert(h.clone());
        }
        let how = || {
            format!(
                "{} {}",
                r.source.as_deref().unwrap_or("?"),
                r.detail.as_deref().unwrap_or("")
            )
            .trim_end()
            .to_string()
        };
        match (r.event.as_deref(), &r.host, &r.uuid) {
            (Some(ev @ (RUNNING | STOPPED)), Some(host), Some(uuid)) => {
                if let Some(n) = &r.name {
                    names.insert(uuid.clone(), n.clone());
                }
                let key = (uuid.clone(), host.clone());
                if ev == RUNNING {
                    match open.get_mut(&key) {
                        None => {
                            open.insert(key, (r.t_ms, how(), r.pid));
                        }
                        // The pid file, read after the start was seen.
                        Some((_, _, pid @ None)) => *pid = r.pid,
                        // Another qemu than the running one: the old instance ended unseen.
                        Some((start, started_by, Some(old)))
                            if r.pid.is_some_and(|p| p != *old) =>
                        {
                            let stopped_by = format!("qemu pid {old} replaced by {:?}", r.pid);
                            intervals.entry(uuid.clone()).or_default().push(Interval {
                                host: host.clone(),
                                start_ms: *start,
                                end_ms: r.t_ms,
                                stop_ms: Some(r.t_ms),
                                open: false,
                                pid: Some(*old),
                                started_by: std::mem::take(started_by),
                                stopped_by: Some(stopped_by),
                            });
                            open.insert(key, (r.t_ms, how(), r.pid));
                        }
                        Some(_) => {}
                    }
                } else if let Some((start, started_by, pid)) = open.remove(&key) {
                    intervals.entry(uuid.clone()).or_default().push(Interval {
                        host: host.clone(),
                        start_ms: start,
                        end_ms: r.t_ms,
                        stop_ms: Some(r.t_ms),
                        open: false,
                        pid,
                        started_by,
                        stopped_by: Some(how()),
                    });
                }
            }
            // A second "unreachable" within one spell changes nothing.
            (Some(HOST_UNREACHABLE), Some(host), _)
                if !unreachable
                    .iter()
                    .any(|u| &u.host == host && u.to_ms.is_none()) =>
            {
                unreachable.push(Unreachable {
                    host: host.clone(),
                    from_ms: r.t_ms,
                    to_ms: None,
                    detail: r.detail.clone().unwrap_or_default(),
                });
            }
            (Some(HOST_REACHABLE), Some(host), _) => {
                if let Some(u) = unreachable
                    .iter_mut()
                    .find(|u| &u.host == host && u.to_ms.is_none())
                {
                    u.to_ms = Some(r.t_ms);
                }
            }
            (None, _, _) => {
                for (kind, v) in &r.extra {
                    if let Some(text) = v.as_str() {
                        marks.push(Mark {
                            t_ms: r.t_ms,
                            kind: kind.clone(),
                            text: text.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    for ((uuid, host), (start, started_by, pid)) in open {
        intervals.entry(uuid).or_default().push(Interval {
            host,
            start_ms: start,
            end_ms: last_ms.max(start),
            stop_ms: None,
            open: true,
            pid,
            started_by,
            stopped_by: None,
        });
    }

    let mut vms = Vec::new();
    let mut overlaps = Vec::new();
    let mut gaps = Vec::new();
    for (uuid, mut ivs) in intervals {
        ivs.sort_by(|a, b| (a.start_ms, &a.host).cmp(&(b.start_ms, &b.host)));
        let name = names.get(&uuid).cloned().unwrap_or_default();
        overlaps.extend(find_overlaps(&uuid, &name, &ivs, &unreachable));
        gaps.extend(find_gaps(&uuid, &name, &ivs, &marks, last_ms));
        vms.push(VmReport {
            uuid,
            name,
            instances: ivs.len(),
            intervals: ivs,
        });
    }
    overlaps.sort_by_key(|o| o.from_ms);
    Report {
        ok: overlaps.is_empty(),
        first_ms,
        last_ms,
        hosts: hosts.into_iter().collect(),
        vms,
        overlaps,
        gaps,
        unreachable,
        marks,
        bad_lines: Vec::new(),
    }
}

fn find_overlaps(
    uuid: &str,
    name: &str,
    ivs: &[Interval],
    unreachable: &[Unreachable],
) -> Vec<Overlap> {
    let mut out = Vec::new();
    for (i, a) in ivs.iter().enumerate() {
        for b in &ivs[i + 1..] {
            if a.host == b.host {
                continue;
            }
            // Strict: touching intervals are no overlap. Two open intervals that both start at
            // the very end still ran together: count them.
            let both_open_at_end = a.open && b.open;
            let overlapping = (a.start_ms < b.end_ms && b.start_ms < a.end_ms)
                || (both_open_at_end && a.start_ms.max(b.start_ms) <= a.end_ms);
            if !overlapping {
                continue;
            }
            let from_ms = a.start_ms.max(b.start_ms);
            let to_ms = a.end_ms.min(b.end_ms);
            let mut notes = Vec::new();
            for iv in [a, b] {
                for u in unreachable.iter().filter(|u| u.host == iv.host) {
                    let until = u.to_ms.unwrap_or(u64::MAX);
                    if u.from_ms < to_ms.max(from_ms + 1) && from_ms < until {
                        notes.push(format!(
                            "libvirtd of {} was unreachable from t={} ms{}: its qemu was not proven gone ({})",
                            u.host,
                            u.from_ms,
                            u.to_ms.map(|t| format!(" to t={t} ms")).unwrap_or_default(),
                            u.detail
                        ));
                    }
                }
            }
            let mut hosts = [a.host.clone(), b.host.clone()];
            hosts.sort();
            out.push(Overlap {
                uuid: uuid.to_string(),
                name: name.to_string(),
                hosts,
                from_ms,
                to_ms,
                duration_ms: to_ms.saturating_sub(from_ms),
                open: both_open_at_end,
                notes,
            });
        }
    }
    out
}

fn find_gaps(uuid: &str, name: &str, ivs: &[Interval], marks: &[Mark], last_ms: u64) -> Vec<Gap> {
    let mut out = Vec::new();
    // The interval that ends last among those seen so far (ivs are sorted by start).
    let mut cover: Option<&Interval> = None;
    for iv in ivs {
        if let Some(c) = cover {
            if !c.open && iv.start_ms >= c.end_ms {
                out.push(make_gap(uuid, name, c, Some(iv), marks, last_ms));
            }
        }
        let later = match cover {
            None => true,
            Some(c) => !c.open && (iv.open || iv.end_ms > c.end_ms),
        };
        if later {
            cover = Some(iv);
        }
    }
    if let Some(c) = cover {
        if !c.open {
            out.push(make_gap(uuid, name, c, None, marks, last_ms));
        }
    }
    out
}

fn make_gap(
    uuid: &str,
    name: &str,
    lost: &Interval,
    back: Option<&Interval>,
    marks: &[Mark],
    last_ms: u64,
) -> Gap {
    let until = back.map(|b| b.start_ms).unwrap_or(last_ms);
    let between: Vec<Mark> = marks
        .iter()
        .filter(|m| m.t_ms >= lost.start_ms && m.t_ms <= until)
        .cloned()
        .collect();
    let fault_to_back_ms = back.and_then(|b| {
        between
            .iter()
            .filter(|m| m.kind == "fault")
            .map(|m| m.t_ms)
            .max()
            .map(|t| b.start_ms.saturating_sub(t))
    });
    Gap {
        uuid: uuid.to_string(),
        name: name.to_string(),
        lost_host: lost.host.clone(),
        lost_ms: lost.end_ms,
        back_host: back.map(|b| b.host.clone()),
        back_ms: back.map(|b| b.start_ms),
        gap_ms: until.saturating_sub(lost.end_ms),
        fault_to_back_ms,
        marks: between,
    }
}

fn secs(t_ms: u64, t0: u64) -> String {
    let d = t_ms.saturating_sub(t0);
    format!("{}.{:03}", d / 1000, d % 1000)
}

fn label(name: &str, uuid: &str) -> String {
    if name.is_empty() {
        uuid.to_string()
    } else {
        format!("{name} ({uuid})")
    }
}

/// The human report: VMs and their intervals, duplicates, gaps. Times in seconds from the
/// timeline's first line.
pub fn render(r: &Report) -> String {
    let t0 = r.first_ms;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "timeline: {} hosts ({}), {} VMs, {:.3} s (t=0 is unix ms {})",
        r.hosts.len(),
        r.hosts.join(", "),
        r.vms.len(),
        r.last_ms.saturating_sub(t0) as f64 / 1000.0,
        t0
    );
    for b in &r.bad_lines {
        let _ = writeln!(s, "warning: unreadable {b}");
    }
    for u in &r.unreachable {
        let _ = writeln!(
            s,
            "host {} unreachable {} s -> {}: {}",
            u.host,
            secs(u.from_ms, t0),
            u.to_ms
                .map(|t| format!("{} s", secs(t, t0)))
                .unwrap_or_else(|| "end".into()),
            u.detail
        );
    }
    let _ = writeln!(s, "\nVMs:");
    for vm in &r.vms {
        let _ = writeln!(
            s,
            "  {}: {} qemu instance(s)",
            label(&vm.name, &vm.uuid),
            vm.instances
        );
        for iv in &vm.intervals {
            let _ = writeln!(
                s,
                "    {:<10} running {:>9} s -> {:>9} s{} pid {}   [{} / {}]",
                iv.host,
                secs(iv.start_ms, t0),
                secs(iv.end_ms, t0),
                if iv.open { " (still running)" } else { "" },
                iv.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                iv.started_by,
                iv.stopped_by.as_deref().unwrap_or("-"),
            );
        }
    }
    if r.overlaps.is_empty() {
        let _ = writeln!(s, "\nduplicates: none");
    } else {
        let _ = writeln!(s, "\nDUPLICATES: {}", r.overlaps.len());
        for o in &r.overlaps {
            let _ = writeln!(
                s,
                "  VM {} ran on {} and {} at once from {} s to {} s ({} ms{})",
                label(&o.name, &o.uuid),
                o.hosts[0],
                o.hosts[1],
                secs(o.from_ms, t0),
                secs(o.to_ms, t0),
                o.duration_ms,
                if o.open {
                    ", both still running at the end"
                } else {
                    ""
                }
            );
            for n in &o.notes {
                let _ = writeln!(s, "    note: {n}");
            }
        }
    }
    let _ = writeln!(s, "\ngaps (lost -> running again):");
    if r.gaps.is_empty() {
        let _ = writeln!(s, "  none");
    } else {
        let _ = writeln!(
            s,
            "  {:<24} {:<10} {:>9} {:<10} {:>9} {:>9} {:>12}  marks",
            "VM", "lost on", "lost s", "back on", "back s", "gap ms", "fault->back"
        );
        for g in &r.gaps {
            let marks: Vec<String> = g
                .marks
                .iter()
                .map(|m| format!("{} s {}: {}", secs(m.t_ms, t0), m.kind, m.text))
                .collect();
            let name = if g.name.is_empty() { &g.uuid } else { &g.name };
            let _ = writeln!(
                s,
                "  {:<24} {:<10} {:>9} {:<10} {:>9} {:>9} {:>12}  {}",
                name,
                g.lost_host,
                secs(g.lost_ms, t0),
                g.back_host.as_deref().unwrap_or("-"),
                g.back_ms
                    .map(|t| secs(t, t0))
                    .unwrap_or_else(|| "never".into()),
                g.gap_ms,
                g.fault_to_back_ms
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                marks.join("; ")
            );
        }
    }
    let _ = writeln!(
        s,
        "\nresult: {}",
        if r.ok {
            "OK (no VM ran on two hosts at once)"
        } else {
            "FAIL (a VM ran on two hosts at once)"
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "11111111-2222-3333-4444-555555555555";

    fn vm(t: u64, host: &str, running: bool) -> Record {
        Record::vm(t, host, U, "web", running, "event", String::new())
    }

    fn mark(t: u64, text: &str) -> Record {
        Record::mark(t, "fault", text).expect("mark")
    }

    fn host(t: u64, host: &str, ev: &str) -> Record {
        Record::host(t, host, ev, "gone".into())
    }

    #[test]
    fn overlap_is_detected_with_both_hosts_and_interval() {
        let r = check(&[
            vm(1000, "hv1", true),
            vm(3000, "hv2", true),
            vm(4000, "hv1", false),
            vm(9000, "hv2", false),
        ]);
        assert!(!r.ok);
        assert_eq!(r.overlaps.len(), 1);
        let o = &r.overlaps[0];
        assert_eq!(o.hosts, ["hv1".to_string(), "hv2".to_string()]);
        assert_eq!((o.from_ms, o.to_ms, o.duration_ms), (3000, 4000, 1000));
        assert!(render(&r).contains("ran on hv1 and hv2 at once from 2.000 s to 3.000 s"));
    }

    #[test]
    fn touching_intervals_are_no_overlap_and_the_gap_is_zero() {
        let r = check(&[
            vm(1000, "hv1", true),
            vm(2000, "hv1", false),
            vm(2000, "hv2", true),
            vm(5000, "hv2", false),
        ]);
        assert!(r.ok, "{:?}", r.overlaps);
        assert_eq!(r.gaps.len(), 2);
        assert_eq!(r.gaps[0].gap_ms, 0);
        assert_eq!(r.gaps[0].back_host.as_deref(), Some("hv2"));
        // Lost on hv2 at the end and never back.
        assert_eq!(r.gaps[1].back_ms, None);
    }

    #[test]
    fn gaps_are_computed_with_the_fault_marks_in_between() {
        let r = check(&[
            vm(1000, "hv1", true),
            mark(1500, "unrelated earlier"),
            mark(4800, "crash-host hv1"),
            vm(5000, "hv1", false),
            vm(7300, "hv2", true),
            mark(8000, "after"),
        ]);
        assert!(r.ok);
        assert_eq!(r.gaps.len(), 1);
        let g = &r.gaps[0];
        assert_eq!(g.lost_host, "hv1");
        assert_eq!(g.lost_ms, 5000);
        assert_eq!(g.back_ms, Some(7300));
        assert_eq!(g.gap_ms, 2300);
        assert_eq!(g.fault_to_back_ms, Some(2500));
        let texts: Vec<&str> = g.marks.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["unrelated earlier", "crash-host hv1"]);
        let table = render(&r);
        assert!(table.contains("2300"), "{table}");
        assert!(table.contains("crash-host hv1"), "{table}");
    }

    #[test]
    fn restart_in_place_is_a_gap_not_an_overlap() {
        let r = check(&[
            vm(0, "hv1", true),
            vm(1000, "hv1", false),
            vm(1900, "hv1", true),
        ]);
        assert!(r.ok);
        assert_eq!(r.gaps.len(), 1);
        assert_eq!(r.gaps[0].gap_ms, 900);
        assert_eq!(r.gaps[0].back_host.as_deref(), Some("hv1"));
    }

    #[test]
    fn an_unreachable_host_does_not_end_its_domains() {
        // hv1's libvirtd died at 2000; no proof that its qemu is gone; hv2 starts the VM.
        let r = check(&[
            vm(1000, "hv1", true),
            host(2000, "hv1", HOST_UNREACHABLE),
            vm(3000, "hv2", true),
            vm(6000, "hv2", false),
        ]);
        assert!(!r.ok);
        let o = &r.overlaps[0];
        assert_eq!((o.from_ms, o.to_ms), (3000, 6000));
        assert!(o.notes.iter().any(|n| n.contains("hv1")), "{:?}", o.notes);
    }

    #[test]
    fn qemu_proven_gone_while_unreachable_allows_the_restart() {
        let r = check(&[
            vm(1000, "hv1", true),
            host(2000, "hv1", HOST_UNREACHABLE),
            Record::vm(
                2100,
                "hv1",
                U,
                "web",
                false,
                "pid",
                "qemu pid 7 gone".into(),
            ),
            mark(1900, "crash-host hv1"),
            vm(3000, "hv2", true),
            host(9000, "hv1", HOST_REACHABLE),
        ]);
        assert!(r.ok, "{:?}", r.overlaps);
        assert_eq!(r.gaps[0].gap_ms, 900);
        assert_eq!(r.gaps[0].fault_to_back_ms, Some(1100));
        assert_eq!(r.unreachable[0].to_ms, Some(9000));
    }

    #[test]
    fn open_intervals_on_two_hosts_overlap_until_the_end() {
        let r = check(&[
            vm(1000, "hv1", true),
            vm(2000, "hv2", true),
            mark(2500, "end"),
        ]);
        assert!(!r.ok);
        assert!(r.overlaps[0].open);
        assert_eq!(r.overlaps[0].to_ms, 2500);
        // Both started at the very last line: still two at once.
        let r = check(&[vm(1000, "hv1", true), vm(1000, "hv2", true)]);
        assert!(!r.ok);
    }

    fn vm_pid(
        t: u64,
        host: &str,
        uuid: &str,
        name: &str,
        running: bool,
        pid: Option<u32>,
    ) -> Record {
        let mut r = Record::vm(t, host, uuid, name, running, "event", String::new());
        r.pid = pid;
        r
    }

    #[test]
    fn a_restart_in_place_that_no_stop_line_showed_is_a_second_instance() {
        // The watcher saw the VM running twice with different qemu processes and no stop in
        // between (a restart between two looks): two instances, not one.
        let r = check(&[
            vm_pid(1000, "hv1", U, "web", true, Some(100)),
            vm_pid(5000, "hv1", U, "web", true, Some(200)),
            mark(6000, "end"),
        ]);
        let v = r.vm("web").expect("web");
        assert_eq!(v.instances, 2, "{:#?}", v.intervals);
        assert_eq!(v.intervals[0].pid, Some(100));
        assert_eq!(v.intervals[0].stop_ms, Some(5000));
        assert_eq!(v.intervals[1].pid, Some(200));
        assert!(v.intervals[1].open && v.intervals[1].stop_ms.is_none());
        assert!(r.ok, "one host: no duplicate");
        assert_eq!(r.starts_since("web", 2000).len(), 1);
        assert_eq!(r.stops_since(&["hv1"], 2000).len(), 1);
    }

    #[test]
    fn a_pid_read_after_the_start_completes_the_same_instance() {
        let r = check(&[
            vm_pid(1000, "hv1", U, "web", true, None),
            vm_pid(1100, "hv1", U, "web", true, Some(42)),
            vm_pid(1200, "hv1", U, "web", true, Some(42)),
        ]);
        let v = r.vm("web").expect("web");
        assert_eq!(v.instances, 1);
        assert_eq!(v.intervals[0].pid, Some(42));
        assert_eq!(v.intervals[0].start_ms, 1000);
    }

    #[test]
    fn after_a_host_failure_each_instance_is_listed_with_host_times_and_pid() {
        const U1: &str = "u-hv1-vm1";
        const U2: &str = "u-hv2-vm1";
        const U3: &str = "u-hv3-vm1";
        let timeline = [
            vm_pid(100, "hv1", U1, "hv1-vm1", true, Some(11)),
            vm_pid(100, "hv2", U2, "hv2-vm1", true, Some(21)),
            vm_pid(100, "hv3", U3, "hv3-vm1", true, Some(31)),
            mark(5000, "crash-host hv2"),
            Record::host(5001, "hv2", HOST_UNREACHABLE, "gone".into()),
            Record::vm(
                5100,
                "hv2",
                U2,
                "hv2-vm1",
                false,
                "pid",
                "qemu pid 21 gone".into(),
            ),
            vm_pid(7000, "hv1", U2, "hv2-vm1", true, Some(41)),
            mark(9000, "end"),
        ];
        let r = check(&timeline);
        assert!(r.ok);
        let moved = r.starts_since("hv2-vm1", 5000);
        assert_eq!(moved.len(), 1, "started exactly once after the fault");
        assert_eq!(
            (
                moved[0].host.as_str(),
                moved[0].start_ms,
                moved[0].pid,
                moved[0].open
            ),
            ("hv1", 7000, Some(41), true)
        );
        let v = r.vm("hv2-vm1").expect("hv2-vm1");
        assert_eq!(v.instances, 2);
        assert_eq!(
            (
                v.intervals[0].host.as_str(),
                v.intervals[0].stop_ms,
                v.intervals[0].pid
            ),
            ("hv2", Some(5100), Some(21))
        );
        // Nothing on the unaffected hosts stopped; the failed host's VM did.
        assert!(r.stops_since(&["hv1", "hv3"], 5000).is_empty());
        let stopped = r.stops_since(&[], 5000);
        assert_eq!(stopped.len(), 1);
        assert_eq!(
            (stopped[0].0, stopped[0].1.host.as_str()),
            ("hv2-vm1", "hv2")
        );
        // A second start elsewhere (even after a clean stop) is a second instance.
        let mut twice = timeline.to_vec();
        twice.push(vm_pid(9500, "hv1", U2, "hv2-vm1", false, None));
        twice.push(vm_pid(9600, "hv3", U2, "hv2-vm1", true, Some(51)));
        let r = check(&twice);
        assert!(r.ok, "no overlap, but not exactly once");
        assert_eq!(r.starts_since("hv2-vm1", 5000).len(), 2);
        assert_eq!(r.stops_since(&["hv1"], 5000).len(), 1);
        // The JSON report carries the instances.
        let json = serde_json::to_value(&r).expect("json");
        let vm = json["vms"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == "hv2-vm1"))
            .expect("vm in json");
        assert_eq!(vm["instances"], 3);
        assert_eq!(vm["intervals"][1]["pid"], 41);
        assert_eq!(vm["intervals"][1]["stop_ms"], 9500);
        assert!(r.vm("nope").is_none() && r.starts_since("nope", 0).is_empty());
    }

    #[test]
    fn other_vms_and_bad_lines_do_not_confuse_it() {
        let text = [
            vm(1000, "hv1", true).to_line(),
            "not json\n".to_string(),
            Record::vm(1500, "hv2", "other-uuid", "db", true, "poll", String::new()).to_line(),
            vm(2000, "hv1", false).to_line(),
        ]
        .concat();
        let r = check_text(&text);
        assert!(r.ok);
        assert_eq!(r.vms.len(), 2);
        assert_eq!(r.bad_lines.len(), 1);
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["ok"], serde_json::Value::Bool(true));
    }
}
