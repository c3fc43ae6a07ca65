//! The engine's edge: one tokio task owns the pure [`Engine`], feeds it inputs from agent
//! sessions, timer ticks and Raft leadership changes, and hands its proposals to a proposer
//! task that writes them through Raft in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use vigil_common::config::MonitorConfig;

use crate::agent_link::Sessions;
use crate::engine::FailoverConfig;
use crate::engine::{Action, CommandAnswer, Engine, Input, StorageCycle};
use crate::fencing::{self, FenceAction, FenceFailure};
use crate::raft::leader_lease::LeaseView;
use crate::raft::{RaftNode, WriteError};
use crate::state::{StateCommand, StateResponse};
use crate::storage::{PoolReport, StorageWorker};

/// How long an agent may take to carry out a command (a domain start under TCG can take
/// seconds on a loaded host).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Most commands the proposer puts into one Raft entry.
pub const MAX_BATCH: usize = 512;

/// A read of the engine's soft state, answered on the engine task.
pub type Query = Box<dyn FnOnce(&Engine, u64) + Send>;

enum Msg {
    Input(Box<Input>),
    Query(Query),
}

/// Cheap handle to the engine task.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
}

impl EngineHandle {
    /// Delivers an input; waits if the engine is busy (back-pressure on agent sessions).
    pub async fn input(&self, input: Input) {
        let _ = self.tx.send(Msg::Input(Box::new(input))).await;
    }

    /// Runs `f` against the engine's current soft state and returns its result.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine, u64) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let q: Query = Box::new(move |e, now| {
            let _ = tx.send(f(e, now));
        });
        self.tx.send(Msg::Query(q)).await.ok()?;
        rx.await.ok()
    }
}

/// Monotonic milliseconds since `epoch`.
pub fn mono_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// TCP port peers knock on when probing a silent host (ssh: open or refused, either way the
/// host's kernel answers).
pub const PROBE_PORT: u16 = 22;

/// Starts the engine and proposer tasks, and the storage worker. The engine leads while
/// `lease` says this monitor holds its leader lease (`raft::leader_lease`), not merely while
/// Raft says it leads, and pauses through a short lapse of it ([`follow_lease`]); `lease`
/// counts in the same `epoch`.
pub fn spawn(
    raft: Arc<RaftNode>,
    sessions: Arc<Sessions>,
    monitor: &MonitorConfig,
    epoch: Instant,
    mut lease: watch::Receiver<LeaseView>,
    mut stop: watch::Receiver<bool>,
) -> EngineHandle {
    let (tx, mut rx) = mpsc::channel::<Msg>(65_536);
    let handle = EngineHandle { tx: tx.clone() };
    let (ptx, prx) = mpsc::unbounded_channel::<StateCommand>();
    tokio::spawn(proposer(raft.clone(), prx, handle.clone()));

    // The heartbeat interval cannot change on a running cluster (`settings::FIXED_KEYS`):
    // the file's is the cluster's, or the monitor said so at start-up.
    let tick_every =
        Duration::from_millis((monitor.detector.heartbeat_interval_ms / 5).clamp(10, 100));
    // The file's cluster-wide sections until the cluster has settings of its own; from
    // then on the committed ones (`engine::settings`), also for the fence agents below.
    // Nothing leaves the engine but proposals once the leader lease has run out (checked at
    // every use, from Input::LeaderLease): a deposed leader that has not noticed yet must not
    // extend leases the new leader counts as expired, fence, or write the leader record.
    let mut engine = Engine::new(
        monitor.detector.clone(),
        monitor.recovery.clone(),
        mono_ms(epoch),
    )
    .with_failover(FailoverConfig {
        probe_port: PROBE_PORT,
        ..FailoverConfig::default()
    })
    .with_settings(monitor.cluster_settings(), monitor.storage.interval_ms)
    .with_leader_lease();
    let file_fencing = monitor.fencing.clone();
    // The leader's I/O on shared storage runs on its own threads; its reports come back here.
    let (storage_tx, mut storage_rx) = mpsc::unbounded_channel::<PoolReport>();
    let storage = StorageWorker::spawn(&monitor.storage, storage_tx);
    let self_handle = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut follower = LeaseFollower::default();
        let mut batch = Vec::with_capacity(256);
        let node = raft.node_id();
        loop {
            let inputs: Vec<Input> = tokio::select! {
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 { break; }
                    let mut inputs = Vec::with_capacity(n);
                    for m in batch.drain(..) {
                        match m {
                            Msg::Input(i) => inputs.push(*i),
                            Msg::Query(q) => q(&engine, mono_ms(epoch)),
                        }
                    }
                    inputs
                }
                _ = tick.tick() => vec![Input::Tick],
                Some(report) = storage_rx.recv() => vec![Input::Storage {
                    pool: report.pool,
                    result: report.result.map(|c| StorageCycle {
                        leader_written: c.leader_written.is_some(),
                        condemned: c.condemned,
                        heartbeats: c.heartbeats,
                        acks: c.acks,
                    }),
                }],
                changed = lease.changed() => {
                    if changed.is_err() { break; }
                    let view = *lease.borrow_and_update();
                    let now = mono_ms(epoch);
                    let (change, inputs) = follow_lease(view, &mut follower, node, now);
                    match change {
                        LeaseChange::Became { term } => {
                            info!(term, "this monitor is the leader (it holds the leader lease)");
                            storage.set_leader(Some((term, node)));
                        }
                        LeaseChange::Paused { term } => {
                            storage.set_leader(None);
                            warn!(term, "the leader lease ran out (no quorum answered a probe in time): acting on nothing outside Raft until it is back");
                        }
                        LeaseChange::Resumed { term, paused_ms } => {
                            storage.set_leader(Some((term, node)));
                            info!(term, paused_ms, "the leader lease is back in the same term (no other leader can have acted meanwhile): carrying on as leader");
                        }
                        LeaseChange::Lost => {
                            storage.set_leader(None);
                            info!("this monitor no longer leads (leadership lost, or the leader lease stayed out)");
                        }
                        LeaseChange::Same => {}
                    }
                    inputs
                }
                _ = stop.changed() => break,
            };
            for input in inputs {
                let now = mono_ms(epoch);
                let wall = vigil_common::unix_ms();
                let actions = raft.read(|state| engine.handle(input, now, wall, state));
                for action in actions {
                    match action {
                        Action::Propose(cmd) => {
                            let _ = ptx.send(cmd);
                        }
                        Action::Send { host, command } => {
                            let sessions = sessions.clone();
                            let back = self_handle.clone();
                            tokio::spawn(async move {
                                let answer = sessions
                                    .command_observed(&host, command.clone(), COMMAND_TIMEOUT)
                                    .await;
                                let seq = answer.as_ref().ok().map(|(_, s)| *s);
                                let result = answer.map(|(outcome, _)| outcome);
                                debug!(%host, ?command, ?result, ?seq, "command done");
                                back.input(Input::CommandDone(CommandAnswer {
                                    host,
                                    command,
                                    result,
                                    seq,
                                }))
                                .await;
                            });
                        }
                        Action::Fence { host } => {
                            let back = self_handle.clone();
                            // The committed settings' entry for the host (the file's
                            // before the cluster has settings).
                            let (entry, timeout_ms) = raft.read(|s| {
                                let fencing = s
                                    .settings
                                    .as_ref()
                                    .map_or(&file_fencing, |r| &r.settings.fencing);
                                (fencing.host(&host).cloned(), fencing.timeout_ms)
                            });
                            let fence_timeout = Duration::from_millis(timeout_ms);
                            tokio::spawn(async move {
                                let result = match entry.as_ref() {
                                    None => Err(FenceFailure::NotConfigured { host: host.clone() }),
                                    Some(cfg) => {
                                        warn!(%host, agent = %cfg.agent, "fencing: powering the host off");
                                        match fencing::fence(cfg, FenceAction::Off, fence_timeout)
                                            .await
                                        {
                                            Ok(o) => Ok(format!(
                                                "{} confirmed power off (exit 0) in {} ms",
                                                cfg.agent,
                                                o.took.as_millis()
                                            )),
                                            Err(e) => Err(FenceFailure::Agent(Arc::new(e))),
                                        }
                                    }
                                };
                                info!(%host, ?result, "fencing done");
                                back.input(Input::FenceDone { host, result }).await;
                            });
                        }
                        Action::Notify {
                            host: Some(h),
                            message,
                        } => {
                            sessions.notify(&h, message);
                        }
                        Action::Notify {
                            host: None,
                            message,
                        } => {
                            sessions.broadcast(&message);
                        }
                        Action::RequestFence(req) => {
                            warn!(host = %req.host, id = req.id, "writing a fence request into the host's storage slot");
                            storage.request_fence(req);
                        }
                        Action::ClearFence { host } => storage.clear_fence(&host),
                        Action::LeaderRecord { condemned, hold } => {
                            storage.publish_record(condemned, hold)
                        }
                    }
                }
            }
        }
        storage.stop();
        debug!("engine task stopped");
    });
    handle
}

/// Says, when this monitor starts and whenever the cluster's settings change, where this
/// monitor's own file differs from them (issue 12 item 9): the file's cluster-wide sections
/// are only the seed of a new cluster, and an operator who edits them on one monitor must
/// learn that they are not used.
pub async fn warn_of_settings_drift(
    raft: Arc<RaftNode>,
    file: vigil_common::settings::ClusterSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = 0;
    loop {
        // The whole record only when its revision moved (this runs every 2 s).
        let record = raft.read(|s| s.settings.as_ref().filter(|r| r.revision != seen).cloned());
        if let Some(r) = record {
            seen = r.revision;
            let differs = vigil_common::settings::diff(&r.settings, &file);
            if differs.is_empty() {
                info!(
                    revision = r.revision,
                    "this monitor's file agrees with the cluster settings"
                );
            } else {
                let keys: Vec<String> = differs
                    .iter()
                    .map(|c| {
                        format!(
                            "{} (cluster {}, file {})",
                            c.key,
                            c.from.as_deref().unwrap_or("not set"),
                            c.to.as_deref().unwrap_or("not set")
                        )
                    })
                    .collect();
                warn!(
                    revision = r.revision,
                    "this monitor's file differs from the cluster settings in {}: the cluster's values are used (`vigilctl config show`); align the file, or change the cluster with `vigilctl config set`",
                    keys.join(", ")
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// What a change of the leader lease means for the engine task (see [`follow_lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// This monitor now leads in `term`: the engine is told it became leader, and the storage
    /// worker writes the leader record for `(term, node)`.
    Became { term: u64 },
    /// Its lease ran out, but Raft still says it leads in `term` and it is not deposed yet
    /// (`LeaseClock::deposed`): the engine is told only that the lease is out (it holds back
    /// whatever needs the lease), the storage worker stops writing the record.
    Paused { term: u64 },
    /// The lease is back in the term it paused in, after `paused_ms`: a quorum answered in
    /// that term, so no monitor was elected in a later one meanwhile (the two majorities
    /// would share a voter, and a voter never goes back to an older term). The engine goes
    /// on where it was; the storage worker writes the record again.
    Resumed { term: u64, paused_ms: u64 },
    /// It no longer leads (Raft leadership lost, or the lease stayed out until this monitor
    /// counts as deposed): the engine is told, the storage worker stops writing the record.
    Lost,
    /// Nothing but the lease's end moved (or nothing at all).
    Same,
}

/// What the engine task remembers of the lease between two [`LeaseView`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseFollower {
    /// The term the engine was last told it leads in.
    term: Option<u64>,
    /// Since when (monotonic ms) the lease has been out while the engine leads, if it is.
    paused_since_ms: Option<u64>,
}

/// How the engine task follows the leader lease: on each [`LeaseView`] the lease task
/// publishes (`raft::leader_lease`), the inputs for the engine (always the lease's end
/// first, then `BecameLeader` or `LostLeadership` when leadership changed) and what changed.
///
/// Defect A (issue 12): a lease that ran out under load and came back in the same term made
/// the engine start over as if elected (a second "became leader" event, every host suspect,
/// VM states unknown, agents sent away). A lapse is now a pause: while Raft still says this
/// monitor leads in the same term and it is not deposed, the engine keeps leading with no
/// lease (nothing that needs one leaves it) and goes on when the lease is back. Pure, so
/// that the simulator drives its monitors' engines with this very function.
pub fn follow_lease(
    view: LeaseView,
    follower: &mut LeaseFollower,
    node: u64,
    now_ms: u64,
) -> (LeaseChange, Vec<Input>) {
    let until = Input::LeaderLease {
        until_ms: view.serving.map(|s| s.until_ms),
    };
    match (view.serving, follower.term) {
        (Some(s), Some(t)) if t == s.term => match follower.paused_since_ms.take() {
            Some(since) => (
                LeaseChange::Resumed {
                    term: t,
                    paused_ms: now_ms.saturating_sub(since),
                },
                vec![until],
            ),
            None => (LeaseChange::Same, vec![until]),
        },
        (Some(s), _) => {
            *follower = LeaseFollower {
                term: Some(s.term),
                paused_since_ms: None,
            };
            (
                LeaseChange::Became { term: s.term },
                vec![until, Input::BecameLeader { term: s.term, node }],
            )
        }
        (None, Some(t)) if view.raft_term == Some(t) && !view.deposed => {
            if follower.paused_since_ms.is_some() {
                (LeaseChange::Same, vec![until])
            } else {
                follower.paused_since_ms = Some(now_ms);
                (LeaseChange::Paused { term: t }, vec![until])
            }
        }
        (None, Some(_)) => {
            *follower = LeaseFollower::default();
            (LeaseChange::Lost, vec![until, Input::LostLeadership])
        }
        (None, None) => (LeaseChange::Same, vec![until]),
    }
}

/// Writes proposals through Raft in the order the engine made them. Whatever queued up while
/// the previous write was in flight goes into one `Batch` entry, so a burst (ten thousand
/// agents registering) costs a few Raft entries, not ten thousand. After each write the
/// engine is told, so work that depends on the committed result happens at once.
async fn proposer(
    raft: Arc<RaftNode>,
    mut rx: mpsc::UnboundedReceiver<StateCommand>,
    engine: EngineHandle,
) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let cmd = if buf.len() == 1 {
            buf.pop()
                .unwrap_or(StateCommand::Batch { commands: vec![] })
        } else {
            StateCommand::Batch {
                commands: std::mem::take(&mut buf),
            }
        };
        buf.clear();
        match raft.write(cmd).await {
            Ok(resp) => {
                log_rejections(&resp);
                engine.input(Input::Applied).await;
            }
            // A proposal made as leader that fails because leadership moved is dropped: the
            // new leader's engine re-derives what matters from committed state.
            Err(WriteError::NotLeader(nl)) => debug!(%nl, "proposal dropped"),
            Err(e) => warn!(error = %e, "proposal failed"),
        }
    }
}

fn log_rejections(resp: &StateResponse) {
    match resp {
        StateResponse::Batch { results } => results.iter().for_each(log_rejections),
        StateResponse::Stale { reason } => debug!(%reason, "stale proposal ignored"),
        StateResponse::Invalid { reason } => warn!(%reason, "proposal rejected"),
        StateResponse::UnknownHost { host } => warn!(%host, "proposal for an unknown host"),
        StateResponse::UnknownVm { vm } => warn!(%vm, "proposal for an unknown VM"),
        StateResponse::Ok | StateResponse::Unchanged => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::leader_lease::Serving;

    fn leading(term: u64, until_ms: u64) -> LeaseView {
        LeaseView {
            serving: Some(Serving { term, until_ms }),
            raft_term: Some(term),
            deposed: false,
        }
    }

    fn lapsed(term: u64, deposed: bool) -> LeaseView {
        LeaseView {
            serving: None,
            raft_term: Some(term),
            deposed,
        }
    }

    fn told_leadership(inputs: &[Input]) -> bool {
        inputs
            .iter()
            .any(|i| matches!(i, Input::BecameLeader { .. } | Input::LostLeadership))
    }

    /// Defect A (issue 12): a lease that ran out under load and came back in the same term,
    /// with no election anywhere, restarted the engine (a second "became leader" event,
    /// every host suspect, VM states unknown, agents sent away). Now it is a pause.
    #[test]
    fn a_lease_that_lapses_and_returns_in_the_same_term_pauses_the_engine() {
        let mut f = LeaseFollower::default();
        let (change, inputs) = follow_lease(leading(2, 400), &mut f, 1, 0);
        assert_eq!(change, LeaseChange::Became { term: 2 });
        assert!(told_leadership(&inputs));
        let (change, inputs) = follow_lease(lapsed(2, false), &mut f, 1, 400);
        assert_eq!(change, LeaseChange::Paused { term: 2 });
        assert_eq!(inputs, vec![Input::LeaderLease { until_ms: None }]);
        // Still out, still the same term: nothing new.
        let (change, _) = follow_lease(lapsed(2, false), &mut f, 1, 450);
        assert_eq!(change, LeaseChange::Same);
        let (change, inputs) = follow_lease(leading(2, 900), &mut f, 1, 520);
        assert_eq!(
            change,
            LeaseChange::Resumed {
                term: 2,
                paused_ms: 120
            }
        );
        assert_eq!(
            inputs,
            vec![Input::LeaderLease {
                until_ms: Some(900)
            }],
            "no second BecameLeader"
        );
        // Extended as usual afterwards.
        let (change, _) = follow_lease(leading(2, 1_000), &mut f, 1, 600);
        assert_eq!(change, LeaseChange::Same);
    }

    #[test]
    fn a_lapse_that_lasts_until_deposed_or_loses_raft_leadership_is_a_loss() {
        // Out until the lease clock counts this monitor deposed.
        let mut f = LeaseFollower::default();
        follow_lease(leading(2, 400), &mut f, 1, 0);
        follow_lease(lapsed(2, false), &mut f, 1, 400);
        let (change, inputs) = follow_lease(lapsed(2, true), &mut f, 1, 950);
        assert_eq!(change, LeaseChange::Lost);
        assert!(inputs.contains(&Input::LostLeadership));
        // Back later (in the same term): an election for the engine, from scratch.
        let (change, inputs) = follow_lease(leading(2, 2_000), &mut f, 1, 1_600);
        assert_eq!(change, LeaseChange::Became { term: 2 });
        assert!(told_leadership(&inputs));
        // Raft leadership lost during a pause: lost at once.
        follow_lease(lapsed(2, false), &mut f, 1, 2_000);
        let none = LeaseView::default();
        let (change, _) = follow_lease(none, &mut f, 1, 2_010);
        assert_eq!(change, LeaseChange::Lost);
        // A lease back in another term is a new leadership, never a resumption.
        let mut f = LeaseFollower::default();
        follow_lease(leading(2, 400), &mut f, 1, 0);
        follow_lease(lapsed(2, false), &mut f, 1, 400);
        let (change, inputs) = follow_lease(leading(3, 900), &mut f, 1, 500);
        assert_eq!(change, LeaseChange::Became { term: 3 });
        assert!(told_leadership(&inputs));
    }
}
