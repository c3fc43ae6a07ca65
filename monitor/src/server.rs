//! The monitor process: opens Raft, starts the engine, and serves agents and `vigilctl` on
//! one QUIC endpoint (the negotiated ALPN picks the protocol).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use vigil_common::config::MonitorConfig;
use vigil_common::tls::{
    self, CertInfo, ExpiredHook, ExpiredPeer, Role, TlsPaths, TransportTuning,
};
use vigil_common::wire::{self, close};

use crate::admin::{self, AdminContext};
use crate::agent_link::{self, Admission, AdmissionCheck, LinkSettings, Sessions};
use crate::certs::{self, CertWatch, Note};
use crate::raft::quic::{QuicTuning, RaftEndpoint, RaftServer, TransportError};
use crate::raft::{leader_lease, RaftNode, RaftTuning, DB_FILE_NAME};
use crate::service::{self, EngineHandle};
use crate::state::{EventKind, Severity, StateCommand};
use crate::vip;

/// Whether this start may create the cluster database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartMode {
    /// Open the existing database; refuse to start without one (the normal start).
    Existing,
    /// `vigil-monitor --init`: create a new, empty cluster; refuse if `data_dir` already holds
    /// one.
    Init,
    /// `vigil-monitor --join` (needs `[raft] listen`): create an empty database and wait to be
    /// added by the leader (`vigilctl server add`); refuse if `data_dir` already holds a
    /// cluster.
    Join,
    /// `vigil-monitor --restore FILE`: create a new one-node cluster whose state is the
    /// backup's (`vigilctl db backup`), then run it; refuse if `data_dir` holds a database.
    /// The other monitors are added back as to any cluster (`--join`, `vigilctl server add`).
    Restore(PathBuf),
    /// `vigil-monitor --reset` (needs `[raft] listen`): this monitor's database is lost or
    /// damaged. Move it aside (kept as `raft.redb.reset-<unix ms>`), start empty, and take
    /// no Raft message until the leader re-admits it (`vigilctl server reset N`;
    /// [`crate::raft::reset`]).
    Reset,
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
         start with `vigil-monitor --init` to create a new cluster there (or set [raft] listen \
         and start with `--join` to be added to an existing one)"
    )]
    Empty { db: PathBuf },
    #[error(
        "--join refused: {db} already holds a cluster (this monitor is a member already, or \
         was one). Start without --join to run it; a monitor whose database is lost or damaged \
         comes back with `vigil-monitor --reset` and `vigilctl server reset N` on the leader"
    )]
    AlreadyJoined { db: PathBuf },
    #[error("--join needs field `raft.listen`: the leader reaches a new monitor there")]
    JoinWithoutRaft,
    #[error(
        "--reset needs field `raft.listen`: a reset monitor catches up from the other \
         monitors. A one-node cluster whose database is lost comes back from a backup \
         (`vigil-monitor --restore FILE`)"
    )]
    ResetWithoutRaft,
    #[error(
        "the monitor database {db} is damaged: {detail}. Nothing was changed. This monitor's \
         committed data is also on the other monitors of its cluster: start it with \
         `vigil-monitor --reset` (the damaged file is kept aside, never deleted), then run \
         `vigilctl server reset {node_id}` against the leader; it catches up from there. A \
         one-node cluster comes back from a backup instead (`vigil-monitor --restore FILE` \
         into an empty data_dir)"
    )]
    Damaged {
        db: PathBuf,
        detail: String,
        node_id: u64,
    },
    #[error(
        "--init refused: {db} already holds a cluster. `--init` only creates a new one; start \
         without --init to run this one"
    )]
    AlreadyInitialized { db: PathBuf },
    #[error(
        "--restore refused: {db} exists. A restore builds a new cluster in an empty data \
         directory and never replaces what is stored there: move that directory away (or set \
         data_dir to an empty one) first, after making sure it is not the cluster you want \
         to keep"
    )]
    RestoreOverExisting { db: PathBuf },
    #[error(
        "--restore refused: {running} of the backed-up cluster still run (each answered on its \
         Raft port and holds a cluster). A restored cluster beside the old one would be two \
         deciders for the same hosts, and a VM could be started by both. Stop every monitor of \
         the old cluster (one that should join the restored cluster starts later with \
         `--join` on an empty data directory), then run --restore again; nothing was created"
    )]
    RestoreWhileRunning { running: String },
}

/// `--restore`: which of `members` (the backed-up cluster's other monitors) answer on their
/// Raft port as monitors that hold a cluster (not waiting to be admitted), named for the
/// refusal; empty when none does. Asked together, each within 3 s: an unreachable monitor
/// is taken as stopped.
async fn still_running(ep: &RaftEndpoint, members: &[(u64, String)]) -> String {
    let asks = members.iter().map(|(id, addr)| async move {
        let answer = ep
            .reset_step(
                *id,
                addr,
                crate::raft::reset::ResetStep::Probe,
                Duration::from_secs(3),
            )
            .await;
        match answer {
            Ok(reply) if !reply.waiting => Some(format!("mon{id} at {addr}")),
            _ => None,
        }
    });
    let running: Vec<String> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    running.join(", ")
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
    /// The Raft address (`[raft] listen` bound) and its server, when `[raft] listen` is set.
    pub raft_addr: Option<SocketAddr>,
    raft_server: Option<RaftServer>,
    /// Issue 10 items 4 and 5: certificate reloads (SIGHUP) and expiry watching.
    tls_state: Arc<TlsState>,
    /// The `[vip]` task (it removes the address once `stop` is sent), when configured.
    vip: Option<JoinHandle<()>>,
    /// `true` while this monitor holds the VIP (`None` without `[vip]`).
    pub vip_holding: Option<watch::Receiver<bool>>,
}

/// What certificate reloads and expiry checks share.
struct TlsState {
    certs: Arc<CertWatch>,
    raft: Arc<RaftNode>,
    hook: ExpiredHook,
    /// This monitor's own certificate.
    own: std::sync::Mutex<CertInfo>,
    /// Every identified connection (agents and admins), for closing revoked ones on reload
    /// and re-checking long sessions' expiry.
    live: std::sync::Mutex<std::collections::HashMap<usize, (quinn::Connection, CertInfo)>>,
}

impl TlsState {
    fn own(&self) -> CertInfo {
        self.own
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn live(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<usize, (quinn::Connection, CertInfo)>>
    {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes a certificate in use; records its expiry warning once.
    fn in_use(self: &Arc<Self>, info: &CertInfo) {
        if self.certs.in_use(info, unix_s()) == Note::Expiring {
            let me = self.clone();
            let info = info.clone();
            tokio::spawn(async move { me.record(&info, false).await });
        }
    }

    /// Records a certificate's expiry event (warning or expired-and-refused), unless the
    /// replicated log has it already.
    async fn record(&self, info: &CertInfo, expired: bool) {
        if self
            .raft
            .read(|s| certs::already_recorded(s, expired, &info.serial))
        {
            return;
        }
        let now = unix_s();
        let at = vigil_common::unix_ms();
        let not_after_ms = (info.not_after.max(0) as u64) * 1000;
        let when = format!("{} UTC", crate::ctl::render::timestamp(not_after_ms));
        let what = certs::describe(info);
        let (severity, kind, message) = if expired {
            (
                Severity::Critical,
                EventKind::CertificateExpired {
                    role: info.role.to_string(),
                    name: info.name.clone(),
                    serial: info.serial.clone(),
                    not_after_ms,
                },
                format!(
                    "the {what} expired at {when}: its connections are refused. Renew it (`vigilctl cert renew`) and send its daemon SIGHUP{}",
                    if info.role == Role::Agent {
                        "; meanwhile the host is treated as alive and unmanaged (never fenced for this), its guests keep running unprotected"
                    } else {
                        ""
                    }
                ),
            )
        } else {
            (
                Severity::Warning,
                EventKind::CertificateExpiring {
                    role: info.role.to_string(),
                    name: info.name.clone(),
                    serial: info.serial.clone(),
                    not_after_ms,
                },
                format!(
                    "the {what} expires in {} days (at {when}): renew it with `vigilctl cert renew` and send its daemon SIGHUP (docs/operations.md)",
                    (info.not_after - now).div_euclid(86_400)
                ),
            )
        };
        let cmd = StateCommand::RecordEvent {
            at_ms: at,
            severity,
            host: (info.role == Role::Agent).then(|| info.name.clone()),
            kind,
            message,
        };
        if let Err(e) = self.raft.write(cmd).await {
            debug!(error = %e, "certificate event not recorded (not the leader?); retried later");
            if !expired {
                self.certs.unwarn(info);
            }
        }
    }
}

fn unix_s() -> i64 {
    (vigil_common::unix_ms() / 1000) as i64
}

/// The endpoint's configuration from the `[tls]` files (with the CRL, if configured), this
/// monitor's own certificate, and the serials the CRL lists.
fn build_server_config(
    paths: &TlsPaths,
    hook: ExpiredHook,
) -> anyhow::Result<(quinn::ServerConfig, CertInfo, Vec<String>)> {
    let material = paths.load().context("loading the monitor's TLS files")?;
    let leaf = material
        .chain
        .first()
        .with_context(|| format!("{}: no certificate", paths.cert.display()))?;
    let own = tls::cert_info(leaf).with_context(|| format!("tls.cert {}", paths.cert.display()))?;
    if own.role != Role::Monitor {
        anyhow::bail!(
            "tls.cert {} is a {} certificate; a monitor needs one issued with --role monitor",
            paths.cert.display(),
            own.role
        );
    }
    let mut revoked = Vec::new();
    for c in &material.crls {
        revoked.extend(tls::crl_serials(c)?);
    }
    let cfg = tls::server_config_with(
        material,
        &[wire::ALPN_AGENT, wire::ALPN_ADMIN],
        TransportTuning::default(),
        Some(hook),
    )?;
    Ok((cfg, own, revoked))
}

impl Monitor {
    /// Opens the data directory, starts Raft (initializing a one-node cluster with
    /// [`StartMode::Init`] only), and listens for agents and admins. Fails with a
    /// [`DataDirError`] when the database is missing without `Init`, or exists with it.
    pub async fn start(cfg: MonitorConfig, mode: StartMode) -> anyhow::Result<Monitor> {
        // A wrong `[vip]` (bad address, no such interface) refuses the start with the field
        // named, before anything else is opened.
        if let Some(v) = &cfg.vip {
            vip::check(v)?;
        }
        let db = cfg.data_dir.join(DB_FILE_NAME);
        if mode == StartMode::Existing && !db.exists() {
            // Checked before anything creates the directory or the file.
            return Err(DataDirError::Missing { db }.into());
        }
        // `--restore`: the data directory must be empty, and the file a valid backup,
        // before anything is bound or created.
        let restore = match &mode {
            StartMode::Restore(_) if db.exists() => {
                return Err(DataDirError::RestoreOverExisting { db }.into())
            }
            StartMode::Restore(file) => Some((file.clone(), crate::backup::read_file(file)?)),
            _ => None,
        };
        let (expired_tx, expired_rx) = tokio::sync::mpsc::unbounded_channel::<ExpiredPeer>();
        let hook: ExpiredHook = Arc::new(move |p| {
            let _ = expired_tx.send(p);
        });
        let (server_cfg, own_cert, _) = build_server_config(&cfg.tls, hook.clone())?;
        let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen)
            .with_context(|| format!("listening on udp {}", cfg.listen))?;
        let local_addr = endpoint.local_addr()?;
        let advertise = match cfg.advertise {
            Some(a) => a,
            None if cfg.listen.port() == 0 => SocketAddr::new(cfg.listen.ip(), local_addr.port()),
            None => cfg.listen,
        };

        if mode == StartMode::Join && cfg.raft.listen.is_none() {
            return Err(DataDirError::JoinWithoutRaft.into());
        }
        if mode == StartMode::Reset && cfg.raft.listen.is_none() {
            return Err(DataDirError::ResetWithoutRaft.into());
        }
        // `[raft] listen`: this monitor talks Raft with the others on its own endpoint, and
        // the membership holds that endpoint's address. Bound before the database is opened,
        // so a certificate that is not `mon<node_id>` refuses the start with nothing created.
        let raft_endpoint = match cfg.raft.listen {
            None => None,
            Some(listen) => {
                let load = || {
                    cfg.tls
                        .load()
                        .context("loading the monitor's TLS files for Raft")
                };
                let ep = RaftEndpoint::bind(
                    listen,
                    cfg.node_id,
                    load()?,
                    load()?,
                    QuicTuning::default(),
                )
                .map_err(|e| match e {
                    e @ TransportError::OwnCertificate { .. } => anyhow::anyhow!(
                        "field `node_id` = {} does not match tls.cert {}: {e}. Fix node_id, or \
                         issue this monitor a certificate named mon{} (`vigilctl cert issue \
                         --role monitor mon{}`)",
                        cfg.node_id,
                        cfg.tls.cert.display(),
                        cfg.node_id,
                        cfg.node_id
                    ),
                    e => anyhow::Error::new(e).context("field `raft.listen`"),
                })?;
                let bound = ep.local_addr().context("the Raft endpoint's address")?;
                let advertise = match cfg.raft.advertise {
                    Some(a) => a,
                    None if listen.port() == 0 => SocketAddr::new(listen.ip(), bound.port()),
                    None => listen,
                };
                Some((ep, bound, advertise))
            }
        };
        if let (Some((_, backup)), Some((ep, _, _))) = (&restore, &raft_endpoint) {
            let running = still_running(
                ep,
                &crate::backup::members_to_ask(&backup.header, cfg.node_id),
            )
            .await;
            if !running.is_empty() {
                return Err(DataDirError::RestoreWhileRunning { running }.into());
            }
        }
        if let Some((file, backup)) = &restore {
            // The membership holds the Raft address (or, without `[raft] listen`, the
            // client address), as `--init` would write it.
            let member_addr = match &raft_endpoint {
                Some((_, _, raft_advertise)) => raft_advertise.to_string(),
                None => advertise.to_string(),
            };
            if !cfg.raft.peers.is_empty() {
                warn!("--restore builds a one-node cluster: `[raft] peers` is not used; add the others with `vigilctl server add`");
            }
            let state = crate::backup::restored_state(
                backup.state.clone(),
                backup.header.created_at_ms,
                backup.header.last_applied.map(|l| l.index),
                vigil_common::unix_ms(),
            );
            let last = RaftNode::seed_from_backup(
                &cfg.data_dir,
                cfg.node_id,
                &member_addr,
                backup.header.last_applied,
                &state,
            )
            .await
            .with_context(|| {
                format!(
                    "restoring {} into {}",
                    file.display(),
                    cfg.data_dir.display()
                )
            })?;
            info!(
                file = %file.display(),
                db = %db.display(),
                hosts = state.hosts.len(),
                vms = state.vms.len(),
                events = state.events.len(),
                log_index = last.index,
                "restored a one-node cluster from a backup taken at {} ms; add the other monitors with `vigil-monitor --join` there and `vigilctl server add`",
                backup.header.created_at_ms
            );
        }
        if mode == StartMode::Join && !db.exists() {
            // Silent on Raft until the leader admits it (`raft::reset`): a member whose files
            // were deleted by hand and started with `--join` must not vote, empty.
            crate::raft::reset::begin_join(&cfg.data_dir).with_context(|| {
                format!("--join: writing the marker in {}", cfg.data_dir.display())
            })?;
        }
        if mode == StartMode::Reset {
            let moved =
                crate::raft::reset::begin(&cfg.data_dir, DB_FILE_NAME, vigil_common::unix_ms())
                    .with_context(|| format!("--reset: setting {} aside", db.display()))?;
            match moved {
                Some(aside) => warn!(
                    kept = %aside.display(),
                    "--reset: the old database is kept aside; this monitor starts empty and waits for `vigilctl server reset {}` on the leader",
                    cfg.node_id
                ),
                None => warn!(
                    "--reset: no database was there; this monitor starts empty and waits for `vigilctl server reset {}` on the leader",
                    cfg.node_id
                ),
            }
        }
        let raft = match &raft_endpoint {
            None => {
                RaftNode::open(
                    &cfg.data_dir,
                    cfg.node_id,
                    advertise.to_string(),
                    RaftTuning::default(),
                )
                .await
            }
            Some((ep, _, raft_advertise)) => {
                RaftNode::open_with_network(
                    &cfg.data_dir,
                    cfg.node_id,
                    raft_advertise.to_string(),
                    RaftTuning::default().to_config(),
                    ep.network(),
                )
                .await
            }
        }
        .map_err(|e| match e {
            crate::raft::RaftSetupError::Damaged { path, detail } => {
                anyhow::Error::new(DataDirError::Damaged {
                    db: path,
                    detail,
                    node_id: cfg.node_id,
                })
            }
            e => anyhow::Error::new(e)
                .context(format!("opening Raft state in {}", cfg.data_dir.display())),
        })?;
        let raft = Arc::new(raft);
        let initialized = raft
            .is_initialized()
            .await
            .context("reading the Raft state")?;
        let refusal = match (&mode, initialized) {
            // A monitor that joined (or is joining) waits, empty, to be added by the leader.
            (StartMode::Existing, false) if raft_endpoint.is_some() => None,
            (StartMode::Existing, false) => Some(DataDirError::Empty { db: db.clone() }),
            (StartMode::Init, true) => Some(DataDirError::AlreadyInitialized { db: db.clone() }),
            (StartMode::Join, true) => Some(DataDirError::AlreadyJoined { db: db.clone() }),
            _ => None,
        };
        if let Some(e) = refusal {
            raft.shutdown().await;
            return Err(e.into());
        }
        // Serve the other monitors before initializing: peers named in `[raft] peers` vote
        // only once they can reach us.
        // Votes pass the gate first: none during the first vote lease after this start, none
        // while this monitor acts as leader (`raft::leader_lease`).
        let vote_gate = leader_lease::VoteGate::new(
            Instant::now(),
            Duration::from_millis(raft.election_timeout_max_ms()),
        );
        leader_lease::hold_elections_while_quiet(raft.raft(), &vote_gate);
        let raft_endpoint_handle = raft_endpoint.as_ref().map(|(ep, _, _)| ep.clone());
        let reset_gate = crate::raft::reset::ResetGate::load(&cfg.data_dir);
        if reset_gate.is_waiting() {
            warn!(
                "this monitor started empty (--join or --reset) and takes no Raft message until the leader admits it: `vigilctl server add {0} ADDR` for a new monitor, `vigilctl server reset {0}` for a member whose database was lost (a cluster's formation admits its [raft] peers by itself)",
                cfg.node_id
            );
        }
        let (raft_server, raft_addr) = match raft_endpoint {
            None => (None, None),
            Some((ep, bound, _)) => (
                Some(ep.serve_with_reset(raft.raft().clone(), vote_gate.clone(), reset_gate)),
                Some(bound),
            ),
        };
        if mode == StartMode::Init {
            let peers: std::collections::BTreeMap<u64, String> = cfg
                .raft
                .peers
                .iter()
                .map(|p| (p.id, p.addr.clone()))
                .collect();
            // The peers started with `--join` wait to be admitted; this monitor admits them
            // (recorded first, so a restart goes on with it).
            let to_admit: Vec<(u64, String)> = peers
                .iter()
                .filter(|(id, _)| **id != cfg.node_id)
                .map(|(id, addr)| (*id, addr.clone()))
                .collect();
            crate::raft::reset::write_formation(&cfg.data_dir, &to_admit)
                .context("recording the [raft] peers to admit")?;
            raft.initialize_with_if_new(&peers)
                .await
                .context("initializing the monitor cluster")?;
            info!(db = %db.display(), voters = peers.len() + 1, "created a new monitor cluster (--init)");
        } else if !initialized {
            info!(
                node = cfg.node_id,
                raft = ?raft_addr,
                "no cluster yet: waiting to be added by the leader (`vigilctl server add {} ADDR`)",
                cfg.node_id
            );
        }

        let (stop, stop_rx) = watch::channel(false);
        if let Some(ep) = &raft_endpoint_handle {
            if cfg.data_dir.join(crate::raft::reset::FORMATION).exists() {
                tokio::spawn(crate::raft::reset::admit_formation_peers(
                    ep.clone(),
                    cfg.data_dir.clone(),
                    stop_rx.clone(),
                ));
            }
        }
        let epoch = Instant::now();
        // Everything this monitor does as leader outside Raft (engine, VIP) follows its leader
        // lease, not Raft's own view (openraft never steps a cut-off leader down).
        let (lease, lease_view) = leader_lease::spawn_watching(
            raft.clone(),
            raft.election_timeout_min_ms(),
            epoch,
            vote_gate,
            stop_rx.clone(),
        );
        let (vip, vip_status) = match &cfg.vip {
            None => (None, None),
            Some(v) => {
                let leading = serving_signal(lease.clone(), stop_rx.clone());
                let (task, holding) = vip::spawn_with_holding(v.clone(), leading, stop_rx.clone());
                info!(address = %v.address, interface = %v.interface, "the VIP follows this monitor's leadership");
                (
                    Some(task),
                    Some(vip::Status {
                        address: v.address.clone(),
                        interface: v.interface.clone(),
                        holding,
                    }),
                )
            }
        };
        let vip_holding = vip_status.as_ref().map(|s| s.holding.clone());
        let sessions = Arc::new(Sessions::default());
        let engine = service::spawn(
            raft.clone(),
            sessions.clone(),
            &cfg,
            epoch,
            lease_view.clone(),
            stop_rx.clone(),
        );
        let certs = Arc::new(CertWatch::default());
        let tls_state = Arc::new(TlsState {
            certs: certs.clone(),
            raft: raft.clone(),
            hook,
            own: std::sync::Mutex::new(own_cert),
            live: Default::default(),
        });
        tokio::spawn(expired_loop(
            expired_rx,
            tls_state.clone(),
            engine.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(expiry_ticker(
            tls_state.clone(),
            engine.clone(),
            stop_rx.clone(),
        ));
        let ctx = AdminContext {
            raft: raft.clone(),
            engine: engine.clone(),
            sessions: sessions.clone(),
            certs,
            vip: vip_status,
            raft_endpoint: raft_endpoint_handle,
            file_settings: Arc::new(cfg.cluster_settings()),
            storage_interval_ms: cfg.storage.interval_ms,
        };
        tokio::spawn(crate::service::warn_of_settings_drift(
            raft.clone(),
            cfg.cluster_settings(),
            stop_rx.clone(),
        ));
        // Issue 12 item 3: only the leader keeps agents; it records where they reach it.
        let admission = admission_check(raft.clone(), raft_addr.is_some(), lease_view);
        if raft_addr.is_some() && advertise.ip().is_unspecified() {
            warn!(
                %advertise,
                "field `advertise` is not set and `listen` is a wildcard address: followers \
                 cannot tell agents and vigilctl where this monitor is when it leads (they \
                 try their next monitor instead). Set `advertise` to the address they dial"
            );
        }
        tokio::spawn(follow_leadership(
            raft.clone(),
            sessions.clone(),
            advertise.to_string(),
            admission.clone(),
            stop_rx.clone(),
        ));
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            ctx,
            admission,
            tls_state.clone(),
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
            raft_addr,
            raft_server,
            tls_state,
            vip,
            vip_holding,
        })
    }

    /// Reloads the `[tls]` files (certificate, key, CA, CRL) for new handshakes: sessions
    /// continue, except those of a certificate the CRL now lists, which are closed. On any
    /// error the current configuration stays.
    pub fn reload_tls(&self, paths: &TlsPaths) -> anyhow::Result<String> {
        let (cfg, own, revoked) = build_server_config(paths, self.tls_state.hook.clone())?;
        // The Raft transport first: a certificate it refuses (another node's) changes nothing.
        let raft = match &self.raft_server {
            Some(server) => {
                let load = || {
                    paths
                        .load()
                        .context("loading the monitor's TLS files for Raft")
                };
                Some(
                    server
                        .reload_tls(load()?, load()?)
                        .context("reloading the Raft transport's TLS")?,
                )
            }
            None => None,
        };
        self.endpoint.set_server_config(Some(cfg));
        *self
            .tls_state
            .own
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = own.clone();
        self.tls_state.in_use(&own);
        let mut closed = Vec::new();
        for (conn, info) in self.tls_state.live().values() {
            if revoked.contains(&info.serial) {
                let msg = format!(
                    "certificate of {} (role {}, serial {}) is revoked",
                    info.name, info.role, info.serial
                );
                warn!(remote = %conn.remote_address(), "closing a session: {msg}");
                conn.close(close::UNAUTHORIZED.into(), msg.as_bytes());
                closed.push(format!("{} {}", info.role, info.name));
            }
        }
        Ok(format!(
            "reloaded TLS: serving certificate serial {} ({}), CRL lists {} serial(s){}{}",
            own.serial,
            certs::describe(&own),
            revoked.len(),
            if closed.is_empty() {
                String::new()
            } else {
                format!("; closed the sessions of revoked {}", closed.join(", "))
            },
            raft.map(|r| format!("; {r}")).unwrap_or_default()
        ))
    }

    /// Stops serving, closes sessions and shuts Raft down cleanly.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.sessions.close_all("monitor shutting down");
        self.endpoint
            .close(close::SHUTDOWN.into(), b"monitor shutting down");
        self.accept.abort();
        // `stop` made the VIP task remove the address; wait for it (bounded by the task:
        // removal retries, then the hooks' own timeouts), so the process never exits holding it.
        if let Some(task) = self.vip {
            if let Err(e) = task.await {
                error!("the VIP task ended abnormally: {e}");
            }
        }
        // The Raft server first: no peer RPC reaches a Raft that is shutting down.
        if let Some(server) = self.raft_server {
            server.shutdown().await;
        }
        self.raft.shutdown().await;
        self.endpoint.wait_idle().await;
        info!("monitor stopped");
    }
}

/// True while this monitor holds its leader lease (`raft::leader_lease`): the VIP's signal,
/// so a leader cut off from its quorum drops the address when its lease runs out, before
/// the majority's new leader (which waits a lease and more) takes it. Ends (dropping the
/// sender, which the VIP treats as "not leading") when `stop` turns true.
fn serving_signal(
    mut lease: watch::Receiver<Option<leader_lease::Serving>>,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(lease.borrow_and_update().is_some());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = lease.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let now = lease.borrow_and_update().is_some();
                    tx.send_if_modified(|v| std::mem::replace(v, now) != now);
                }
                _ = stop.changed() => break,
            }
        }
    });
    rx
}

/// Genuine but expired client certificates, refused at the handshake: reported, and an
/// agent's host kept alive like an incompatible agent's (never condemned for it).
async fn expired_loop(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<ExpiredPeer>,
    st: Arc<TlsState>,
    engine: EngineHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut fed: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        let p = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => break },
            _ = stop.changed() => break,
        };
        let info = p.info;
        if st.certs.refused_expired(&info, unix_s()) == Note::Expired {
            error!(
                name = %info.name,
                role = %info.role,
                serial = %info.serial,
                "refused an expired certificate: {}",
                certs::describe(&info)
            );
            st.record(&info, true).await;
        }
        if info.role == Role::Agent
            && fed
                .get(&info.name)
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            fed.insert(info.name.clone(), Instant::now());
            engine
                .input(crate::engine::Input::AgentIncompatible {
                    host: info.name.clone(),
                    detail: format!(
                        "its agent certificate (serial {}) expired; renew it with `vigilctl cert renew` and send the agent SIGHUP",
                        info.serial
                    ),
                })
                .await;
        }
    }
}

/// Re-checks this monitor's own certificate and those of long sessions (an expiry window is
/// crossed without any new connection), and retries warnings not recorded yet.
async fn expiry_ticker(st: Arc<TlsState>, engine: EngineHandle, mut stop: watch::Receiver<bool>) {
    // What the engine was last told about this monitor's own certificate.
    let mut told: Option<Option<String>> = None;
    loop {
        let own = st.own();
        st.in_use(&own);
        // Agents refuse an expired monitor certificate: the engine must not read their
        // silence as death (issue 9 item 4).
        let expired = (own.not_after <= unix_s()).then(|| certs::describe(&own));
        if told.as_ref() != Some(&expired) {
            if let Some(what) = &expired {
                error!("this monitor's own certificate has expired ({what}): agents cannot connect; no host is fenced until it is renewed (`vigilctl cert renew`, then SIGHUP)");
            }
            engine
                .input(crate::engine::Input::OwnCertificate {
                    expired: expired.clone(),
                })
                .await;
            told = Some(expired);
        }
        let infos: Vec<CertInfo> = st.live().values().map(|(_, i)| i.clone()).collect();
        for i in &infos {
            st.in_use(i);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => break,
        }
    }
}

/// Whether a monitor that Raft calls leader takes agents' sessions: not once it is
/// `deposed` (`raft::leader_lease::LeaseClock::deposed`: its wait is over and no quorum
/// confirms its lease). openraft never steps a leader cut off from the other monitors down;
/// if it kept its agents, the majority's new leader would hear none of them, find healthy
/// hosts down and place nothing until the partition heals (sim: the test
/// `a_stale_leader_cut_from_the_monitors_does_not_keep_the_agents`). Pure: the simulator's
/// monitors admit and close sessions by it.
pub fn takes_agents(raft_leader: bool, deposed: bool) -> bool {
    raft_leader && !deposed
}

/// Whether this monitor takes agents now: the leader does ([`takes_agents`]: unless its
/// lease shows it cut off from the majority, when it names no leader, and the agent tries
/// its next monitor); so does a one-node cluster whatever its Raft state (as before issue
/// 12: its one monitor is the leader as soon as Raft has started). A follower, or a monitor
/// started with `[raft] listen` that is no member yet (`--join`), redirects them to the
/// leader's client endpoint when the replicated state has it
/// ([`StateCommand::MonitorEndpoint`]). `lease` is what the lease task publishes
/// (`leader_lease::spawn_watching`).
pub fn admission_check(
    raft: Arc<RaftNode>,
    raft_configured: bool,
    lease: watch::Receiver<leader_lease::LeaseView>,
) -> AdmissionCheck {
    Arc::new(move || {
        if raft.is_leader() {
            return if takes_agents(true, lease.borrow().deposed) {
                Admission::Accept
            } else {
                Admission::Redirect { leader: None }
            };
        }
        let (members, alone) = {
            let metrics = raft.raft().metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let members = membership.nodes().count();
            let alone = membership.nodes().all(|(id, _)| *id == raft.node_id());
            (members, alone)
        };
        if (members > 0 || !raft_configured) && alone {
            return Admission::Accept;
        }
        Admission::Redirect {
            leader: leader_endpoint(&raft),
        }
    })
}

/// The leader's client endpoint (what agents and `vigilctl` dial), when a leader is known
/// and has recorded it.
pub fn leader_endpoint(raft: &RaftNode) -> Option<String> {
    let id = raft.current_leader()?;
    raft.read(|s| s.monitors.get(&id).cloned())
}

/// How long the leader waits for its endpoint record to commit before trying again.
const ENDPOINT_WRITE_TIMEOUT: std::time::Duration = Duration::from_secs(5);
/// How often leadership is re-checked without a metrics change (a backstop).
const LEADERSHIP_SWEEP: std::time::Duration = std::time::Duration::from_millis(500);

/// Issue 12 item 3, on every Raft metrics change (and every [`LEADERSHIP_SWEEP`]): a
/// leader of several monitors records its client endpoint `advertise` (once per change of
/// it: followers name it in their redirects); a monitor that does not take agents (it lost
/// leadership) closes the sessions it still has, with [`close::NOT_LEADER`], so those
/// agents go to the leader. Not in the engine: this is transport, the engine only learns
/// that the agents left.
async fn follow_leadership(
    raft: Arc<RaftNode>,
    sessions: Arc<Sessions>,
    advertise: String,
    admission: AdmissionCheck,
    mut stop: watch::Receiver<bool>,
) {
    let node = raft.node_id();
    let mut metrics = raft.metrics_watch();
    let mut writing: Option<JoinHandle<()>> = None;
    loop {
        if admission() != Admission::Accept {
            let n = sessions.close_all_with(
                close::NOT_LEADER,
                "this monitor is not the leader: connect to the leader",
            );
            if n > 0 {
                info!(
                    sessions = n,
                    "not the leader: closed the agent sessions so that they move to the leader"
                );
            }
        } else if raft.is_leader()
            && raft.has_peers()
            && raft.read(|s| s.monitors.get(&node) != Some(&advertise))
            && writing.as_ref().is_none_or(|h| h.is_finished())
        {
            let raft = raft.clone();
            let addr = advertise.clone();
            writing = Some(tokio::spawn(async move {
                let cmd = StateCommand::MonitorEndpoint {
                    node,
                    addr: addr.clone(),
                };
                match tokio::time::timeout(ENDPOINT_WRITE_TIMEOUT, raft.write(cmd)).await {
                    Ok(Ok(r)) => match r.into_result() {
                        Ok(_) => info!(node, endpoint = %addr, "recorded this leader's client endpoint"),
                        Err(why) => error!(node, endpoint = %addr, "the client endpoint was refused: {why}"),
                    },
                    Ok(Err(e)) => debug!(error = %e, "client endpoint not recorded (leadership lost?)"),
                    Err(_) => warn!(
                        "the client endpoint was not recorded within {ENDPOINT_WRITE_TIMEOUT:?} (no quorum?); retrying"
                    ),
                }
            }));
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(LEADERSHIP_SWEEP) => {}
            _ = stop.changed() => break,
        }
    }
    if let Some(h) = writing {
        h.abort();
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: AdminContext,
    admission: AdmissionCheck,
    st: Arc<TlsState>,
    link: LinkSettings,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.changed() => break,
        };
        let ctx = ctx.clone();
        let st = st.clone();
        let admission = admission.clone();
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
            let conn_id = conn.stable_id();
            if let Ok(info) = tls::peer_cert_info(&conn) {
                st.in_use(&info);
                st.live().insert(conn_id, (conn.clone(), info));
            }
            match tls::negotiated_alpn(&conn).as_deref() {
                Some(wire::ALPN_AGENT) => {
                    agent_link::serve(
                        conn,
                        peer,
                        ctx.engine.clone(),
                        ctx.sessions.clone(),
                        link,
                        ctx.raft.state(),
                        admission,
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
            st.live().remove(&conn_id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::RaftTuning;

    fn not_deposed() -> watch::Receiver<leader_lease::LeaseView> {
        watch::channel(leader_lease::LeaseView::default()).1
    }

    #[test]
    fn a_deposed_leader_takes_no_agents() {
        assert!(takes_agents(true, false));
        assert!(!takes_agents(true, true));
        assert!(!takes_agents(false, false));
    }

    #[tokio::test]
    async fn admission_of_one_node_and_not_yet_joined_monitors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raft = Arc::new(
            RaftNode::open(
                dir.path(),
                1,
                "127.0.0.1:7440".into(),
                RaftTuning::default(),
            )
            .await
            .expect("open"),
        );
        // Not a member of anything yet: a monitor started with `[raft] listen` (`--join`)
        // sends agents away; one without it (a one-node cluster starting) takes them, as
        // before.
        assert_eq!(
            admission_check(raft.clone(), true, not_deposed())(),
            Admission::Redirect { leader: None }
        );
        assert_eq!(
            admission_check(raft.clone(), false, not_deposed())(),
            Admission::Accept
        );
        raft.initialize_single_if_new().await.expect("init");
        raft.wait_for_leader(Duration::from_secs(5))
            .await
            .expect("a leader");
        // A one-node cluster takes agents, with or without `[raft] listen`.
        assert_eq!(
            admission_check(raft.clone(), true, not_deposed())(),
            Admission::Accept
        );
        assert_eq!(
            admission_check(raft.clone(), false, not_deposed())(),
            Admission::Accept
        );
        // It has no peers: nothing names it anywhere.
        assert_eq!(leader_endpoint(&raft), None);
        raft.shutdown().await;
    }
}
