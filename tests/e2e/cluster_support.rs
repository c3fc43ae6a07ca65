#![allow(dead_code)]
//! A Vigil monitor cluster of real processes on loopback, for the benchmarks (included with
//! `#[path]`, next to the harness, which it uses): one monitor without `[raft] listen` (a
//! one-node cluster), or three formed as an operator forms them — mon1 with `--init`, mon2
//! and mon3 with `--join`, added by `vigilctl server add` — until all three list the same
//! leader among three voters. As `tests/raft_cluster.rs` does, but returning errors instead
//! of panicking, so that a benchmark says why and exits nonzero.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// One monitor of a [`Cluster`].
pub struct Member {
    pub id: u64,
    pub mon: MonitorProc,
    /// Its Raft address (`None` for a one-node cluster).
    pub raft: Option<SocketAddr>,
    pub ctl: Ctl,
}

/// Monitors that agree on a leader. Every process ends (by its PID) when this drops.
pub struct Cluster {
    pub members: Vec<Member>,
    /// Node id of the leader they agreed on.
    pub leader: u64,
}

impl Cluster {
    pub fn leader(&self) -> &Member {
        self.member(self.leader)
    }

    pub fn member(&self, id: u64) -> &Member {
        self.members
            .iter()
            .find(|m| m.id == id)
            .unwrap_or(&self.members[0])
    }

    pub fn followers(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.id != self.leader)
    }

    /// Client addresses, the leader first.
    pub fn addrs_leader_first(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.leader().mon.addr];
        v.extend(self.followers().map(|m| m.mon.addr));
        v
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn start_member(
    pki: &Pki,
    dir: &Path,
    id: u64,
    raft: Option<SocketAddr>,
    extra_toml: &str,
    flag: &str,
    timeout: Duration,
) -> Result<Member, String> {
    let dir = dir.join(format!("mon{id}"));
    let addr = loopback();
    let extra = match raft {
        Some(r) => format!("{extra_toml}\n[raft]\nlisten = \"{r}\"\n"),
        None => extra_toml.to_string(),
    };
    let (config, data_dir) =
        MonitorProc::write_config_as(pki, &dir, addr, id, &format!("mon{id}"), &extra);
    let mut mon = MonitorProc::spawn_flags(config, addr, data_dir, &dir, &[flag]);
    let ctl = Ctl::new(pki, vec![addr]);
    ctl.wait_started(&mut mon, timeout)
        .map_err(|e| format!("mon{id} did not start: {e}"))?;
    Ok(Member { id, mon, raft, ctl })
}

/// The leader every member agrees on, once each lists `n` voters with exactly one leader.
fn agreed_leader(members: &[Member], n: usize) -> Option<u64> {
    agreed_leader_of(
        members.iter().map(|m| m.ctl.json(&["server", "list"]).ok()),
        n,
    )
}

/// Starts `n` monitors (1, or more as one Raft cluster) under `dir` with `extra_toml` in
/// each config, and waits until they agree on a leader (within `timeout` per step).
pub fn start_cluster(
    pki: &Pki,
    dir: &Path,
    n: usize,
    extra_toml: &str,
    timeout: Duration,
) -> Result<Cluster, String> {
    if n <= 1 {
        let m = start_member(pki, dir, 1, None, extra_toml, "--init", timeout)?;
        return Ok(Cluster {
            members: vec![m],
            leader: 1,
        });
    }
    let mut members = Vec::with_capacity(n);
    for id in 1..=n as u64 {
        let flag = if id == 1 { "--init" } else { "--join" };
        members.push(start_member(
            pki,
            dir,
            id,
            Some(loopback()),
            extra_toml,
            flag,
            timeout,
        )?);
    }
    for m in &members[1..] {
        let raft = m.raft.map(|r| r.to_string()).unwrap_or_default();
        let out = members[0]
            .ctl
            .run(&["server", "add", &m.id.to_string(), &raft]);
        if !out.status.success() {
            return Err(format!(
                "server add {} {raft}: {}\nmon{} log ends:\n{}",
                m.id,
                String::from_utf8_lossy(&out.stderr).trim(),
                m.id,
                log_tail(&m.mon.proc_.log_text(), 20)
            ));
        }
    }
    let leader = wait_for(timeout, || agreed_leader(&members, n)).ok_or_else(|| {
        format!(
            "the {n} monitors did not agree on a leader among {n} voters within {timeout:?}: {:?}",
            members[0].ctl.json(&["server", "list"])
        )
    })?;
    Ok(Cluster { members, leader })
}

/// An environment variable, or `default`.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
pub fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime is field 14, stime 15 (1-based); after ')' field 3 is index 0.
    let cpu_ticks = ticks(11) + ticks(12);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu_ticks as f64 / 100.0, rss_kb * 1024)
}
