//! What a SIGHUP does with a re-read configuration file: which changed settings apply to the
//! running daemon and which need a restart ([`ReloadPlan`]).
//!
//! Live: `[tls]` (certificate, key, CA and CRL, for new handshakes) and `log_level`. Nothing
//! else: the detector and lease timings, the fencing and recovery settings are what the
//! engine's safety argument is made of (a lease granted under one timing must be judged under
//! the same one), and addresses, node ids and directories are bound at start. A changed one is
//! named in the log and waits for a restart.

use serde::Serialize;
use serde_json::Value;

use crate::config::{AgentConfig, LogLevel, MonitorConfig};

/// The top-level fields (and sections) that apply on SIGHUP, for both daemons.
pub const LIVE_FIELDS: &[&str] = &["tls", "log_level"];

/// The changed settings of a re-read configuration, as dotted field names
/// (`detector.down_after_ms`; a list such as `monitors` or `fencing.hosts` as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadPlan {
    /// Changed, applied now.
    pub live: Vec<String>,
    /// Changed, kept at the running value until a restart.
    pub restart: Vec<String>,
}

impl ReloadPlan {
    /// The log line for the fields that need a restart (`None` when there are none).
    pub fn restart_message(&self, file: &std::path::Path) -> Option<String> {
        (!self.restart.is_empty()).then(|| {
            format!(
                "SIGHUP: {} changed {} that only a restart applies (still running with the old value{}): {}",
                file.display(),
                if self.restart.len() == 1 { "a setting" } else { "settings" },
                if self.restart.len() == 1 { "" } else { "s" },
                self.restart.join(", ")
            )
        })
    }
}

/// Compares `running` and `new` field by field; a changed field is live when it is one of
/// `live` or inside one of them.
pub fn reload_plan<T: Serialize>(running: &T, new: &T, live: &[&str]) -> ReloadPlan {
    let mut changed = Vec::new();
    match (serde_json::to_value(running), serde_json::to_value(new)) {
        (Ok(a), Ok(b)) => diff("", &a, &b, &mut changed),
        // Not reachable with the config types (string keys only); never treat it as "same".
        _ => changed.push("(the configuration could not be compared)".to_string()),
    }
    let is_live = |path: &str| {
        live.iter().any(|l| {
            path == *l
                || path
                    .strip_prefix(l)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    };
    let (live, restart) = changed.into_iter().partition(|p| is_live(p));
    ReloadPlan { live, restart }
}

fn diff(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                diff(
                    &path,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

impl MonitorConfig {
    /// What SIGHUP does with `new` while `self` runs.
    pub fn reload_plan(&self, new: &MonitorConfig) -> ReloadPlan {
        reload_plan(self, new, LIVE_FIELDS)
    }
}

impl AgentConfig {
    /// What SIGHUP does with `new` while `self` runs.
    pub fn reload_plan(&self, new: &AgentConfig) -> ReloadPlan {
        reload_plan(self, new, LIVE_FIELDS)
    }
}

/// `e` on one line (a TOML error spans several, with a pointer under the column): one
/// journal entry, which `journalctl -p err` shows whole.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Applies a changed `log_level` to the running filter and records it in `running`; says
/// so in the log, or why it was not applied (`RUST_LOG` set).
pub fn apply_log_level(running: &mut LogLevel, new: LogLevel) {
    if *running == new {
        return;
    }
    match crate::logging::set_level(new) {
        Ok(()) => {
            tracing::info!(
                "SIGHUP: log_level is now {} (was {})",
                new.as_str(),
                running.as_str()
            );
            *running = new;
        }
        Err(e) => tracing::warn!("SIGHUP: log_level {} not applied: {e}", new.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn monitor(text: &str) -> MonitorConfig {
        MonitorConfig::from_toml_str(text, Path::new("/etc/vigil/monitor.toml")).expect(text)
    }

    fn agent(text: &str) -> AgentConfig {
        AgentConfig::from_toml_str(text, Path::new("/etc/vigil/agent.toml")).expect(text)
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let m = monitor("node_id = 2\n[vip]\naddress = \"198.18.0.10\"\ninterface = \"br0\"\n");
        assert_eq!(m.reload_plan(&m.clone()), ReloadPlan::default());
        let a = agent("zone = \"z1\"\n");
        assert_eq!(a.reload_plan(&a.clone()), ReloadPlan::default());
    }

    #[test]
    fn log_level_and_certificates_are_live() {
        let running = monitor("");
        let new = monitor(
            "log_level = \"debug\"\n[tls]\nca = \"/x/ca.crt\"\ncert = \"/etc/vigil/tls/monitor.crt\"\nkey = \"/etc/vigil/tls/monitor.key\"\ncrl = \"/x/crl.pem\"\n",
        );
        let plan = running.reload_plan(&new);
        assert_eq!(plan.live, ["log_level", "tls.ca", "tls.crl"]);
        assert!(plan.restart.is_empty(), "{plan:?}");
        assert_eq!(plan.restart_message(Path::new("/m.toml")), None);
    }

    #[test]
    fn safety_timings_addresses_and_ids_need_a_restart() {
        let running = monitor("");
        let new = monitor(
            "node_id = 3\nlisten = \"10.0.0.1:7440\"\nlog_format = \"json\"\nlog_level = \"warn\"\n\
             [detector]\ndown_after_ms = 3000\n[lease]\nduration_ms = 6000\n\
             [recovery]\nha_tag = \"ha\"\n[raft]\nlisten = \"10.0.0.1:7441\"\n\
             [vip]\naddress = \"198.18.0.10\"\ninterface = \"br0\"\n",
        );
        let plan = running.reload_plan(&new);
        assert_eq!(plan.live, ["log_level"]);
        assert_eq!(
            plan.restart,
            [
                "detector.down_after_ms",
                "lease.duration_ms",
                "listen",
                "log_format",
                "node_id",
                "raft.listen",
                "recovery.ha_tag",
                "vip"
            ]
        );
        let msg = plan
            .restart_message(Path::new("/etc/vigil/monitor.toml"))
            .expect("a message");
        assert!(
            msg.contains("/etc/vigil/monitor.toml")
                && msg.contains("only a restart applies")
                && msg.ends_with("raft.listen, recovery.ha_tag, vip"),
            "{msg}"
        );
    }

    #[test]
    fn a_list_or_a_section_inside_an_option_is_named_by_its_path() {
        let base = "[vip]\naddress = \"198.18.0.10\"\ninterface = \"br0\"\n";
        let running = monitor(base);
        let new = monitor(&format!(
            "{base}garp_count = 2\n[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"fence_ipmilan\"\n[fencing.hosts.options]\npassword = \"s3cret\"\n"
        ));
        let plan = running.reload_plan(&new);
        assert_eq!(plan.restart, ["fencing.hosts", "vip.garp_count"]);
        let msg = plan.restart_message(Path::new("/m.toml")).expect("message");
        assert!(!msg.contains("s3cret"), "names only, never values: {msg}");
        let mut gone = running.clone();
        gone.vip = None;
        assert_eq!(running.reload_plan(&gone).restart, ["vip"]);
        assert_eq!(gone.reload_plan(&monitor(base)).restart, ["vip"]);
    }

    #[test]
    fn the_agents_monitors_and_watchdog_need_a_restart_its_log_level_does_not() {
        let running = agent("");
        let new = agent(
            "monitors = [\"10.0.0.1:7440\", \"10.0.0.2:7440\"]\nlog_level = \"trace\"\n\
             [watchdog]\ndevice = \"/dev/watchdog\"\n",
        );
        let plan = running.reload_plan(&new);
        assert_eq!(plan.live, ["log_level"]);
        assert_eq!(plan.restart, ["monitors", "watchdog.device"]);
        assert_eq!(new.log_level, LogLevel::Trace);
    }

    #[test]
    fn a_parse_error_is_logged_on_one_line_naming_file_and_field() {
        let err =
            MonitorConfig::from_toml_str("nodeid = 2\n", Path::new("/etc/vigil/monitor.toml"))
                .expect_err("unknown field");
        assert!(
            err.to_string().contains('\n'),
            "toml's error spans lines: {err}"
        );
        let line = one_line(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("/etc/vigil/monitor.toml: TOML parse error at line 1, column 1")
                && line.contains("unknown field `nodeid`"),
            "{line}"
        );
    }

    #[test]
    fn a_live_prefix_does_not_match_a_longer_field_name() {
        #[derive(Serialize)]
        struct C {
            tls: u8,
            tls_extra: u8,
        }
        let plan = reload_plan(
            &C {
                tls: 1,
                tls_extra: 1,
            },
            &C {
                tls: 2,
                tls_extra: 2,
            },
            LIVE_FIELDS,
        );
        assert_eq!(plan.live, ["tls"]);
        assert_eq!(plan.restart, ["tls_extra"]);
    }
}
