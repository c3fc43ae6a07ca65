//! The settings every monitor of a cluster must agree on, kept in the replicated state.
//!
//! OpenNebula's `onezone serversync` copies configuration files between its servers by hand;
//! a Vigil cluster never needs that. The failure detector, the recovery policy (with `ha_tag`
//! and its fallback), the agents' lease and the fencing entries are one [`ClusterSettings`],
//! committed through Raft like everything else: each monitor's `monitor.toml` keeps only what
//! is its own (node id, addresses, certificates, data dir, VIP interface, storage mounts). The
//! first leader of a cluster seeds the settings from its own file; after that they change only
//! with `vigilctl config set|unset`, validated before they commit, each changed key an event
//! with who changed it, and a monitor whose file disagrees says so when it starts.
//!
//! Pure: parsing, validation, the rules for changing a running cluster ([`check_live_change`])
//! and the per-key difference ([`diff`]) used by the state machine, `vigilctl` and the
//! start-up check alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{
    is_secret_fence_option, DetectorConfig, FencingConfig, LeaseConfig, RecoveryConfig,
};

/// Longest a cluster's settings may be as TOML (fencing entries included): they ride in one
/// Raft entry and in every snapshot.
pub const MAX_SETTINGS_LEN: usize = 64 * 1024;

/// Shown instead of a secret fence option (passwords never leave the monitor that runs the
/// fence agent: not in `vigilctl config`, not in events).
pub const HIDDEN: &str = "(hidden)";

/// The cluster-wide sections of `monitor.toml`, with the same names and defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    pub detector: DetectorConfig,
    pub recovery: RecoveryConfig,
    pub lease: LeaseConfig,
    pub fencing: FencingConfig,
}

/// A setting that cannot be taken: `key` names it (`recovery.window_ms`), `message` says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingError {
    pub key: String,
    pub message: String,
}

fn error(key: impl Into<String>, message: impl Into<String>) -> SettingError {
    SettingError {
        key: key.into(),
        message: message.into(),
    }
}

/// One key whose value differs between two settings (values as TOML, secrets hidden;
/// `None`: not set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingChange {
    pub key: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl SettingChange {
    /// `recovery.ha_tag: "ha" -> "ha2"`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} -> {}",
            self.key,
            self.from.as_deref().unwrap_or("(not set)"),
            self.to.as_deref().unwrap_or("(not set)")
        )
    }
}

/// Settings keys whose change on a running cluster is refused, and why (see
/// [`check_live_change`]).
pub const FIXED_KEYS: [(&str, &str); 1] = [
    (
        "lease.isolation_response",
        "agents hold the isolation response of their last grant, and lease expiry would count as proof for a host whose agent still keeps its guests",
    ),
];

impl ClusterSettings {
    /// Checks every field on its own and against the others; the error names the field as
    /// in `monitor.toml` (`detector.down_after_ms`). The lease's check against this monitor's
    /// storage interval is [`check_lease_against_storage`].
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let d = &self.detector;
        if d.heartbeat_interval_ms < 10 || d.heartbeat_interval_ms > 60_000 {
            return Err((
                "detector.heartbeat_interval_ms",
                format!("{} is out of range 10..=60000", d.heartbeat_interval_ms),
            ));
        }
        if d.suspect_after_ms <= d.heartbeat_interval_ms {
            return Err((
                "detector.suspect_after_ms",
                format!(
                    "{} must be greater than detector.heartbeat_interval_ms ({})",
                    d.suspect_after_ms, d.heartbeat_interval_ms
                ),
            ));
        }
        if d.down_after_ms <= d.suspect_after_ms {
            return Err((
                "detector.down_after_ms",
                format!(
                    "{} must be greater than detector.suspect_after_ms ({})",
                    d.down_after_ms, d.suspect_after_ms
                ),
            ));
        }
        let r = &self.recovery;
        if r.max_restarts_in_place + r.max_relocations == 0 {
            return Err((
                "recovery.max_restarts_in_place",
                "recovery.max_restarts_in_place and recovery.max_relocations cannot both be 0 (HA would never restart anything)".into(),
            ));
        }
        if r.min_failures_tolerated > 8 {
            return Err((
                "recovery.min_failures_tolerated",
                format!("{} is out of range 0..=8", r.min_failures_tolerated),
            ));
        }
        if r.vcpu_overcommit > 64 {
            return Err((
                "recovery.vcpu_overcommit",
                format!("{} is out of range 0..=64", r.vcpu_overcommit),
            ));
        }
        if r.window_ms < 1_000 {
            return Err((
                "recovery.window_ms",
                format!("{} is shorter than 1000 ms", r.window_ms),
            ));
        }
        if r.backoff_max_ms < r.backoff_initial_ms {
            return Err((
                "recovery.backoff_max_ms",
                format!(
                    "{} is smaller than recovery.backoff_initial_ms ({})",
                    r.backoff_max_ms, r.backoff_initial_ms
                ),
            ));
        }
        if let Some(tag) = &r.ha_tag {
            crate::names::validate("tag", tag).map_err(|m| ("recovery.ha_tag", m))?;
        }
        self.fencing.validate()?;
        let l = &self.lease;
        if !(1_000..=600_000).contains(&l.duration_ms) {
            return Err((
                "lease.duration_ms",
                format!("{} is out of range 1000..=600000", l.duration_ms),
            ));
        }
        if l.duration_ms <= d.down_after_ms {
            return Err((
                "lease.duration_ms",
                format!(
                    "{} must be longer than detector.down_after_ms ({}): a lease shorter than detection would fence hosts the monitor still counts as alive",
                    l.duration_ms, d.down_after_ms
                ),
            ));
        }
        if !(100..=600_000).contains(&l.drift_margin_ms) {
            return Err((
                "lease.drift_margin_ms",
                format!("{} is out of range 100..=600000", l.drift_margin_ms),
            ));
        }
        Ok(())
    }

    /// The longest a fence-agent call may run under these settings (the longest of
    /// `fencing.timeout_ms` and the hosts' own).
    pub fn fence_agent_limit_ms(&self) -> u64 {
        self.fencing
            .hosts
            .iter()
            .filter_map(|h| h.timeout_ms)
            .fold(self.fencing.timeout_ms, u64::max)
    }

    /// Every key with its value as TOML (`recovery.ha_tag` → `"ha"`), secrets hidden.
    /// `fencing.hosts` is one key: the list is set whole.
    pub fn flatten(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(self.redacted()) {
            flatten_into("", &t, &mut out);
        }
        out
    }

    /// A copy with every secret fence option replaced by [`HIDDEN`].
    pub fn redacted(&self) -> ClusterSettings {
        let mut s = self.clone();
        for h in &mut s.fencing.hosts {
            for (k, v) in h.options.iter_mut() {
                if is_secret_fence_option(k) {
                    *v = HIDDEN.to_string();
                }
            }
        }
        s
    }

    /// The settings as `monitor.toml` sections, secrets hidden (what `vigilctl config show`
    /// prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.redacted()).unwrap_or_default()
    }

    /// Length of these settings as TOML, secrets included (checked against
    /// [`MAX_SETTINGS_LEN`]).
    pub fn encoded_len(&self) -> usize {
        toml::to_string(self).map(|t| t.len()).unwrap_or(usize::MAX)
    }

    /// The value of `key` as TOML (secrets hidden); `None` when the key is not set (an
    /// optional one such as `recovery.ha_tag`). An unknown key is an error that lists the
    /// known ones of its section.
    pub fn get(&self, key: &str) -> Result<Option<String>, SettingError> {
        get_from(&self.flatten(), key)
    }

    /// These settings with `key` set to `value`, validated. `value` is a TOML value (`3000`,
    /// `true`, `"ha"`, `[{ host = "hv1", agent = "fence_ipmilan" }]`); a bare word is taken as
    /// a string (`wait`). Secret fence options shown as [`HIDDEN`] keep their stored value
    /// when the list is set again as `config show` printed it.
    pub fn with(&self, key: &str, value: &str) -> Result<ClusterSettings, SettingError> {
        check_key(key)?;
        let v = parse_value(value);
        self.edit(key, Some(v))
    }

    /// These settings with `key` back at its default (an optional key: not set).
    pub fn without(&self, key: &str) -> Result<ClusterSettings, SettingError> {
        check_key(key)?;
        let default = toml::Value::try_from(ClusterSettings::default())
            .map_err(|e| error(key, e.to_string()))?;
        let v = lookup(&default, key).cloned();
        self.edit(key, v)
    }

    fn edit(&self, key: &str, value: Option<toml::Value>) -> Result<ClusterSettings, SettingError> {
        let mut root = toml::Value::try_from(self).map_err(|e| error(key, e.to_string()))?;
        let parts: Vec<&str> = key.split('.').collect();
        let (last, path) = parts.split_last().ok_or_else(|| error(key, "empty key"))?;
        let mut table = root
            .as_table_mut()
            .ok_or_else(|| error(key, "settings are not a table"))?;
        for p in path {
            table = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| error(key, format!("{p} is not a section")))?;
        }
        match value {
            Some(v) => {
                table.insert(last.to_string(), v);
            }
            None => {
                table.remove(*last);
            }
        }
        let mut next: ClusterSettings = root
            .try_into()
            .map_err(|e: toml::de::Error| error(key, e.message().to_string()))?;
        next.keep_hidden_secrets(self);
        next.validate().map_err(|(field, m)| error(field, m))?;
        Ok(next)
    }

    /// Puts back the stored value of every secret option given as [`HIDDEN`] (the list was
    /// copied from `config show`).
    fn keep_hidden_secrets(&mut self, old: &ClusterSettings) {
        for h in &mut self.fencing.hosts {
            let before = old.fencing.host(&h.host);
            for (k, v) in h.options.iter_mut() {
                if v == HIDDEN {
                    if let Some(stored) = before.and_then(|b| b.options.get(k)) {
                        *v = stored.clone();
                    }
                }
            }
        }
    }
}

/// [`ClusterSettings::get`] on settings already flattened (`vigilctl config get` on what
/// the monitor sent).
pub fn get_from(
    flat: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<String>, SettingError> {
    check_key(key)?;
    if let Some(v) = flat.get(key) {
        return Ok(Some(v.clone()));
    }
    // A section (`recovery`): all of it.
    let prefix = format!("{key}.");
    let lines: Vec<String> = flat
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    Ok((!lines.is_empty()).then(|| lines.join("\n")))
}

/// The keys a cluster's settings have (sections and their fields), for errors.
fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = ClusterSettings::default().flatten().into_keys().collect();
    keys.push("recovery.ha_tag".into());
    keys.sort();
    keys
}

fn check_key(key: &str) -> Result<(), SettingError> {
    let known = known_keys();
    let ok = known
        .iter()
        .any(|k| k == key || k.starts_with(&format!("{key}.")));
    if ok {
        return Ok(());
    }
    let section = key.split('.').next().unwrap_or(key);
    let siblings: Vec<&str> = known
        .iter()
        .filter(|k| k.starts_with(&format!("{section}.")))
        .map(String::as_str)
        .collect();
    let hint = if siblings.is_empty() {
        "the sections are detector, recovery, lease and fencing; the rest of monitor.toml is each monitor's own".to_string()
    } else {
        format!("known keys: {}", siblings.join(", "))
    };
    Err(error(key, format!("not a cluster setting ({hint})")))
}

fn parse_value(text: &str) -> toml::Value {
    let parsed = format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    parsed.unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn lookup<'a>(root: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
    key.split('.').try_fold(root, |v, p| v.get(p))
}

fn flatten_into(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten_into(&key, t, out),
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

/// Every key whose value differs from `old` to `new`, in key order (secrets hidden: a
/// changed password shows as a change of `fencing.hosts` with both values hidden).
pub fn diff(old: &ClusterSettings, new: &ClusterSettings) -> Vec<SettingChange> {
    let (a, b) = (old.flatten(), new.flatten());
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<SettingChange> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| SettingChange {
            key: k.clone(),
            from: a.get(k).cloned(),
            to: b.get(k).cloned(),
        })
        .collect();
    if out.is_empty() && old.fencing.hosts != new.fencing.hosts {
        // Only a secret changed.
        let shown = a.get("fencing.hosts").cloned();
        out.push(SettingChange {
            key: "fencing.hosts".into(),
            from: shown.clone(),
            to: shown,
        });
    }
    out
}

/// Whether a running cluster may go from `old` to `new` (both valid). Refused:
///
/// - a shorter `lease.duration_ms` or `lease.drift_margin_ms`: agents hold leases granted at
///   the old length, and a monitor counting them with the new one would take a lease for
///   expired while its agent still runs its guests (a longer one only makes proofs wait);
/// - a change of a [`FIXED_KEYS`] key (each with its reason);
/// - a fence agent that is not a ClusterLabs agent (`fence_*`, a bare name), and any
///   fence option that names a program (`*_path`, `*_script`, `exec`), unless the file the
///   cluster was seeded from already had it: an admin certificate may fence, but must not
///   make the monitors run a program of its choosing.
pub fn check_live_change(old: &ClusterSettings, new: &ClusterSettings) -> Result<(), SettingError> {
    if new.lease.duration_ms < old.lease.duration_ms {
        return Err(error(
            "lease.duration_ms",
            format!(
                "{} is shorter than the cluster's {} ms: agents hold leases granted at the old length, so a running cluster can only lengthen its lease",
                new.lease.duration_ms, old.lease.duration_ms
            ),
        ));
    }
    if new.lease.drift_margin_ms < old.lease.drift_margin_ms {
        return Err(error(
            "lease.drift_margin_ms",
            format!(
                "{} is shorter than the cluster's {} ms: a running cluster can only lengthen it (see lease.duration_ms)",
                new.lease.drift_margin_ms, old.lease.drift_margin_ms
            ),
        ));
    }
    let (a, b) = (old.flatten(), new.flatten());
    for (key, why) in FIXED_KEYS {
        if a.get(key) != b.get(key) {
            return Err(error(
                key,
                format!("cannot change on a running cluster: {why}"),
            ));
        }
    }
    for h in &new.fencing.hosts {
        let before: Vec<&crate::config::FenceHostConfig> = old.fencing.hosts.iter().collect();
        let known_agent = before.iter().any(|b| b.agent == h.agent);
        let clusterlabs = h.agent.starts_with("fence_") && !h.agent.contains('/');
        if !clusterlabs && !known_agent {
            return Err(error(
                "fencing.hosts.agent",
                format!(
                    "host {:?}: agent {:?} is not a ClusterLabs fence agent (fence_*, a bare name found in PATH, /usr/sbin or /sbin); another program can only come from the file the cluster was seeded from",
                    h.host, h.agent
                ),
            ));
        }
        for (k, v) in &h.options {
            let names_a_program = k.ends_with("_path") || k.ends_with("_script") || k == "exec";
            if !names_a_program {
                continue;
            }
            let same = before
                .iter()
                .any(|b| b.host == h.host && b.options.get(k) == Some(v));
            if !same {
                return Err(error(
                    "fencing.hosts.options",
                    format!(
                        "host {:?}: option {k:?} names a program the fence agent would run; it cannot be set through vigilctl (put it in the file the cluster is seeded from)",
                        h.host
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The lease's check against a monitor's storage interval (`storage.interval_ms`): an
/// isolated agent must see the leader record change before its lease runs out.
pub fn check_lease_against_storage(
    settings: &ClusterSettings,
    storage_interval_ms: u64,
) -> Result<(), (&'static str, String)> {
    let fresh_after = 2 * storage_interval_ms + settings.detector.heartbeat_interval_ms;
    if settings.lease.duration_ms <= fresh_after + 1_000 {
        return Err((
            "lease.duration_ms",
            format!(
                "{} is too short: an isolated agent needs to see the leader record change more than {fresh_after} ms (two storage.interval_ms plus detector.heartbeat_interval_ms) after its last renewal, and a second to spare",
                settings.lease.duration_ms
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FenceHostConfig, TagFallback};

    fn fenced() -> ClusterSettings {
        let mut s = ClusterSettings::default();
        s.fencing.hosts.push(FenceHostConfig {
            host: "hv1".into(),
            agent: "fence_ipmilan".into(),
            options: [
                ("ip".to_string(), "198.18.2.1".to_string()),
                ("password".to_string(), "s3cret".to_string()),
            ]
            .into_iter()
            .collect(),
            timeout_ms: None,
            netns: None,
        });
        s
    }

    #[test]
    fn a_value_is_set_by_its_key_and_validated() {
        let s = ClusterSettings::default();
        let t = s.with("recovery.ha_tag", "ha").expect("valid");
        assert_eq!(t.recovery.ha_tag.as_deref(), Some("ha"));
        let t = t.with("recovery.ha_tag_fallback", "wait").expect("valid");
        assert_eq!(t.recovery.ha_tag_fallback, TagFallback::Wait);
        let t = t.with("detector.down_after_ms", "4000").expect("valid");
        assert_eq!(t.detector.down_after_ms, 4000);
        assert_eq!(
            diff(&s, &t)
                .iter()
                .map(SettingChange::describe)
                .collect::<Vec<_>>(),
            vec![
                "detector.down_after_ms: 2500 -> 4000",
                "recovery.ha_tag: (not set) -> \"ha\"",
                "recovery.ha_tag_fallback: \"any\" -> \"wait\"",
            ]
        );
        let back = t.without("recovery.ha_tag").expect("valid");
        assert_eq!(back.recovery.ha_tag, None);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let s = ClusterSettings::default();
        let e = s.with("recovery.window_ms", "500").expect_err("refused");
        assert_eq!(e.key, "recovery.window_ms");
        assert!(e.message.contains("shorter than 1000"), "{e}");
        let e = s
            .with("detector.down_after_ms", "\"soon\"")
            .expect_err("refused");
        assert_eq!(e.key, "detector.down_after_ms");
        let e = s.with("recovery.ha_tga", "ha").expect_err("refused");
        assert!(
            e.message.contains("known keys") && e.message.contains("recovery.ha_tag"),
            "{e}"
        );
        let e = s.with("node_id", "3").expect_err("refused");
        assert!(e.message.contains("each monitor's own"), "{e}");
        // A lease no longer than detection.
        let e = s
            .with("detector.down_after_ms", "6000")
            .expect_err("refused");
        assert_eq!(e.key, "lease.duration_ms");
    }

    #[test]
    fn secrets_are_hidden_and_kept_when_the_list_is_set_again() {
        let s = fenced();
        let shown = s.get("fencing.hosts").expect("valid").expect("valid");
        assert!(
            !shown.contains("s3cret") && shown.contains(HIDDEN),
            "{shown}"
        );
        assert!(!s.to_toml().contains("s3cret"));
        // The operator pastes what `config show` printed, with a new address.
        let pasted = shown.replace("198.18.2.1", "198.18.2.9");
        let t = s.with("fencing.hosts", &pasted).expect("valid");
        let h = t.fencing.host("hv1").expect("valid");
        assert_eq!(h.options["password"], "s3cret");
        assert_eq!(h.options["ip"], "198.18.2.9");
        let changes = diff(&s, &t);
        assert_eq!(changes.len(), 1);
        assert!(!format!("{changes:?}").contains("s3cret"));
    }

    #[test]
    fn a_running_cluster_only_lengthens_its_lease_and_keeps_the_fixed_keys() {
        let s = ClusterSettings::default();
        let longer = s.with("lease.duration_ms", "8000").expect("valid");
        assert!(check_live_change(&s, &longer).is_ok());
        let e = check_live_change(&longer, &s).expect_err("refused");
        assert_eq!(e.key, "lease.duration_ms");
        let keep = s
            .with("lease.isolation_response", "keep-running")
            .expect("valid");
        assert_eq!(
            check_live_change(&s, &keep).expect_err("refused").key,
            "lease.isolation_response"
        );
        // The heartbeat interval changes live: connected agents are told (`Tuning`).
        let beat = s
            .with("detector.heartbeat_interval_ms", "400")
            .expect("valid");
        assert!(check_live_change(&s, &beat).is_ok());
        // Still checked against the detector as the file would be.
        assert_eq!(
            s.with("detector.heartbeat_interval_ms", "2000")
                .expect_err("not above suspect_after_ms")
                .key,
            "detector.suspect_after_ms"
        );
    }

    #[test]
    fn vigilctl_cannot_make_the_monitors_run_a_program_of_its_choosing() {
        let s = fenced();
        let evil = s
            .with("fencing.hosts", r#"[{ host = "hv1", agent = "/bin/sh" }]"#)
            .expect("valid");
        assert_eq!(
            check_live_change(&s, &evil).expect_err("refused").key,
            "fencing.hosts.agent"
        );
        let evil = s
            .with(
                "fencing.hosts",
                r#"[{ host = "hv1", agent = "fence_ipmilan", options = { ipmitool_path = "/tmp/x" } }]"#,
            )
            .expect("valid");
        assert_eq!(
            check_live_change(&s, &evil).expect_err("refused").key,
            "fencing.hosts.options"
        );
        let fine = s
            .with(
                "fencing.hosts",
                r#"[{ host = "hv2", agent = "fence_redfish", options = { ip = "198.18.2.2" } }]"#,
            )
            .expect("valid");
        assert!(check_live_change(&s, &fine).is_ok());
    }

    #[test]
    fn a_section_is_shown_whole() {
        let s = ClusterSettings::default();
        let all = s.get("detector").expect("valid").expect("valid");
        assert!(all.contains("detector.down_after_ms = 2500"), "{all}");
        assert_eq!(s.get("recovery.ha_tag").expect("valid"), None);
    }
}
