//! Configuration files: `/etc/vigil/monitor.toml` and `/etc/vigil/agent.toml`.
//!
//! Every field has a default where a default is safe; the TLS paths default to the packaged
//! layout under `/etc/vigil/tls/`. Unknown fields are errors (a typo must not silently fall
//! back to a default), and every error names the file and the field.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::settings::ClusterSettings;
use crate::tls::TlsPaths;

/// Default location of the monitor's configuration.
pub const DEFAULT_MONITOR_CONFIG: &str = "/etc/vigil/monitor.toml";
/// Default location of the agent's configuration.
pub const DEFAULT_AGENT_CONFIG: &str = "/etc/vigil/agent.toml";
/// Default UDP port of the monitor (agents and vigilctl, told apart by ALPN).
pub const DEFAULT_MONITOR_PORT: u16 = 7440;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain lines, journald-friendly.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}; expected plain or json"
            )),
        }
    }
}

/// `log_level`: the most verbose level of Vigil's own log lines (the QUIC, Raft and TLS
/// libraries stay at `warn`). `RUST_LOG`, when set, overrides it. Changes apply on SIGHUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

fn default_tls(name: &str) -> TlsPaths {
    TlsPaths {
        ca: PathBuf::from("/etc/vigil/tls/ca.crt"),
        cert: PathBuf::from(format!("/etc/vigil/tls/{name}.crt")),
        key: PathBuf::from(format!("/etc/vigil/tls/{name}.key")),
        crl: None,
    }
}

/// Failure detector settings (monitor side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// How often agents send a heartbeat (told to them in the handshake).
    pub heartbeat_interval_ms: u64,
    /// A host with no heartbeat for this long becomes Suspect.
    pub suspect_after_ms: u64,
    /// A host with no heartbeat for this long becomes Down.
    pub down_after_ms: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            heartbeat_interval_ms: 500,
            suspect_after_ms: 1_250,
            down_after_ms: 2_500,
        }
    }
}

/// Restart budget, backoff and placement preferences of HA VMs (monitor side, `[recovery]`):
/// parsed from monitor.toml and used as is by the engine and `monitor::recovery`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Failures restarted on the same host within the window.
    pub max_restarts_in_place: u32,
    /// Further failures relocated to another host of the same cluster within the window.
    pub max_relocations: u32,
    /// The budget window.
    pub window_ms: u64,
    /// Delay before the second attempt; doubles for each further one. The first restart
    /// after a failure is immediate.
    pub backoff_initial_ms: u64,
    /// The doubling backoff never exceeds this.
    pub backoff_max_ms: u64,
    /// VMs recovering from a host failure go to hosts carrying this tag first.
    pub ha_tag: Option<String>,
    /// When no live host carries `ha_tag`: "any" (use another host, loudly) or "wait"
    /// (queue the VM, loudly).
    pub ha_tag_fallback: TagFallback,
    /// Placement puts at most a host's CPUs times this many vCPUs on it (0: not checked).
    pub vcpu_overcommit: u32,
    /// Raise an event when a cluster can no longer absorb this many host failures with all
    /// its HA VMs placed (N+k, see `vigilctl plan`); 0: no event (`vigilctl status` shows N+k
    /// either way).
    pub min_failures_tolerated: u32,
}

/// `recovery.ha_tag_fallback`: what placement does when no live host carries the `ha_tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagFallback {
    /// Use any other suitable host (and say so loudly).
    #[default]
    Any,
    /// Keep the VM queued until a tagged host is alive (and say so loudly).
    Wait,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            max_restarts_in_place: 3,
            max_relocations: 2,
            window_ms: 10 * 60 * 1000,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
            ha_tag: None,
            ha_tag_fallback: TagFallback::Any,
            vcpu_overcommit: 4,
            min_failures_tolerated: 0,
        }
    }
}

impl RecoveryConfig {
    /// Backoff before attempt number `n` (1-based) within the window.
    pub fn backoff_ms(&self, n: u32) -> u64 {
        if n <= 1 {
            return 0;
        }
        let shift = (n - 2).min(32);
        self.backoff_initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.backoff_max_ms)
    }

    pub fn budget(&self) -> u32 {
        self.max_restarts_in_place + self.max_relocations
    }
}

/// Shared primary storage pools (`[storage]`, in both `agent.toml` and `monitor.toml`).
///
/// ```toml
/// [storage]
/// interval_ms = 500
/// deadline_ms = 2000
/// [[storage.pools]]
/// name = "primary"
/// path = "/mnt/primary"
/// ```
///
/// Agents write their storage heartbeat on every pool and read their fence slot and the
/// leader record there; the leader writes the leader record and fence requests. A pool whose
/// write or read fails, or takes longer than `deadline_ms`, is down on that host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The shared pools, one `[[storage.pools]]` table each.
    pub pools: Vec<PoolConfig>,
    /// One heartbeat write + slot read per pool this often.
    pub interval_ms: u64,
    /// A pool I/O cycle slower than this marks the pool down (the storage thread may hang;
    /// nothing else waits for it).
    pub deadline_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            pools: Vec::new(),
            interval_ms: 500,
            deadline_ms: 2_000,
        }
    }
}

/// One primary storage pool (`[[storage.pools]]`). The same `name` must mean the same
/// storage on every host and monitor; `path` is where this machine mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool's name: the same on every host and monitor for the same storage.
    pub name: String,
    /// Where this machine mounts the pool (absolute); Vigil uses `.vigil/` at its root.
    pub path: PathBuf,
}

impl StorageConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(50..=60_000).contains(&self.interval_ms) {
            return Err((
                "storage.interval_ms",
                format!("{} is out of range 50..=60000", self.interval_ms),
            ));
        }
        if self.deadline_ms <= self.interval_ms || self.deadline_ms > 600_000 {
            return Err((
                "storage.deadline_ms",
                format!(
                    "{} must be greater than storage.interval_ms ({}) and at most 600000",
                    self.deadline_ms, self.interval_ms
                ),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.pools {
            crate::names::validate("pool", &p.name).map_err(|m| ("storage.pools.name", m))?;
            if !seen.insert(p.name.as_str()) {
                return Err((
                    "storage.pools.name",
                    format!("pool {:?} is listed twice", p.name),
                ));
            }
            if !p.path.is_absolute() {
                return Err((
                    "storage.pools.path",
                    format!(
                        "pool {:?}: {} is not an absolute path",
                        p.name,
                        p.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What an agent does when its lease runs out while the monitors are alive without it
/// (`[lease] isolation_response`), as vSphere HA's isolation response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationResponse {
    /// Destroy the host's HA domains (then lease expiry is proof for the monitors).
    #[default]
    SelfFence,
    /// Keep them running and wait to be power-fenced (lease expiry is then no proof).
    KeepRunning,
}

/// Agent leases (`[lease]` in `monitor.toml`; agents learn it from the monitor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long a renewal keeps an agent's lease valid, counted by the agent from when it
    /// *sent* the heartbeat that was granted.
    pub duration_ms: u64,
    /// The monitor waits `duration_ms + drift_margin_ms` after the last grant before it takes
    /// lease expiry as proof (covers clock-rate drift and the agent's self-fence time).
    pub drift_margin_ms: u64,
    /// What an agent does when its lease runs out while the monitors are alive without it:
    /// `self-fence` (destroy its HA domains) or `keep-running` (wait to be power-fenced).
    pub isolation_response: IsolationResponse,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            duration_ms: 5_000,
            drift_margin_ms: 1_000,
            isolation_response: IsolationResponse::SelfFence,
        }
    }
}

/// `monitor.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// This monitor's Raft node id (unique in the monitor cluster, never reused).
    pub node_id: u64,
    /// Where the Raft log and state machine live.
    pub data_dir: PathBuf,
    /// UDP address for agents and vigilctl (QUIC; ALPN tells them apart).
    pub listen: SocketAddr,
    /// The address other parties use to reach this monitor (defaults to `listen`).
    pub advertise: Option<SocketAddr>,
    /// This monitor's TLS material (`[tls]`), re-read on SIGHUP.
    pub tls: TlsPaths,
    /// Failure detector timings (`[detector]`).
    pub detector: DetectorConfig,
    /// Restart budget, backoff and placement of HA VMs (`[recovery]`).
    pub recovery: RecoveryConfig,
    /// Log line format: `plain` (journald-friendly lines) or `json` (one object per line).
    pub log_format: LogFormat,
    /// Most verbose level logged (`RUST_LOG` overrides it); applied on SIGHUP.
    pub log_level: LogLevel,
    /// Power fencing of hypervisor hosts through ClusterLabs fence agents (`[fencing]`).
    pub fencing: FencingConfig,
    /// Agent leases and the isolation response (`[lease]`).
    pub lease: LeaseConfig,
    /// Shared primary storage pools as mounted on this monitor (`[storage]`).
    pub storage: StorageConfig,
    /// Raft between monitors (`[raft]`); without `listen`, a one-node cluster.
    pub raft: RaftConfig,
    /// The floating VIP that follows the Raft leader (`[vip]`); without it, none.
    pub vip: Option<VipConfig>,
}

/// Raft between monitors (`[raft]`). Without `listen` the monitor is a one-node cluster and
/// talks to no other monitor (the default). With it, it serves Raft to the other monitors on
/// its own UDP address (ALPN `vigil-raft/1`, mutual TLS): Raft node `node_id` must then hold
/// a monitor certificate named `mon<node_id>`.
///
/// ```toml
/// node_id = 1
/// [raft]
/// listen = "10.0.0.1:7441"       # UDP, for the other monitors only
/// # advertise = "10.0.0.1:7441"  # what the others dial (defaults to listen)
/// # Only read by `vigil-monitor --init`: start the cluster with these voters at once
/// # (otherwise it starts with this monitor alone; add others with `vigilctl server add`).
/// [[raft.peers]]
/// id = 2
/// addr = "10.0.0.2:7441"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// UDP address of the Raft endpoint; `None`: one-node cluster, no Raft network.
    pub listen: Option<SocketAddr>,
    /// The Raft address the other monitors dial (defaults to `listen`; with port 0 there,
    /// the port actually bound).
    pub advertise: Option<SocketAddr>,
    /// The other monitors a new cluster starts with (`--init` only).
    pub peers: Vec<RaftPeer>,
}

/// One other monitor in `[[raft.peers]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftPeer {
    /// Its Raft node id (its certificate is `mon<id>`).
    pub id: u64,
    /// Its Raft address, `host:port` (its `[raft] advertise`).
    pub addr: String,
}

impl RaftConfig {
    fn validate(&self, node_id: u64) -> Result<(), (&'static str, String)> {
        if self.listen.is_none() {
            if self.advertise.is_some() {
                return Err((
                    "raft.advertise",
                    "is set without raft.listen (a one-node monitor has no Raft address)".into(),
                ));
            }
            if !self.peers.is_empty() {
                return Err((
                    "raft.peers",
                    "lists other monitors but raft.listen is not set: set raft.listen to talk Raft with them".into(),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if peer.id == 0 {
                return Err(("raft.peers", "a peer id must be at least 1".into()));
            }
            if peer.id == node_id {
                return Err((
                    "raft.peers",
                    format!(
                        "lists node {} (this monitor's node_id); list only the other monitors",
                        peer.id
                    ),
                ));
            }
            if !seen.insert(peer.id) {
                return Err(("raft.peers", format!("node {} is listed twice", peer.id)));
            }
            check_host_port(&peer.addr).map_err(|why| {
                (
                    "raft.peers",
                    format!("node {}: address {:?} {why}", peer.id, peer.addr),
                )
            })?;
        }
        Ok(())
    }
}

/// The floating service address (`[vip]`): the monitor that leads adds it to `interface`
/// with netlink, announces it with gratuitous ARP (`garp_count` times, `garp_interval_ms`
/// apart) and removes it the moment it stops leading and on shutdown. Optional hooks run
/// (with `hook_timeout_ms`) after each change; a failing or hanging hook never holds the VIP up.
///
/// ```toml
/// [vip]
/// address = "192.0.2.10"            # IPv4 (IPv6 is added, but not announced)
/// # prefix = 32                     # defaults to 32 (128 for IPv6)
/// interface = "br0"                 # must exist when the monitor starts
/// # garp_count = 5
/// # garp_interval_ms = 200
/// # garp_repeat_after_ms = 5000   # a second burst, for caches the first one missed (0: none)
/// # leader_hook = "/usr/local/bin/vip-became-leader"     # run with /bin/sh -c
/// # follower_hook = "/usr/local/bin/vip-became-follower"
/// # hook_timeout_ms = 5000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// The address, without a prefix (`192.0.2.10`); checked by [`VipConfig::ip`].
    pub address: String,
    /// Prefix length (defaults to 32 for IPv4, 128 for IPv6).
    #[serde(default)]
    pub prefix: Option<u8>,
    /// The interface that carries it (`br0`, `eth0`).
    pub interface: String,
    /// Gratuitous ARPs sent after each add (0: none).
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    /// Time between two gratuitous ARPs.
    #[serde(default = "default_garp_interval_ms")]
    pub garp_interval_ms: u64,
    /// A second burst of `garp_count` gratuitous ARPs this long after the add, if this
    /// monitor still holds the VIP (0: none). For the switch or router that missed the first
    /// one while the leader changed, or was itself restarting; keepalived's
    /// `garp_master_delay`, with its default.
    #[serde(default = "default_garp_repeat_after_ms")]
    pub garp_repeat_after_ms: u64,
    /// Shell command run (`/bin/sh -c`) after this monitor took the VIP.
    #[serde(default)]
    pub leader_hook: Option<String>,
    /// Shell command run after this monitor dropped the VIP (or started without it).
    #[serde(default)]
    pub follower_hook: Option<String>,
    /// A hook still running after this long is killed (its whole process group).
    #[serde(default = "default_hook_timeout_ms")]
    pub hook_timeout_ms: u64,
}

fn default_garp_count() -> u32 {
    5
}
fn default_garp_interval_ms() -> u64 {
    200
}
fn default_garp_repeat_after_ms() -> u64 {
    5_000
}
fn default_hook_timeout_ms() -> u64 {
    5_000
}

impl VipConfig {
    /// A `[vip]` with defaults for everything but the address and the interface.
    pub fn new(address: impl Into<String>, interface: impl Into<String>) -> VipConfig {
        VipConfig {
            address: address.into(),
            prefix: None,
            interface: interface.into(),
            garp_count: default_garp_count(),
            garp_interval_ms: default_garp_interval_ms(),
            garp_repeat_after_ms: default_garp_repeat_after_ms(),
            leader_hook: None,
            follower_hook: None,
            hook_timeout_ms: default_hook_timeout_ms(),
        }
    }

    /// The address, parsed; the error names `vip.address`.
    pub fn ip(&self) -> Result<IpAddr, (&'static str, String)> {
        let ip: IpAddr = self.address.trim().parse().map_err(|_| {
            (
                "vip.address",
                format!(
                    "{:?} is not an IP address (write it without a prefix: set vip.prefix for that)",
                    self.address
                ),
            )
        })?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err((
                "vip.address",
                format!("{ip} cannot be a service address (unspecified, loopback or multicast)"),
            ));
        }
        if let IpAddr::V4(v4) = ip {
            if v4.is_broadcast() {
                return Err(("vip.address", format!("{ip} is the broadcast address")));
            }
        }
        Ok(ip)
    }

    /// The prefix length (default 32 for IPv4, 128 for IPv6); the error names `vip.prefix`.
    pub fn prefix_len(&self) -> Result<u8, (&'static str, String)> {
        let max = if self.ip()?.is_ipv4() { 32 } else { 128 };
        match self.prefix {
            None => Ok(max),
            Some(p) if (1..=max).contains(&p) => Ok(p),
            Some(p) => Err(("vip.prefix", format!("{p} is out of range 1..={max}"))),
        }
    }

    /// Field checks (the interface's existence is checked by the monitor at start-up).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.ip()?;
        self.prefix_len()?;
        let name = &self.interface;
        if name.is_empty() {
            return Err((
                "vip.interface",
                "is empty: name the interface that carries the VIP".into(),
            ));
        }
        // IFNAMSIZ is 16 with the terminating NUL.
        if name.len() > 15 || name.contains(|c: char| c == '/' || c.is_whitespace() || c == '\0') {
            return Err((
                "vip.interface",
                format!(
                    "{name:?} is not an interface name (at most 15 characters, no '/' or spaces)"
                ),
            ));
        }
        if self.garp_count > 100 {
            return Err((
                "vip.garp_count",
                format!("{} is out of range 0..=100", self.garp_count),
            ));
        }
        if !(10..=10_000).contains(&self.garp_interval_ms) {
            return Err((
                "vip.garp_interval_ms",
                format!("{} is out of range 10..=10000", self.garp_interval_ms),
            ));
        }
        if self.garp_repeat_after_ms != 0 && !(100..=600_000).contains(&self.garp_repeat_after_ms) {
            return Err((
                "vip.garp_repeat_after_ms",
                format!(
                    "{} is out of range: 0 (no second burst) or 100..=600000",
                    self.garp_repeat_after_ms
                ),
            ));
        }
        if !(100..=600_000).contains(&self.hook_timeout_ms) {
            return Err((
                "vip.hook_timeout_ms",
                format!("{} is out of range 100..=600000", self.hook_timeout_ms),
            ));
        }
        for (field, hook) in [
            ("vip.leader_hook", &self.leader_hook),
            ("vip.follower_hook", &self.follower_hook),
        ] {
            if hook.as_deref().is_some_and(|h| h.trim().is_empty()) {
                return Err((field, "is empty: remove it or name a command".into()));
            }
        }
        Ok(())
    }
}

/// Checks that `addr` is `host:port` (a name or an address, then a port 1..=65535).
pub fn check_host_port(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("is not host:port".into());
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("has no host before the port".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("has no valid port ({port:?})")),
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            node_id: 1,
            data_dir: PathBuf::from("/var/lib/vigil/monitor"),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_MONITOR_PORT)),
            advertise: None,
            tls: default_tls("monitor"),
            detector: DetectorConfig::default(),
            recovery: RecoveryConfig::default(),
            log_format: LogFormat::Plain,
            log_level: LogLevel::Info,
            fencing: FencingConfig::default(),
            lease: LeaseConfig::default(),
            storage: StorageConfig::default(),
            raft: RaftConfig::default(),
            vip: None,
        }
    }
}

impl MonitorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: MonitorConfig = load_toml(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: MonitorConfig = parse_toml(text, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be at least 1".into()));
        }
        let settings = self.cluster_settings();
        settings
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        self.storage
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        self.raft
            .validate(self.node_id)
            .map_err(|(field, m)| invalid(field, m))?;
        if let Some(vip) = &self.vip {
            vip.validate().map_err(|(field, m)| invalid(field, m))?;
        }
        crate::settings::check_lease_against_storage(&settings, self.storage.interval_ms)
            .map_err(|(field, m)| invalid(field, m))?;
        Ok(())
    }

    /// The cluster-wide sections of this file ([`crate::settings`]): what the first leader
    /// seeds a new cluster with, and what a monitor compares with the cluster's at start-up.
    pub fn cluster_settings(&self) -> ClusterSettings {
        ClusterSettings {
            detector: self.detector.clone(),
            recovery: self.recovery.clone(),
            lease: self.lease.clone(),
            fencing: self.fencing.clone(),
        }
    }

    /// The address advertised to peers.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }
}

/// Power fencing (monitor side, `[fencing]`): how the monitor reaches each hypervisor host's
/// BMC through a ClusterLabs fence agent (`fence_ipmilan`, `fence_redfish`, ...). A fence agent
/// that exits 0 for `off` is proof 2 of "The one rule" (docs/architecture.md).
///
/// ```toml
/// [fencing]
/// timeout_ms = 20000          # per fence-agent call (a host's own timeout_ms wins)
/// mass_failure_percent = 30   # hold automatic fencing above this share of a cluster's hosts
/// mass_failure_window_ms = 60000  # ... counting hosts that went silent this close together
/// [[fencing.hosts]]
/// host = "hv1"
/// agent = "fence_ipmilan"     # program name (PATH, then /usr/sbin, /sbin) or absolute path
/// [fencing.hosts.options]     # key=value lines on the agent's stdin
/// ip = "198.18.2.1"
/// username = "admin"
/// password = "vigil"
/// lanplus = "1"
/// cipher = "3"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// Longest a fence-agent call may take before its process group is killed.
    pub timeout_ms: u64,
    /// Percent (1..=100) of a cluster's hosts above which automatic fencing is held (a mass
    /// failure is more likely the monitors' own network than dead hosts). An integer percent
    /// rather than a ratio so that the configuration stays `Eq`.
    pub mass_failure_percent: u32,
    /// Hosts count towards a mass failure only when they went silent within this many ms of
    /// each other and are not proven off yet: a host lost (and fenced) a minute ago plus one
    /// more now is two single failures, not "2 of 3 down at once".
    pub mass_failure_window_ms: u64,
    /// One entry per fenceable hypervisor host.
    pub hosts: Vec<FenceHostConfig>,
    /// Ask a host that is cut from the monitors but still alive on storage to fence itself
    /// through its slot on shared storage (sbd's poison pill). Needs `[storage]` pools.
    pub storage_slot: bool,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            timeout_ms: 20_000,
            mass_failure_percent: 30,
            mass_failure_window_ms: 60_000,
            hosts: Vec::new(),
            storage_slot: true,
        }
    }
}

/// Option keys whose values are secrets: never shown by `Debug` nor in fencing errors.
pub fn is_secret_fence_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("passw") || k.contains("secret") || k.contains("token")
}

/// How to fence one host (`[[fencing.hosts]]`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceHostConfig {
    /// The host's name, as its agent reports it.
    pub host: String,
    /// The fence agent: a program name (searched in PATH, then /usr/sbin and /sbin) or an
    /// absolute path.
    pub agent: String,
    /// Written to the agent's stdin as `key=value` lines, after `action=...`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Overrides `fencing.timeout_ms` for this host.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Run the agent inside this network namespace (`ip netns exec NETNS AGENT`): for the lab and
    /// tests, where BMCs live in namespaces. Leave unset in production.
    #[serde(default)]
    pub netns: Option<String>,
}

impl std::fmt::Debug for FenceHostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_fence_option(k) {
                    "****"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("FenceHostConfig")
            .field("host", &self.host)
            .field("agent", &self.agent)
            .field("options", &options)
            .field("timeout_ms", &self.timeout_ms)
            .field("netns", &self.netns)
            .finish()
    }
}

impl FencingConfig {
    /// The fencing configuration of `host`, if any.
    pub fn host(&self, host: &str) -> Option<&FenceHostConfig> {
        self.hosts.iter().find(|h| h.host == host)
    }

    /// Checks the section; the error names the field (`fencing.…`).
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=100).contains(&self.mass_failure_percent) {
            return Err((
                "fencing.mass_failure_percent",
                format!("{} is out of range 1..=100", self.mass_failure_percent),
            ));
        }
        if !(1..=3_600_000).contains(&self.mass_failure_window_ms) {
            return Err((
                "fencing.mass_failure_window_ms",
                format!(
                    "{} is out of range 1..=3600000",
                    self.mass_failure_window_ms
                ),
            ));
        }
        if !(100..=600_000).contains(&self.timeout_ms) {
            return Err((
                "fencing.timeout_ms",
                format!("{} is out of range 100..=600000", self.timeout_ms),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for h in &self.hosts {
            crate::names::validate("host", &h.host).map_err(|m| ("fencing.hosts.host", m))?;
            if !seen.insert(h.host.as_str()) {
                return Err((
                    "fencing.hosts.host",
                    format!("host {:?} is listed twice", h.host),
                ));
            }
            let agent = h.agent.trim();
            if agent.is_empty() || agent != h.agent || h.agent.chars().any(char::is_control) {
                return Err((
                    "fencing.hosts.agent",
                    format!(
                        "host {:?}: agent {:?} is not a program name or path",
                        h.host, h.agent
                    ),
                ));
            }
            if h.agent.contains('/') && !h.agent.starts_with('/') {
                return Err((
                    "fencing.hosts.agent",
                    format!(
                        "host {:?}: agent {:?} must be a bare program name or an absolute path",
                        h.host, h.agent
                    ),
                ));
            }
            if let Some(t) = h.timeout_ms {
                if !(100..=600_000).contains(&t) {
                    return Err((
                        "fencing.hosts.timeout_ms",
                        format!("host {:?}: {t} is out of range 100..=600000", h.host),
                    ));
                }
            }
            if let Some(ns) = &h.netns {
                if ns.is_empty()
                    || ns.len() > 64
                    || !ns
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return Err((
                        "fencing.hosts.netns",
                        format!(
                            "host {:?}: netns {ns:?} must match [A-Za-z0-9_.-]{{1,64}}",
                            h.host
                        ),
                    ));
                }
            }
            for (k, v) in &h.options {
                let bad_key = k.is_empty()
                    || k.contains('=')
                    || k.trim() != k
                    || k.starts_with('#')
                    || k.chars().any(char::is_control);
                if bad_key {
                    return Err((
                        "fencing.hosts.options",
                        format!("host {:?}: option key {k:?} must be non-empty, without '=', leading '#', spaces at either end or control characters", h.host),
                    ));
                }
                if k == "action" {
                    return Err((
                        "fencing.hosts.options",
                        format!(
                            "host {:?}: option `action` is set by the monitor on each call",
                            h.host
                        ),
                    ));
                }
                if v.contains(['\n', '\r', '\0']) {
                    // Never echo the value: it may be a password.
                    return Err((
                        "fencing.hosts.options",
                        format!(
                            "host {:?}: the value of option {k:?} contains a line break or NUL",
                            h.host
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This host's name. Must equal the common name of its certificate; defaults to it.
    pub host: Option<String>,
    /// Availability zone of this host.
    pub zone: String,
    /// Cluster of this host inside the zone.
    pub cluster: String,
    /// Every monitor's address (and the VIP, if any). The agent tries them in turn.
    pub monitors: Vec<SocketAddr>,
    /// This agent's TLS material (`[tls]`), re-read on SIGHUP (used from the next connection).
    pub tls: TlsPaths,
    /// Wait this long before reconnecting after a lost connection (doubles up to 8x).
    pub reconnect_ms: u64,
    /// Talk to the local libvirt (off: an agent that only heartbeats).
    pub libvirt_enabled: bool,
    /// The libvirt connection URI.
    pub libvirt_uri: String,
    /// Longest a libvirt call may take before the hypervisor counts as unhealthy. Above the
    /// slowest normal call (a domain start under QEMU TCG takes seconds).
    pub libvirt_deadline_ms: u64,
    /// Full inventory poll, the backstop for lifecycle events.
    pub poll_interval_ms: u64,
    /// Durable agent state: the activation generations it has seen, its lease (`lease.json`)
    /// and its lock.
    pub state_dir: PathBuf,
    /// Log line format: `plain` (journald-friendly lines) or `json` (one object per line).
    pub log_format: LogFormat,
    /// Most verbose level logged (`RUST_LOG` overrides it); applied on SIGHUP.
    pub log_level: LogLevel,
    /// Shared primary storage pools as mounted on this host (`[storage]`).
    pub storage: StorageConfig,
    /// Feed the systemd service watchdog (`WatchdogSec=` in the unit) from the agent's
    /// isolation guard loop, so that systemd kills and restarts a hung agent. That restarts the
    /// agent only; it never resets the host (the host watchdog that backs lease proofs is
    /// `[watchdog]`, opened by the agent itself). Only has an effect under systemd with
    /// `WATCHDOG_USEC` set.
    pub systemd_watchdog: bool,
    /// The host watchdog that backs lease expiry as a proof (`[watchdog]`).
    pub watchdog: WatchdogConfig,
}

/// `[watchdog]` in `agent.toml`: the host watchdog device (proof 3 of "The one rule",
/// docs/architecture.md).
///
/// The agent arms it before it starts or adopts any HA domain and feeds it while it runs and
/// would not fence itself now; when the agent dies, hangs or decides to self-fence, feeding
/// stops and the device resets the host within `timeout_secs`. Only a host whose agent reports
/// an armed watchdog can be proven off by lease expiry; without one its HA VMs wait for power
/// fencing or a storage-slot acknowledgement.
///
/// Off by default: opening a watchdog device arms it, and a softdog on a development machine
/// would reset it. The packaged agent.toml sets `device = "/dev/watchdog"` (hardware, or the
/// softdog its unit loads; systemd's `RuntimeWatchdogSec` must be off so the agent is the only
/// opener; docs/packaging.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// The device (Linux watchdog API: `WDIOC_SETTIMEOUT`, `WDIOC_KEEPALIVE`, magic close
    /// 'V'). Absent: no watchdog.
    pub device: Option<PathBuf>,
    /// Timeout to program (seconds); the agent reads back what the device accepted and
    /// reports that.
    pub timeout_secs: u32,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            device: None,
            timeout_secs: 10,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            host: None,
            zone: "default".into(),
            cluster: "default".into(),
            monitors: vec![SocketAddr::from(([127, 0, 0, 1], DEFAULT_MONITOR_PORT))],
            tls: default_tls("agent"),
            reconnect_ms: 200,
            libvirt_enabled: true,
            libvirt_uri: "qemu:///system".into(),
            libvirt_deadline_ms: 20_000,
            poll_interval_ms: 2_000,
            state_dir: PathBuf::from("/var/lib/vigil/agent"),
            log_format: LogFormat::Plain,
            log_level: LogLevel::Info,
            storage: StorageConfig::default(),
            systemd_watchdog: true,
            watchdog: WatchdogConfig::default(),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = load_toml(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = parse_toml(text, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        if self.monitors.is_empty() {
            return Err(invalid(
                "monitors",
                "list at least one monitor address".into(),
            ));
        }
        for (field, v) in [("zone", &self.zone), ("cluster", &self.cluster)] {
            if let Err(m) = crate::names::validate(field, v) {
                return Err(invalid(field, m));
            }
        }
        if let Some(h) = &self.host {
            if let Err(m) = crate::names::validate("host", h) {
                return Err(invalid("host", m));
            }
        }
        if !(100..=600_000).contains(&self.libvirt_deadline_ms) {
            return Err(invalid(
                "libvirt_deadline_ms",
                format!("{} is out of range 100..=600000", self.libvirt_deadline_ms),
            ));
        }
        if !(50..=60_000).contains(&self.poll_interval_ms) {
            return Err(invalid(
                "poll_interval_ms",
                format!("{} is out of range 50..=60000", self.poll_interval_ms),
            ));
        }
        if self.libvirt_enabled && self.libvirt_uri.trim().is_empty() {
            return Err(invalid(
                "libvirt_uri",
                "must not be empty while libvirt_enabled is true".into(),
            ));
        }
        if !(1..=600).contains(&self.watchdog.timeout_secs) {
            return Err(invalid(
                "watchdog.timeout_secs",
                format!("{} is out of range 1..=600", self.watchdog.timeout_secs),
            ));
        }
        if self
            .watchdog
            .device
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid(
                "watchdog.device",
                "must not be empty (leave it out for no watchdog)".into(),
            ));
        }
        if self.reconnect_ms == 0 || self.reconnect_ms > 60_000 {
            return Err(invalid(
                "reconnect_ms",
                format!("{} is out of range 1..=60000", self.reconnect_ms),
            ));
        }
        self.storage
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        Ok(())
    }
}

fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PathBuf {
        PathBuf::from("/etc/vigil/test.toml")
    }

    #[test]
    fn empty_files_give_the_defaults() {
        assert_eq!(
            MonitorConfig::from_toml_str("", &p()).expect("monitor"),
            MonitorConfig::default()
        );
        assert_eq!(
            AgentConfig::from_toml_str("", &p()).expect("agent"),
            AgentConfig::default()
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = MonitorConfig::from_toml_str("nodeid = 3\n", &p()).expect_err("typo");
        let text = err.to_string();
        assert!(text.contains("nodeid"), "{text}");
        assert!(text.contains("/etc/vigil/test.toml"), "{text}");
        let err = MonitorConfig::from_toml_str("[detector]\nsuspect_after = 3\n", &p())
            .expect_err("typo");
        assert!(err.to_string().contains("suspect_after"), "{err}");
    }

    #[test]
    fn wrong_types_are_named() {
        let err = AgentConfig::from_toml_str("monitors = [\"not an address\"]\n", &p())
            .expect_err("bad address");
        assert!(err.to_string().contains("monitors"), "{err}");
        let err = MonitorConfig::from_toml_str("node_id = \"one\"\n", &p()).expect_err("type");
        assert!(err.to_string().contains("node_id"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let err = MonitorConfig::from_toml_str(
            "[detector]\nsuspect_after_ms = 3000\ndown_after_ms = 2000\n",
            &p(),
        )
        .expect_err("order");
        assert!(err.to_string().contains("detector.down_after_ms"), "{err}");
        let err = AgentConfig::from_toml_str("zone = \"a b\"\n", &p()).expect_err("zone");
        assert!(err.to_string().contains("field `zone`"), "{err}");
        let err = AgentConfig::from_toml_str("monitors = []\n", &p()).expect_err("monitors");
        assert!(err.to_string().contains("field `monitors`"), "{err}");
        let err = MonitorConfig::from_toml_str("[recovery]\nmin_failures_tolerated = 9\n", &p())
            .expect_err("out of range");
        assert!(
            err.to_string().contains("recovery.min_failures_tolerated"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_recovery_value_is_named() {
        let cfg = MonitorConfig::from_toml_str(
            "[recovery]\nha_tag = \"ha\"\nha_tag_fallback = \"wait\"\n",
            &p(),
        )
        .expect("parse");
        assert_eq!(cfg.recovery.ha_tag_fallback, TagFallback::Wait);
        let err = MonitorConfig::from_toml_str("[recovery]\nha_tag_fallback = \"later\"\n", &p())
            .expect_err("bad variant");
        let shown = err.to_string();
        assert!(shown.contains("/etc/vigil/test.toml"), "{shown}");
        assert!(shown.contains("ha_tag_fallback"), "{shown}");
        assert!(
            shown.contains("unknown variant `later`, expected `any` or `wait`"),
            "{shown}"
        );
        let err = MonitorConfig::from_toml_str("[recovery]\nmax_relocations = -1\n", &p())
            .expect_err("negative");
        assert!(err.to_string().contains("max_relocations"), "{err}");
    }

    #[test]
    fn a_fencing_section_parses_and_hides_the_password() {
        let cfg = MonitorConfig::from_toml_str(
            r#"
[fencing]
timeout_ms = 20000
mass_failure_percent = 30
[[fencing.hosts]]
host = "hv1"
agent = "fence_ipmilan"
[fencing.hosts.options]
ip = "198.18.2.1"
ipport = "623"
username = "admin"
password = "s3cret-pw"
lanplus = "1"
cipher = "3"
power_wait = "0"
[[fencing.hosts]]
host = "hv2"
agent = "/usr/sbin/fence_redfish"
timeout_ms = 5000
netns = "lab-hv2"
"#,
            &p(),
        )
        .expect("parse");
        assert_eq!(cfg.fencing.hosts.len(), 2);
        let hv1 = cfg.fencing.host("hv1").expect("hv1");
        assert_eq!(hv1.options["ipport"], "623");
        assert_eq!(hv1.timeout_ms, None);
        assert_eq!(cfg.fencing.host("hv2").expect("hv2").timeout_ms, Some(5000));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("****"), "{shown}");
    }

    #[test]
    fn fencing_errors_name_the_field() {
        let cases = [
            ("[fencing]\nmass_failure_percent = 0\n", "fencing.mass_failure_percent"),
            ("[fencing]\nmass_failure_percent = 101\n", "fencing.mass_failure_percent"),
            (
                "[fencing]\nmass_failure_window_ms = 0\n",
                "fencing.mass_failure_window_ms",
            ),
            ("[fencing]\ntimeout_ms = 99\n", "fencing.timeout_ms"),
            ("[fencing]\ntimeout_ms = 600001\n", "fencing.timeout_ms"),
            (
                "[[fencing.hosts]]\nhost = \"a b\"\nagent = \"fence_ipmilan\"\n",
                "fencing.hosts.host",
            ),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\n[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\n",
                "fencing.hosts.host",
            ),
            ("[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"\"\n", "fencing.hosts.agent"),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"bin/fence\"\n",
                "fencing.hosts.agent",
            ),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\ntimeout_ms = 1\n",
                "fencing.hosts.timeout_ms",
            ),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\nnetns = \"a/b\"\n",
                "fencing.hosts.netns",
            ),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\n[fencing.hosts.options]\n\"a=b\" = \"1\"\n",
                "fencing.hosts.options",
            ),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\n[fencing.hosts.options]\naction = \"off\"\n",
                "fencing.hosts.options",
            ),
            (
                "[[fencing.hosts]]\nhost = \"hv1\"\nagent = \"x\"\n[fencing.hosts.options]\npassword = \"pw\\nip=1\"\n",
                "fencing.hosts.options",
            ),
        ];
        for (text, field) in cases {
            let err = MonitorConfig::from_toml_str(text, &p()).expect_err(text);
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("field `{field}`")),
                "{text}: {shown}"
            );
            assert!(!shown.contains("pw\nip"), "{shown}");
        }
        let err = MonitorConfig::from_toml_str("[fencing]\nratio = 0.3\n", &p()).expect_err("typo");
        assert!(err.to_string().contains("ratio"), "{err}");
    }

    #[test]
    fn a_full_agent_file_parses() {
        let cfg = AgentConfig::from_toml_str(
            r#"
host = "hv1"
zone = "z1"
cluster = "c1"
monitors = ["198.18.0.1:7440", "198.18.0.2:7440"]
reconnect_ms = 100
log_format = "json"
[tls]
ca = "/tmp/ca.crt"
cert = "/tmp/hv1.crt"
key = "/tmp/hv1.key"
"#,
            &p(),
        )
        .expect("parse");
        assert_eq!(cfg.monitors.len(), 2);
        assert_eq!(cfg.log_format, LogFormat::Json);
    }

    #[test]
    fn raft_section_defaults_to_one_node_and_parses_peers() {
        let cfg = MonitorConfig::from_toml_str("", &p()).expect("defaults");
        assert_eq!(cfg.raft, RaftConfig::default());
        assert!(cfg.raft.listen.is_none());
        let cfg = MonitorConfig::from_toml_str(
            "node_id = 1\n[raft]\nlisten = \"127.0.0.1:7441\"\n[[raft.peers]]\nid = 2\naddr = \"mon2.example:7441\"\n[[raft.peers]]\nid = 3\naddr = \"10.0.0.3:7441\"\n",
            &p(),
        )
        .expect("parse");
        assert_eq!(
            cfg.raft.listen,
            Some("127.0.0.1:7441".parse().expect("addr"))
        );
        assert_eq!(cfg.raft.peers.len(), 2);
        assert_eq!(cfg.raft.peers[0].addr, "mon2.example:7441");
    }

    #[test]
    fn raft_errors_name_the_field() {
        let cases = [
            ("[raft]\nlisten = \"not an address\"\n", "listen"),
            ("[raft]\nlisten = \"127.0.0.1\"\n", "listen"),
            ("[raft]\nlisten = \"127.0.0.1:1\"\nlistenn = 3\n", "listenn"),
            (
                "[raft]\nlisten = \"127.0.0.1:1\"\n[[raft.peers]]\nid = 2\naddr = \"a:1\"\n[[raft.peers]]\nid = 2\naddr = \"b:1\"\n",
                "raft.peers",
            ),
            (
                "[raft]\nlisten = \"127.0.0.1:1\"\n[[raft.peers]]\nid = 1\naddr = \"a:1\"\n",
                "raft.peers",
            ),
            (
                "[raft]\nlisten = \"127.0.0.1:1\"\n[[raft.peers]]\nid = 2\naddr = \"nohost\"\n",
                "raft.peers",
            ),
            (
                "[raft]\nlisten = \"127.0.0.1:1\"\n[[raft.peers]]\nid = 2\naddr = \"a:0\"\n",
                "raft.peers",
            ),
            ("[[raft.peers]]\nid = 2\naddr = \"a:1\"\n", "raft.peers"),
            ("[raft]\nadvertise = \"127.0.0.1:1\"\n", "raft.advertise"),
        ];
        for (text, field) in cases {
            let err = MonitorConfig::from_toml_str(text, &p()).expect_err(text);
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn vip_section_is_optional_and_has_defaults() {
        let cfg = MonitorConfig::from_toml_str("node_id = 1\n", &p()).expect("parses");
        assert_eq!(cfg.vip, None);
        let cfg = MonitorConfig::from_toml_str(
            "[vip]\naddress = \"198.18.0.10\"\ninterface = \"br0\"\n",
            &p(),
        )
        .expect("parses");
        let vip = cfg.vip.expect("a [vip]");
        assert_eq!(vip, VipConfig::new("198.18.0.10", "br0"));
        assert_eq!(vip.prefix_len(), Ok(32));
        assert_eq!(
            (vip.garp_count, vip.garp_interval_ms, vip.hook_timeout_ms),
            (5, 200, 5_000)
        );
        let cfg = MonitorConfig::from_toml_str(
            "[vip]\naddress = \"2001:db8::10\"\ninterface = \"eth0\"\nprefix = 64\nleader_hook = \"true\"\n",
            &p(),
        )
        .expect("parses");
        let vip = cfg.vip.expect("a [vip]");
        assert_eq!(vip.prefix_len(), Ok(64));
        assert_eq!(vip.leader_hook.as_deref(), Some("true"));
    }

    #[test]
    fn vip_errors_name_the_field() {
        let cases = [
            (
                "address = \"198.18.0.300\"\ninterface = \"br0\"",
                "vip.address",
            ),
            (
                "address = \"198.18.0.1/32\"\ninterface = \"br0\"",
                "vip.address",
            ),
            ("address = \"0.0.0.0\"\ninterface = \"br0\"", "vip.address"),
            (
                "address = \"127.0.0.1\"\ninterface = \"br0\"",
                "vip.address",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\nprefix = 33",
                "vip.prefix",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\nprefix = 0",
                "vip.prefix",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"\"",
                "vip.interface",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"a-very-long-interface\"",
                "vip.interface",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\ngarp_count = 1000",
                "vip.garp_count",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\ngarp_interval_ms = 1",
                "vip.garp_interval_ms",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\ngarp_repeat_after_ms = 50",
                "vip.garp_repeat_after_ms",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\nhook_timeout_ms = 0",
                "vip.hook_timeout_ms",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\nleader_hook = \" \"",
                "vip.leader_hook",
            ),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\nfollower_hook = \"\"",
                "vip.follower_hook",
            ),
            ("interface = \"br0\"", "address"),
            ("address = \"198.18.0.1\"", "interface"),
            (
                "address = \"198.18.0.1\"\ninterface = \"br0\"\ngarp = 1",
                "garp",
            ),
        ];
        for (body, field) in cases {
            let text = format!("[vip]\n{body}\n");
            let err = MonitorConfig::from_toml_str(&text, &p()).expect_err(&text);
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }
}
