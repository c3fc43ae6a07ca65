//! `vigil-lab down`: removes every process, mount and namespace of the lab, with or without
//! its supervisor; idempotent.

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

use super::*;
use crate::cmd::run;
use crate::layout::{now_ms, Lab, Program, LAB_ID_ENV};
use crate::net;
use crate::procfs;
use crate::state::{self, LabState};
use crate::supervisor::{self, ProcTable, Request};

/// Live processes that belong to the lab: in one of its namespaces, carrying its id, or in
/// the supervisor's table. Never this process or its ancestors.
fn lab_processes(
    st: Option<&LabState>,
    table: Option<&ProcTable>,
    inodes: &[u64],
) -> BTreeSet<i32> {
    let exclude = procfs::self_and_ancestors();
    let mut v = BTreeSet::new();
    for p in procfs::all_pids() {
        if exclude.contains(&p) || !procfs::alive(p, None) {
            continue;
        }
        let in_ns = procfs::netns_of_pid(p).is_some_and(|i| inodes.contains(&i));
        let marked = st.is_some_and(|s| procfs::environ_has(p, LAB_ID_ENV, &s.id));
        if in_ns || marked {
            v.insert(p);
        }
    }
    if let Some(t) = table {
        for e in t.procs.iter().chain(&t.history) {
            if e.alive() && !exclude.contains(&e.pid) {
                v.insert(e.pid);
            }
        }
        if t.supervisor_alive() && !exclude.contains(&t.supervisor_pid) {
            v.insert(t.supervisor_pid);
        }
    }
    v
}

pub fn down(lab: &Lab) -> anyhow::Result<Report> {
    require_root()?;
    let t0 = Instant::now();
    let mut st = LabState::load(lab)?;
    let table = supervisor::read_table_file(lab);
    if st.is_none() && table.is_none() {
        return Ok(Report::new(
            json!({"ok": true, "nothing_to_do": true, "root": lab.root}),
            format!("no lab in {}: nothing to do", lab.root.display()),
        ));
    }
    let ns_names: Vec<String> = st
        .as_ref()
        .map(|s| s.namespaces.clone())
        .unwrap_or_default();
    let inodes: Vec<u64> = ns_names
        .iter()
        .filter_map(|n| procfs::netns_inode(n))
        .collect();
    let mut steps: Vec<String> = Vec::new();

    // Nothing may hang in a failing FUSE mount while we stop.
    if let (Some(s), Some(bin)) = (st.as_ref(), Program::Faultfs.find()) {
        if s.components.faultfs {
            for h in &s.hosts {
                let sock = lab.host_faultfs_socket(&h.name);
                if sock.exists() {
                    let _ = run(
                        &[
                            path_str(&bin),
                            "ctl".into(),
                            "--control".into(),
                            path_str(&sock),
                            "ok".into(),
                            "--timeout-ms".into(),
                            "2000".into(),
                        ],
                        Duration::from_secs(5),
                    );
                }
            }
        }
    }

    // Agents stopped now must not get their host "reset" by a watchdog they no longer feed.
    if let Some(s) = st.as_ref() {
        if s.components.watchdog {
            for h in &s.hosts {
                if lab.host_watchdog_socket(&h.name).exists() {
                    if let Err(e) = watchdog_ctl(lab, &h.name, "off") {
                        steps.push(format!("watchdog of {} did not switch off: {e:#}", h.name));
                    }
                }
            }
        }
    }

    // 1. The supervisor stops everything it started, in order, and exits.
    if supervisor::answers(lab) {
        match supervisor::request(
            lab,
            &Request::Shutdown { grace_ms: 20_000 },
            Duration::from_secs(180),
        ) {
            Ok(_) => steps.push("supervisor stopped every lab process".into()),
            Err(e) => steps.push(format!("supervisor shutdown failed: {e:#}")),
        }
        if let Some(t) = supervisor::read_table_file(lab) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while procfs::alive(t.supervisor_pid, Some(t.supervisor_starttime))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let table = supervisor::read_table_file(lab).or(table);

    // 2. Whatever is left (the supervisor was dead, or something escaped it): SIGKILL.
    let mut killed = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = lab_processes(st.as_ref(), table.as_ref(), &inodes);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        for p in &left {
            if killed.insert(*p) {
                eprintln!("vigil-lab: down: SIGKILL {p} ({})", comm(*p));
            }
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !killed.is_empty() {
        steps.push(format!("killed leftover processes {killed:?}"));
    }

    // 3. Mounts under the lab root (faultfs, watchdogs; nothing else mounts in the root
    // namespace). Either binary's `cleanup` removes a dead FUSE mount.
    let mut unmounted = Vec::new();
    if let (Some(s), Some(bin)) = (
        st.as_ref(),
        Program::Faultfs.find().or(Program::Watchdog.find()),
    ) {
        for mp in &s.mountpoints {
            if procfs::mounts_under(mp).contains(mp) {
                let _ = run(
                    &[
                        path_str(&bin),
                        "cleanup".into(),
                        "--mountpoint".into(),
                        path_str(mp),
                    ],
                    Duration::from_secs(15),
                );
            }
        }
    }
    for _ in 0..5 {
        let m = procfs::mounts_under(&lab.root);
        if m.is_empty() {
            break;
        }
        for mp in m {
            if nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                unmounted.push(mp);
            }
        }
    }
    if !unmounted.is_empty() {
        steps.push(format!("unmounted {unmounted:?}"));
    }

    // 4. Namespaces (their veths and the bridge go with them).
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for n in &ns_names {
        if net::ns_exists(n) {
            match net::delete_ns(n) {
                Ok(()) => deleted.push(n.clone()),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }

    // 5. Check: nothing may be left.
    let procs_left: Vec<i32> = lab_processes(st.as_ref(), table.as_ref(), &inodes)
        .into_iter()
        .collect();
    let ns_left: Vec<&String> = ns_names.iter().filter(|n| net::ns_exists(n)).collect();
    let mounts_left = procfs::mounts_under(&lab.root);
    if lab.socket().exists() && !supervisor::answers(lab) {
        let _ = fs::remove_file(lab.socket());
    }
    let clean = procs_left.is_empty() && ns_left.is_empty() && mounts_left.is_empty();
    if let Some(s) = st.as_mut() {
        s.state = if clean { "down" } else { "failed" }.into();
        let _ = s.save(lab);
        record_event(
            lab,
            s,
            state::Event::new(
                now_ms(),
                "lab",
                "down",
                None,
                if clean {
                    "lab down"
                } else {
                    "lab down left something behind"
                },
                json!({"killed": killed, "namespaces": deleted, "unmounted": unmounted}),
            ),
        );
    }
    if !clean {
        bail!(
            "down left something behind: processes {procs_left:?}, namespaces {ns_left:?}, mounts {mounts_left:?}; errors: {errors:?}"
        );
    }
    let elapsed = t0.elapsed();
    let text = format!(
        "lab down in {:.1} s: {} namespace(s) deleted{}{}",
        elapsed.as_secs_f64(),
        deleted.len(),
        if killed.is_empty() {
            String::new()
        } else {
            format!(", {} leftover process(es) killed", killed.len())
        },
        if unmounted.is_empty() {
            String::new()
        } else {
            format!(", {} mount(s) removed", unmounted.len())
        }
    );
    Ok(Report::new(
        json!({
            "ok": true,
            "root": lab.root,
            "elapsed_ms": elapsed.as_millis() as u64,
            "namespaces_deleted": deleted,
            "killed": killed,
            "unmounted": unmounted,
            "steps": steps,
        }),
        text,
    ))
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
