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

use crate::engine::Input;
use crate::service::EngineHandle;

/// How long an agent may take between connecting and sending its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

struct SessionEntry {
    conn_id: u64,
    conn: quinn::Connection,
    /// Frames to write to this agent (commands and notifications), in order.
    outbox: mpsc::Sender<MonitorToAgent>,
}

/// The live agent sessions, by host name.
#[derive(Default)]
pub struct Sessions {
    by_host: Mutex<HashMap<String, SessionEntry>>,
    /// Commands awaiting an answer: the outcome and its observation sequence number.
    pending: Mutex<HashMap<u64, oneshot::Sender<(CommandOutcome, u64)>>>,
    next_id: AtomicU64,
    heartbeats: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
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

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<(CommandOutcome, u64)>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
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
        let tx = {
            let hosts = self.lock_hosts();
            let entry = hosts
                .get(host)
                .ok_or_else(|| CommandError::NotConnected(host.to_string()))?;
            entry.outbox.clone()
        };
        let (otx, orx) = oneshot::channel();
        self.lock_pending().insert(id, otx);
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
        for (_, e) in self.lock_hosts().drain() {
            e.conn.close(close::SHUTDOWN.into(), reason.as_bytes());
        }
    }
}

/// What every agent session needs to know about this monitor.
#[derive(Debug, Clone, Copy)]
pub struct LinkSettings {
    pub node_id: u64,
    pub heartbeat_interval_ms: u64,
    pub isolation_response: vigil_common::config::IsolationResponse,
}

/// Serves one agent connection until it ends.
pub async fn serve(
    conn: quinn::Connection,
    peer: PeerIdentity,
    engine: EngineHandle,
    sessions: Arc<Sessions>,
    link: LinkSettings,
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

    let conn_id = conn.stable_id() as u64;
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
        .input(Input::AgentConnected {
            host: host.clone(),
            zone: hello.zone.clone(),
            cluster: hello.cluster.clone(),
            agent_version: hello.agent_version.clone(),
            facts: hello.facts.clone(),
            instance: hello.instance,
            pools: hello.pools.clone(),
            addr: Some(remote.ip()),
        })
        .await;
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
                        .input(Input::Heartbeat {
                            host: host.clone(),
                            seq: hb.seq,
                            facts: hb.facts,
                            mono_ms: hb.mono_ms,
                            pools: hb.pools,
                            watchdog_ms: hb.watchdog_ms,
                        })
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
                        .input(Input::SelfFenced {
                            host: host.clone(),
                            id,
                            reason,
                            destroyed,
                        })
                        .await;
                }
                Ok(Some(AgentToMonitor::Inventory {
                    domains,
                    health,
                    seq,
                })) => {
                    engine
                        .input(Input::Inventory {
                            host: host.clone(),
                            domains,
                            health,
                            seq,
                        })
                        .await;
                }
                Ok(Some(AgentToMonitor::DomainEvent {
                    event,
                    generation,
                    seq,
                })) => {
                    debug!(%host, ?event, seq, "domain event");
                    engine
                        .input(Input::DomainEvent {
                            host: host.clone(),
                            event,
                            generation,
                            seq,
                        })
                        .await;
                }
                Ok(Some(AgentToMonitor::Definition { uuid, xml })) => {
                    engine
                        .input(Input::Definition {
                            host: host.clone(),
                            uuid,
                            xml,
                        })
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
                        .input(Input::StaleDestroyed {
                            host: host.clone(),
                            uuid,
                            found,
                            newest,
                        })
                        .await;
                }
                Ok(Some(AgentToMonitor::CommandResult { id, outcome, seq })) => {
                    if let Some(tx) = sessions.lock_pending().remove(&id) {
                        let _ = tx.send((outcome, seq));
                    }
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
