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
