//! Where a VM may run: same zone always, same cluster first, live hosts with room.
//!
//! Pure: it reads the replicated hosts and a view of each host's liveness and capacity that
//! the engine supplies. (`ha_tag` preference and anti-affinity come with host-failure
//! recovery.)

use std::collections::BTreeMap;

use crate::state::HostRecord;

/// What the engine knows about a host right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub usable: bool,
    pub memory_available_bytes: u64,
}

/// Picks a host for a VM of `memory_kib` leaving `from_host`: same zone only; same cluster
/// preferred; most free memory first; never `from_host`. `None` if no host qualifies.
pub fn relocation_target(
    hosts: &BTreeMap<String, HostRecord>,
    views: &BTreeMap<String, HostView>,
    from_host: &str,
    memory_kib: u64,
) -> Option<String> {
    let from = hosts.get(from_host)?;
    let need = memory_kib.saturating_mul(1024);
    let mut best: Option<(bool, u64, &str)> = None;
    for (name, h) in hosts {
        if name == from_host || h.zone != from.zone {
            continue;
        }
        let Some(v) = views.get(name) else { continue };
        if !v.usable || v.memory_available_bytes < need {
            continue;
        }
        let key = (
            h.cluster == from.cluster,
            v.memory_available_bytes,
            name.as_str(),
        );
        if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
            best = Some(key);
        }
    }
    best.map(|b| b.2.to_string())
}

/// What to do when no live host carries the `ha_tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TagFallback {
    /// Use any other suitable host (and say so loudly).
    #[default]
    Any,
    /// Keep the VM queued until a tagged host is alive (and say so loudly).
    Wait,
}

/// The host a VM of a failed host goes to, and a warning when the `ha_tag` could not be
/// honoured. Same zone only; hosts carrying `ha_tag` first; then same cluster; then most
/// free memory.
pub fn failover_target(
    hosts: &BTreeMap<String, HostRecord>,
    views: &BTreeMap<String, HostView>,
    from_host: &str,
    memory_kib: u64,
    ha_tag: Option<&str>,
    fallback: TagFallback,
) -> (Option<String>, Option<String>) {
    let Some(from) = hosts.get(from_host) else {
        return (None, None);
    };
    let need = memory_kib.saturating_mul(1024);
    let candidates: Vec<(&String, &HostRecord, u64)> = hosts
        .iter()
        .filter(|(n, h)| n.as_str() != from_host && h.zone == from.zone)
        .filter_map(|(n, h)| {
            let v = views.get(n)?;
            (v.usable && v.memory_available_bytes >= need).then_some((
                n,
                h,
                v.memory_available_bytes,
            ))
        })
        .collect();
    let best = |c: &[&(&String, &HostRecord, u64)]| {
        c.iter()
            .max_by_key(|(n, h, mem)| {
                (
                    h.cluster == from.cluster,
                    *mem,
                    std::cmp::Reverse((*n).clone()),
                )
            })
            .map(|(n, _, _)| (*n).clone())
    };
    let all: Vec<&(&String, &HostRecord, u64)> = candidates.iter().collect();
    let Some(tag) = ha_tag else {
        return (best(&all), None);
    };
    let tagged: Vec<&(&String, &HostRecord, u64)> = candidates
        .iter()
        .filter(|(_, h, _)| h.tags.contains(tag))
        .collect();
    if let Some(t) = best(&tagged) {
        return (Some(t), None);
    }
    let warning = format!(
        "no live host in zone {} carrying ha_tag {tag:?} can take it",
        from.zone
    );
    match fallback {
        TagFallback::Any => (
            best(&all),
            Some(format!("{warning}; falling back to any host")),
        ),
        TagFallback::Wait => (None, Some(format!("{warning}; queued until one is"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn host(name: &str, zone: &str, cluster: &str) -> (String, HostRecord) {
        (
            name.into(),
            HostRecord {
                name: name.into(),
                zone: zone.into(),
                cluster: cluster.into(),
                tags: BTreeSet::new(),
                registered_at_ms: 0,
                agent_version: String::new(),
                phase: Default::default(),
            },
        )
    }

    fn view(usable: bool, gib: u64) -> HostView {
        HostView {
            usable,
            memory_available_bytes: gib << 30,
        }
    }

    #[test]
    fn ha_tag_hosts_first_then_the_fallback() {
        let mut hosts: BTreeMap<_, _> = [
            host("a1", "z1", "c1"),
            host("a2", "z1", "c1"),
            host("a3", "z1", "c2"),
        ]
        .into_iter()
        .collect();
        if let Some(h) = hosts.get_mut("a3") {
            h.tags.insert("ha".into());
        }
        let mut views: BTreeMap<String, HostView> = [
            ("a1".to_string(), view(true, 8)),
            ("a2".to_string(), view(true, 64)),
            ("a3".to_string(), view(true, 2)),
        ]
        .into_iter()
        .collect();
        // The tagged host wins even from another cluster and with less memory.
        let (t, w) = failover_target(&hosts, &views, "a1", 1 << 20, Some("ha"), TagFallback::Any);
        assert_eq!((t.as_deref(), w), (Some("a3"), None));
        views.insert("a3".into(), view(false, 2));
        let (t, w) = failover_target(&hosts, &views, "a1", 1 << 20, Some("ha"), TagFallback::Any);
        assert_eq!(t.as_deref(), Some("a2"));
        assert!(w.is_some_and(|w| w.contains("ha_tag")));
        let (t, w) = failover_target(&hosts, &views, "a1", 1 << 20, Some("ha"), TagFallback::Wait);
        assert_eq!(t, None);
        assert!(w.is_some_and(|w| w.contains("queued")));
    }

    #[test]
    fn never_crosses_zones_prefers_cluster_and_needs_room() {
        let hosts: BTreeMap<_, _> = [
            host("a1", "z1", "c1"),
            host("a2", "z1", "c1"),
            host("a3", "z1", "c2"),
            host("b1", "z2", "c1"),
        ]
        .into_iter()
        .collect();
        let mut views: BTreeMap<String, HostView> = [
            ("a1".to_string(), view(true, 8)),
            ("a2".to_string(), view(true, 2)),
            ("a3".to_string(), view(true, 64)),
            ("b1".to_string(), view(true, 128)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            relocation_target(&hosts, &views, "a1", 1 << 20).as_deref(),
            Some("a2")
        );
        // a2 lacks room for 4 GiB: the other cluster of the same zone, never zone z2.
        assert_eq!(
            relocation_target(&hosts, &views, "a1", 4 << 20).as_deref(),
            Some("a3")
        );
        views.insert("a3".into(), view(false, 64));
        assert_eq!(relocation_target(&hosts, &views, "a1", 4 << 20), None);
    }
}
