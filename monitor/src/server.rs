//! The monitor process: opens Raft, starts the engine, and serves agents and `vigilctl` on
//! one QUIC endpoint (the negotiated ALPN picks the protocol).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use vigil_common::config::MonitorConfig;
use vigil_common::tls::{self, TransportTuning};
use vigil_common::wire::{self, close};

use crate::admin::{self, AdminContext};
use crate::agent_link::{self, LinkSettings, Sessions};
use crate::raft::{RaftNode, RaftTuning, DB_FILE_NAME};
use crate::service::{self, EngineHandle};

/// Whether this start may create the cluster database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Open the existing database; refuse to start without one (the normal start).
    Existing,
    /// `vigil-monitor --init`: create a new, empty cluster; refuse if `data_dir` already holds
    /// one.
    Init,
}

/// Exit status of a monitor that refuses to start because of its data directory
/// (`EX_CONFIG` of sysexits.h), so that a unit can say `RestartPreventExitStatus=78`.
pub const EXIT_DATA_DIR: u8 = 78;

/// Why the monitor refuses to start on its data directory. Starting a new cluster is an
/// explicit act: a missing or mistyped `data_dir` must not silently create an empty cluster
/// (generations would restart at 0 and every HA flag would vanish).
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "no monitor database at {db}: data_dir is wrong, or this monitor was never initialized \
         there. Starting anyway would create a new, empty cluster (VM generations from 0, no HA \
         flags). Fix data_dir if it is wrong; to create a new cluster, start once with \
         `vigil-monitor --init`"
    )]
    Missing { db: PathBuf },
    #[error(
        "the monitor database {db} holds no cluster (an interrupted `vigil-monitor --init`?); \
         start with `vigil-monitor --init` to create a new cluster there"
    )]
    Empty { db: PathBuf },
    #[error(
        "--init refused: {db} already holds a cluster. `--init` only creates a new one; start \
         without --init to run this one"
    )]
    AlreadyInitialized { db: PathBuf },
}

/// A running monitor.
pub struct Monitor {
    pub local_addr: SocketAddr,
    pub raft: Arc<RaftNode>,
    pub engine: EngineHandle,
    pub sessions: Arc<Sessions>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Monitor {
    /// Opens the data directory, starts Raft (initializing a one-node cluster with
    /// [`StartMode::Init`] only), and listens for agents and admins. Fails with a
    /// [`DataDirError`] when the database is missing without `Init`, or exists with it.
    pub async fn start(cfg: MonitorConfig, mode: StartMode) -> anyhow::Result<Monitor> {
        let db = cfg.data_dir.join(DB_FILE_NAME);
        if mode == StartMode::Existing && !db.exists() {
            // Checked before anything creates the directory or the file.
            return Err(DataDirError::Missing { db }.into());
        }
        let tls_material = cfg.tls.load().context("loading the monitor's TLS files")?;
        let server_cfg = tls::server_config(
            tls_material,
            &[wire::ALPN_AGENT, wire::ALPN_ADMIN],
            TransportTuning::default(),
        )?;
        let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen)
            .with_context(|| format!("listening on udp {}", cfg.listen))?;
        let local_addr = endpoint.local_addr()?;
        let advertise = match cfg.advertise {
            Some(a) => a,
            None if cfg.listen.port() == 0 => SocketAddr::new(cfg.listen.ip(), local_addr.port()),
            None => cfg.listen,
        };

        let raft = RaftNode::open(
            &cfg.data_dir,
            cfg.node_id,
            advertise.to_string(),
            RaftTuning::default(),
        )
        .await
        .with_context(|| format!("opening Raft state in {}", cfg.data_dir.display()))?;
        let raft = Arc::new(raft);
        let initialized = raft
            .is_initialized()
            .await
            .context("reading the Raft state")?;
        let refusal = match (mode, initialized) {
            (StartMode::Existing, false) => Some(DataDirError::Empty { db: db.clone() }),
            (StartMode::Init, true) => Some(DataDirError::AlreadyInitialized { db: db.clone() }),
            _ => None,
        };
        if let Some(e) = refusal {
            raft.shutdown().await;
            return Err(e.into());
        }
        if mode == StartMode::Init {
            raft.initialize_single_if_new()
                .await
                .context("initializing the monitor cluster")?;
            info!(db = %db.display(), "created a new monitor cluster (--init)");
        }

        let (stop, stop_rx) = watch::channel(false);
        let epoch = Instant::now();
        let sessions = Arc::new(Sessions::default());
        let engine = service::spawn(raft.clone(), sessions.clone(), &cfg, epoch, stop_rx.clone());
        let ctx = AdminContext {
            raft: raft.clone(),
            engine: engine.clone(),
            sessions: sessions.clone(),
        };
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            ctx,
            LinkSettings {
                node_id: cfg.node_id,
                heartbeat_interval_ms: cfg.detector.heartbeat_interval_ms,
                isolation_response: cfg.lease.isolation_response,
            },
            stop_rx,
        ));
        info!(
            node = cfg.node_id,
            %local_addr,
            data_dir = %cfg.data_dir.display(),
            "vigil-monitor {} serving agents and vigilctl",
            vigil_common::VERSION
        );
        Ok(Monitor {
            local_addr,
            raft,
            engine,
            sessions,
            endpoint,
            stop,
            accept,
        })
    }

    /// Stops serving, closes sessions and shuts Raft down cleanly.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.sessions.close_all("monitor shutting down");
        self.endpoint
            .close(close::SHUTDOWN.into(), b"monitor shutting down");
        self.accept.abort();
        self.raft.shutdown().await;
        self.endpoint.wait_idle().await;
        info!("monitor stopped");
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: AdminContext,
    link: LinkSettings,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.changed() => break,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // Includes clients without a certificate or with one from another CA:
                    // rustls refuses them during the handshake.
                    warn!(%remote, error = %e, "handshake failed");
                    return;
                }
            };
            let peer = match tls::peer_identity(&conn) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("unusable client certificate: {e}");
                    warn!(%remote, "{msg}");
                    conn.close(close::UNAUTHORIZED.into(), msg.as_bytes());
                    return;
                }
            };
            match tls::negotiated_alpn(&conn).as_deref() {
                Some(wire::ALPN_AGENT) => {
                    agent_link::serve(
                        conn,
                        peer,
                        ctx.engine.clone(),
                        ctx.sessions.clone(),
                        link,
                        ctx.raft.state(),
                    )
                    .await
                }
                Some(wire::ALPN_ADMIN) => admin::serve(conn, peer, ctx).await,
                other => {
                    debug!(%remote, ?other, "unknown ALPN");
                    conn.close(
                        close::PROTOCOL_ERROR.into(),
                        b"unknown application protocol",
                    );
                }
            }
        });
    }
}
