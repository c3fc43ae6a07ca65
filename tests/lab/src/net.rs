//! The lab network: a "switch" namespace with a bridge, one namespace per machine with a veth to
//! it, and partitions.
//!
//! Nothing is created in the root namespace: veth pairs are created inside the switch namespace
//! with their other end moved straight into the machine's namespace. IPv6 is disabled in every
//! lab namespace, so the only addresses in use are the lab's own from 198.18.0.0/15.
//!
//! Partitions (no nftables/iptables needed, both are absent here):
//! - `--from monitors`: permanent neighbour entries with an unused, locally administered MAC, in
//!   the host's namespace for every monitor address and in every monitor's namespace for the
//!   host's address. Frames still leave, but nobody accepts them: a *silent* drop in both
//!   directions, exactly what a broken path looks like (no local error, no ICMP). Received ARP
//!   cannot override a permanent entry. The host still reaches the other hosts.
//! - `--from all`: the host's port on the switch goes down (a pulled cable): the host's own
//!   interface loses carrier and nothing gets in or out.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::cmd::{ip, run};
use crate::layout::PREFIX_LEN;
use crate::state::{LabState, Node};

/// Nobody in the lab has this MAC (locally administered, unicast).
pub const BLACKHOLE_MAC: &str = "02:00:00:de:ad:01";
/// Name of the machine end of every veth.
pub const NODE_IF: &str = "eth0";
/// Name of the bridge in the switch namespace.
pub const BRIDGE: &str = "br0";

pub fn ns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

fn disable_ipv6(ns: &str) {
    // Best effort: a kernel without IPv6 has nothing to disable.
    let _ = run(
        &[
            "ip",
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do [ -e $f ] && echo 1 > $f; done; true",
        ],
        Duration::from_secs(10),
    );
}

pub fn create_switch(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", ns]).with_context(|| format!("creating namespace {ns}"))?;
    disable_ipv6(ns);
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// A machine's namespace, its veth to the switch, its address.
pub fn create_node(switch_ns: &str, node: &Node) -> anyhow::Result<()> {
    let ns = node.netns.as_str();
    ip(&["netns", "add", ns]).with_context(|| format!("creating namespace {ns}"))?;
    disable_ipv6(ns);
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        switch_ns,
        "link",
        "add",
        &node.switch_port,
        "type",
        "veth",
        "peer",
        "name",
        NODE_IF,
        "netns",
        ns,
    ])?;
    ip(&[
        "-n",
        switch_ns,
        "link",
        "set",
        &node.switch_port,
        "master",
        BRIDGE,
        "up",
    ])?;
    let cidr = format!("{}/{}", node.addr, PREFIX_LEN);
    ip(&["-n", ns, "addr", "add", &cidr, "dev", NODE_IF])?;
    ip(&["-n", ns, "link", "set", NODE_IF, "up"])?;
    Ok(())
}

/// `ip netns del`, when the namespace exists.
pub fn delete_ns(name: &str) -> anyhow::Result<()> {
    if ns_exists(name) {
        ip(&["netns", "del", name]).with_context(|| format!("deleting namespace {name}"))?;
    }
    Ok(())
}

fn blackhole(ns: &str, addr: &std::net::Ipv4Addr) -> anyhow::Result<()> {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        BLACKHOLE_MAC,
        "nud",
        "permanent",
        "dev",
        NODE_IF,
    ])?;
    Ok(())
}

fn unblackhole(ns: &str, addr: &std::net::Ipv4Addr) {
    if !ns_exists(ns) {
        return;
    }
    // Only our own entries: a permanent entry with the blackhole MAC.
    if neigh_blackholed(ns).contains(&addr.to_string()) {
        let _ = ip(&["-n", ns, "neigh", "del", &addr.to_string(), "dev", NODE_IF]);
    }
}

/// Addresses that namespace `ns` has blackholed.
fn neigh_blackholed(ns: &str) -> Vec<String> {
    let Ok(out) = ip(&["-j", "-n", ns, "neigh", "show", "nud", "permanent"]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e.get("lladdr").and_then(|m| m.as_str()) == Some(BLACKHOLE_MAC))
                .filter_map(|e| e.get("dst").and_then(|d| d.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The monitors other than `node` (all of them for a host).
fn other_monitors<'a>(st: &'a LabState, node: &'a Node) -> impl Iterator<Item = &'a Node> {
    st.monitors.iter().filter(move |m| m.name != node.name)
}

/// Cuts `node` off the (other) monitors, both directions, silently. For a host that
/// includes the VIP (whoever holds it: every monitor also drops the host's frames); for a
/// monitor it is a split of the monitor cluster, the hosts still reach it.
pub fn partition_from_monitors(st: &LabState, node: &Node) -> anyhow::Result<()> {
    for m in other_monitors(st, node) {
        blackhole(&node.netns, &m.addr)?;
        blackhole(&m.netns, &node.addr)?;
    }
    if let Some(vip) = st.vip.filter(|_| !is_monitor(st, node)) {
        blackhole(&node.netns, &vip)?;
    }
    Ok(())
}

fn is_monitor(st: &LabState, node: &Node) -> bool {
    st.monitors.iter().any(|m| m.name == node.name)
}

/// Cuts `host` off everything: its switch port goes down.
pub fn partition_from_all(st: &LabState, host: &Node) -> anyhow::Result<()> {
    ip(&[
        "-n",
        &st.switch_ns,
        "link",
        "set",
        &host.switch_port,
        "down",
    ])?;
    Ok(())
}

/// A machine's NIC loses or regains power with the machine: a powered-off host answers
/// nothing (no ARP, no TCP reset), which is what peers probing it must see.
pub fn set_nic(host: &Node, up: bool) -> anyhow::Result<()> {
    ip(&[
        "-n",
        &host.netns,
        "link",
        "set",
        NODE_IF,
        if up { "up" } else { "down" },
    ])?;
    Ok(())
}

/// Undoes every partition of `node` (a host or a monitor). Idempotent.
pub fn heal(st: &LabState, node: &Node) -> anyhow::Result<()> {
    if ns_exists(&st.switch_ns) {
        ip(&["-n", &st.switch_ns, "link", "set", &node.switch_port, "up"])?;
    }
    for m in other_monitors(st, node) {
        unblackhole(&node.netns, &m.addr);
        unblackhole(&m.netns, &node.addr);
    }
    if let Some(vip) = st.vip {
        unblackhole(&node.netns, &vip);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    None,
    FromMonitors,
    FromAll,
    /// Some monitors only (an incomplete partition or heal).
    Partial,
}

/// What the namespaces say about `node`'s partition state (a host or a monitor).
pub fn partition_state(st: &LabState, host: &Node) -> Partition {
    if !ns_exists(&st.switch_ns) {
        return Partition::None;
    }
    let port_up = ip(&["-j", "-n", &st.switch_ns, "link", "show", &host.switch_port])
        .ok()
        .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
        .and_then(|v| {
            v.get(0)?
                .get("flags")?
                .as_array()
                .map(|f| f.iter().any(|x| x.as_str() == Some("UP")))
        })
        .unwrap_or(true);
    if !port_up {
        return Partition::FromAll;
    }
    let holes = neigh_blackholed(&host.netns);
    let others = other_monitors(st, host).count();
    let n = other_monitors(st, host)
        .filter(|m| holes.contains(&m.addr.to_string()))
        .count();
    if n == 0 {
        Partition::None
    } else if n == others {
        Partition::FromMonitors
    } else {
        Partition::Partial
    }
}

/// Whether namespace `ns` has `addr` on its lab interface (the VIP check: what the kernel
/// says, not what a monitor claims).
pub fn has_addr(ns: &str, addr: &std::net::Ipv4Addr) -> bool {
    if !ns_exists(ns) {
        return false;
    }
    let Ok(out) = ip(&["-j", "-n", ns, "addr", "show", "dev", NODE_IF]) else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let want = addr.to_string();
    v.as_array().is_some_and(|ifs| {
        ifs.iter().any(|i| {
            i.get("addr_info")
                .and_then(|a| a.as_array())
                .is_some_and(|a| {
                    a.iter()
                        .any(|x| x.get("local").and_then(|l| l.as_str()) == Some(want.as_str()))
                })
        })
    })
}
