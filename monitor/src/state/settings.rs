//! The cluster-wide settings in the replicated state (issue 12 item 9, see
//! `vigil_common::settings`): seeded once from the first leader's file, then changed only by
//! an operator, each change checked here, where every replica applies it alike.

use serde::{Deserialize, Serialize};
use vigil_common::settings::{self as rules, ClusterSettings, MAX_SETTINGS_LEN};

use super::{ClusterState, EventKind, Severity, StateCommand, StateResponse};

/// The settings the cluster runs with, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsRecord {
    pub settings: ClusterSettings,
    /// 1 when seeded, +1 per change: a change names the revision it was made against.
    pub revision: u64,
    /// When and by whom the last change was made (`monitor 1's file` for the seed,
    /// `admin:alice` for a change).
    pub at_ms: u64,
    pub by: String,
    /// The longest fence-agent time limit these settings ever had: a fence agent that a
    /// deposed leader started may run that long, whatever the limit is now, so a new leader
    /// waits for this one before it lets a host it was fencing rejoin.
    pub longest_fence_agent_ms: u64,
}

/// Applies [`StateCommand::SetSettings`].
pub(super) fn apply(state: &mut ClusterState, cmd: &StateCommand) -> StateResponse {
    let StateCommand::SetSettings {
        at_ms,
        by,
        base_revision,
        settings,
    } = cmd
    else {
        return StateResponse::Unchanged;
    };
    if let Err((field, why)) = settings.validate() {
        return StateResponse::Invalid {
            reason: format!("{field}: {why}"),
        };
    }
    let len = settings.encoded_len();
    if len > MAX_SETTINGS_LEN {
        return StateResponse::Invalid {
            reason: format!("cluster settings of {len} bytes (at most {MAX_SETTINGS_LEN})"),
        };
    }
    let Some(current) = &state.settings else {
        // The seed: the first leader's file. Racing seeds of two leaders: the first wins.
        if *base_revision != 0 {
            return StateResponse::Stale {
                reason: format!(
                    "the cluster has no settings yet (a change was made against revision {base_revision})"
                ),
            };
        }
        state.settings = Some(SettingsRecord {
            settings: settings.clone(),
            revision: 1,
            at_ms: *at_ms,
            by: by.clone(),
            longest_fence_agent_ms: settings.fence_agent_limit_ms(),
        });
        state.push_event(
            *at_ms,
            Severity::Info,
            None,
            EventKind::SettingsSeeded { by: by.clone() },
            format!("cluster settings taken from {by}; `vigilctl config show` prints them, `vigilctl config set` changes them"),
        );
        return StateResponse::Ok;
    };
    if *base_revision == 0 {
        // Another leader's seed came first.
        return StateResponse::Unchanged;
    }
    if *base_revision != current.revision {
        return StateResponse::Stale {
            reason: format!(
                "the cluster settings changed meanwhile (revision {} now, this change was made against {base_revision}): look again with `vigilctl config show`",
                current.revision
            ),
        };
    }
    if let Err(e) = rules::check_live_change(&current.settings, settings) {
        return StateResponse::Invalid {
            reason: e.to_string(),
        };
    }
    let changes = rules::diff(&current.settings, settings);
    if changes.is_empty() {
        return StateResponse::Unchanged;
    }
    let longest = current
        .longest_fence_agent_ms
        .max(settings.fence_agent_limit_ms());
    state.settings = Some(SettingsRecord {
        settings: settings.clone(),
        revision: current.revision + 1,
        at_ms: *at_ms,
        by: by.clone(),
        longest_fence_agent_ms: longest,
    });
    for c in changes {
        let message = super::clip_message(format!("{by} changed {}", c.describe()));
        state.push_event(
            *at_ms,
            Severity::Info,
            None,
            EventKind::SettingChanged {
                key: c.key,
                from: c.from.map(super::clip_message),
                to: c.to.map(super::clip_message),
                by: by.clone(),
            },
            message,
        );
    }
    StateResponse::Ok
}

/// What `vigilctl config set KEY VALUE` (`value` `Some`) or `config unset KEY` (`None`)
/// proposes on top of the committed `record`: the revision it is made against and the new
/// settings, or `None` when nothing would change. Checked as the state machine will check it
/// (fields, what a running cluster may change) and against this monitor's
/// `storage_interval_ms` (the lease must outlast two of them). One function for the admin
/// API and the simulator.
pub fn proposed_change(
    record: Option<&SettingsRecord>,
    key: &str,
    value: Option<&str>,
    storage_interval_ms: u64,
) -> Result<Option<(u64, ClusterSettings)>, String> {
    let Some(record) = record else {
        return Err(
            "the cluster has no settings yet: its first leader takes them from its file when it is elected; try again in a moment"
                .into(),
        );
    };
    let next = match value {
        Some(v) => record.settings.with(key, v),
        None => record.settings.without(key),
    }
    .map_err(|e| e.to_string())?;
    rules::check_lease_against_storage(&next, storage_interval_ms)
        .map_err(|(field, why)| format!("{field}: {why}"))?;
    rules::check_live_change(&record.settings, &next).map_err(|e| e.to_string())?;
    if rules::diff(&record.settings, &next).is_empty() {
        return Ok(None);
    }
    Ok(Some((record.revision, next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_common::config::FenceHostConfig;

    fn seed(state: &mut ClusterState, settings: &ClusterSettings, by: &str) -> StateResponse {
        state.apply(&StateCommand::SetSettings {
            at_ms: 1,
            by: by.into(),
            base_revision: 0,
            settings: settings.clone(),
        })
    }

    fn change(state: &ClusterState, key: &str, value: &str) -> StateCommand {
        let (base_revision, settings) =
            proposed_change(state.settings.as_ref(), key, Some(value), 500)
                .expect("valid")
                .expect("a change");
        StateCommand::SetSettings {
            at_ms: 2,
            by: "admin:alice".into(),
            base_revision,
            settings,
        }
    }

    #[test]
    fn the_first_seed_wins_and_each_changed_key_is_one_event_with_who_changed_it() {
        let mut s = ClusterState::default();
        let file = ClusterSettings::default();
        assert_eq!(seed(&mut s, &file, "monitor 1's file"), StateResponse::Ok);
        // A second leader's seed (its file differs): nothing changes.
        let other = file.with("recovery.ha_tag", "x").expect("valid");
        assert_eq!(
            seed(&mut s, &other, "monitor 2's file"),
            StateResponse::Unchanged
        );
        assert_eq!(s.settings.as_ref().expect("valid").settings, file);
        assert_eq!(s.settings.as_ref().expect("valid").revision, 1);

        let set_tag = change(&s, "recovery.ha_tag", "ha");
        let two = match &set_tag {
            StateCommand::SetSettings { settings, .. } => settings
                .with("recovery.ha_tag_fallback", "wait")
                .expect("valid"),
            _ => unreachable!(),
        };
        let both = StateCommand::SetSettings {
            at_ms: 2,
            by: "admin:alice".into(),
            base_revision: 1,
            settings: two,
        };
        let before = s.events.len();
        assert_eq!(s.apply(&both), StateResponse::Ok);
        let new: Vec<_> = s.events.iter().skip(before).collect();
        assert_eq!(new.len(), 2, "{new:?}");
        assert!(
            matches!(&new[0].kind, EventKind::SettingChanged { key, by, .. } if key == "recovery.ha_tag" && by == "admin:alice")
        );
        assert!(new[1]
            .message
            .contains("recovery.ha_tag_fallback: \"any\" -> \"wait\""));
        assert_eq!(s.settings.as_ref().expect("valid").revision, 2);
        // Made against revision 1, which is gone: stale, nothing changes.
        assert!(matches!(s.apply(&set_tag), StateResponse::Stale { .. }));
        assert_eq!(s.settings.as_ref().expect("valid").revision, 2);
    }

    #[test]
    fn the_state_machine_itself_refuses_what_a_running_cluster_may_not_change() {
        let mut s = ClusterState::default();
        let file = ClusterSettings::default()
            .with("lease.duration_ms", "8000")
            .expect("valid");
        seed(&mut s, &file, "monitor 1's file");
        let shorter = file.with("lease.duration_ms", "6000").expect("valid");
        let cmd = StateCommand::SetSettings {
            at_ms: 2,
            by: "admin:mallory".into(),
            base_revision: 1,
            settings: shorter,
        };
        assert!(
            matches!(s.apply(&cmd), StateResponse::Invalid { reason } if reason.contains("lease.duration_ms"))
        );
        let mut bad = file.clone();
        bad.detector.down_after_ms = 1;
        let cmd = StateCommand::SetSettings {
            at_ms: 2,
            by: "admin:mallory".into(),
            base_revision: 1,
            settings: bad,
        };
        assert!(matches!(s.apply(&cmd), StateResponse::Invalid { .. }));
        assert_eq!(s.settings.as_ref().expect("valid").settings, file);
        // And an unseeded cluster takes no change.
        let mut empty = ClusterState::default();
        assert!(proposed_change(None, "recovery.ha_tag", Some("ha"), 500).is_err());
        let cmd = StateCommand::SetSettings {
            at_ms: 2,
            by: "admin:alice".into(),
            base_revision: 3,
            settings: file,
        };
        assert!(matches!(empty.apply(&cmd), StateResponse::Stale { .. }));
        assert!(empty.settings.is_none());
    }

    #[test]
    fn a_fence_password_never_reaches_the_event_log_and_a_shorter_fence_limit_is_remembered() {
        let mut s = ClusterState::default();
        let mut file = ClusterSettings::default();
        file.fencing.hosts.push(FenceHostConfig {
            host: "hv1".into(),
            agent: "fence_ipmilan".into(),
            options: [("password".to_string(), "s3cret".to_string())]
                .into_iter()
                .collect(),
            timeout_ms: Some(90_000),
            netns: None,
        });
        seed(&mut s, &file, "monitor 1's file");
        let cmd = change(
            &s,
            "fencing.hosts",
            r#"[{ host = "hv1", agent = "fence_ipmilan", options = { password = "n3w" } }]"#,
        );
        assert_eq!(s.apply(&cmd), StateResponse::Ok);
        let log = format!("{:?}", s.events);
        assert!(!log.contains("s3cret") && !log.contains("n3w"), "{log}");
        let r = s.settings.as_ref().expect("valid");
        assert_eq!(r.settings.fence_agent_limit_ms(), 20_000);
        // A fence agent a predecessor started under the old limit may still run 90 s.
        assert_eq!(r.longest_fence_agent_ms, 90_000);
    }

    #[test]
    fn a_snapshot_from_before_settings_loads_without_them() {
        let mut s = ClusterState::default();
        let old = serde_json::to_value(&s).expect("valid");
        assert!(old.get("settings").is_none());
        let back: ClusterState = serde_json::from_value(old).expect("valid");
        assert!(back.settings.is_none());
        seed(&mut s, &ClusterSettings::default(), "monitor 1's file");
        let round: ClusterState =
            serde_json::from_value(serde_json::to_value(&s).expect("valid")).expect("valid");
        assert_eq!(round.settings, s.settings);
    }
}
