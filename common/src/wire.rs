//! Messages exchanged between agents, monitors and `vigilctl`.
//!
//! A QUIC connection carries one bidirectional *control stream*, opened by the client. Both
//! sides first write an 8-byte [`Preamble`] (magic + protocol version) in raw bytes, so that
//! two different versions can always tell each other apart even when their message layouts
//! differ; a mismatch closes the connection with [`close::VERSION_MISMATCH`] and a reason that
//! names both versions. After the preamble the stream carries length-prefixed frames (see
//! [`crate::codec`]).
//!
//! The ALPN token picks the protocol: [`ALPN_AGENT`] for agents, [`ALPN_ADMIN`] for `vigilctl`.
//! Identity never comes from a message: the monitor takes it from the peer's certificate and
//! refuses a [`Hello`] that claims another name.

use serde::{Deserialize, Serialize};

use crate::config::IsolationResponse;
use crate::domain::{DomainEvent, DomainInfo, HypervisorHealth};

/// Version of the agent and admin protocols. Bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;

/// ALPN token of the agent protocol.
pub const ALPN_AGENT: &[u8] = b"vigil-agent/1";
/// ALPN token of the admin protocol (`vigilctl`).
pub const ALPN_ADMIN: &[u8] = b"vigil-admin/1";

/// The server name clients put in SNI and verify in the monitor certificate. Every monitor
/// certificate carries it, so agents can reach any monitor (or the VIP) by address.
pub const MONITOR_SERVER_NAME: &str = "vigil-monitor";

/// Magic bytes that open every control stream.
pub const MAGIC: [u8; 4] = *b"VGIL";

/// QUIC application close codes used by Vigil.
pub mod close {
    /// Normal shutdown.
    pub const NORMAL: u32 = 0;
    /// The peers speak different protocol versions.
    pub const VERSION_MISMATCH: u32 = 1;
    /// The peer's certificate does not allow what it asked for (wrong role, wrong name).
    pub const UNAUTHORIZED: u32 = 2;
    /// The peer sent something that is not a valid message.
    pub const PROTOCOL_ERROR: u32 = 3;
    /// A newer connection from the same host replaced this one.
    pub const REPLACED: u32 = 4;
    /// The monitor is shutting down.
    pub const SHUTDOWN: u32 = 5;
    /// This monitor stopped leading (or never led): agents connect to the leader instead.
    pub const NOT_LEADER: u32 = 6;
}

/// Longest leader address a [`MonitorToAgent::NotLeader`] may carry (a `host:port` is far
/// shorter): a longer one is a protocol error, never an address to dial.
pub const MAX_LEADER_ADDR_LEN: usize = 256;

/// The raw bytes every control stream starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub version: u32,
}

/// Why a preamble was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("peer is not speaking the Vigil protocol (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("protocol version mismatch: {local_role} speaks version {local}, {peer_role} speaks version {peer}")]
    VersionMismatch {
        local_role: &'static str,
        local: u32,
        peer_role: &'static str,
        peer: u32,
    },
}

impl Preamble {
    pub const LEN: usize = 8;

    pub fn current() -> Self {
        Preamble {
            version: PROTOCOL_VERSION,
        }
    }

    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&MAGIC);
        b[4..].copy_from_slice(&self.version.to_be_bytes());
        b
    }

    /// Parses a peer's preamble and checks that it speaks our version. `local_role` and
    /// `peer_role` ("monitor", "agent", "vigilctl") make the error message say who is who.
    pub fn check(
        bytes: [u8; 8],
        local_role: &'static str,
        peer_role: &'static str,
    ) -> Result<Preamble, PreambleError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(PreambleError::BadMagic(magic));
        }
        let version = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if version != PROTOCOL_VERSION {
            return Err(PreambleError::VersionMismatch {
                local_role,
                local: PROTOCOL_VERSION,
                peer_role,
                peer: version,
            });
        }
        Ok(Preamble { version })
    }
}

/// Facts about a hypervisor host, gathered by the agent (crate `sysinfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HostFacts {
    pub hostname: String,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_avg: [f32; 3],
    pub uptime_s: u64,
    /// Kernel boot id (`/proc/sys/kernel/random/boot_id`): changes on every reboot.
    pub boot_id: String,
}

/// First frame from an agent after the preamble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The host name the agent believes it has. Must equal its certificate's name.
    pub host: String,
    pub agent_version: String,
    pub zone: String,
    pub cluster: String,
    pub facts: HostFacts,
    /// Random per agent process (also written in its storage heartbeats).
    pub instance: u64,
    /// Names of the primary storage pools this host mounts.
    pub pools: Vec<String>,
}

/// One storage pool as this host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub ok: bool,
    /// Why it is down (empty when ok).
    pub detail: String,
}

/// A periodic liveness report with fresh facts. Each one also asks for a lease renewal:
/// the leader answers with [`MonitorToAgent::LeaseGrant`] for the same `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per beat on one connection; lets the monitor see lost beats.
    pub seq: u64,
    pub facts: HostFacts,
    /// Milliseconds since this agent process started, when the beat was sent (comparable
    /// with the `agent_mono_ms` of its storage heartbeats).
    pub mono_ms: u64,
    /// Each storage pool's state on this host.
    pub pools: Vec<PoolStatus>,
    /// The host watchdog's timeout while it is armed (`None`: no watchdog backs this host's
    /// lease, so the monitors never take its expiry as proof).
    pub watchdog_ms: Option<u64>,
}

/// An order from the monitor to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentCommand {
    /// Round-trip check; the agent answers with [`CommandOutcome::Pong`].
    Ping { nonce: u64 },
    /// Start a domain with an activation generation that the monitor committed first. The
    /// agent refuses a generation older than the newest it has seen for that VM, records
    /// the generation durably before starting, defines the domain from `definition` if this
    /// host does not have it, and answers only once libvirt reports it running.
    StartDomain {
        uuid: String,
        generation: u64,
        definition: Option<String>,
    },
    /// Destroy (hard stop) a domain.
    DestroyDomain { uuid: String },
    /// Check whether another host's kernel answers at `addr` (a TCP connection attempt: an
    /// accept or a refusal both prove the host alive), within `timeout_ms`. The answer is
    /// `Done` with detail `reachable` or `unreachable: ...`.
    ProbeHost {
        host: String,
        addr: std::net::SocketAddr,
        timeout_ms: u64,
    },
}

/// An agent's answer to an [`AgentCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Pong {
        nonce: u64,
    },
    /// Done; the text says what happened.
    Done {
        detail: String,
    },
    Failed {
        reason: String,
    },
}

/// Frames an agent sends.
///
/// Observations (inventory listings, lifecycle events, command results) carry an
/// *observation sequence number* `seq`: one counter per agent process, increased for every
/// observation and stamped when the observation is **taken**, not when it is sent. Reports
/// travel on different paths inside the agent (the watcher's queue, the session's command
/// tasks, the latest listing resent on connect), so they can reach the monitor out of order;
/// the monitor never lets an older observation of a VM override a newer one (a listing taken
/// before a start completed must not read as a crash after the start's "running" answer).
/// Counters of different agent processes (see [`Hello::instance`]) are not comparable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentToMonitor {
    Hello(Hello),
    Heartbeat(Heartbeat),
    /// `seq`: the observation sequence number (see above), stamped when the command finished.
    CommandResult {
        id: u64,
        outcome: CommandOutcome,
        seq: u64,
    },
    /// Every domain on the host, with the hypervisor's health: sent on connect, on change,
    /// and periodically as a backstop. `seq`: stamped *before* the listing was taken, so a
    /// listing that started before a start completed is older than that start's answer.
    Inventory {
        domains: Vec<DomainInfo>,
        health: HypervisorHealth,
        seq: u64,
    },
    /// A lifecycle event, forwarded as soon as libvirt delivers it. `generation` is the
    /// activation generation the domain was running with, as far as the agent knows.
    /// `seq`: stamped when the agent received the event.
    DomainEvent {
        event: DomainEvent,
        generation: Option<u64>,
        seq: u64,
    },
    /// The inactive XML of an HA domain, when it changed.
    Definition {
        uuid: String,
        xml: String,
    },
    /// The agent destroyed a domain that ran with a generation older than the newest.
    StaleDestroyed {
        uuid: String,
        name: String,
        found: Option<u64>,
        newest: u64,
    },
    /// The agent fenced itself (destroyed its HA domains) while cut from the monitors. One
    /// report per fencing episode (`id`, unique per agent): persisted by the agent and sent
    /// on every (re)connect, before the inventory, until the monitor answers
    /// [`MonitorToAgent::SelfFenceNoted`]; sent again with the same `id` if more domains
    /// were destroyed in the same episode.
    SelfFenced {
        id: u64,
        reason: String,
        destroyed: Vec<String>,
        /// Unix ms when it happened (for the event log).
        wall_ms: u64,
    },
}

/// The monitor's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Raft node id of the monitor that accepted the agent.
    pub monitor_node: u64,
    /// How often the agent must send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The identity the monitor recorded (from the certificate).
    pub host: String,
    /// What the agent does when its lease runs out while the monitors are alive.
    pub isolation_response: IsolationResponse,
}

/// Frames a monitor sends to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorToAgent {
    Welcome(Welcome),
    Command {
        id: u64,
        command: AgentCommand,
    },
    /// The HA VMs and their current activation generations (committed). `full`: this is the
    /// whole table (agents forget HA VMs not in it); otherwise an update of some entries.
    Generations {
        entries: Vec<(String, u64)>,
        full: bool,
    },
    /// The leader renews the agent's lease: valid for `lease_ms` from when the agent *sent*
    /// heartbeat `seq` (on the agent's own monotonic clock, so it ends before the monitor's
    /// copy does).
    LeaseGrant {
        seq: u64,
        lease_ms: u64,
    },
    /// The leader recorded the agent's [`AgentToMonitor::SelfFenced`] report `id`: the agent
    /// stops resending it.
    SelfFenceNoted {
        id: u64,
    },
    /// The leader withdrew its fence request `id` for this host (the host was heard again):
    /// the agent must not obey it, even if it still finds it in its slot.
    FenceWithdrawn {
        id: u64,
    },
    // --- issue 10 item 7 (scale): the full generation table in chunks ---
    /// One piece of a whole generation table too large for one frame (see
    /// [`crate::table`]). Chunks of table `table` (an id unique on this session) come in
    /// order, `index` from 0, on the one control stream; the agent replaces its HA set only
    /// when the chunk with `last` arrives, so a session that ends halfway through a table
    /// leaves the previous table in force (an agent never forgets HA VMs because of a
    /// half-received table). A table that fits in one frame is still sent as
    /// [`MonitorToAgent::Generations`] with `full`.
    GenerationsChunk {
        table: u64,
        index: u32,
        last: bool,
        entries: Vec<(String, u64)>,
    },
    // --- issue 12 item 3: agents follow the Raft leader ---
    /// The answer of a follower to a [`Hello`] (instead of a [`Welcome`]): only the leader
    /// takes agents. `leader` is the leader's client address (its `advertise`) when this
    /// monitor knows it; the follower then closes the connection. Not a lease grant: the
    /// agent's lease is untouched. Added at the end of the enum, so every older variant keeps
    /// its encoding; an older agent reads it as a malformed frame and tries its next monitor.
    NotLeader {
        leader: Option<String>,
    },
    // --- issue 12 item 9: cluster settings changed live ---
    /// The cluster's heartbeat interval changed (`vigilctl config set
    /// detector.heartbeat_interval_ms`): beat at this one from now on, as if the welcome had
    /// said it. Appended at the end (variant 8); an older agent reads it as a malformed
    /// frame, reconnects, and its new welcome carries the new interval.
    Tuning {
        heartbeat_interval_ms: u64,
    },
}

/// Checks the leader address of a [`MonitorToAgent::NotLeader`]: `Err` when it is longer
/// than [`MAX_LEADER_ADDR_LEN`] (a protocol error, never an address to dial).
pub fn check_leader_addr(leader: Option<&str>) -> Result<Option<&str>, String> {
    match leader {
        Some(l) if l.len() > MAX_LEADER_ADDR_LEN => Err(format!(
            "a not-leader answer names a leader address of {} bytes (at most {MAX_LEADER_ADDR_LEN})",
            l.len()
        )),
        other => Ok(other),
    }
}

/// A request from `vigilctl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    Status,
    /// `vigilctl plan --fail H[,H]`: where each HA VM of those hosts would go if they failed
    /// now (changes nothing).
    Plan {
        fail: Vec<String>,
    },
    HostList,
    HostShow {
        host: String,
    },
    HostTagAdd {
        host: String,
        tag: String,
    },
    HostTagRemove {
        host: String,
        tag: String,
    },
    /// The newest `limit` events, optionally of one host.
    Events {
        limit: u32,
        host: Option<String>,
        /// Only events about this VM (uuid).
        vm: Option<String>,
    },
    /// Round trip through a host's agent (checks the command path).
    HostPing {
        host: String,
    },
    /// Every domain the agents report, merged with the HA records.
    VmList,
    /// One VM (uuid or name) with its recovery history.
    VmShow {
        vm: String,
    },
    /// Enable or disable HA for a VM (uuid or name), with an optional priority.
    VmHa {
        vm: String,
        enable: bool,
        priority: Option<i32>,
    },
    /// Stop a VM on purpose through Vigil (destroy; Vigil will not restart it).
    VmStop {
        vm: String,
    },
    /// Put a host in maintenance (drain its HA VMs, place nothing on it) or take it out.
    HostMaintenance {
        host: String,
        on: bool,
    },
    /// Put a VM (uuid or name) in an anti-affinity group, or take it out (`None`).
    VmAntiAffinity {
        vm: String,
        group: Option<String>,
    },
    /// Run the host's fence agent now (`vigilctl host fence H`, like Pacemaker's
    /// `stonith_admin --fence`); `force`: even though the host is up.
    HostFence {
        host: String,
        force: bool,
    },
    /// The operator's own proof that the host is powered off (`vigilctl host confirm-off H`,
    /// like `stonith_admin --confirm`), recorded with the admin certificate's name.
    HostConfirmOff {
        host: String,
    },
    /// Lift the mass-failure hold (`vigilctl fencing release`) of one cluster, or of all.
    FencingRelease {
        cluster: Option<String>,
    },
    // ---- Issue 10 item 3 ----
    /// Move a registered host to another zone and cluster (`vigilctl host place`): the only
    /// way its placement changes; its agent's hello must match the record.
    HostPlace {
        host: String,
        zone: String,
        cluster: String,
    },
    // --- issue 10 item 7 (scale): paged answers ---
    /// One page of `vm list`: VMs by uuid, strictly after `after`, at most `limit` (the
    /// monitor also stops a page before its answer would outgrow a frame). The answer is
    /// a `VmPage`; `vigilctl` follows its `next` cursor until it is empty.
    VmListPage {
        after: Option<String>,
        limit: u32,
    },
    /// One page of `events`: the newest `limit` events (of `host`, of `vm`) with an id
    /// below `before`. The answer is an `EventsPage`, oldest first; its `next_before`
    /// says where the next (older) page starts when this one stopped short of `limit`.
    EventsPage {
        limit: u32,
        host: Option<String>,
        vm: Option<String>,
        before: Option<u64>,
    },
    /// One page of `host list`: hosts by name, strictly after `after`, at most `limit` (cut
    /// before the answer would outgrow a frame). The answer is a `HostPage`; `vigilctl`
    /// follows its `next` cursor until it is empty.
    HostListPage {
        after: Option<String>,
        limit: u32,
    },
    // --- issue 12: monitor membership ---
    /// The monitor servers (`vigilctl server list`): a `ServersView`.
    ServerList,
    /// Add monitor `id` at Raft address `addr` (`vigilctl server add`): as a learner, then,
    /// once it caught up (within `wait_ms`), as a voter. Leader only.
    ServerAdd {
        id: u64,
        addr: String,
        wait_ms: u64,
    },
    /// Remove monitor `id` (`vigilctl server del`), not keeping it as a learner.
    ServerDel {
        id: u64,
    },
    // --- issue 12 item 6: backup ---
    /// `vigilctl db backup`: the leader takes a backup file of the cluster state from a
    /// linearizable read and keeps it for this connection; the answer is its first piece,
    /// [`AdminResponse::BackupChunk`] at offset 0. Admin certificates only; followers
    /// answer `NotLeader`.
    DbBackup,
    /// The piece of this connection's backup `id` starting at `offset`.
    DbBackupChunk {
        id: u64,
        offset: u64,
    },
    /// `vigilctl server reset`: bring back monitor `id`, started with `vigil-monitor
    /// --reset` after its database was lost or damaged: removed from the membership,
    /// re-admitted, added back as a learner and, once caught up (within `wait_ms`), made a
    /// voter. `addr`: its Raft address, needed only when it is no longer a member. Leader
    /// only.
    ServerReset {
        id: u64,
        addr: Option<String>,
        wait_ms: u64,
    },
    // --- issue 12 item 9: cluster settings ---
    /// `vigilctl config show|get`: the cluster's settings (secrets hidden), their revision
    /// and last change, and how the answering monitor's own file differs: a `ConfigView`.
    ConfigShow,
    /// `vigilctl config set KEY VALUE` (`value` a TOML value) or `config unset KEY`
    /// (`value` absent: back to the default). Validated, then committed; admin only, leader
    /// only.
    ConfigSet {
        key: String,
        value: Option<String>,
    },
}

/// A reply to `vigilctl`. Payloads are JSON documents so that the CLI can print them as they
/// are with `--json` and so that fields can be added without breaking older CLIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// A JSON document (see the monitor's admin module for the shapes).
    Json(String),
    /// The request could not be served; the text says why.
    Error { message: String },
    /// This monitor is not the leader; writes go to `leader` (an address) if known.
    NotLeader { leader: Option<String> },
    /// A piece of backup file `id` (`total` bytes in all): `data` starts at `offset`. Bytes,
    /// not JSON: a backup is a file (see the monitor's `backup` module).
    BackupChunk {
        id: u64,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    },
}

/// The most file bytes one [`AdminResponse::BackupChunk`] carries (well within a frame).
pub const BACKUP_CHUNK_BYTES: usize = 512 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_roundtrip_and_mismatch() {
        let ok = Preamble::current().to_bytes();
        assert_eq!(
            Preamble::check(ok, "monitor", "agent"),
            Ok(Preamble::current())
        );
        let mut newer = ok;
        newer[4..].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let err = Preamble::check(newer, "monitor", "agent").expect_err("mismatch");
        let text = err.to_string();
        assert!(
            text.contains(&format!("monitor speaks version {PROTOCOL_VERSION}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("agent speaks version {}", PROTOCOL_VERSION + 1)),
            "{text}"
        );
        let mut junk = ok;
        junk[0] = b'X';
        assert!(matches!(
            Preamble::check(junk, "monitor", "agent"),
            Err(PreambleError::BadMagic(_))
        ));
    }

    #[test]
    fn tuning_is_appended_after_not_leader() {
        use crate::codec::{decode_frame, encode_frame, encode_payload};
        let m = MonitorToAgent::Tuning {
            heartbeat_interval_ms: 250,
        };
        let back: MonitorToAgent =
            decode_frame(&encode_frame(&m).expect("encode")).expect("decode");
        assert_eq!(back, m);
        assert_eq!(encode_payload(&m).expect("encode")[0], 8, "variant index 8");
    }

    #[test]
    fn not_leader_roundtrips_and_keeps_older_variants_encodings() {
        use crate::codec::{decode_frame, encode_frame, encode_payload};
        for leader in [None, Some("10.0.0.2:7440".to_string())] {
            let m = MonitorToAgent::NotLeader {
                leader: leader.clone(),
            };
            let back: MonitorToAgent =
                decode_frame(&encode_frame(&m).expect("encode")).expect("decode");
            assert_eq!(back, m);
        }
        // Appended at the end: variant index 7, and the older ones keep theirs.
        let nl = encode_payload(&MonitorToAgent::NotLeader { leader: None }).expect("encode");
        assert_eq!(nl, vec![7, 0]);
        let grant = encode_payload(&MonitorToAgent::LeaseGrant {
            seq: 1,
            lease_ms: 2,
        })
        .expect("encode");
        assert_eq!(grant[0], 3);
    }

    #[test]
    fn not_leader_garbage_and_limits() {
        use crate::codec::{decode_payload, CodecError};
        // Variant 7, Some, then a string length of 2^40: refused before any allocation.
        let mut huge = vec![7u8, 1, 253];
        huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            decode_payload::<MonitorToAgent>(&huge),
            Err(CodecError::Malformed(_))
        ));
        // Truncated, trailing bytes, a bad option tag, invalid UTF-8: all refused.
        for bad in [
            vec![7u8],
            vec![7, 0, 0],
            vec![7, 2],
            vec![7, 1, 2, 0xff, 0xfe],
            vec![7, 1, 5, b'a'],
        ] {
            assert!(decode_payload::<MonitorToAgent>(&bad).is_err(), "{bad:?}");
        }
        // A decodable but over-long address is a protocol error, never dialled.
        let long = "a".repeat(MAX_LEADER_ADDR_LEN + 1);
        assert!(check_leader_addr(Some(&long)).is_err());
        let ok = "a".repeat(MAX_LEADER_ADDR_LEN);
        assert_eq!(check_leader_addr(Some(&ok)), Ok(Some(ok.as_str())));
        assert_eq!(check_leader_addr(None), Ok(None));
    }

    proptest::proptest! {
        #[test]
        fn not_leader_garbage_never_panics(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut payload = vec![7u8];
            payload.extend_from_slice(&tail);
            if let Ok(MonitorToAgent::NotLeader { leader }) = crate::codec::decode_payload::<MonitorToAgent>(&payload) {
                let _ = check_leader_addr(leader.as_deref());
            }
        }
    }
}
