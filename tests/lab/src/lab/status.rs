//! `vigil-lab status`: what runs where, partitions, power, the faults so far.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::cmd::run;
use crate::layout::Lab;
use crate::net;
use crate::procfs;
use crate::state::{self, LabState, Node};
use crate::supervisor;

fn sandbox_pids(lab: &Lab, host: &str) -> Vec<(String, i32)> {
    fs::read_to_string(lab.libvirt_dir(host).join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// PIDs from the host's QEMU pid files.
pub fn qemu_pids(lab: &Lab, host: &str) -> Vec<(String, i32)> {
    let mut v = Vec::new();
    if let Ok(d) = fs::read_dir(lab.qemu_pid_dir(host)) {
        for e in d.flatten() {
            let p = e.path();
            // driver.pid is libvirtd's own.
            if p.extension().is_some_and(|x| x == "pid")
                && p.file_stem().is_some_and(|s| s != "driver")
            {
                if let Some(pid) = fs::read_to_string(&p)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let name = p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    v.push((name, pid));
                }
            }
        }
    }
    v.sort();
    v
}

/// Every PID of a host: live processes in its namespace, plus its recorded daemons and QEMU
/// processes that are (still) in that namespace.
pub fn host_pids(lab: &Lab, st: &LabState, host: &Node) -> BTreeSet<i32> {
    let mut v = BTreeSet::new();
    let Some(ino) = procfs::netns_inode(&host.netns) else {
        return v;
    };
    v.extend(procfs::pids_in_netns(ino));
    let recorded = sandbox_pids(lab, &host.name)
        .into_iter()
        .map(|(_, p)| p)
        .chain(qemu_pids(lab, &host.name).into_iter().map(|(_, p)| p))
        .chain(
            supervisor::table(lab)
                .map(|t| {
                    t.procs
                        .iter()
                        .filter(|e| e.group == host.name && e.alive())
                        .map(|e| e.pid)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
    for p in recorded {
        if procfs::alive(p, None) && procfs::netns_of_pid(p) == Some(ino) {
            v.insert(p);
        }
    }
    let _ = st;
    v
}

pub fn status(lab: &Lab) -> anyhow::Result<Report> {
    let Some(st) = LabState::load(lab)? else {
        return Ok(Report::new(
            json!({"ok": true, "root": lab.root, "state": "none"}),
            format!("no lab in {}", lab.root.display()),
        ));
    };
    let table = supervisor::table(lab);
    let sup_alive = table.as_ref().is_some_and(|t| t.supervisor_alive());
    let entry = |name: &str| table.as_ref().and_then(|t| t.get(name).cloned());
    let mut hosts = Vec::new();
    let mut text = String::new();
    text.push_str(&format!(
        "lab {} in {} (prefix {}): {}; supervisor {}\n",
        st.id,
        lab.root.display(),
        st.prefix,
        st.state,
        match &table {
            Some(t) if sup_alive => format!("pid {} running", t.supervisor_pid),
            Some(t) => format!("pid {} gone", t.supervisor_pid),
            None => "never started".into(),
        }
    ));
    if let Some(ms) = st.up_ms {
        text.push_str(&format!("up took {:.1} s\n", ms as f64 / 1000.0));
    }
    let c = &st.components;
    let part = |on: bool, what: &str| format!("{what} {}", if on { "yes" } else { "missing" });
    text.push_str(&format!(
        "optional parts: {}, {}, {}, {}\n",
        part(c.faultfs, "shared storage (faultfs)"),
        part(c.observer, "observer"),
        part(c.bmc, "BMCs (ipmi_sim)"),
        part(c.watchdog, "watchdogs")
    ));
    text.push_str(&format!(
        "{:<6} {:<10} {:<13} {:<13} {:<13} {:<13} {:<5} {:<18} {}\n",
        "HOST",
        "NETNS",
        "ADDRESS",
        "PARTITION",
        "AGENT",
        "LIBVIRTD",
        "POWER",
        "WATCHDOG",
        "RUNNING DOMAINS"
    ));
    for h in &st.hosts {
        let ns_ok = net::ns_exists(&h.netns);
        let agent = entry(&proc_name(&h.name, "agent"));
        let agent_alive = agent.as_ref().is_some_and(|e| e.alive());
        let ld = sandbox_pids(lab, &h.name)
            .into_iter()
            .find(|(n, _)| n == "libvirtd")
            .map(|(_, p)| p);
        let ino = procfs::netns_inode(&h.netns);
        let ld_alive = ld.is_some_and(|p| {
            procfs::alive(p, None) && ino.is_some() && procfs::netns_of_pid(p) == ino
        });
        let domains: Option<Vec<String>> = if ld_alive {
            run(
                &[
                    "virsh",
                    "-q",
                    "-c",
                    &lab.libvirt_uri(&h.name),
                    "list",
                    "--name",
                ],
                Duration::from_secs(5),
            )
            .ok()
            .filter(|o| o.ok())
            .map(|o| {
                o.stdout
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
        } else {
            None
        };
        let qemu: Vec<Value> = qemu_pids(lab, &h.name)
            .into_iter()
            .map(|(n, p)| {
                json!({"domain": n, "pid": p,
                       "alive": procfs::alive(p, None) && ino.is_some() && procfs::netns_of_pid(p) == ino})
            })
            .collect();
        let part = if ns_ok {
            net::partition_state(&st, h)
        } else {
            net::Partition::None
        };
        let nprocs = host_pids(lab, &st, h).len();
        let power = power_is_on(lab, &h.name);
        let watchdog = st
            .components
            .watchdog
            .then(|| watchdog_status(lab, &h.name));
        let watchdog_text = match &watchdog {
            None => "-".to_string(),
            Some(w) => match (w["state"].as_str(), w["left_ms"].as_u64()) {
                (Some(s), Some(left)) => format!("{s} {}s {left}ms", w["timeout_secs"]),
                (Some(s), None) => format!("{s} {}s", w["timeout_secs"]),
                (None, _) => "no answer".into(),
            },
        };
        text.push_str(&format!(
            "{:<6} {:<10} {:<13} {:<13} {:<13} {:<13} {:<5} {:<18} {}\n",
            h.name,
            if ns_ok { h.netns.as_str() } else { "(missing)" },
            h.addr.to_string(),
            serde_json::to_value(part)?.as_str().unwrap_or(""),
            match &agent {
                Some(e) if agent_alive => format!("pid {}", e.pid),
                Some(_) => "dead".into(),
                None => "-".into(),
            },
            match (ld, ld_alive, domains.is_some()) {
                (Some(p), true, true) => format!("pid {p}"),
                (Some(p), true, false) => format!("pid {p} (mute)"),
                (Some(_), false, _) => "dead".into(),
                (None, _, _) => "-".into(),
            },
            if power { "on" } else { "off" },
            watchdog_text,
            domains
                .as_ref()
                .map(|d| d.join(","))
                .unwrap_or_else(|| "?".into())
        ));
        hosts.push(json!({
            "name": h.name,
            "netns": h.netns,
            "netns_exists": ns_ok,
            "addr": h.addr.to_string(),
            "partition": part,
            "power": if power { "on" } else { "off" },
            "watchdog": watchdog.map(|mut w| {
                w["device"] = json!(lab.host_watchdog_device(&h.name));
                w
            }),
            "agent": {"pid": agent.as_ref().map(|e| e.pid), "alive": agent_alive,
                      "exit": agent.as_ref().and_then(|e| e.exit.clone())},
            "libvirt": {"libvirtd_pid": ld, "alive": ld_alive, "answers": domains.is_some(),
                        "uri": lab.libvirt_uri(&h.name)},
            "domains_running": domains,
            "qemu": qemu,
            "processes": nprocs,
        }));
    }
    let mut monitors = Vec::new();
    text.push_str(&format!(
        "{:<6} {:<10} {:<13} {:<4} {:<16} {}\n",
        "MON", "NETNS", "ADDRESS", "VIP", "PARTITION", "MONITOR"
    ));
    for m in &st.monitors {
        let e = entry(&proc_name(&m.name, "monitor"));
        let alive = e.as_ref().is_some_and(|e| e.alive());
        let started = st.monitors_started.contains(&m.name);
        let holds_vip = st.vip.is_some_and(|v| net::has_addr(&m.netns, &v));
        let partition = net::partition_state(&st, m);
        text.push_str(&format!(
            "{:<6} {:<10} {:<13} {:<4} {:<16} {}\n",
            m.name,
            if net::ns_exists(&m.netns) {
                m.netns.as_str()
            } else {
                "(missing)"
            },
            m.addr.to_string(),
            if holds_vip { "yes" } else { "-" },
            serde_json::to_value(partition)?
                .as_str()
                .unwrap_or("?")
                .to_string(),
            if !started {
                "none".to_string()
            } else if alive {
                format!("pid {}", e.as_ref().map(|e| e.pid).unwrap_or(0))
            } else {
                "dead".into()
            }
        ));
        monitors.push(json!({
            "name": m.name, "netns": m.netns, "addr": m.addr.to_string(),
            "started": started,
            "holds_vip": holds_vip,
            "partition": partition,
            "monitor": {"pid": e.as_ref().map(|e| e.pid), "alive": alive,
                        "exit": e.as_ref().and_then(|e| e.exit.clone())},
        }));
    }
    let faults: Vec<state::Event> = state::read_timeline(lab)
        .into_iter()
        .filter(|e| e.kind == "fault")
        .collect();
    if !faults.is_empty() {
        text.push_str("FAULTS\n");
        for f in &faults {
            text.push_str(&format!(
                "  {} {:<16} {:<6} {}\n",
                f.ts_ms,
                f.verb,
                f.target.as_deref().unwrap_or("-"),
                f.text
            ));
        }
    }
    for n in &st.notes {
        text.push_str(&format!("note: {n}\n"));
    }
    Ok(Report::new(
        json!({
            "ok": true,
            "root": lab.root,
            "id": st.id,
            "prefix": st.prefix,
            "state": st.state,
            "up_ms": st.up_ms,
            "up_phases": st.up_phases,
            "supervisor": {"pid": table.as_ref().map(|t| t.supervisor_pid), "alive": sup_alive},
            "hosts": hosts,
            "monitors": monitors,
            "vip": st.vip.map(|v| v.to_string()),
            "ops": st.ops.as_ref().map(|o| o.addr.to_string()),
            "vms": st.vms,
            "components": st.components,
            "faults": faults,
            "notes": st.notes,
            "processes": table.map(|t| t.procs).unwrap_or_default(),
        }),
        text,
    ))
}
