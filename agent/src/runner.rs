//! Keeps the agent connected: tries every configured monitor in turn, backs off between
//! rounds, and never gives up (a monitor outage must not stop the agent, and never touches
//! guests).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{error, info, warn};
use vigil_common::config::{AgentConfig, StorageConfig};
use vigil_common::tls::{self, Role, TlsPaths, TransportTuning};
use vigil_common::wire::{self, Hello};

use crate::executor::Executor;
use crate::facts::FactsCollector;
use crate::fencing::Fencing;
use crate::follow;
use crate::generations::Generations;
use crate::lease::Lease;
use crate::libvirt::Hypervisor;
use crate::session::{Session, SessionError, SessionIo};
use crate::storage::StorageWorker;
use crate::watchdog::Watchdog;
use crate::{isolation, watch};

/// The host name this agent speaks for: the common name of its certificate. A configured
/// `host` that differs is an error: the monitor would refuse every hello anyway.
pub fn resolve_identity(cfg: &AgentConfig, config_path: &Path) -> anyhow::Result<String> {
    let cert = std::fs::read(&cfg.tls.cert)
        .with_context(|| format!("reading tls.cert {}", cfg.tls.cert.display()))?;
    let der = first_der(&cert).with_context(|| format!("tls.cert {}", cfg.tls.cert.display()))?;
    let id = tls::identity_from_der(&der)
        .with_context(|| format!("tls.cert {}", cfg.tls.cert.display()))?;
    if id.role != Role::Agent {
        anyhow::bail!(
            "tls.cert {} is a {} certificate; the agent needs one issued with --role agent",
            cfg.tls.cert.display(),
            id.role
        );
    }
    if let Some(h) = &cfg.host {
        if *h != id.name {
            anyhow::bail!(
                "{}: field `host` is {h:?} but the certificate {} is for {:?}",
                config_path.display(),
                cfg.tls.cert.display(),
                id.name
            );
        }
    }
    Ok(id.name)
}

fn first_der(pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    use vigil_common::pem::{CertificateDer, PemObject};
    let der = CertificateDer::from_pem_slice(pem)
        .map_err(|e| anyhow::anyhow!("no PEM certificate: {e}"))?;
    Ok(der.to_vec())
}

/// Everything the agent needs to connect.
pub struct AgentRunner {
    pub host: String,
    pub zone: String,
    pub cluster: String,
    pub monitors: Vec<SocketAddr>,
    pub reconnect: Duration,
    /// Replaced on SIGHUP ([`TlsReloader`]); each connection attempt takes the current one.
    client: std::sync::Arc<std::sync::RwLock<quinn::ClientConfig>>,
    endpoint: quinn::Endpoint,
    executor: Executor,
    poll: Duration,
    lease: Lease,
    storage_cfg: StorageConfig,
    watchdog: bool,
    watchdog_cfg: vigil_common::config::WatchdogConfig,
    instance: u64,
    started: Instant,
    fencing: Fencing,
}

/// Swaps the agent's client certificate (issue 10 item 5): the next connection uses the new
/// one, the current session continues.
#[derive(Clone)]
pub struct TlsReloader {
    host: String,
    client: std::sync::Arc<std::sync::RwLock<quinn::ClientConfig>>,
}

impl TlsReloader {
    /// Loads `paths`; refuses a certificate for another host or role (the current one stays).
    pub fn reload(&self, paths: &TlsPaths) -> anyhow::Result<String> {
        let info = tls::cert_info_file(&paths.cert)?;
        if info.role != Role::Agent || info.name != self.host {
            anyhow::bail!(
                "tls.cert {} is the {} certificate of {:?}; this agent is host {:?} and needs its agent certificate",
                paths.cert.display(),
                info.role,
                info.name,
                self.host
            );
        }
        let cfg = client_config(paths)?;
        *self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cfg;
        warn_if_expiring(paths);
        Ok(format!(
            "loaded certificate serial {} for the next connection (the current session continues)",
            info.serial
        ))
    }
}

/// Logs a warning when the agent's own certificate expires within 30 days.
fn warn_if_expiring(paths: &TlsPaths) {
    if let Ok(info) = tls::cert_info_file(&paths.cert) {
        let now = (vigil_common::unix_ms() / 1000) as i64;
        let days = (info.not_after - now).div_euclid(86_400);
        if days < 30 {
            warn!(serial = %info.serial, "this agent's certificate {} expires in {days} days: renew it (`vigilctl cert renew`) and send the agent SIGHUP", paths.cert.display());
        }
    }
}

impl AgentRunner {
    /// A handle that swaps the client certificate for the next connection.
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader {
            host: self.host.clone(),
            client: self.client.clone(),
        }
    }

    fn current_client(&self) -> quinn::ClientConfig {
        self.client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn new(cfg: &AgentConfig, host: String) -> anyhow::Result<Self> {
        let client = std::sync::Arc::new(std::sync::RwLock::new(client_config(&cfg.tls)?));
        warn_if_expiring(&cfg.tls);
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .context("opening the agent's UDP socket")?;
        let gens = Generations::load(&cfg.state_dir)
            .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
        let hv = cfg.libvirt_enabled.then(|| {
            let hv = Hypervisor::open(
                &cfg.libvirt_uri,
                Duration::from_millis(cfg.libvirt_deadline_ms),
            );
            hv.set_pools(
                cfg.storage
                    .pools
                    .iter()
                    .map(|p| (p.name.clone(), p.path.clone()))
                    .collect(),
            );
            hv
        });
        Ok(AgentRunner {
            host,
            zone: cfg.zone.clone(),
            cluster: cfg.cluster.clone(),
            monitors: cfg.monitors.clone(),
            reconnect: Duration::from_millis(cfg.reconnect_ms),
            client,
            endpoint,
            executor: Executor::new(hv, gens),
            poll: Duration::from_millis(cfg.poll_interval_ms),
            lease: Lease::load(&cfg.state_dir, Instant::now()),
            fencing: Fencing::load(&cfg.state_dir),
            storage_cfg: cfg.storage.clone(),
            watchdog: cfg.systemd_watchdog,
            watchdog_cfg: cfg.watchdog.clone(),
            instance: rand::random::<u64>().max(1),
            started: Instant::now(),
        })
    }

    /// Runs until `stop` becomes true.
    pub async fn run(self, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut facts = FactsCollector::new();
        let (reports_tx, mut reports) = tokio::sync::mpsc::channel(1024);
        let latest = watch::spawn(self.executor.clone(), self.poll, reports_tx.clone());
        let storage =
            StorageWorker::spawn(&self.storage_cfg, &self.host, self.instance, self.started);
        let host_watchdog = Watchdog::spawn(&self.watchdog_cfg);
        let guard = isolation::spawn(
            isolation::Guard {
                lease: self.lease.clone(),
                storage: storage.clone(),
                exec: self.executor.clone(),
                host: self.host.clone(),
                instance: self.instance,
                reports: reports_tx,
                watchdog: self.watchdog,
                host_watchdog: host_watchdog.clone(),
                storage_interval: Duration::from_millis(self.storage_cfg.interval_ms),
                started: self.started,
                fencing: self.fencing.clone(),
            },
            stop.clone(),
        );
        // Always, whatever `systemd_watchdog` says: the unit is `Type=notify`, and an agent
        // that never said READY=1 would be killed by systemd at TimeoutStartSec and
        // restarted, forever. (Without NOTIFY_SOCKET this does nothing.)
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let mut dial = follow::Dialer::new(self.monitors.len(), self.reconnect);
        loop {
            if *stop.borrow() {
                break;
            }
            let addr = self.monitors[dial.current()];
            let hello = Hello {
                host: self.host.clone(),
                agent_version: vigil_common::VERSION.to_string(),
                zone: self.zone.clone(),
                cluster: self.cluster.clone(),
                facts: facts.collect(),
                instance: self.instance,
                pools: self
                    .storage_cfg
                    .pools
                    .iter()
                    .map(|p| p.name.clone())
                    .collect(),
            };
            // A shutdown must not wait for a connection attempt to time out.
            let mut stop_open = stop.clone();
            let opened = tokio::select! {
                r = Session::open(&self.endpoint, self.current_client(), addr, hello) => r,
                _ = stop_open.changed() => break,
            };
            // After a redirect or a lost session many agents move at once: the dialer pauses
            // a little (randomly), and backs off after a whole round without a welcome.
            let pause = match opened {
                Ok(session) => {
                    dial.welcomed();
                    let io = SessionIo {
                        reports: Some(&mut reports),
                        latest: Some(latest.clone()),
                        executor: Some(self.executor.clone()),
                        lease: Some(self.lease.clone()),
                        storage: Some(storage.clone()),
                        host_watchdog: Some(host_watchdog.clone()),
                        started: self.started,
                        fencing: Some(self.fencing.clone()),
                    };
                    match session.run(&mut facts, io, stop.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            warn!(%addr, error = %e, "lost the monitor");
                            dial.lost(&e)
                        }
                    }
                }
                Err(SessionError::NotLeader { leader, .. }) => {
                    let pause = dial.redirected(&self.monitors, leader.as_deref());
                    info!(%addr, ?leader, next = %self.monitors[dial.current()], "monitor is not the leader; trying the next");
                    pause
                }
                Err(e) => {
                    if let Some(why) = e.unmanaged_reason() {
                        // Loud on this side too: the host is alive but unprotected.
                        error!(%addr, error = %e, "a monitor answered but cannot manage this agent: {why}; the guests keep running, unprotected, until this is fixed");
                        self.lease.note_unmanaged(Instant::now(), why);
                    } else if e.is_permanent() {
                        error!(%addr, error = %e, "monitor refused this agent");
                    } else {
                        warn!(%addr, error = %e, "cannot reach monitor");
                    }
                    dial.failed()
                }
            };
            if !pause.is_zero() {
                let mut stop2 = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop2.changed() => {}
                }
            }
        }
        storage.stop();
        // The newest renewal on disk, so a restarted agent keeps it (bounded: a hung state
        // disk must not hold the shutdown).
        let lease = self.lease.clone();
        let flushed = tokio::task::spawn_blocking(move || lease.flush(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        if !flushed {
            warn!("the newest lease renewal may not be on disk: a restarted agent may start with an older lease (safe, it only ends sooner)");
        }
        guard.abort();
        // The host watchdog stays armed while HA domains run here: they must stay guarded
        // while no agent watches them (a restarted agent feeds it again within its timeout; a
        // stopped one lets it reset the host, which is what makes lease expiry a proof). With
        // no HA domain running (a fresh listing, taken after the session ended and with starts
        // refused, so no order can come and a start still queued on the libvirt worker cannot
        // slip in after it), nothing needs guarding: disarm, so that `systemctl stop`, a package
        // removal or a host shutdown after its guests stopped does not reset the host. Drain
        // the host first (`vigilctl host maintenance on`) to stop an agent for longer.
        if host_watchdog.armed_ms().is_some() {
            self.executor.begin_fencing();
            let listing = tokio::time::timeout(
                Duration::from_secs(3),
                self.executor.ha_listing(&std::collections::BTreeSet::new()),
            )
            .await;
            match listing {
                Ok(Ok(l)) if l.running.is_empty() => {
                    host_watchdog.disarm();
                    let until = Instant::now() + Duration::from_secs(2);
                    while host_watchdog.armed_ms().is_some() && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if host_watchdog.armed_ms().is_some() {
                        warn!("could not disarm the host watchdog in time: unless an agent runs again within its timeout, the host resets");
                    }
                }
                Ok(Ok(l)) => warn!(running = ?l.running, "agent stopping with HA domains running and the host watchdog armed: unless an agent runs again within its timeout, the host resets"),
                Ok(Err(e)) => warn!(error = %e, "agent stopping with the host watchdog armed and no listing of its domains: unless an agent runs again within its timeout, the host resets"),
                Err(_) => warn!("agent stopping with the host watchdog armed and libvirt not answering: unless an agent runs again within its timeout, the host resets"),
            }
        }
        host_watchdog.stop();
        self.endpoint
            .close(wire::close::NORMAL.into(), b"agent shutting down");
        info!("agent stopped");
        Ok(())
    }
}

/// The agent's QUIC client configuration from its TLS files.
pub fn client_config(paths: &TlsPaths) -> anyhow::Result<quinn::ClientConfig> {
    let material = paths.load()?;
    Ok(tls::client_config(
        material,
        wire::ALPN_AGENT,
        TransportTuning::default(),
    )?)
}
