//! Human-readable tables for `vigilctl`.

use crate::api::{EventsView, HostView, PlanView, StatusView, VmView};
use crate::engine::PlanOutcome;

/// A plain text table with aligned columns.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 == cols {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  ", w = width[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn bytes(b: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    const MIB: f64 = 1024.0 * 1024.0;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1}G", b / GIB)
    } else {
        format!("{:.0}M", b / MIB)
    }
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}s", ms / 1000),
    }
}

/// Formats Unix milliseconds as UTC `YYYY-MM-DD HH:MM:SS.mmm`.
pub fn timestamp(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        ms % 1000
    )
}

/// The servers table of `status` and `server list`.
fn server_table(servers: &[crate::api::ServerView]) -> String {
    let mut t = Table::new(&[
        "ID", "ADDRESS", "STATE", "VOTER", "TERM", "INDEX", "COMMIT", "LAG",
    ]);
    for srv in servers {
        t.row(vec![
            srv.id.to_string(),
            srv.addr.clone(),
            srv.state.clone(),
            if srv.voter { "yes" } else { "no" }.into(),
            opt(srv.term),
            opt(srv.index),
            opt(srv.commit),
            opt(srv.lag),
        ]);
    }
    t.render()
}

/// `vigilctl server list`.
pub fn servers(s: &crate::api::ServersView) -> String {
    format!(
        "MONITOR SERVERS  (answered by node {}, leader {}, term {})\n{}",
        s.node,
        opt(s.leader),
        s.term,
        server_table(&s.servers)
    )
}

/// `vigilctl config show`.
pub fn config(v: &crate::api::ConfigView) -> String {
    let mut out = match (v.revision, &v.by, v.at_ms) {
        (0, _, _) => format!(
            "# The cluster has no settings yet: these are node {}'s file's; its first leader takes them from its own file.\n",
            v.node
        ),
        (rev, Some(by), Some(at)) => format!(
            "# Cluster settings, revision {rev}, last changed by {by} at {} (answered by node {}).\n",
            timestamp(at),
            v.node
        ),
        (rev, _, _) => format!("# Cluster settings, revision {rev} (answered by node {}).\n", v.node),
    };
    out.push_str(&v.toml);
    if v.revision > 0 && !v.file_differs.is_empty() {
        out.push_str(&format!(
            "\n# Node {}'s own file differs (its values are not used; align the file, or change the cluster with `vigilctl config set`):\n",
            v.node
        ));
        for c in &v.file_differs {
            out.push_str(&format!(
                "#   {}: cluster {}, file {}\n",
                c.key,
                c.from.as_deref().unwrap_or("(not set)"),
                c.to.as_deref().unwrap_or("(not set)")
            ));
        }
    }
    out
}

/// `vigilctl config set|unset`.
pub fn config_change(v: &crate::api::ConfigChangeView) -> String {
    if v.result == "unchanged" {
        return format!(
            "nothing to do: the cluster already has that (revision {})\n",
            v.revision
        );
    }
    let mut out = format!("cluster settings now at revision {}:\n", v.revision);
    for c in &v.changes {
        out.push_str(&format!("  {}\n", c.describe()));
    }
    out
}

pub fn status(s: &StatusView) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "MONITOR CLUSTER  (answered by node {}, leader {}, term {}, vigil {})\n",
        s.node,
        opt(s.leader),
        s.term,
        s.version
    ));
    out.push_str(&server_table(&s.servers));
    if let Some(v) = &s.vip {
        out.push_str(&format!(
            "VIP {} on {}: {} node {}\n",
            v.address,
            v.interface,
            if v.held { "held by" } else { "not held by" },
            s.node
        ));
    }
    out.push_str(&format!(
        "\nHOSTS  total {}, up {}, suspect {}, down {}, unknown {}; fencing {}, fenced {}, in maintenance {}\n",
        s.hosts_total,
        s.hosts_up,
        s.hosts_suspect,
        s.hosts_down,
        s.hosts_unknown,
        s.hosts_fencing,
        s.hosts_fenced,
        s.hosts_maintenance
    ));
    out.push_str(&format!(
        "HA VMS waiting to start {}, starting {}, given up {}{}\n",
        s.vms_waiting,
        s.vms_recovering,
        s.vms_gave_up,
        if s.vms_waiting + s.vms_gave_up > 0 {
            "  (see `vigilctl events`: why they wait)"
        } else {
            ""
        }
    ));
    if !s.capacity.is_empty() {
        let per: Vec<String> = s
            .capacity
            .iter()
            .map(|c| {
                format!(
                    "{} N+{}{} ({} hosts)",
                    c.cluster,
                    c.tolerated,
                    if c.at_least { " or more" } else { "" },
                    c.hosts
                )
            })
            .collect();
        out.push_str(&format!(
            "FAILOVER CAPACITY  host failures absorbed with every HA VM placed: {}  (`vigilctl plan --fail HOST` for the detail)\n",
            per.join(", ")
        ));
    }
    if !s.certificates.is_empty() {
        out.push_str(
            "CERTIFICATES (renew: `vigilctl cert renew`, then SIGHUP; see docs/operations.md)\n",
        );
        for c in &s.certificates {
            let when = timestamp(c.not_after_ms);
            let what = if c.refused {
                format!("EXPIRED at {when}: refused, it cannot connect")
            } else if c.expired {
                format!("EXPIRED at {when}")
            } else {
                format!("expires in {} days ({when})", c.days_left)
            };
            out.push_str(&format!(
                "  {} {} (serial {}) {what}\n",
                c.role, c.name, c.serial
            ));
        }
    }
    out
}

fn hypervisor(h: &HostView) -> String {
    use vigil_common::domain::HypervisorHealth;
    match &h.hypervisor {
        None => "-".into(),
        Some(HypervisorHealth::Healthy) => "ok".into(),
        Some(HypervisorHealth::Disabled) => "none".into(),
        Some(HypervisorHealth::Unhealthy { reason, since_ms }) => {
            format!("UNHEALTHY since {}: {reason}", timestamp(*since_ms))
        }
    }
}

pub fn host_list(hosts: &[HostView]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "ZONE",
        "CLUSTER",
        "STATE",
        "CONDITION",
        "PHASE",
        "LAST BEAT",
        "HYPERVISOR",
        "CPUS",
        "MEM FREE/TOTAL",
        "LOAD",
        "TAGS",
    ]);
    for h in hosts {
        let (cpus, mem, load) = match &h.facts {
            Some(f) => (
                f.cpus.to_string(),
                format!(
                    "{}/{}",
                    bytes(f.memory_available_bytes),
                    bytes(f.memory_total_bytes)
                ),
                format!("{:.2}", f.load_avg[0]),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        t.row(vec![
            h.name.clone(),
            h.zone.clone(),
            h.cluster.clone(),
            h.liveness.to_string(),
            h.condition
                .as_ref()
                .map(|c| c.name().to_string())
                .unwrap_or_else(|| "-".into()),
            if h.maintenance {
                format!("{} (maintenance)", h.phase.name())
            } else {
                h.phase.name().to_string()
            },
            ago(h.last_heartbeat_ms_ago),
            match &h.hypervisor {
                Some(vigil_common::domain::HypervisorHealth::Unhealthy { .. }) => {
                    "UNHEALTHY".into()
                }
                _ => hypervisor(h),
            },
            cpus,
            mem,
            load,
            if h.tags.is_empty() {
                "-".into()
            } else {
                h.tags.iter().cloned().collect::<Vec<_>>().join(",")
            },
        ]);
    }
    t.render()
}

pub fn host_show(h: &HostView) -> String {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let mut kv = |k: &str, v: String| t.row(vec![k.to_string(), v]);
    kv("name", h.name.clone());
    kv("zone", h.zone.clone());
    kv("cluster", h.cluster.clone());
    kv("state", h.liveness.to_string());
    kv(
        "condition",
        match &h.condition {
            Some(crate::investigation::Condition::Isolated { evidence })
            | Some(crate::investigation::Condition::AgentDown { evidence })
            | Some(crate::investigation::Condition::Dead { evidence, .. }) => format!(
                "{}: {evidence}",
                h.condition.as_ref().map(|c| c.name()).unwrap_or_default()
            ),
            Some(c) => c.name().to_string(),
            None => "-".into(),
        },
    );
    kv(
        "maintenance",
        if h.maintenance {
            "yes".into()
        } else {
            "no".into()
        },
    );
    kv(
        "phase",
        match &h.phase {
            crate::state::HostPhase::Fenced { proof, .. } => format!("fenced ({proof})"),
            other => other.name().to_string(),
        },
    );
    kv(
        "storage",
        if h.pools.is_empty() {
            "-".into()
        } else {
            h.pools
                .iter()
                .map(|p| {
                    if p.ok {
                        format!("{} up", p.name)
                    } else {
                        format!("{} DOWN ({})", p.name, p.detail)
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    kv("connected", h.connected.to_string());
    kv("last heartbeat", ago(h.last_heartbeat_ms_ago));
    kv(
        "tags",
        h.tags.iter().cloned().collect::<Vec<_>>().join(", "),
    );
    kv("hypervisor", hypervisor(h));
    kv("agent version", h.agent_version.clone());
    kv("registered", timestamp(h.registered_at_ms));
    if let Some(f) = &h.facts {
        kv("hostname", f.hostname.clone());
        kv("cpus", f.cpus.to_string());
        kv("memory total", bytes(f.memory_total_bytes));
        kv("memory available", bytes(f.memory_available_bytes));
        kv(
            "load",
            format!(
                "{:.2} {:.2} {:.2}",
                f.load_avg[0], f.load_avg[1], f.load_avg[2]
            ),
        );
        kv("uptime", format!("{}s", f.uptime_s));
        kv("boot id", f.boot_id.clone());
    }
    t.render()
}

pub fn events(e: &EventsView) -> String {
    let mut t = Table::new(&["ID", "TIME (UTC)", "SEVERITY", "HOST", "MESSAGE"]);
    for ev in &e.events {
        t.row(vec![
            ev.id.to_string(),
            timestamp(ev.at_ms),
            ev.severity.to_string(),
            ev.host.clone().unwrap_or_else(|| "-".into()),
            ev.message.clone(),
        ]);
    }
    t.render()
}

fn json_word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| "-".into())
}

pub fn vm_list(vms: &[VmView]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "UUID",
        "HOST",
        "STATE",
        "HA",
        "PRIO",
        "GEN",
        "PHASE",
        "LAST RECOVERY",
    ]);
    for v in vms {
        let state = match (v.state, v.reason) {
            (Some(s), Some(r)) => format!("{} ({})", json_word(&s), json_word(&r)),
            (Some(s), None) => json_word(&s),
            _ => "unreported".into(),
        };
        t.row(vec![
            v.name.clone(),
            v.uuid.clone(),
            v.host.clone().unwrap_or_else(|| "-".into()),
            state,
            if v.ha { "yes" } else { "no" }.into(),
            v.priority.to_string(),
            v.generation.to_string(),
            v.phase.clone().unwrap_or_else(|| "-".into()),
            v.last_recovery
                .as_ref()
                .map(|r| format!("{} → {} ({})", r.from_host, r.to_host, timestamp(r.at_ms)))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

pub fn vm_show(v: &VmView) -> String {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let mut kv = |k: &str, val: String| t.row(vec![k.to_string(), val]);
    kv("name", v.name.clone());
    kv("uuid", v.uuid.clone());
    kv("host", v.host.clone().unwrap_or_else(|| "-".into()));
    kv(
        "state",
        match (v.state, v.reason) {
            (Some(s), Some(r)) => format!("{} ({})", json_word(&s), json_word(&r)),
            _ => "unreported".into(),
        },
    );
    kv("vcpus", v.vcpus.to_string());
    kv("memory", format!("{} MiB", v.memory_kib / 1024));
    kv(
        "anti-affinity",
        v.anti_affinity.clone().unwrap_or_else(|| "-".into()),
    );
    kv(
        "ha",
        match (v.ha, v.ha_source) {
            (true, Some(src)) => format!("yes (set by {})", json_word(&src)),
            (false, Some(_)) => "no (disabled)".into(),
            _ => "no".into(),
        },
    );
    kv("priority", v.priority.to_string());
    kv(
        "generation",
        format!(
            "{} (running copy reports {})",
            v.generation,
            v.reported_generation
                .map(|g| g.to_string())
                .unwrap_or_else(|| "none".into())
        ),
    );
    kv(
        "phase",
        match &v.phase_detail {
            Some(p) => serde_json::to_string(p).unwrap_or_default(),
            None => "-".into(),
        },
    );
    kv("failures in window", v.failures_in_window.to_string());
    kv("definition stored", v.definition_stored.to_string());
    match &v.last_recovery {
        Some(r) => {
            kv("last recovery", timestamp(r.at_ms));
            kv(
                "  from → to",
                format!(
                    "{} → {} (generation {})",
                    r.from_host, r.to_host, r.generation
                ),
            );
            kv("  cause", r.cause.clone());
            kv("  proof", r.proof.to_string());
        }
        None => kv("last recovery", "never".into()),
    }
    t.render()
}

/// `vigilctl plan --fail H[,H]`: one row per HA VM of the failed hosts, in the order a real
/// failure places them, and a summary line.
pub fn plan(p: &PlanView) -> String {
    let mut t = Table::new(&["VM", "FROM", "PRIORITY", "OUTCOME", "TARGET", "WHY"]);
    let (mut placed, mut waits, mut gives_up) = (0, 0, 0);
    for v in &p.vms {
        let (outcome, target) = match &v.outcome {
            PlanOutcome::Placed { target } => {
                placed += 1;
                ("placed", target.as_str())
            }
            PlanOutcome::Waits => {
                waits += 1;
                ("waits", "-")
            }
            PlanOutcome::GivesUp => {
                gives_up += 1;
                ("gives up", "-")
            }
        };
        let why = match &v.warning {
            Some(w) => format!("{}; {w}", v.why),
            None => v.why.clone(),
        };
        t.row(vec![
            v.name.clone(),
            v.from.clone(),
            v.priority.to_string(),
            outcome.into(),
            target.into(),
            why,
        ]);
    }
    let mut out = format!(
        "PLAN  if {} failed now: {placed} HA VM(s) placed, {waits} would wait, {gives_up} would be given up (nothing was changed)\n",
        p.failed.join(", ")
    );
    if p.vms.is_empty() {
        out.push_str("no HA VM runs there\n");
    } else {
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000");
        assert_eq!(timestamp(1_795_000_000_123), "2026-11-18 11:06:40.123");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn status_says_whether_the_answering_monitor_holds_the_vip() {
        let mut doc = serde_json::json!({
            "node": 2, "leader": 2, "term": 3, "servers": [],
            "hosts_total": 0, "hosts_up": 0, "hosts_suspect": 0, "hosts_down": 0,
            "hosts_unknown": 0, "agents_connected": 0, "heartbeats_total": 0,
            "version": "0.1.0",
        });
        let old: StatusView = serde_json::from_value(doc.clone()).expect("a status without vip");
        assert!(!status(&old).contains("VIP"), "no [vip], no line");
        doc["vip"] =
            serde_json::json!({"address": "198.18.0.10", "interface": "br0", "held": true});
        let s: StatusView = serde_json::from_value(doc.clone()).expect("status");
        assert!(
            status(&s).contains("VIP 198.18.0.10 on br0: held by node 2\n"),
            "{}",
            status(&s)
        );
        doc["vip"]["held"] = serde_json::json!(false);
        let s: StatusView = serde_json::from_value(doc).expect("status");
        assert!(status(&s).contains("VIP 198.18.0.10 on br0: not held by node 2\n"));
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["xxxx".into(), "y".into()]);
        assert_eq!(t.render(), "A     LONGER\nxxxx  y\n");
    }
}
