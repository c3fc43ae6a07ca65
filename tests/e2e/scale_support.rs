#![allow(dead_code)]
//! Many HA VMs in a real monitor (issue 10 item 7), shared by `tests/scale.rs` and
//! `benches/generation_table.rs` (included with `#[path]`, next to the harness).
//!
//! The VMs get in the way they do in production: *seeder* agents, each with its own agent
//! certificate and its own QUIC connection with mutual TLS, run the real agent session code
//! and report an inventory of running domains marked HA in their metadata; the monitor's
//! engine turns them into `VmSeen` commands through Raft. Nothing is written into the state
//! behind the state machine's back. One seeder carries an in-memory generation table, so
//! the test can tell when every VM is registered (the monitor announced them all).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vigil_agent::executor::Executor;
use vigil_agent::generations::Generations;
use vigil_agent::session::{Session, SessionIo};
use vigil_common::domain::{DomainInfo, DomainState, HypervisorHealth, StateReason, VigilMeta};
use vigil_common::tls::CaSigner;
use vigil_common::wire::{Hello, HostFacts};

/// The uuid of seeder `host`'s VM `i` (a valid, unique, sortable uuid).
pub fn vm_uuid(host: usize, i: usize) -> String {
    format!("00000000-0000-4000-8000-{host:04}{i:08}")
}

fn domain(host: usize, i: usize) -> DomainInfo {
    DomainInfo {
        uuid: vm_uuid(host, i),
        name: format!("vm-{host:04}-{i:06}"),
        state: DomainState::Running,
        reason: StateReason::Booted,
        vcpus: 1,
        memory_kib: 1 << 20,
        disks: vec![],
        pools: None,
        meta: VigilMeta {
            ha: Some(true),
            priority: None,
            generation: Some(1),
        },
        persistent: true,
    }
}

/// Seeder agents holding `hosts × per_host` running HA VMs in one monitor.
pub struct Seeders {
    pub rt: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    endpoints: Vec<quinn::Endpoint>,
    /// The generation table of seeder 0 (updated by the monitor's announcements).
    probe: Arc<Mutex<Generations>>,
    pub total: usize,
    /// How long registering them all took.
    pub took: Duration,
}

impl Seeders {
    /// Connects the seeders one after the other, each once the monitor registered the VMs
    /// of the ones before (a burst of all inventories at once would measure the engine's
    /// backlog, not the table); returns once every VM is registered and announced.
    pub fn start(
        ca_dir: &Path,
        monitor: SocketAddr,
        hosts: usize,
        per_host: usize,
        timeout: Duration,
    ) -> Seeders {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let probe_exec = Executor::new(None, Generations::in_memory());
        let probe = probe_exec.gens.clone();
        let endpoints: Vec<quinn::Endpoint> = rt.block_on(async {
            (0..4)
                .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep"))
                .collect()
        });
        let ca = CaSigner::load(ca_dir).expect("ca");
        let mut seeders = Seeders {
            rt,
            stop,
            endpoints,
            probe,
            total: hosts * per_host,
            took: Duration::ZERO,
        };
        let t0 = Instant::now();
        for h in 0..hosts {
            let name = format!("seed{h:04}");
            let cfg =
                crate::harness::agent_client_config(&ca, &name, Some(Duration::from_millis(500)));
            let ep = seeders.endpoints[h % seeders.endpoints.len()].clone();
            let stop = stop_rx.clone();
            let exec = (h == 0).then(|| probe_exec.clone());
            seeders.rt.spawn(async move {
                // Room for a thousand VMs.
                let facts = HostFacts {
                    cpus: 256,
                    memory_total_bytes: 4 << 40,
                    memory_available_bytes: 2 << 40,
                    ..crate::harness::sim_facts(&name)
                };
                let domains: Vec<DomainInfo> = (0..per_host).map(|i| domain(h, i)).collect();
                let (_inv_tx, inv_rx) =
                    tokio::sync::watch::channel(Some((domains, HypervisorHealth::Healthy, 1u64)));
                // Like the agent: reconnect until told to stop.
                while !*stop.borrow() {
                    let hello = Hello {
                        host: name.clone(),
                        agent_version: "seeder".into(),
                        zone: "z".into(),
                        cluster: "c".into(),
                        facts: facts.clone(),
                        instance: 1,
                        pools: vec![],
                    };
                    match Session::open(&ep, cfg.clone(), monitor, hello).await {
                        Ok(session) => {
                            let f = facts.clone();
                            let mut f = move || f.clone();
                            let io = SessionIo {
                                latest: Some(inv_rx.clone()),
                                executor: exec.clone(),
                                ..SessionIo::default()
                            };
                            if let Err(e) = session.run_with(&mut f, io, stop.clone()).await {
                                eprintln!("seeder {name}: {e}");
                            }
                        }
                        Err(e) => eprintln!("seeder {name}: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            let want = (h + 1) * per_host;
            loop {
                let n = seeders.announced();
                if n >= want {
                    break;
                }
                assert!(
                    t0.elapsed() < timeout,
                    "only {n} of {want} HA VMs registered within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            if (h + 1) % 10 == 0 {
                eprintln!(
                    "  {want} HA VMs registered after {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        seeders.took = t0.elapsed();
        seeders
    }

    /// HA VMs the monitor has announced to seeder 0.
    pub fn announced(&self) -> usize {
        self.probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ha_vms()
            .count()
    }
}

impl Drop for Seeders {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        for ep in &self.endpoints {
            ep.close(0u32.into(), b"seeders done");
        }
    }
}

/// HA VMs in an agent's persisted table (`state_dir/generations.json`), if readable.
pub fn persisted_ha(state_dir: &Path) -> Option<usize> {
    let bytes = std::fs::read(state_dir.join("generations.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("ha")?.as_array().map(|a| a.len())
}

/// When the agent last renewed its persisted lease (`state_dir/lease.json` is rewritten
/// at most once a second while grants arrive).
pub fn lease_written(state_dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(state_dir.join("lease.json"))
        .ok()?
        .modified()
        .ok()
}
