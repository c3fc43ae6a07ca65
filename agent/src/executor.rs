//! Carries out the monitor's orders on this host, guarded by activation generations.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{info, warn};
use vigil_common::domain::DomainState;
use vigil_common::generation_guard::{admit_order, start_verdict, LocalCopy, StartVerdict};
use vigil_common::wire::{AgentCommand, CommandOutcome};

use crate::generations::Generations;
use crate::libvirt::Hypervisor;

/// Shared by the session (commands) and the host watcher (stale checks).
#[derive(Clone)]
pub struct Executor {
    pub hv: Option<Hypervisor>,
    pub gens: Arc<Mutex<Generations>>,
    /// Set while this host fences itself: every start is refused, also one already queued
    /// on the libvirt worker (checked there right before `virDomainCreate`).
    fencing: Arc<AtomicBool>,
}

/// HA domains as a fresh listing from libvirt shows them (see [`Executor::ha_listing`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaListing {
    /// Running, paused, crashed with qemu kept, or in any other state but shut off.
    pub running: Vec<String>,
    /// Shut off, or not defined on this host at all.
    pub off: Vec<String>,
}

fn failed(reason: String) -> CommandOutcome {
    warn!("{reason}");
    CommandOutcome::Failed { reason }
}

impl Executor {
    pub fn new(hv: Option<Hypervisor>, gens: Generations) -> Self {
        Executor {
            hv,
            gens: Arc::new(Mutex::new(gens)),
            fencing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A fencing episode begins: from now on every start is refused, including those queued
    /// or waiting on the libvirt worker.
    pub fn begin_fencing(&self) {
        self.fencing.store(true, Ordering::SeqCst);
    }

    /// The fencing episode is over (the monitors granted a lease again): starts are allowed.
    pub fn end_fencing(&self) {
        self.fencing.store(false, Ordering::SeqCst);
    }

    /// Whether a fencing episode is under way.
    pub fn is_fencing(&self) -> bool {
        self.fencing.load(Ordering::SeqCst)
    }

    /// A fresh listing from libvirt, through the worker (so it runs after every call queued
    /// before it, starts included), never from a cache: the HA domains (marked in their XML,
    /// in the monitor's table, or in `named`) that run, and those that do not. Each uuid in
    /// `named` is HA even if this agent never heard so; one not defined here is not
    /// running. `Err` when libvirt did not answer (no backend, a timeout, a lost
    /// connection): nothing is known then.
    pub async fn ha_listing(&self, named: &BTreeSet<String>) -> Result<HaListing, String> {
        let Some(hv) = &self.hv else {
            return Err("this agent has no hypervisor backend: it cannot list its domains".into());
        };
        let domains = hv.list().await.map_err(|e| e.to_string())?;
        let gens = self.gens();
        let mut listing = HaListing::default();
        let mut seen = BTreeSet::new();
        for d in domains {
            let uuid = d.uuid.to_ascii_lowercase();
            if !(d.meta.ha == Some(true) || gens.is_ha(&uuid) || named.contains(&uuid)) {
                continue;
            }
            seen.insert(uuid.clone());
            if d.state == DomainState::Shutoff {
                listing.off.push(uuid);
            } else {
                listing.running.push(uuid);
            }
        }
        listing
            .off
            .extend(named.iter().filter(|u| !seen.contains(*u)).cloned());
        Ok(listing)
    }

    fn gens(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.gens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a generation table from the monitor.
    pub fn merge_generations(&self, entries: &[(String, u64)], full: bool) {
        if let Err(e) = self.gens().merge(entries, full) {
            warn!(error = %e, "cannot record generations");
        }
    }

    /// Whether the monitor's generation table marks `uuid` as an HA VM.
    pub fn is_ha(&self, uuid: &str) -> bool {
        self.gens().is_ha(uuid)
    }

    /// Runs one command.
    pub async fn execute(&self, command: AgentCommand) -> CommandOutcome {
        match command {
            AgentCommand::Ping { nonce } => CommandOutcome::Pong { nonce },
            AgentCommand::StartDomain {
                uuid,
                generation,
                definition,
            } => self.start(&uuid, generation, definition).await,
            AgentCommand::DestroyDomain { uuid } => {
                let Some(hv) = &self.hv else {
                    return failed("this agent has no hypervisor backend".into());
                };
                match hv.destroy(&uuid).await {
                    Ok(()) => {
                        info!(%uuid, "destroyed on the monitor's order");
                        CommandOutcome::Done {
                            detail: format!("{uuid} destroyed"),
                        }
                    }
                    Err(e) => failed(e.to_string()),
                }
            }
            AgentCommand::ProbeHost {
                host,
                addr,
                timeout_ms,
            } => probe_host(&host, addr, timeout_ms).await,
        }
    }

    async fn start(
        &self,
        uuid: &str,
        generation: u64,
        definition: Option<String>,
    ) -> CommandOutcome {
        let Some(hv) = &self.hv else {
            return failed("this agent has no hypervisor backend".into());
        };
        // 1. No start while fencing; never go back in time (`admit_order`, shared with the
        // simulator); remember the new generation before acting on it.
        {
            let mut gens = self.gens();
            if let Err(refusal) = admit_order(self.is_fencing(), gens.newest(uuid), generation) {
                return failed(refusal.reason(uuid, generation));
            }
            if let Err(e) = gens.raise(uuid, generation) {
                return failed(format!(
                    "cannot record generation {generation} of {uuid}: {e}"
                ));
            }
        }
        // 2. Define it here if this host does not have it.
        let current = match hv.get(uuid).await {
            Ok(c) => c,
            Err(e) => return failed(e.to_string()),
        };
        let current = match current {
            Some(d) => d,
            None => {
                let Some(xml) = definition else {
                    return failed(format!(
                        "{uuid} is not defined on this host and the order carries no definition"
                    ));
                };
                // Defence in depth (issue 10 item 2): the monitors store only definitions
                // the domain policy accepts, but this host is the one that would run what
                // the XML says (a definition stored before the policy, a monitor gone bad).
                if let Err(e) = vigil_common::domain_policy::check(
                    &xml,
                    &vigil_common::domain_policy::DomainPolicy::default(),
                ) {
                    return failed(format!(
                        "refusing to define {uuid} from the order's definition: {e} (docs/domain-policy.md)"
                    ));
                }
                match hv.define(xml).await {
                    Ok(defined) if defined.eq_ignore_ascii_case(uuid) => {}
                    Ok(other) => {
                        return failed(format!(
                            "the definition sent for {uuid} defines {other} instead"
                        ))
                    }
                    Err(e) => return failed(e.to_string()),
                }
                match hv.get(uuid).await {
                    Ok(Some(d)) => d,
                    Ok(None) => return failed(format!("{uuid} vanished right after define")),
                    Err(e) => return failed(e.to_string()),
                }
            }
        };
        // 3. Already running: fine if it is this very activation, never a second copy. A
        // generation activates at most once: if it already ran here and stopped, this is a
        // late duplicate of an old order (the monitor needs a new generation to start it).
        // (`start_verdict`, shared with the simulator.)
        let here = if matches!(current.state, DomainState::Running | DomainState::Paused) {
            LocalCopy::Running {
                generation: current.meta.generation,
            }
        } else {
            LocalCopy::NotRunning
        };
        {
            let mut gens = self.gens();
            match start_verdict(here, gens.started(uuid), generation) {
                StartVerdict::Start => {}
                StartVerdict::AlreadyRunning => {
                    return CommandOutcome::Done {
                        detail: format!("{uuid} already running with generation {generation}"),
                    }
                }
                StartVerdict::Refused(refusal) => return failed(refusal.reason(uuid, generation)),
            }
            // Recorded before libvirt is asked: a start it refuses has used up its generation.
            if let Err(e) = gens.mark_started(uuid, generation) {
                return failed(format!(
                    "cannot record the start of generation {generation} of {uuid}: {e}"
                ));
            }
        }
        // 4. Stamp the generation into the domain, then start it.
        if let Err(e) = hv.set_generation(uuid, generation).await {
            return failed(e.to_string());
        }
        match hv.start_unless(uuid, self.fencing.clone()).await {
            Ok(()) => {
                info!(%uuid, generation, "started on the monitor's order");
                CommandOutcome::Done {
                    detail: format!("{uuid} started with generation {generation}"),
                }
            }
            Err(e) => failed(e.to_string()),
        }
    }
}

/// Whether `host`'s kernel answers at `addr`: a TCP handshake or a refusal (RST) both prove
/// it alive; silence or "unreachable" until the timeout does not.
pub async fn probe_host(host: &str, addr: std::net::SocketAddr, timeout_ms: u64) -> CommandOutcome {
    let timeout = std::time::Duration::from_millis(timeout_ms.clamp(10, 10_000));
    let detail = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => "reachable: connection accepted".to_string(),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "reachable: connection refused by its kernel".to_string()
        }
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => format!("unreachable: no answer within {} ms", timeout.as_millis()),
    };
    info!(%host, %addr, %detail, "peer probe");
    CommandOutcome::Done { detail }
}
