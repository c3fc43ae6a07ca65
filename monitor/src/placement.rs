//! Where a VM may run: same zone always, live hosts with room (memory and vCPUs), never a host
//! in maintenance; `ha_tag` hosts first for VMs of a failed host; then hosts without another
//! VM of the same anti-affinity group; then the same cluster; then the most free memory.
//!
//! Pure: it reads the replicated hosts and a view of each host's liveness and capacity that
//! the engine supplies (free memory and vCPUs already net of the starts it ordered and that
//! have not shown up in the host's facts yet, see `Engine::host_views`).
//!
//! Anti-affinity is a preference, not a refusal: when every host with room already runs a
//! member of the group, the VM still starts (an HA VM down is worse than two members sharing
//! a host), and the engine says so in the event log.

use std::collections::{BTreeMap, BTreeSet};

use vigil_common::config::TagFallback;

use crate::state::HostRecord;

/// What the engine knows about a host right now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostView {
    /// Connected, up, healthy hypervisor, its storage up, not in maintenance, not fenced.
    pub usable: bool,
    /// Why not, when not usable (for the event log and `vigilctl plan`).
    pub unusable_why: Option<String>,
    pub memory_available_bytes: u64,
    /// vCPUs it can still take (its CPUs times the overcommit ratio, minus what runs there).
    pub vcpus_available: u64,
    /// Anti-affinity groups of the VMs running or starting there.
    pub groups: BTreeSet<String>,
}

/// What a VM needs from a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Need<'a> {
    pub memory_kib: u64,
    pub vcpus: u32,
    pub group: Option<&'a str>,
}

impl HostView {
    fn fits(&self, need: &Need) -> bool {
        self.usable
            && self.memory_available_bytes >= need.memory_kib.saturating_mul(1024)
            && self.vcpus_available >= u64::from(need.vcpus)
    }

    fn conflicts(&self, need: &Need) -> bool {
        need.group.is_some_and(|g| self.groups.contains(g))
    }

    /// Takes what `need` uses (several VMs placed in one pass must not all land on the host
    /// that had room for one).
    pub fn reserve(&mut self, need: &Need) {
        self.memory_available_bytes = self
            .memory_available_bytes
            .saturating_sub(need.memory_kib.saturating_mul(1024));
        self.vcpus_available = self.vcpus_available.saturating_sub(u64::from(need.vcpus));
        if let Some(g) = need.group {
            self.groups.insert(g.to_string());
        }
    }
}

/// Candidates in the zone of `from_host` (never `from_host`) that fit `need`.
fn candidates<'h>(
    hosts: &'h BTreeMap<String, HostRecord>,
    views: &'h BTreeMap<String, HostView>,
    from: &HostRecord,
    from_host: &str,
    need: &Need,
) -> Vec<(&'h String, &'h HostRecord, &'h HostView)> {
    hosts
        .iter()
        .filter(|(n, h)| n.as_str() != from_host && h.zone == from.zone && !h.maintenance)
        .filter_map(|(n, h)| {
            let v = views.get(n)?;
            v.fits(need).then_some((n, h, v))
        })
        .collect()
}

/// vCPUs a view offers when they are not checked (`vcpu_overcommit = 0`): not worth printing.
const VCPUS_UNCHECKED: u64 = 1 << 40;

/// A host placement chose, and why: what an operator reads in the event that sends a VM
/// there ("why did this VM restart *here*?").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub host: String,
    /// The reasons, in the order they decided: ha_tag, anti-affinity, cluster, room left.
    pub why: String,
}

/// The best of `c`: no anti-affinity conflict, then same cluster, then most free memory,
/// then the name (deterministic). `tag`: the ha_tag every candidate carries, if any.
fn best(
    c: &[&(&String, &HostRecord, &HostView)],
    from: &HostRecord,
    need: &Need,
    tag: Option<&str>,
) -> Option<Choice> {
    let (n, h, v) = c.iter().max_by_key(|(n, h, v)| {
        (
            !v.conflicts(need),
            h.cluster == from.cluster,
            v.memory_available_bytes,
            std::cmp::Reverse((*n).clone()),
        )
    })?;
    let mut why = Vec::new();
    if let Some(tag) = tag {
        why.push(format!("carries ha_tag {tag:?}"));
    }
    if let Some(g) = need.group {
        why.push(if v.conflicts(need) {
            format!("every candidate already runs a member of anti-affinity group {g}")
        } else {
            format!("no other member of anti-affinity group {g}")
        });
    }
    why.push(if h.cluster == from.cluster {
        format!("same cluster {}", h.cluster)
    } else {
        format!("in cluster {}, not {}", h.cluster, from.cluster)
    });
    let mut after = (*v).clone();
    after.reserve(need);
    why.push(if after.vcpus_available >= VCPUS_UNCHECKED {
        format!("{} MiB free after it", after.memory_available_bytes >> 20)
    } else {
        format!(
            "{} MiB and {} vCPUs free after it",
            after.memory_available_bytes >> 20,
            after.vcpus_available
        )
    });
    why.push(format!(
        "best of {} candidate(s) in zone {}",
        c.len(),
        from.zone
    ));
    Some(Choice {
        host: (*n).clone(),
        why: why.join(", "),
    })
}

/// Why no host in the zone of `from_host` can take `need`: each other host of the zone with
/// what rules it out (the text a queued VM's event carries).
/// `tag`: the ha_tag a host must carry (a failover that waits for a tagged host).
pub fn no_room(
    hosts: &BTreeMap<String, HostRecord>,
    views: &BTreeMap<String, HostView>,
    from_host: &str,
    need: &Need,
    tag: Option<&str>,
) -> String {
    let Some(from) = hosts.get(from_host) else {
        return format!("its host {from_host} is not registered");
    };
    let reasons: Vec<String> = hosts
        .iter()
        .filter(|(n, h)| n.as_str() != from_host && h.zone == from.zone)
        .map(|(n, h)| {
            let v = views.get(n).cloned().unwrap_or_default();
            let why = if h.maintenance {
                "is in maintenance".to_string()
            } else if !v.usable {
                v.unusable_why
                    .clone()
                    .unwrap_or_else(|| "is not usable".to_string())
            } else if v.memory_available_bytes < need.memory_kib.saturating_mul(1024) {
                format!(
                    "has {} MiB free, needs {} MiB",
                    v.memory_available_bytes >> 20,
                    need.memory_kib >> 10
                )
            } else if v.vcpus_available < u64::from(need.vcpus) {
                format!("has {} vCPUs free, needs {}", v.vcpus_available, need.vcpus)
            } else if let Some(tag) = tag.filter(|t| !h.tags.contains(*t)) {
                format!("does not carry ha_tag {tag:?}")
            } else {
                "fits".to_string()
            };
            format!("{n} {why}")
        })
        .collect();
    if reasons.is_empty() {
        format!("no other host in zone {}", from.zone)
    } else {
        format!("in zone {}: {}", from.zone, reasons.join("; "))
    }
}

/// Picks a host for a VM leaving `from_host` (see the module docs). `None` if no host
/// qualifies.
pub fn relocation_target(
    hosts: &BTreeMap<String, HostRecord>,
    views: &BTreeMap<String, HostView>,
    from_host: &str,
    need: &Need,
) -> Option<Choice> {
    let from = hosts.get(from_host)?;
    let c = candidates(hosts, views, from, from_host, need);
    best(&c.iter().collect::<Vec<_>>(), from, need, None)
}

/// Whether placing `need` on `host` puts two members of its anti-affinity group together.
pub fn shares_group(views: &BTreeMap<String, HostView>, host: &str, need: &Need) -> bool {
    views.get(host).is_some_and(|v| v.conflicts(need))
}

/// The host a VM of a failed host goes to, and a warning when the `ha_tag` could not be
/// honoured. Same zone only; hosts carrying `ha_tag` first; then as [`relocation_target`].
pub fn failover_target(
    hosts: &BTreeMap<String, HostRecord>,
    views: &BTreeMap<String, HostView>,
    from_host: &str,
    need: &Need,
    ha_tag: Option<&str>,
    fallback: TagFallback,
) -> (Option<Choice>, Option<String>) {
    let Some(from) = hosts.get(from_host) else {
        return (None, None);
    };
    let c = candidates(hosts, views, from, from_host, need);
    let all: Vec<_> = c.iter().collect();
    let Some(tag) = ha_tag else {
        return (best(&all, from, need, None), None);
    };
    let tagged: Vec<_> = c.iter().filter(|(_, h, _)| h.tags.contains(tag)).collect();
    if let Some(t) = best(&tagged, from, need, Some(tag)) {
        return (Some(t), None);
    }
    let warning = format!(
        "no live host in zone {} carrying ha_tag {tag:?} can take it",
        from.zone
    );
    match fallback {
        TagFallback::Any => (
            best(&all, from, need, None),
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
                maintenance: false,
                pools: vec![],
                addr: None,
            },
        )
    }

    fn view(usable: bool, gib: u64) -> HostView {
        HostView {
            usable,
            unusable_why: (!usable).then(|| "is down".to_string()),
            memory_available_bytes: gib << 30,
            vcpus_available: 64,
            groups: BTreeSet::new(),
        }
    }

    /// Hosts by name, from (name, zone, cluster).
    fn hosts(list: &[(&str, &str, &str)]) -> BTreeMap<String, HostRecord> {
        list.iter()
            .map(|(name, zone, cluster)| host(name, zone, cluster))
            .collect()
    }

    /// Host views by name, from (name, usable, GiB free).
    fn views(list: &[(&str, bool, u64)]) -> BTreeMap<String, HostView> {
        list.iter()
            .map(|(name, usable, gib)| (name.to_string(), view(*usable, *gib)))
            .collect()
    }

    /// The host [`relocation_target`] picks, by name.
    fn relocation_host(
        hosts: &BTreeMap<String, HostRecord>,
        views: &BTreeMap<String, HostView>,
        need: &Need,
    ) -> Option<String> {
        relocation_target(hosts, views, "a1", need).map(|c| c.host)
    }

    fn mem(kib: u64) -> Need<'static> {
        Need {
            memory_kib: kib,
            vcpus: 1,
            group: None,
        }
    }

    #[test]
    fn ha_tag_hosts_first_then_the_fallback() {
        let mut hosts = hosts(&[("a1", "z1", "c1"), ("a2", "z1", "c1"), ("a3", "z1", "c2")]);
        hosts.get_mut("a3").expect("a3").tags.insert("ha".into());
        let mut views = views(&[("a1", true, 8), ("a2", true, 64), ("a3", true, 2)]);
        let failover = |views: &BTreeMap<String, HostView>, fallback: TagFallback| {
            failover_target(&hosts, views, "a1", &mem(1 << 20), Some("ha"), fallback)
        };
        // The tagged host wins even from another cluster and with less memory.
        let (t, w) = failover(&views, TagFallback::Any);
        assert_eq!(w, None);
        let chosen = t.expect("a tagged host");
        assert_eq!(chosen.host, "a3");
        // The reasons name the tag first, then the cluster and the room left.
        assert!(
            chosen
                .why
                .starts_with("carries ha_tag \"ha\", in cluster c2, not c1"),
            "{}",
            chosen.why
        );
        assert!(
            chosen.why.contains("1024 MiB and 63 vCPUs free after it"),
            "{}",
            chosen.why
        );
        views.insert("a3".into(), view(false, 2));
        let (t, w) = failover(&views, TagFallback::Any);
        assert_eq!(t.map(|c| c.host).as_deref(), Some("a2"));
        assert!(w.is_some_and(|w| w.contains("ha_tag")));
        let (t, w) = failover(&views, TagFallback::Wait);
        assert_eq!(t, None);
        assert!(w.is_some_and(|w| w.contains("queued")));
    }

    #[test]
    fn never_crosses_zones_prefers_cluster_and_needs_room() {
        let hosts = hosts(&[
            ("a1", "z1", "c1"),
            ("a2", "z1", "c1"),
            ("a3", "z1", "c2"),
            ("b1", "z2", "c1"),
        ]);
        let mut views = views(&[
            ("a1", true, 8),
            ("a2", true, 2),
            ("a3", true, 64),
            ("b1", true, 128),
        ]);
        assert_eq!(
            relocation_host(&hosts, &views, &mem(1 << 20)).as_deref(),
            Some("a2")
        );
        // a2 lacks room for 4 GiB: the other cluster of the same zone, never zone z2.
        assert_eq!(
            relocation_host(&hosts, &views, &mem(4 << 20)).as_deref(),
            Some("a3")
        );
        views.insert("a3".into(), view(false, 64));
        assert_eq!(relocation_target(&hosts, &views, "a1", &mem(4 << 20)), None);
    }

    #[test]
    fn anti_affinity_maintenance_vcpus_and_reservations() {
        let mut hosts = hosts(&[("a1", "z1", "c1"), ("a2", "z1", "c1"), ("a3", "z1", "c1")]);
        let mut views = views(&[("a1", true, 8), ("a2", true, 64), ("a3", true, 32)]);
        let db = Need {
            memory_kib: 1 << 20,
            vcpus: 2,
            group: Some("db"),
        };
        // a2 has the most memory but already runs a member of "db": a3 wins.
        views.get_mut("a2").expect("a2").groups.insert("db".into());
        assert_eq!(relocation_host(&hosts, &views, &db).as_deref(), Some("a3"));
        // Every host with room shares the group: placed anyway (a preference).
        views.get_mut("a3").expect("a3").groups.insert("db".into());
        assert_eq!(relocation_host(&hosts, &views, &db).as_deref(), Some("a2"));
        assert!(shares_group(&views, "a2", &db));
        let why = relocation_target(&hosts, &views, "a1", &db)
            .expect("a2")
            .why;
        assert!(
            why.contains("every candidate already runs a member of anti-affinity group db"),
            "{why}"
        );
        // A host in maintenance takes nothing.
        hosts.get_mut("a2").expect("a2").maintenance = true;
        assert_eq!(relocation_host(&hosts, &views, &db).as_deref(), Some("a3"));
        // Too few vCPUs left: not a candidate.
        views.get_mut("a3").expect("a3").vcpus_available = 1;
        assert_eq!(relocation_target(&hosts, &views, "a1", &db), None);
        // Why nothing fits, host by host, for the queued VM's event.
        assert_eq!(
            no_room(&hosts, &views, "a1", &db, None),
            "in zone z1: a2 is in maintenance; a3 has 1 vCPUs free, needs 2"
        );
        // Reservations: two 20 GiB VMs from one pass do not both land on a3 (32 GiB).
        views.get_mut("a3").expect("a3").vcpus_available = 64;
        hosts.get_mut("a2").expect("a2").maintenance = false;
        // a2 24 GiB, a3 32 GiB free.
        views.get_mut("a2").expect("a2").memory_available_bytes = 24 << 30;
        let big = mem(20 << 20);
        let first = relocation_host(&hosts, &views, &big).expect("room");
        assert_eq!(first, "a3");
        views.get_mut(&first).expect("first").reserve(&big);
        let second = relocation_host(&hosts, &views, &big).expect("room");
        assert_eq!(second, "a2");
        views.get_mut(&second).expect("second").reserve(&big);
        assert_eq!(relocation_target(&hosts, &views, "a1", &big), None);
    }
}
