//! Agent sessions on the monitor: authenticate, handshake, then turn heartbeats into engine
//! inputs and carry commands back to the agent.
//!
//! Identity comes only from the verified client certificate. A hello that names another host
//! than the certificate is refused with [`close::UNAUTHORIZED`], so an agent cannot speak for
//! another host. One session per host: a new session replaces the old one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use vigil_common::codec;
use vigil_common::tls::{PeerIdentity, Role};
use vigil_common::wire::{
    close, AgentCommand, AgentToMonitor, CommandOutcome, MonitorToAgent, Preamble, Welcome,
};

use crate::engine::{
    Beat, DefinitionReport, Hello, Input, LifecycleReport, Listing, SelfFenceReport,
    StaleCopyDestroyed,
};
use crate::service::EngineHandle;

/// How long an agent may take between connecting and sending its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

struct SessionEntry {
    conn_id: u64,
    conn: quinn::Connection,
    /// Frames to write to this agent (commands and notifications), in order.
    outbox: mpsc::Sender<MonitorToAgent>,
}

/// A command awaiting its answer, bound to the session it was sent on (issue 10 item 1):
/// only that session (host and connection) may answer it.
struct PendingCommand {
    host: String,
    conn_id: u64,
    /// The outcome and its observation sequence number.
    tx: oneshot::Sender<(CommandOutcome, u64)>,
}

/// The live agent sessions, by host name.
#[derive(Default)]
pub struct Sessions {
    by_host: Mutex<HashMap<String, SessionEntry>>,
    /// Commands awaiting an answer, by command id.
    pending: Mutex<HashMap<u64, PendingCommand>>,
    next_id: AtomicU64,
    /// Session numbers, unique for the monitor's lifetime (a QUIC `stable_id` may be reused
    /// once its connection is freed).
    next_session: AtomicU64,
    heartbeats: AtomicU64,
}

/// Why a command sent to an agent got no answer (the engine reads it as "no answer").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("host {0} has no agent connected to this monitor")]
    NotConnected(String),
    #[error("agent on {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("agent on {0} disconnected before answering")]
    Lost(String),
}

impl Sessions {
    fn lock_hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionEntry>> {
        self.by_host.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PendingCommand>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers a command result that arrived on `host`'s session `conn_id`. Ids are global,
    /// so a result is taken only from the session its command was sent on: an agent must
    /// not answer for another host (a forged "unreachable" probe answer would make a live
    /// host look dead), nor an old session of its own host. Anything else is ignored with
    /// a warning. `false`: not taken.
    fn deliver(
        &self,
        host: &str,
        conn_id: u64,
        id: u64,
        outcome: CommandOutcome,
        seq: u64,
    ) -> bool {
        let mut pending = self.lock_pending();
        match pending.get(&id) {
            Some(p) if p.host == host && p.conn_id == conn_id => {
                if let Some(p) = pending.remove(&id) {
                    let _ = p.tx.send((outcome, seq));
                }
                true
            }
            Some(p) => {
                warn!(
                    %host,
                    id,
                    sent_to = %p.host,
                    "ignored a command result from another session: command {id} was sent to {} (connection {}), not to {host} (connection {conn_id})",
                    p.host,
                    p.conn_id
                );
                false
            }
            // Timed out or already answered.
            None => false,
        }
    }

    /// A session ended: its unanswered commands are lost (their callers learn it now).
    fn drop_pending_of(&self, conn_id: u64) {
        self.lock_pending().retain(|_, p| p.conn_id != conn_id);
    }

    /// Sends a command to a host's agent and waits for its outcome.
    pub async fn command(
        &self,
        host: &str,
        command: AgentCommand,
        timeout: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        self.command_observed(host, command, timeout)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// Like [`Sessions::command`], with the agent's observation sequence number of the answer
    /// (the engine orders it against the agent's listings and events).
    pub async fn command_observed(
        &self,
        host: &str,
        command: AgentCommand,
        timeout: Duration,
    ) -> Result<(CommandOutcome, u64), CommandError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (otx, orx) = oneshot::channel();
        let tx = {
            let hosts = self.lock_hosts();
            let entry = hosts
                .get(host)
                .ok_or_else(|| CommandError::NotConnected(host.to_string()))?;
            // Registered under the hosts lock: the session cannot end (and drop its pending
            // commands) between choosing it and binding the command to it.
            self.lock_pending().insert(
                id,
                PendingCommand {
                    host: host.to_string(),
                    conn_id: entry.conn_id,
                    tx: otx,
                },
            );
            entry.outbox.clone()
        };
        if tx
            .send(MonitorToAgent::Command { id, command })
            .await
            .is_err()
        {
            self.lock_pending().remove(&id);
            return Err(CommandError::Lost(host.to_string()));
        }
        match tokio::time::timeout(timeout, orx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(CommandError::Lost(host.to_string())),
            Err(_) => {
                self.lock_pending().remove(&id);
                Err(CommandError::Timeout(host.to_string(), timeout))
            }
        }
    }

    /// Queues a notification for one host's agent; `false` if it is not connected or its
    /// queue is full (it will get the full table when it reconnects).
    pub fn notify(&self, host: &str, message: MonitorToAgent) -> bool {
        let hosts = self.lock_hosts();
        hosts
            .get(host)
            .is_some_and(|e| e.outbox.try_send(message).is_ok())
    }

    /// Queues a notification for every connected agent.
    pub fn broadcast(&self, message: &MonitorToAgent) {
        let hosts = self.lock_hosts();
        for (host, e) in hosts.iter() {
            if e.outbox.try_send(message.clone()).is_err() {
                warn!(%host, "agent outbox full; closing the session so it resyncs");
                e.conn
                    .close(close::PROTOCOL_ERROR.into(), b"outbox overflow; reconnect");
            }
        }
    }

    /// Agents connected now.
    pub fn connected_count(&self) -> usize {
        self.lock_hosts().len()
    }

    /// Heartbeats received since the monitor started.
    pub fn heartbeats_total(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }

    pub fn connected_hosts(&self) -> Vec<String> {
        self.lock_hosts().keys().cloned().collect()
    }

    /// Closes every session (monitor shutdown).
    pub fn close_all(&self, reason: &str) {
        self.close_all_with(close::SHUTDOWN, reason);
    }

    /// Closes every session with `code`; returns how many were open. With
    /// [`close::NOT_LEADER`] when this monitor stopped leading: its agents go to the leader
    /// (a session with a follower protects nobody: no grant, no decision).
    ///
    /// Unlike [`Sessions::close_all`] the sessions are not dropped here: each one's task sees
    /// its connection end, removes itself and tells the engine the agent left, as for any
    /// lost session.
    pub fn close_all_with(&self, code: u32, reason: &str) -> usize {
        let mut n = 0;
        for e in self.lock_hosts().values() {
            if e.conn.close_reason().is_none() {
                e.conn.close(code.into(), reason.as_bytes());
                n += 1;
            }
        }
        n
    }
}

/// Whether this monitor takes an agent's session now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The leader (or a one-node cluster): welcome.
    Accept,
    /// A follower: answer [`MonitorToAgent::NotLeader`] with the leader's client address if
    /// known, and close.
    Redirect { leader: Option<String> },
}

/// Asked at every hello (cheap: reads Raft metrics and the applied state).
pub type AdmissionCheck = Arc<dyn Fn() -> Admission + Send + Sync>;

/// How long a follower waits for a redirected agent to close before closing itself (the
/// answer must reach it: closing at once could discard the frame).
const REDIRECT_LINGER: Duration = Duration::from_secs(2);

/// What every agent session needs to know about this monitor.
#[derive(Debug, Clone, Copy)]
pub struct LinkSettings {
    pub node_id: u64,
    pub heartbeat_interval_ms: u64,
    pub isolation_response: vigil_common::config::IsolationResponse,
}

/// The replicated state as this monitor has applied it (host records).
pub type AppliedState = Arc<std::sync::RwLock<crate::state::ClusterState>>;

/// Why a hello naming `zone`/`cluster` is refused for `host` (issue 10 item 3): zone and
/// cluster are pinned in the host record when it first registers, and only an operator
/// moves a host (`vigilctl host place`). `None`: accepted (a new host, or the record's own
/// values).
pub fn placement_refusal(
    state: &crate::state::ClusterState,
    host: &str,
    zone: &str,
    cluster: &str,
) -> Option<String> {
    let h = state.hosts.get(host)?;
    if h.zone == zone && h.cluster == cluster {
        return None;
    }
    Some(format!(
        "host {host} is registered in zone {:?}, cluster {:?}, but its hello claims zone {zone:?}, cluster {cluster:?}; an agent cannot move its host: an operator does, with `vigilctl host place {host} --zone {zone} --cluster {cluster}` (or set zone/cluster back in the agent's config)",
        h.zone, h.cluster
    ))
}

/// Serves one agent connection until it ends.
pub async fn serve(
    conn: quinn::Connection,
    peer: PeerIdentity,
    engine: EngineHandle,
    sessions: Arc<Sessions>,
    link: LinkSettings,
    state: AppliedState,
    admission: AdmissionCheck,
) {
    let LinkSettings {
        node_id,
        heartbeat_interval_ms,
        isolation_response,
    } = link;
    let remote = conn.remote_address();
    if peer.role != Role::Agent {
        let msg = format!(
            "certificate of {} has role {}; only agent certificates may connect as agents",
            peer.name, peer.role
        );
        warn!(%remote, "{msg}");
        conn.close(close::UNAUTHORIZED.into(), msg.as_bytes());
        return;
    }
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, handshake(&conn, &peer)).await {
        Ok(Ok(parts)) => parts,
        Ok(Err((code, msg))) => {
            warn!(%remote, host = %peer.name, "agent refused: {msg}");
            if code == close::VERSION_MISMATCH {
                // The certificate is verified: this host is alive, only not manageable.
                // Never fence it for that (issue 9 item 4).
                error!(%remote, host = %peer.name, "agent speaks another protocol version: {msg}; the host is not fenced and its guests keep running unprotected");
                engine
                    .input(Input::AgentIncompatible {
                        host: peer.name.clone(),
                        detail: msg.clone(),
                    })
                    .await;
            }
            conn.close(code.into(), msg.as_bytes());
            return;
        }
        Err(_) => {
            let msg = format!("no hello within {HELLO_TIMEOUT:?}");
            warn!(%remote, host = %peer.name, "{msg}");
            conn.close(close::PROTOCOL_ERROR.into(), msg.as_bytes());
            return;
        }
    };
    let (hello, mut send, mut recv) = hello;
    let host = peer.name.clone();
    if let Admission::Redirect { leader } = admission() {
        info!(%remote, %host, ?leader, "not the leader: redirecting the agent");
        let answer = MonitorToAgent::NotLeader {
            leader: leader.clone(),
        };
        if codec::write_frame(&mut send, &answer).await.is_ok() && send.finish().is_ok() {
            // The agent closes once it read the answer.
            let _ = tokio::time::timeout(REDIRECT_LINGER, conn.closed()).await;
        }
        let why = match &leader {
            Some(l) => format!("not the leader; the leader is at {l}"),
            None => "not the leader; no leader known yet".to_string(),
        };
        conn.close(close::NOT_LEADER.into(), why.as_bytes());
        return;
    }
    let refusal = {
        let st = state.read().unwrap_or_else(PoisonError::into_inner);
        placement_refusal(&st, &host, &hello.zone, &hello.cluster)
    };
    if let Some(msg) = refusal {
        warn!(%remote, %host, "agent refused: {msg}");
        engine
            .input(Input::HostPlacementRefused {
                host: host.clone(),
                detail: msg.clone(),
            })
            .await;
        conn.close(close::UNAUTHORIZED.into(), msg.as_bytes());
        return;
    }

    let conn_id = sessions.next_session.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<MonitorToAgent>(1024);
    if let Some(old) = sessions.lock_hosts().insert(
        host.clone(),
        SessionEntry {
            conn_id,
            conn: conn.clone(),
            outbox: out_tx.clone(),
        },
    ) {
        old.conn.close(
            close::REPLACED.into(),
            b"replaced by a newer session of this host",
        );
    }

    engine
        .input(Input::AgentConnected(Hello {
            host: host.clone(),
            zone: hello.zone.clone(),
            cluster: hello.cluster.clone(),
            agent_version: hello.agent_version.clone(),
            facts: hello.facts.clone(),
            instance: hello.instance,
            pools: hello.pools.clone(),
            addr: Some(remote.ip()),
        }))
        .await;
    // The cluster's settings once it has them (a monitor whose file says otherwise warned
    // at start-up): every monitor tells agents the same.
    let (state_interval_ms, isolation_response) = state
        .read()
        .ok()
        .and_then(|s| {
            s.settings.as_ref().map(|r| {
                (
                    r.settings.detector.heartbeat_interval_ms,
                    r.settings.lease.isolation_response,
                )
            })
        })
        .unwrap_or((heartbeat_interval_ms, isolation_response));
    // The interval is the engine's, asked after this session was registered: if it changes
    // later, the engine's `Tuning` reaches this session after the welcome (issue 12 item 9).
    let heartbeat_interval_ms = engine
        .query(|e, _| e.heartbeat_interval_ms())
        .await
        .unwrap_or(state_interval_ms);
    let welcome = MonitorToAgent::Welcome(Welcome {
        monitor_node: node_id,
        heartbeat_interval_ms,
        host: host.clone(),
        isolation_response,
    });
    drop(out_tx);
    if let Err(e) = codec::write_frame(&mut send, &welcome).await {
        debug!(%host, error = %e, "could not send welcome");
    } else {
        info!(%host, %remote, zone = %hello.zone, cluster = %hello.cluster, "agent connected");
        // The writer owns the send half; commands reach it through the channel.
        let writer_conn = conn.clone();
        let writer_host = host.clone();
        let writer = tokio::spawn(async move {
            // Generation tables larger than a frame go out in chunks (issue 10 item 7).
            let mut tables = 0u64;
            while let Some(msg) = out_rx.recv().await {
                for frame in vigil_common::table::frames(msg, &mut tables) {
                    if let Err(e) = codec::write_frame(&mut send, &frame).await {
                        // A session that can no longer send would stay up on heartbeats
                        // but never grant again: end it, so the agent reconnects.
                        if writer_conn.close_reason().is_none() {
                            let msg = format!("cannot send to the agent: {e}");
                            error!(host = %writer_host, "{msg}");
                            writer_conn.close(close::PROTOCOL_ERROR.into(), msg.as_bytes());
                        }
                        return;
                    }
                }
            }
        });
        loop {
            match codec::read_frame::<_, AgentToMonitor>(&mut recv).await {
                Ok(Some(AgentToMonitor::Heartbeat(hb))) => {
                    sessions.heartbeats.fetch_add(1, Ordering::Relaxed);
                    engine
                        .input(Input::Heartbeat(Beat {
                            host: host.clone(),
                            seq: hb.seq,
                            facts: hb.facts,
                            mono_ms: hb.mono_ms,
                            pools: hb.pools,
                            watchdog_ms: hb.watchdog_ms,
                        }))
                        .await;
                }
                Ok(Some(AgentToMonitor::SelfFenced {
                    id,
                    reason,
                    destroyed,
                    wall_ms,
                })) => {
                    warn!(%host, id, %reason, ?destroyed, wall_ms, "agent reports it fenced itself");
                    engine
                        .input(Input::SelfFenced(SelfFenceReport {
                            host: host.clone(),
                            id,
                            reason,
                            destroyed,
                        }))
                        .await;
                }
                Ok(Some(AgentToMonitor::Inventory {
                    domains,
                    health,
                    seq,
                })) => {
                    engine
                        .input(Input::Inventory(Listing {
                            host: host.clone(),
                            domains,
                            health,
                            seq,
                        }))
                        .await;
                }
                Ok(Some(AgentToMonitor::DomainEvent {
                    event,
                    generation,
                    seq,
                })) => {
                    debug!(%host, ?event, seq, "domain event");
                    engine
                        .input(Input::DomainEvent(LifecycleReport {
                            host: host.clone(),
                            event,
                            generation,
                            seq,
                        }))
                        .await;
                }
                Ok(Some(AgentToMonitor::Definition { uuid, xml })) => {
                    engine
                        .input(Input::Definition(DefinitionReport {
                            host: host.clone(),
                            uuid,
                            xml,
                        }))
                        .await;
                }
                Ok(Some(AgentToMonitor::StaleDestroyed {
                    uuid,
                    name,
                    found,
                    newest,
                })) => {
                    warn!(%host, %uuid, %name, ?found, newest, "agent destroyed a stale domain");
                    engine
                        .input(Input::StaleDestroyed(StaleCopyDestroyed {
                            host: host.clone(),
                            uuid,
                            found,
                            newest,
                        }))
                        .await;
                }
                Ok(Some(AgentToMonitor::CommandResult { id, outcome, seq })) => {
                    sessions.deliver(&host, conn_id, id, outcome, seq);
                }
                Ok(Some(AgentToMonitor::Hello(_))) => {
                    conn.close(close::PROTOCOL_ERROR.into(), b"second hello on one session");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    if conn.close_reason().is_none() {
                        let msg = format!("bad frame: {e}");
                        warn!(%host, "{msg}");
                        conn.close(close::PROTOCOL_ERROR.into(), msg.as_bytes());
                    }
                    break;
                }
            }
        }
        writer.abort();
    }
    // Commands sent on this session can no longer be answered (a new session of the host
    // gets new ids).
    sessions.drop_pending_of(conn_id);

    let removed = {
        let mut hosts = sessions.lock_hosts();
        match hosts.get(&host) {
            Some(e) if e.conn_id == conn_id => hosts.remove(&host).is_some(),
            _ => false,
        }
    };
    if removed {
        info!(%host, reason = ?conn.close_reason(), "agent session ended");
        engine
            .input(Input::AgentDisconnected { host: host.clone() })
            .await;
    }
}

type Handshake = (
    vigil_common::wire::Hello,
    quinn::SendStream,
    quinn::RecvStream,
);

/// Preamble exchange and hello. On refusal returns the close code and a message naming why.
async fn handshake(
    conn: &quinn::Connection,
    peer: &PeerIdentity,
) -> Result<Handshake, (u32, String)> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| (close::PROTOCOL_ERROR, format!("no control stream: {e}")))?;
    let mut pre = [0u8; Preamble::LEN];
    recv.read_exact(&mut pre)
        .await
        .map_err(|e| (close::PROTOCOL_ERROR, format!("no preamble: {e}")))?;
    if let Err(e) = Preamble::check(pre, "monitor", "agent") {
        let code = match e {
            vigil_common::wire::PreambleError::VersionMismatch { .. } => close::VERSION_MISMATCH,
            _ => close::PROTOCOL_ERROR,
        };
        // Still send ours, so the agent's own check can name both versions too.
        let _ = send.write_all(&Preamble::current().to_bytes()).await;
        return Err((code, e.to_string()));
    }
    send.write_all(&Preamble::current().to_bytes())
        .await
        .map_err(|e| (close::PROTOCOL_ERROR, format!("cannot answer: {e}")))?;
    let hello = match codec::read_frame::<_, AgentToMonitor>(&mut recv).await {
        Ok(Some(AgentToMonitor::Hello(h))) => h,
        Ok(Some(other)) => {
            return Err((
                close::PROTOCOL_ERROR,
                format!("expected hello, got {}", variant_name(&other)),
            ))
        }
        Ok(None) => return Err((close::PROTOCOL_ERROR, "stream ended before hello".into())),
        Err(e) => return Err((close::PROTOCOL_ERROR, format!("bad hello: {e}"))),
    };
    if hello.host != peer.name {
        return Err((
            close::UNAUTHORIZED,
            format!(
                "certificate is for host {:?} but the hello claims host {:?}; an agent may only speak for its own host",
                peer.name, hello.host
            ),
        ));
    }
    for (what, v) in [("zone", &hello.zone), ("cluster", &hello.cluster)] {
        vigil_common::names::validate(what, v).map_err(|m| (close::PROTOCOL_ERROR, m))?;
    }
    Ok((hello, send, recv))
}

fn variant_name(m: &AgentToMonitor) -> &'static str {
    match m {
        AgentToMonitor::Hello(_) => "hello",
        AgentToMonitor::Heartbeat(_) => "heartbeat",
        AgentToMonitor::CommandResult { .. } => "command result",
        AgentToMonitor::Inventory { .. } => "inventory",
        AgentToMonitor::DomainEvent { .. } => "domain event",
        AgentToMonitor::Definition { .. } => "definition",
        AgentToMonitor::StaleDestroyed { .. } => "stale destroyed",
        AgentToMonitor::SelfFenced { .. } => "self fenced",
    }
}
