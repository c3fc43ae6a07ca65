//! One authenticated session with a monitor: QUIC + mutual TLS, the versioned handshake,
//! then heartbeats out and commands in, on one control stream.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vigil_common::codec::{self, CodecError};
use vigil_common::wire::{
    self, AgentCommand, AgentToMonitor, CommandOutcome, Heartbeat, Hello, HostFacts,
    MonitorToAgent, PoolStatus, Preamble, Welcome,
};

use crate::facts::FactsCollector;

/// Why a session ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("monitor {addr} refused us: {reason}")]
    Refused {
        addr: SocketAddr,
        /// The close code ([`wire::close`]).
        code: u32,
        reason: String,
    },
    #[error("monitor {addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
    #[error("monitor {addr}: {source}")]
    Codec {
        addr: SocketAddr,
        source: CodecError,
    },
    #[error("monitor {addr} closed the control stream")]
    Closed { addr: SocketAddr },
    #[error("monitor {addr} sent no handshake answer within {timeout:?}")]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    /// A follower's answer (or a leader that stopped leading): connect to the leader.
    #[error("monitor {addr} is not the leader ({})", match leader { Some(l) => format!("the leader is at {l}"), None => "no leader known".to_string() })]
    NotLeader {
        addr: SocketAddr,
        leader: Option<String>,
    },
}

/// TLS alert `certificate_expired` (RFC 8446 section 6.2), as QUIC carries it (a crypto
/// error, 0x100 + the alert).
const TLS_CERTIFICATE_EXPIRED: u8 = 45;

impl SessionError {
    /// Errors that will not go away by retrying the same monitor (version, authorization).
    pub fn is_permanent(&self) -> bool {
        matches!(self, SessionError::Refused { .. }) || self.unmanaged_reason().is_some()
    }

    /// A monitor answered, but this agent cannot be managed by it: another protocol version,
    /// or an expired certificate (ours, refused by the monitor, or the monitor's, refused by
    /// us). The monitors treat such a host as alive and never condemn it for it (issue 9
    /// item 4), so its guests must keep running: `Some(why)` is what the isolation guard
    /// and the log say. Anything else (unreachable, timed out, redirected) is `None`.
    pub fn unmanaged_reason(&self) -> Option<String> {
        let expired = quinn::TransportErrorCode::crypto(TLS_CERTIFICATE_EXPIRED);
        match self {
            SessionError::Refused { code, reason, .. } if *code == wire::close::VERSION_MISMATCH => {
                Some(format!("the monitor speaks another protocol version: {reason}"))
            }
            SessionError::Connection {
                source: quinn::ConnectionError::ConnectionClosed(c),
                ..
            } if c.error_code == expired => Some(
                "the monitor refused this agent's certificate as expired: renew it (`vigilctl cert renew`) and send the agent SIGHUP".to_string(),
            ),
            SessionError::Connection {
                source: quinn::ConnectionError::TransportError(e),
                ..
            } if e.code == expired => Some(format!(
                "the monitor's certificate has expired ({e}): renew it (`vigilctl cert renew`) and send the monitor SIGHUP"
            )),
            _ => None,
        }
    }
}

fn map_conn_err(addr: SocketAddr, e: quinn::ConnectionError) -> SessionError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == wire::close::NOT_LEADER.into() =>
        {
            SessionError::NotLeader { addr, leader: None }
        }
        quinn::ConnectionError::ApplicationClosed(close) => SessionError::Refused {
            addr,
            code: u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => SessionError::Connection {
            addr,
            source: other,
        },
    }
}

/// An established session: the handshake is done and the monitor welcomed us.
pub struct Session {
    pub addr: SocketAddr,
    pub welcome: Welcome,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// How often self-fence reports not yet noted are sent again on a live session.
const SELF_FENCE_RESEND: Duration = Duration::from_secs(5);

/// How long the handshake may take before the agent tries another monitor.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl Session {
    /// Connects to `addr`, exchanges preambles and sends `hello`. The hello is sent as given,
    /// so tests can check that the monitor refuses a hello that names another host.
    pub async fn open(
        endpoint: &quinn::Endpoint,
        client: quinn::ClientConfig,
        addr: SocketAddr,
        hello: Hello,
    ) -> Result<Session, SessionError> {
        let fut = async {
            let conn = endpoint
                .connect_with(client, addr, wire::MONITOR_SERVER_NAME)
                .map_err(|source| SessionError::Connect { addr, source })?
                .await
                .map_err(|e| map_conn_err(addr, e))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| map_conn_err(addr, e))?;
            send.write_all(&Preamble::current().to_bytes())
                .await
                .map_err(|e| write_err(&conn, addr, e))?;
            codec::write_frame(&mut send, &AgentToMonitor::Hello(hello))
                .await
                .map_err(|e| codec_err(&conn, addr, e))?;
            let mut pre = [0u8; Preamble::LEN];
            if let Err(e) = recv.read_exact(&mut pre).await {
                return Err(closed_or(&conn, addr, e.to_string()));
            }
            Preamble::check(pre, "agent", "monitor").map_err(|e| {
                conn.close(
                    wire::close::VERSION_MISMATCH.into(),
                    e.to_string().as_bytes(),
                );
                SessionError::Refused {
                    addr,
                    code: wire::close::VERSION_MISMATCH,
                    reason: e.to_string(),
                }
            })?;
            let welcome = match codec::read_frame::<_, MonitorToAgent>(&mut recv).await {
                Ok(Some(MonitorToAgent::Welcome(w))) => w,
                Ok(Some(MonitorToAgent::NotLeader { leader })) => {
                    // Only the leader takes agents. Nothing else changes here: a redirect is
                    // no lease grant.
                    conn.close(wire::close::NORMAL.into(), b"redirected");
                    return match wire::check_leader_addr(leader.as_deref()) {
                        Ok(l) => Err(SessionError::NotLeader {
                            addr,
                            leader: l.map(String::from),
                        }),
                        Err(message) => Err(SessionError::Protocol { addr, message }),
                    };
                }
                Ok(Some(other)) => {
                    return Err(SessionError::Protocol {
                        addr,
                        message: format!("expected a welcome, got {other:?}"),
                    })
                }
                Ok(None) => return Err(closed_or(&conn, addr, "stream ended".into())),
                Err(e) => return Err(codec_err(&conn, addr, e)),
            };
            Ok(Session {
                addr,
                welcome,
                conn,
                send,
                recv,
            })
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(SessionError::HandshakeTimeout {
                addr,
                timeout: HANDSHAKE_TIMEOUT,
            }),
        }
    }

    /// Heartbeats every `welcome.heartbeat_interval_ms`, forwards the host watcher's reports,
    /// and carries out commands, until the connection fails or `stop` fires.
    pub async fn run(
        self,
        facts: &mut FactsCollector,
        io: SessionIo<'_>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        self.run_with(&mut || facts.collect(), io, stop).await
    }

    /// Like [`Session::run`], with facts from `facts` (load generators use fixed facts).
    pub async fn run_with(
        self,
        facts: &mut (dyn FnMut() -> HostFacts + Send),
        mut io: SessionIo<'_>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let Session {
            addr,
            welcome,
            conn,
            mut send,
            recv,
        } = self;
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(10));
        info!(%addr, node = welcome.monitor_node, ?interval, host = %welcome.host, "connected to monitor");

        // Reading is not cancel-safe, so a dedicated task reads frames and forwards them.
        let (tx, mut rx) = mpsc::channel::<Result<MonitorToAgent, CodecError>>(64);
        let reader = tokio::spawn(read_loop(recv, tx));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // When each recent heartbeat was sent: a lease runs from the send time of the beat
        // it was granted for.
        let mut sent: VecDeque<(u64, Instant)> = VecDeque::with_capacity(64);
        if let Some(lease) = &io.lease {
            lease.set_isolation_response(welcome.isolation_response);
            lease.set_heartbeat_interval_ms(welcome.heartbeat_interval_ms);
        }
        // Commands run in their own tasks (a domain start takes seconds; heartbeats must not
        // wait); their answers come back here.
        let (done_tx, mut done_rx) = mpsc::channel::<(u64, CommandOutcome, u64)>(64);
        // What happened while no monitor was reachable (a self-fence, lifecycle events), in
        // order, then the current inventory, so the monitor reads the history before the
        // state it led to (a domain the agent destroyed when fencing itself must not look
        // like an operator's `virsh destroy`).
        // Self-fence reports not yet noted by a monitor come first (persisted: none is lost
        // to a full channel, a lost connection or a restart).
        let pending = io.fencing.as_ref().map(|f| f.pending()).unwrap_or_default();
        for report in pending {
            if let Err(e) = codec::write_frame(&mut send, &report.message()).await {
                reader.abort();
                return Err(codec_err(&conn, addr, e));
            }
        }
        let mut resend_at = Instant::now() + SELF_FENCE_RESEND;
        if let Some(reports) = io.reports.as_mut() {
            while let Ok(report) = reports.try_recv() {
                if let Err(e) = codec::write_frame(&mut send, &report).await {
                    reader.abort();
                    return Err(codec_err(&conn, addr, e));
                }
            }
        }
        if let Some(latest) = &io.latest {
            let current = latest.borrow().clone();
            if let Some((domains, health, seq)) = current {
                let inv = AgentToMonitor::Inventory {
                    domains,
                    health,
                    seq,
                };
                if let Err(e) = codec::write_frame(&mut send, &inv).await {
                    reader.abort();
                    return Err(codec_err(&conn, addr, e));
                }
            }
        }
        // Chunks of a whole generation table too large for one frame, until the last.
        let mut table = vigil_common::table::Assembly::default();
        let result = loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    let now = Instant::now();
                    if sent.len() == 64 {
                        sent.pop_front();
                    }
                    sent.push_back((seq, now));
                    let pools = match &io.storage {
                        Some(st) => st
                            .view()
                            .pools
                            .into_iter()
                            // Unknown yet is not down: report it once something is known.
                            .filter(|p| p.checked)
                            .map(|p| PoolStatus { name: p.name, ok: p.ok, detail: p.detail })
                            .collect(),
                        None => Vec::new(),
                    };
                    let mono_ms = now.saturating_duration_since(io.started).as_millis() as u64;
                    let watchdog_ms = io.host_watchdog.as_ref().and_then(|w| w.armed_ms());
                    let beat = AgentToMonitor::Heartbeat(Heartbeat { seq, facts: facts(), mono_ms, pools, watchdog_ms });
                    if let Err(e) = codec::write_frame(&mut send, &beat).await {
                        break Err(codec_err(&conn, addr, e));
                    }
                    // Reports still not noted (the monitor may have lost them): again.
                    if now >= resend_at {
                        resend_at = now + SELF_FENCE_RESEND;
                        let pending = io.fencing.as_ref().map(|f| f.pending()).unwrap_or_default();
                        let mut failed = None;
                        for report in pending {
                            if let Err(e) = codec::write_frame(&mut send, &report.message()).await {
                                failed = Some(e);
                                break;
                            }
                        }
                        if let Some(e) = failed {
                            break Err(codec_err(&conn, addr, e));
                        }
                    }
                }
                report = async {
                    match io.reports.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(report) = report else {
                        io.reports = None;
                        continue;
                    };
                    if let Err(e) = codec::write_frame(&mut send, &report).await {
                        break Err(codec_err(&conn, addr, e));
                    }
                }
                Some((id, outcome, seq)) = done_rx.recv() => {
                    let reply = AgentToMonitor::CommandResult { id, outcome, seq };
                    if let Err(e) = codec::write_frame(&mut send, &reply).await {
                        break Err(codec_err(&conn, addr, e));
                    }
                }
                msg = rx.recv() => match msg {
                    Some(Ok(MonitorToAgent::Command { id, command })) => {
                        let done = done_tx.clone();
                        match io.executor.clone() {
                            Some(exec) => {
                                tokio::spawn(async move {
                                    let outcome = exec.execute(command).await;
                                    // Stamped when the command finished (what it observed).
                                    let seq = crate::watch::observation_seq();
                                    let _ = done.send((id, outcome, seq)).await;
                                });
                            }
                            None => {
                                let outcome = execute_without_backend(command);
                                let _ = done.send((id, outcome, crate::watch::observation_seq())).await;
                            }
                        }
                    }
                    Some(Ok(MonitorToAgent::Generations { entries, full })) => {
                        if let Some(exec) = &io.executor {
                            exec.merge_generations(&entries, full);
                        }
                    }
                    Some(Ok(MonitorToAgent::GenerationsChunk { table: id, index, last, entries })) => {
                        // Applied only once whole: a half-received table must not make the
                        // agent forget HA VMs.
                        match table.push(id, index, last, entries) {
                            Ok(Some(entries)) => {
                                debug!(table = id, chunks = index + 1, entries = entries.len(), "whole generation table received");
                                if let Some(exec) = &io.executor {
                                    exec.merge_generations(&entries, true);
                                }
                            }
                            Ok(None) => {}
                            Err(e) => break Err(SessionError::Protocol { addr, message: e.to_string() }),
                        }
                    }
                    Some(Ok(MonitorToAgent::LeaseGrant { seq: granted, lease_ms })) => {
                        if let (Some(lease), Some((_, at))) =
                            (&io.lease, sent.iter().find(|(s, _)| *s == granted))
                        {
                            lease.renew(*at, lease_ms);
                        }
                    }
                    Some(Ok(MonitorToAgent::SelfFenceNoted { id })) => {
                        if let Some(f) = &io.fencing {
                            info!(id, "the monitor noted the self-fence report");
                            f.noted(id);
                        }
                    }
                    Some(Ok(MonitorToAgent::FenceWithdrawn { id })) => {
                        if let Some(f) = &io.fencing {
                            info!(id, "the monitor withdrew its fence request");
                            f.withdraw(id);
                        }
                    }
                    Some(Ok(MonitorToAgent::Welcome(_))) => {
                        break Err(SessionError::Protocol { addr, message: "unexpected second welcome".into() });
                    }
                    Some(Ok(MonitorToAgent::Tuning { heartbeat_interval_ms })) => {
                        // The cluster's interval changed: beat at it from the next beat on.
                        let interval = Duration::from_millis(heartbeat_interval_ms.max(10));
                        if interval != tick.period() {
                            info!(%addr, ?interval, was = ?tick.period(), "heartbeat interval changed by the cluster");
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        if let Some(lease) = &io.lease {
                            lease.set_heartbeat_interval_ms(heartbeat_interval_ms);
                        }
                    }
                    Some(Ok(MonitorToAgent::NotLeader { leader })) => {
                        // The monitor stopped leading: go to the leader (the lease is untouched).
                        conn.close(wire::close::NORMAL.into(), b"redirected");
                        let leader = wire::check_leader_addr(leader.as_deref()).ok().flatten().map(String::from);
                        break Err(SessionError::NotLeader { addr, leader });
                    }
                    Some(Err(e)) => break Err(codec_err(&conn, addr, e)),
                    None => break Err(closed_or(&conn, addr, "control stream ended".into())),
                },
                _ = stop.changed() => {
                    conn.close(wire::close::NORMAL.into(), b"agent shutting down");
                    break Ok(());
                }
            }
        };
        reader.abort();
        result
    }
}

async fn read_loop(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Result<MonitorToAgent, CodecError>>,
) {
    loop {
        let msg = codec::read_frame::<_, MonitorToAgent>(&mut recv).await;
        let end = !matches!(msg, Ok(Some(_)));
        let item = match msg {
            Ok(Some(m)) => Ok(m),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        if tx.send(item).await.is_err() || end {
            break;
        }
    }
}

/// Answers commands when the agent has no executor (load generators).
fn execute_without_backend(command: AgentCommand) -> CommandOutcome {
    match command {
        AgentCommand::Ping { nonce } => {
            debug!(nonce, "ping");
            CommandOutcome::Pong { nonce }
        }
        AgentCommand::ProbeHost { .. } => CommandOutcome::Failed {
            reason: "this agent has no executor: cannot probe peers".into(),
        },
        other => CommandOutcome::Failed {
            reason: format!("this agent has no hypervisor backend: cannot {other:?}"),
        },
    }
}

/// What a session exchanges besides heartbeats.
pub struct SessionIo<'a> {
    /// Reports of the host watcher (events, inventory, definitions), forwarded as they come.
    pub reports: Option<&'a mut mpsc::Receiver<AgentToMonitor>>,
    /// The latest inventory, sent right after the handshake.
    pub latest: Option<crate::watch::Latest>,
    /// Carries out commands; `None` answers everything but pings with a failure.
    pub executor: Option<crate::executor::Executor>,
    /// Renewed by the leader's grants.
    pub lease: Option<crate::lease::Lease>,
    /// Pool states for the heartbeats.
    pub storage: Option<crate::storage::StorageWorker>,
    /// The host watchdog's armed timeout rides every heartbeat.
    pub host_watchdog: Option<crate::watchdog::Watchdog>,
    /// When this agent process started (heartbeats carry the time since).
    pub started: Instant,
    /// Self-fence reports to deliver, fence requests the monitors withdraw.
    pub fencing: Option<crate::fencing::Fencing>,
}

impl Default for SessionIo<'_> {
    fn default() -> Self {
        SessionIo {
            reports: None,
            latest: None,
            executor: None,
            lease: None,
            storage: None,
            host_watchdog: None,
            started: Instant::now(),
            fencing: None,
        }
    }
}

fn closed_or(conn: &quinn::Connection, addr: SocketAddr, fallback: String) -> SessionError {
    match conn.close_reason() {
        Some(e) => map_conn_err(addr, e),
        None => SessionError::Protocol {
            addr,
            message: fallback,
        },
    }
}

fn write_err(conn: &quinn::Connection, addr: SocketAddr, e: quinn::WriteError) -> SessionError {
    match e {
        quinn::WriteError::ConnectionLost(c) => map_conn_err(addr, c),
        other => closed_or(conn, addr, other.to_string()),
    }
}

fn codec_err(conn: &quinn::Connection, addr: SocketAddr, e: CodecError) -> SessionError {
    match conn.close_reason() {
        Some(c) => map_conn_err(addr, c),
        None => {
            if let CodecError::Io(_) = e {
                warn!(%addr, error = %e, "stream error");
            }
            SessionError::Codec { addr, source: e }
        }
    }
}
