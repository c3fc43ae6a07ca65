//! The floating VIP (`[vip]`): the address that follows the leading monitor (issue 12, item 4).
//!
//! [`spawn`] starts one task that follows a `watch::Receiver<bool>` ("this monitor leads"):
//! - on `true` it adds the address to the interface with netlink (already present is fine),
//!   then announces it with gratuitous ARP: an ARP request with sender = target = VIP to
//!   ff:ff:ff:ff:ff:ff, `garp_count` times, `garp_interval_ms` apart, the first one at once
//!   (stale ARP caches are the most reported VIP problem; Linux only updates neighbour entries
//!   it already has from a GARP, so one announcement is not enough), and the same burst again
//!   `garp_repeat_after_ms` after the add while it still leads (for a cache that missed the
//!   first: a switch restarting, or busy with the same failure);
//! - on `false`, on `stop` and when the signal's sender is gone it removes the address at once.
//!
//! Latest wins: the task applies one change at a time (a netlink request is never abandoned
//! half-way) and reads the signal again after each, so an add that races a step-down is
//! followed by the removal, and a burst of flips ends in the state of the last one. A failed
//! add or removal is retried every second while it is still wanted. At start the address is
//! removed if present (left by a monitor that was killed), unless the signal says "lead".
//!
//! Hooks: after each change the task queues `leader_hook` / `follower_hook` (run with
//! `/bin/sh -c`, environment `VIGIL_VIP_ROLE`, `VIGIL_VIP_ADDRESS`, `VIGIL_VIP_INTERFACE`) on
//! a separate task; the VIP never waits for them. A hook still running after
//! `hook_timeout_ms` is killed with its whole process group; failures are logged. Queued
//! hooks coalesce: only the latest role runs, and not again if it is the role that ran last.
//!
//! IPv6 addresses are added and removed like IPv4, but not announced (no unsolicited
//! neighbour advertisement is sent; the kernel's own DAD/ndisc behaviour applies).
//!
//! No `unsafe`: the gratuitous ARP goes through an `AF_PACKET` socket from `nix`, addressed
//! with the interface's own `sockaddr_ll` as `getifaddrs` returns it (the kernel takes the
//! protocol from the Ethernet header we write).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use vigil_common::config::VipConfig;

/// How long a failed add or removal waits before the next attempt.
const RETRY: Duration = Duration::from_secs(1);
/// Removal attempts at shutdown before the task gives up (and says so).
const STOP_ATTEMPTS: u32 = 3;
/// Errno values in netlink answers (negative in `ErrorMessage::raw_code`).
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const EADDRNOTAVAIL: i32 = 99;
const ENODEV: i32 = 19;

/// Why the VIP could not be checked, added, removed or announced.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("field `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("field `vip.interface`: no interface {name:?} on this host ({source})")]
    NoInterface { name: String, source: nix::Error },
    #[error("opening a netlink socket: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("adding {addr}/{prefix} to {interface}: {source}")]
    Add {
        addr: IpAddr,
        prefix: u8,
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("removing {addr}/{prefix} from {interface}: {source}")]
    Remove {
        addr: IpAddr,
        prefix: u8,
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("gratuitous ARP for {addr} on {interface}: {message}")]
    Garp {
        addr: Ipv4Addr,
        interface: String,
        message: String,
    },
}

/// What `vigilctl status` shows of the VIP: the configured address and whether the
/// answering monitor holds it.
#[derive(Debug, Clone)]
pub struct Status {
    pub address: String,
    pub interface: String,
    pub holding: watch::Receiver<bool>,
}

/// A checked `[vip]`: the parsed address and prefix, and the interface's index when checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: IpAddr,
    pub prefix: u8,
    pub interface: String,
    pub ifindex: u32,
}

/// Checks `[vip]` and that its interface exists in this network namespace (the monitor calls
/// this at start-up: a wrong field is an error that names it).
pub fn check(cfg: &VipConfig) -> Result<Target, VipError> {
    let conf = |(field, message)| VipError::Config { field, message };
    cfg.validate().map_err(conf)?;
    let addr = cfg.ip().map_err(conf)?;
    let prefix = cfg.prefix_len().map_err(conf)?;
    let ifindex = ifindex(&cfg.interface)?;
    Ok(Target {
        addr,
        prefix,
        interface: cfg.interface.clone(),
        ifindex,
    })
}

fn ifindex(name: &str) -> Result<u32, VipError> {
    nix::net::if_::if_nametoindex(name).map_err(|source| VipError::NoInterface {
        name: name.to_string(),
        source,
    })
}

/// Starts the task that makes the VIP follow `leading` (see the module docs). The task ends
/// after `stop` turns true (or its sender is dropped) and the address has been removed.
pub fn spawn(
    cfg: VipConfig,
    leading: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    spawn_with_holding(cfg, leading, stop).0
}

/// [`spawn`], plus a receiver that is `true` while this monitor holds the VIP (the address
/// was added and not yet removed), for status reports.
pub fn spawn_with_holding(
    cfg: VipConfig,
    leading: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> (JoinHandle<()>, watch::Receiver<bool>) {
    let (holding_tx, holding_rx) = watch::channel(false);
    let task = tokio::spawn(run(cfg, leading, stop, holding_tx));
    (task, holding_rx)
}

async fn run(
    cfg: VipConfig,
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    holding: watch::Sender<bool>,
) {
    let (addr, prefix) = match (cfg.ip(), cfg.prefix_len()) {
        (Ok(a), Ok(p)) => (a, p),
        (Err((field, message)), _) | (_, Err((field, message))) => {
            error!("VIP disabled: {}", VipError::Config { field, message });
            return;
        }
    };
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            error!("VIP disabled: {}", VipError::Netlink(e));
            return;
        }
    };
    let conn = tokio::spawn(conn);
    let (hooks_tx, hooks_rx) = mpsc::unbounded_channel::<Role>();
    let hooks = tokio::spawn(run_hooks(cfg.clone(), hooks_rx));
    let interval = Duration::from_millis(cfg.garp_interval_ms);

    // What the interface is known to carry (`None`: not known yet, at start).
    let mut present: Option<bool> = None;
    let mut leading_gone = false;
    let mut stopping = false;
    let mut retry_at: Option<Instant> = None;
    let mut stop_failures = 0u32;
    let mut garps_left = 0u32;
    let mut next_garp = Instant::now();
    // The second burst, once the first is out.
    let mut repeat_at: Option<Instant> = None;
    loop {
        stopping = stopping || *stop.borrow_and_update();
        let want = !stopping && !leading_gone && *leading.borrow_and_update();
        if present != Some(want) && retry_at.is_none_or(|t| t <= Instant::now()) {
            let result = if want {
                add(&handle, &cfg.interface, addr, prefix).await
            } else {
                remove(&handle, &cfg.interface, addr, prefix).await
            };
            match result {
                Ok(()) => {
                    let first = present.is_none();
                    present = Some(want);
                    retry_at = None;
                    holding.send_replace(want);
                    if want {
                        info!(%addr, prefix, interface = %cfg.interface, "VIP added: this monitor leads");
                        garps_left = if addr.is_ipv4() { cfg.garp_count } else { 0 };
                        next_garp = Instant::now();
                        repeat_at = (garps_left > 0 && cfg.garp_repeat_after_ms > 0)
                            .then(|| next_garp + Duration::from_millis(cfg.garp_repeat_after_ms));
                    } else {
                        garps_left = 0;
                        repeat_at = None;
                        if !first {
                            info!(%addr, interface = %cfg.interface, "VIP removed");
                        }
                    }
                    let _ = hooks_tx.send(if want { Role::Leader } else { Role::Follower });
                }
                Err(e) if stopping => {
                    stop_failures += 1;
                    error!("VIP at shutdown (attempt {stop_failures} of {STOP_ATTEMPTS}): {e}");
                    if stop_failures >= STOP_ATTEMPTS {
                        error!(%addr, interface = %cfg.interface, "giving up: the VIP may still be on the interface; remove it by hand (ip addr del {addr}/{prefix} dev {})", cfg.interface);
                        break;
                    }
                    retry_at = Some(Instant::now() + Duration::from_millis(200));
                }
                Err(e) => {
                    error!("VIP: {e}; retrying in {RETRY:?}");
                    retry_at = Some(Instant::now() + RETRY);
                }
            }
            // Latest wins: read the signal again before doing anything else.
            continue;
        }
        if stopping && present == Some(false) {
            break;
        }
        let settled = present == Some(want);
        tokio::select! {
            r = leading.changed(), if !leading_gone => {
                if r.is_err() {
                    warn!("the leadership signal is gone: dropping the VIP");
                    leading_gone = true;
                }
            }
            r = stop.changed(), if !stopping => {
                if r.is_err() {
                    stopping = true;
                }
            }
            _ = sleep_until_opt(retry_at), if !settled => {
                // `retry_at` passed: the top of the loop tries again.
            }
            _ = sleep_until_opt(repeat_at), if settled && want && garps_left == 0 && repeat_at.is_some() => {
                debug!(%addr, interface = %cfg.interface, "the second burst of gratuitous ARPs");
                repeat_at = None;
                garps_left = cfg.garp_count;
                next_garp = Instant::now();
            }
            _ = tokio::time::sleep_until(next_garp), if settled && want && garps_left > 0 => {
                garps_left -= 1;
                next_garp += interval;
                if let IpAddr::V4(v4) = addr {
                    match send_garp(&cfg.interface, v4) {
                        Ok(()) => debug!(%addr, interface = %cfg.interface, left = garps_left, "gratuitous ARP sent"),
                        Err(e) => warn!("{e}"),
                    }
                }
            }
        }
    }
    holding.send_replace(false);
    drop(hooks_tx);
    // The VIP is gone already; give a running follower hook its time, bounded.
    let grace = Duration::from_millis(cfg.hook_timeout_ms.saturating_mul(2) + 500);
    let hooks_abort = hooks.abort_handle();
    if tokio::time::timeout(grace, hooks).await.is_err() {
        warn!("VIP hooks still running at shutdown: abandoned");
        hooks_abort.abort();
    }
    conn.abort();
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Adds `addr/prefix` to `interface`; already present is success.
pub async fn add(
    handle: &rtnetlink::Handle,
    interface: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), VipError> {
    let index = ifindex(interface)?;
    match handle.address().add(index, addr, prefix).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(EEXIST) => Ok(()),
        Err(source) => Err(VipError::Add {
            addr,
            prefix,
            interface: interface.to_string(),
            source,
        }),
    }
}

/// Removes `addr/prefix` from `interface`; absent (or the interface gone) is success.
pub async fn remove(
    handle: &rtnetlink::Handle,
    interface: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), VipError> {
    use futures_util::TryStreamExt;
    let index = match ifindex(interface) {
        Ok(i) => i,
        // No interface, no address on it.
        Err(_) => return Ok(()),
    };
    let err = |source| VipError::Remove {
        addr,
        prefix,
        interface: interface.to_string(),
        source,
    };
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(addr)
        .set_prefix_length_filter(prefix)
        .execute();
    let mut messages = Vec::new();
    while let Some(m) = found.try_next().await.map_err(err)? {
        messages.push(m);
    }
    for m in messages {
        match handle.address().del(m).execute().await {
            Ok(()) => {}
            Err(e) if matches!(netlink_errno(&e), Some(EADDRNOTAVAIL | ENOENT | ENODEV)) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// Removes the configured VIP from its interface if present, outside a running monitor
/// (`vigil-monitor --drop-vip`, the unit's `ExecStopPost=`). Absent, or the interface gone,
/// is success. Returns the address and prefix it looked for.
pub async fn drop_configured(cfg: &VipConfig) -> Result<(IpAddr, u8), VipError> {
    let conf = |(field, message)| VipError::Config { field, message };
    cfg.validate().map_err(conf)?;
    let addr = cfg.ip().map_err(conf)?;
    let prefix = cfg.prefix_len().map_err(conf)?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(VipError::Netlink)?;
    let conn = tokio::spawn(conn);
    let result = remove(&handle, &cfg.interface, addr, prefix).await;
    conn.abort();
    result.map(|()| (addr, prefix))
}

/// The Ethernet frame of a gratuitous ARP for `ip` from `mac`: an ARP request to
/// ff:ff:ff:ff:ff:ff with sender and target protocol address both `ip`, target hardware
/// address zero, padded to the 60-byte Ethernet minimum.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // f[32..38]: target hardware address, zero.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// The interface's `AF_PACKET` address (index, MAC) as `getifaddrs` reports it.
pub fn link_addr(interface: &str) -> Result<LinkAddr, VipError> {
    let garp_err = |message: String| VipError::Garp {
        addr: Ipv4Addr::UNSPECIFIED,
        interface: interface.to_string(),
        message,
    };
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| garp_err(format!("getifaddrs: {e}")))?;
    for a in addrs {
        if a.interface_name != interface {
            continue;
        }
        if let Some(link) = a.address.as_ref().and_then(|s| s.as_link_addr()) {
            return Ok(*link);
        }
    }
    Err(garp_err("the interface has no link-layer address".into()))
}

/// A raw `AF_PACKET` socket (needs `CAP_NET_RAW`), bound to no protocol: it only sends.
fn packet_socket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Sends one gratuitous ARP for `ip` on `interface`.
pub fn send_garp(interface: &str, ip: Ipv4Addr) -> Result<(), VipError> {
    let err = |message: String| VipError::Garp {
        addr: ip,
        interface: interface.to_string(),
        message,
    };
    let link = link_addr(interface).map_err(|e| err(e.to_string()))?;
    let mac = link.addr().unwrap_or([0; 6]);
    let frame = garp_frame(mac, ip);
    let fd = packet_socket().map_err(|e| err(format!("AF_PACKET socket: {e}")))?;
    let sent = socket::sendto(fd.as_raw_fd(), &frame, &link, MsgFlags::empty())
        .map_err(|e| err(format!("send: {e}")))?;
    if sent != frame.len() {
        return Err(err(format!("sent {sent} of {} bytes", frame.len())));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
        }
    }
}

async fn run_hooks(cfg: VipConfig, mut roles: mpsc::UnboundedReceiver<Role>) {
    let mut last: Option<Role> = None;
    while let Some(mut role) = roles.recv().await {
        while let Ok(newer) = roles.try_recv() {
            role = newer;
        }
        if last == Some(role) {
            continue;
        }
        last = Some(role);
        let command = match role {
            Role::Leader => cfg.leader_hook.as_deref(),
            Role::Follower => cfg.follower_hook.as_deref(),
        };
        if let Some(command) = command {
            run_hook(&cfg, role, command).await;
        }
    }
}

/// Runs one hook under `hook_timeout_ms`; logs what happened, never fails.
async fn run_hook(cfg: &VipConfig, role: Role, command: &str) {
    use std::process::Stdio;
    let timeout = Duration::from_millis(cfg.hook_timeout_ms);
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("VIGIL_VIP_ROLE", role.name())
        .env("VIGIL_VIP_ADDRESS", &cfg.address)
        .env("VIGIL_VIP_INTERFACE", &cfg.interface)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            error!(role = role.name(), command, "VIP hook did not start: {e}");
            return;
        }
    };
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            info!(role = role.name(), command, "VIP hook done");
        }
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            error!(role = role.name(), command, status = %out.status, stderr = %stderr.trim(), "VIP hook failed");
        }
        Ok(Err(e)) => error!(role = role.name(), command, "VIP hook: {e}"),
        Err(_) => {
            // The child itself got SIGKILL when its future was dropped; its group too.
            if let Some(pgid) = pgid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            error!(role = role.name(), command, after = ?timeout, "VIP hook timed out: killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_is_an_arp_request_with_sender_equal_target() {
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        let ip = Ipv4Addr::new(198, 18, 0, 10);
        let f = garp_frame(mac, ip);
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &mac, "sender MAC");
        assert_eq!(&f[28..32], &ip.octets(), "sender IP");
        assert_eq!(&f[32..38], &[0; 6], "target MAC");
        assert_eq!(&f[38..42], &ip.octets(), "target IP");
        assert!(f[42..].iter().all(|b| *b == 0), "padding");
    }

    #[test]
    fn check_names_the_field() {
        let mut cfg = VipConfig::new("198.18.0.1/24", "lo");
        let e = check(&cfg).expect_err("bad address");
        assert!(e.to_string().contains("vip.address"), "{e}");
        cfg.address = "198.18.0.1".into();
        cfg.prefix = Some(40);
        let e = check(&cfg).expect_err("bad prefix");
        assert!(e.to_string().contains("vip.prefix"), "{e}");
        cfg.prefix = None;
        cfg.interface = "vigil-nonexist".into();
        let e = check(&cfg).expect_err("no such interface");
        assert!(e.to_string().contains("vip.interface"), "{e}");
        assert!(e.to_string().contains("vigil-nonexist"), "{e}");
        cfg.interface = "lo".into();
        let t = check(&cfg).expect("lo exists");
        assert_eq!((t.prefix, t.interface.as_str()), (32, "lo"));
    }
}
