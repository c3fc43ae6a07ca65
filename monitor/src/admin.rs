//! The admin API: `vigilctl` requests over QUIC with mutual TLS (ALPN `vigil-admin/1`).
//!
//! Why QUIC and not HTTPS: it reuses the one authenticated transport, port and CA that agents
//! already use, so there is nothing else to configure or secure. Answers are JSON documents
//! (see [`crate::api`]) so scripts get stable shapes with `vigilctl --json`.
//! Reads are served by any monitor (from its applied state); writes go through Raft and are
//! refused by followers with the leader's address, which `vigilctl` follows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::Serialize;
use tracing::{debug, warn};
use vigil_common::codec;
use vigil_common::tls::{PeerIdentity, Role};
use vigil_common::wire::{
    close, AdminRequest, AdminResponse, AgentCommand, CommandOutcome, Preamble,
};

use crate::agent_link::Sessions;
use std::collections::BTreeMap;

use vigil_common::domain::{DomainInfo, DomainState};

use crate::api::{
    EventsView, HostView, OperatorView, PingView, PlanView, ServerChangeView, ServerView,
    ServersView, StatusView, VmView, WriteView,
};
use crate::detector::Liveness;
use crate::engine::Input;
use crate::raft::{MembershipChange, MembershipError, NotLeader, RaftNode, ReadError, WriteError};
use crate::service::EngineHandle;
use crate::state::{StateCommand, StateResponse, VmRecord};

/// Everything the admin API reads from.
#[derive(Clone)]
pub struct AdminContext {
    pub raft: Arc<RaftNode>,
    pub engine: EngineHandle,
    pub sessions: Arc<Sessions>,
    /// Certificates near or past expiry (for `status`).
    pub certs: Arc<crate::certs::CertWatch>,
    /// `[vip]` and whether this monitor holds it (`None` without `[vip]`).
    pub vip: Option<crate::vip::Status>,
    /// The Raft endpoint (`server reset` talks to the monitor being reset), when `[raft]
    /// listen` is set.
    pub raft_endpoint: Option<crate::raft::quic::RaftEndpoint>,
    /// The cluster-wide sections of this monitor's file, and its `storage.interval_ms`
    /// (`config show` compares them with the cluster's; `config set` checks the lease
    /// against the interval).
    pub file_settings: Arc<vigil_common::settings::ClusterSettings>,
    pub storage_interval_ms: u64,
}

/// Serves one admin connection: any number of requests on one control stream.
pub async fn serve(conn: quinn::Connection, peer: PeerIdentity, ctx: AdminContext) {
    // Issue 10 item 4: admin (reads and writes) and viewer (reads) only; a monitor's or an
    // agent's certificate is no operator's.
    if !matches!(peer.role, Role::Admin | Role::Viewer) {
        let msg = format!(
            "certificate {:?} has role {}: the admin API needs an admin certificate (reads and writes) or a viewer certificate (reads only)",
            peer.name, peer.role
        );
        warn!(remote = %conn.remote_address(), "{msg}");
        conn.close(close::UNAUTHORIZED.into(), msg.as_bytes());
        return;
    }
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(Duration::from_secs(5), conn.accept_bi()).await
    else {
        conn.close(close::PROTOCOL_ERROR.into(), b"no control stream");
        return;
    };
    let mut pre = [0u8; Preamble::LEN];
    if recv.read_exact(&mut pre).await.is_err() {
        return;
    }
    let _ = send.write_all(&Preamble::current().to_bytes()).await;
    if let Err(e) = Preamble::check(pre, "monitor", "vigilctl") {
        conn.close(close::VERSION_MISMATCH.into(), e.to_string().as_bytes());
        return;
    }
    // The backup this connection took last (`vigilctl db backup` fetches it in pieces).
    let mut held: Option<HeldBackup> = None;
    loop {
        let req = match codec::read_frame::<_, AdminRequest>(&mut recv).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                let msg = format!("bad request: {e}");
                conn.close(close::PROTOCOL_ERROR.into(), msg.as_bytes());
                break;
            }
        };
        debug!(admin = %peer.name, ?req, "admin request");
        let resp = handle(&ctx, &peer, req, &mut held).await;
        if codec::write_frame(&mut send, &resp).await.is_err() {
            break;
        }
    }
}

fn json<T: Serialize>(v: &T) -> AdminResponse {
    match serde_json::to_string(v) {
        Ok(s) => AdminResponse::Json(s),
        Err(e) => AdminResponse::Error {
            message: format!("cannot encode answer: {e}"),
        },
    }
}

fn err(message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error {
        message: message.into(),
    }
}

/// What a request changes, for the audit entry (`vigilctl`'s words), and the host it is
/// about; `None` for a read. Exhaustive on purpose: a new request must be classified here.
pub fn write_summary(req: &AdminRequest) -> Option<(String, Option<String>)> {
    Some(match req {
        AdminRequest::Status
        | AdminRequest::Plan { .. }
        | AdminRequest::HostList
        | AdminRequest::HostShow { .. }
        | AdminRequest::Events { .. }
        | AdminRequest::VmList
        | AdminRequest::VmShow { .. }
        | AdminRequest::HostPing { .. }
        | AdminRequest::VmListPage { .. }
        | AdminRequest::EventsPage { .. }
        | AdminRequest::HostListPage { .. }
        | AdminRequest::ServerList
        | AdminRequest::ConfigShow
        // A piece of this connection's backup (taken, and audited, by `DbBackup`).
        | AdminRequest::DbBackupChunk { .. } => return None,
        // Not a write, but the whole state (definitions too): admins only, and audited.
        AdminRequest::DbBackup => ("db backup".to_string(), None),
        AdminRequest::ServerAdd { id, addr, .. } => (format!("server add {id} {addr}"), None),
        AdminRequest::ServerDel { id } => (format!("server del {id}"), None),
        AdminRequest::ConfigSet { key, value } => (
            match value {
                Some(v) => format!("config set {key} {}", shown_value(key, v)),
                None => format!("config unset {key}"),
            },
            None,
        ),
        AdminRequest::ServerReset { id, .. } => (format!("server reset {id}"), None),
        AdminRequest::HostTagAdd { host, tag } => {
            (format!("host tag add {host} {tag}"), Some(host.clone()))
        }
        AdminRequest::HostTagRemove { host, tag } => {
            (format!("host tag rm {host} {tag}"), Some(host.clone()))
        }
        AdminRequest::VmHa {
            vm,
            enable,
            priority,
        } => (
            format!(
                "vm ha {} {vm}{}",
                if *enable { "enable" } else { "disable" },
                priority
                    .map(|p| format!(" --priority {p}"))
                    .unwrap_or_default()
            ),
            None,
        ),
        AdminRequest::VmStop { vm } => (format!("vm stop {vm}"), None),
        AdminRequest::HostMaintenance { host, on } => (
            format!("host maintenance {} {host}", if *on { "on" } else { "off" }),
            Some(host.clone()),
        ),
        AdminRequest::VmAntiAffinity { vm, group } => (
            format!(
                "vm anti-affinity {vm} {}",
                group.as_deref().unwrap_or("--none")
            ),
            None,
        ),
        AdminRequest::HostFence { host, force } => (
            format!("host fence {host}{}", if *force { " --force" } else { "" }),
            Some(host.clone()),
        ),
        AdminRequest::HostConfirmOff { host } => {
            (format!("host confirm-off {host}"), Some(host.clone()))
        }
        AdminRequest::HostPlace {
            host,
            zone,
            cluster,
        } => (
            format!("host place {host} --zone {zone} --cluster {cluster}"),
            Some(host.clone()),
        ),
        AdminRequest::FencingRelease { cluster } => (
            format!(
                "fencing release{}",
                cluster
                    .as_ref()
                    .map(|c| format!(" --cluster {c}"))
                    .unwrap_or_default()
            ),
            None,
        ),
    })
}

/// A backup file taken on one admin connection, served in pieces
/// ([`AdminRequest::DbBackupChunk`]) until the connection ends or takes another.
pub struct HeldBackup {
    id: u64,
    bytes: Vec<u8>,
}

/// Answers one request from `peer` (whose certificate's name is recorded as who did it).
/// Writes need an admin certificate; each write, done, failed or refused, leaves an audit
/// entry in the event log (issue 10 items 4 and 6). `held` is the connection's backup.
pub async fn handle(
    ctx: &AdminContext,
    peer: &PeerIdentity,
    req: AdminRequest,
    held: &mut Option<HeldBackup>,
) -> AdminResponse {
    if let AdminRequest::DbBackupChunk { id, offset } = req {
        if peer.role != Role::Admin {
            return err(format!(
                "`db backup` needs an admin certificate; certificate {:?} has role {}",
                peer.name, peer.role
            ));
        }
        return backup_chunk(held.as_ref(), id, offset);
    }
    let Some((request, host)) = write_summary(&req) else {
        if needs_the_leaders_view(&req) && ctx.raft.has_peers() && !ctx.raft.is_leader() {
            // Liveness, sessions and conditions are the leader's to know: a follower's own
            // view says `unknown` for every host. Sent to the leader when one is known; without one (an election, a lost quorum) the
            // follower answers with what it has rather than nothing.
            let redirect = not_leader(ctx);
            if matches!(&redirect, AdminResponse::NotLeader { leader: Some(_) }) {
                return redirect;
            }
        }
        return answer(ctx, peer, req).await;
    };
    if peer.role != Role::Admin {
        let message = format!(
            "`{request}` needs an admin certificate; certificate {:?} has role {} (read-only)",
            peer.name, peer.role
        );
        warn!(admin = %peer.name, role = %peer.role, "refused: {message}");
        audit(
            ctx,
            peer,
            request,
            host,
            "refused: needs an admin certificate".into(),
        )
        .await;
        return err(message);
    }
    let resp = match req {
        AdminRequest::DbBackup => take_backup(ctx, held).await,
        req => answer(ctx, peer, req).await,
    };
    let result = match &resp {
        // Another monitor does it (and records it) once vigilctl follows the redirect.
        AdminResponse::NotLeader { .. } => return resp,
        AdminResponse::BackupChunk { total, .. } => format!("ok, {total} bytes"),
        AdminResponse::Json(s) => serde_json::from_str::<serde_json::Value>(s)
            .ok()
            .and_then(|v| v.get("result").and_then(|r| r.as_str()).map(String::from))
            .unwrap_or_else(|| "ok".into()),
        AdminResponse::Error { message } => format!("error: {message}"),
    };
    audit(ctx, peer, request, host, result).await;
    resp
}

/// Reads whose answer is the leader's live view of every host (liveness, sessions,
/// conditions) or its placement: a follower sends them to the leader ([`handle`]). VM
/// records and events are committed state, the same on every monitor; `status`,
/// `server list` and `host show` stay with the monitor asked, so that one monitor can be
/// inspected on its own (`status` names the node that answered and the leader).
fn needs_the_leaders_view(req: &AdminRequest) -> bool {
    matches!(
        req,
        AdminRequest::HostList | AdminRequest::HostListPage { .. } | AdminRequest::Plan { .. }
    )
}

/// How long an admin answer waits for its audit entry to commit.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who: the certificate's role and name, as in `admin:alice`.
pub fn actor(peer: &PeerIdentity) -> String {
    format!("{}:{}", peer.role, peer.name)
}

/// Records one admin write (after its outcome is known) in the replicated event log. Only
/// the leader can: a follower's refusal of a viewer's write is logged here only.
async fn audit(
    ctx: &AdminContext,
    peer: &PeerIdentity,
    request: String,
    host: Option<String>,
    result: String,
) {
    let by = actor(peer);
    let refused = result.starts_with("refused");
    let cmd = StateCommand::RecordEvent {
        at_ms: vigil_common::unix_ms(),
        severity: if refused {
            crate::state::Severity::Warning
        } else {
            crate::state::Severity::Info
        },
        host,
        message: format!("{by}: {request} ({result})"),
        kind: crate::state::EventKind::AdminAction {
            by: by.clone(),
            request,
            result,
        },
    };
    // Bounded: the answer waits for it, and without a quorum nothing commits.
    match tokio::time::timeout(AUDIT_TIMEOUT, ctx.raft.write(cmd)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(%by, error = %e, "could not record the admin action in the event log")
        }
        Err(_) => warn!(
            %by,
            "the admin action was not recorded in the event log within {AUDIT_TIMEOUT:?} (no quorum?)"
        ),
    }
}

async fn answer(ctx: &AdminContext, peer: &PeerIdentity, req: AdminRequest) -> AdminResponse {
    match req {
        AdminRequest::HostFence { host, force } => operator_fence(ctx, peer, host, force).await,
        AdminRequest::HostConfirmOff { host } => confirm_off(ctx, peer, host).await,
        AdminRequest::FencingRelease { cluster } => release_hold(ctx, peer, cluster).await,
        AdminRequest::HostPlace {
            host,
            zone,
            cluster,
        } => place_host(ctx, peer, host, zone, cluster).await,
        AdminRequest::Status => json(&status(ctx).await),
        AdminRequest::ConfigShow => json(&config_view(ctx)),
        AdminRequest::ConfigSet { key, value } => set_config(ctx, peer, key, value).await,
        AdminRequest::ServerList => {
            let m = ctx.raft.metrics();
            json(&ServersView {
                node: m.id,
                leader: m.current_leader,
                term: m.current_term,
                servers: servers(ctx),
            })
        }
        AdminRequest::ServerAdd { id, addr, wait_ms } => {
            if id == 0 {
                return err("a monitor's node id is at least 1");
            }
            if let Err(why) = vigil_common::config::check_host_port(&addr) {
                return err(format!("address {addr:?} {why}"));
            }
            let wait = Duration::from_millis(wait_ms.clamp(1_000, 600_000));
            if let Some(endpoint) = &ctx.raft_endpoint {
                if let Err(why) = ctx.raft.admit_new_monitor(endpoint, id, &addr, wait).await {
                    return err(why);
                }
            }
            membership_answer(ctx, ctx.raft.add_server(id, &addr, wait).await, || {
                format!("node {id} at {addr} is a voter")
            })
        }
        AdminRequest::ServerDel { id } => membership_answer(
            ctx,
            ctx.raft.remove_server(id, MEMBERSHIP_TIMEOUT).await,
            || format!("node {id} is no longer a member"),
        ),
        AdminRequest::ServerReset { id, addr, wait_ms } => {
            if let Some(Err(why)) = addr.as_deref().map(vigil_common::config::check_host_port) {
                return err(format!("address {addr:?} {why}"));
            }
            let Some(endpoint) = &ctx.raft_endpoint else {
                return err(
                    "this monitor has no `[raft] listen`: it is a one-node cluster, with no other \
                     monitor to bring back (restore a lost one-node cluster from a backup: \
                     `vigil-monitor --restore FILE`)",
                );
            };
            let wait = Duration::from_millis(wait_ms.clamp(1_000, 600_000));
            membership_answer(
                ctx,
                ctx.raft
                    .reset_server(endpoint, id, addr.as_deref(), wait)
                    .await,
                || format!("node {id} was reset: it caught up from the leader and is a voter"),
            )
        }
        AdminRequest::Plan { fail } => plan(ctx, fail).await,
        // Served by `handle`, which holds the connection's backup.
        AdminRequest::DbBackup | AdminRequest::DbBackupChunk { .. } => {
            err("internal error: a backup request reached the generic handler")
        }
        AdminRequest::HostList => json_bounded(&hosts(ctx, None).await, "host list"),
        AdminRequest::HostListPage { after, limit } => host_page(ctx, after, limit).await,
        AdminRequest::HostShow { host } => match hosts(ctx, Some(&host)).await.pop() {
            Some(h) => json(&h),
            None => err(format!("unknown host {host:?}")),
        },
        AdminRequest::HostTagAdd { host, tag } => {
            write(
                ctx,
                StateCommand::AddTag {
                    at_ms: vigil_common::unix_ms(),
                    host,
                    tag,
                },
            )
            .await
        }
        AdminRequest::HostTagRemove { host, tag } => {
            write(
                ctx,
                StateCommand::RemoveTag {
                    at_ms: vigil_common::unix_ms(),
                    host,
                    tag,
                },
            )
            .await
        }
        AdminRequest::Events { limit, host, vm } => {
            let limit = limit.clamp(1, 10_000) as usize;
            let events = ctx.raft.read(|s| {
                let mut v: Vec<_> = s
                    .events
                    .iter()
                    .rev()
                    .filter(|e| host.as_ref().is_none_or(|h| e.host.as_ref() == Some(h)))
                    .filter(|e| vm.as_ref().is_none_or(|v| e.vm.as_ref() == Some(v)))
                    .take(limit)
                    .cloned()
                    .collect();
                v.reverse();
                v
            });
            json_bounded(&EventsView { events }, "events")
        }
        AdminRequest::VmList => json_bounded(&vms(ctx).await, "vm list"),
        AdminRequest::VmListPage { after, limit } => vm_page(ctx, after, limit).await,
        AdminRequest::EventsPage {
            limit,
            host,
            vm,
            before,
        } => events_page(ctx, limit, host, vm, before),
        AdminRequest::VmShow { vm } => match resolve(ctx, &vm).await {
            Ok(v) => json(&v),
            Err(e) => err(e),
        },
        AdminRequest::VmHa {
            vm,
            enable,
            priority,
        } => {
            let v = match resolve(ctx, &vm).await {
                Ok(v) => v,
                Err(e) => return err(e),
            };
            let Some(host) = v.host.clone() else {
                return err(format!(
                    "VM {vm:?} is not reported by any agent; cannot tell its host"
                ));
            };
            write(
                ctx,
                StateCommand::SetHa {
                    at_ms: vigil_common::unix_ms(),
                    uuid: v.uuid,
                    name: v.name,
                    host,
                    ha: enable,
                    priority,
                },
            )
            .await
        }
        AdminRequest::HostMaintenance { host, on } => {
            write(
                ctx,
                StateCommand::SetMaintenance {
                    at_ms: vigil_common::unix_ms(),
                    host,
                    on,
                },
            )
            .await
        }
        AdminRequest::VmAntiAffinity { vm, group } => {
            let v = match resolve(ctx, &vm).await {
                Ok(v) => v,
                Err(e) => return err(e),
            };
            write(
                ctx,
                StateCommand::SetAntiAffinity {
                    at_ms: vigil_common::unix_ms(),
                    uuid: v.uuid,
                    group,
                },
            )
            .await
        }
        AdminRequest::VmStop { vm } => {
            // A write, and the destroy goes through the agent's session: the leader's.
            if ctx.raft.has_peers() && !ctx.raft.is_leader() {
                return not_leader(ctx);
            }
            let v = match resolve(ctx, &vm).await {
                Ok(v) => v,
                Err(e) => return err(e),
            };
            if v.ha {
                // Commit "stopped on purpose" first, so the destroy is never mistaken for a
                // failure to recover from.
                let resp = write(
                    ctx,
                    StateCommand::OperatorStop {
                        at_ms: vigil_common::unix_ms(),
                        uuid: v.uuid.clone(),
                    },
                )
                .await;
                if !matches!(resp, AdminResponse::Json(_)) {
                    return resp;
                }
            }
            let Some(host) = v.host.clone() else {
                return err(format!("VM {vm:?} is not reported by any agent"));
            };
            match ctx
                .sessions
                .command(
                    &host,
                    AgentCommand::DestroyDomain {
                        uuid: v.uuid.clone(),
                    },
                    Duration::from_secs(30),
                )
                .await
            {
                Ok(CommandOutcome::Done { .. }) => json(&WriteView {
                    result: "ok".into(),
                }),
                Ok(CommandOutcome::Failed { reason }) => err(format!(
                    "the agent of {host} could not destroy {}: {reason}",
                    v.name
                )),
                Ok(other) => err(format!("unexpected answer from {host}: {other:?}")),
                Err(e) => err(e.to_string()),
            }
        }
        AdminRequest::HostPing { host } => {
            // Agents are the leader's (issue 12 item 3): a follower sends the ping there.
            if ctx.raft.has_peers()
                && !ctx.raft.is_leader()
                && !ctx.sessions.connected_hosts().contains(&host)
            {
                return not_leader(ctx);
            }
            let nonce = vigil_common::unix_ms();
            let started = Instant::now();
            match ctx
                .sessions
                .command(&host, AgentCommand::Ping { nonce }, Duration::from_secs(5))
                .await
            {
                Ok(CommandOutcome::Pong { nonce: n }) if n == nonce => json(&PingView {
                    host,
                    rtt_us: started.elapsed().as_micros() as u64,
                }),
                Ok(other) => err(format!("unexpected answer from {host}: {other:?}")),
                Err(e) => err(e.to_string()),
            }
        }
    }
}

/// `vigilctl db backup`: a backup file of the state as a linearizable read on the leader
/// sees it (a follower redirects), kept for this connection; answers its first piece.
async fn take_backup(ctx: &AdminContext, held: &mut Option<HeldBackup>) -> AdminResponse {
    let (last_applied, state) = match ctx.raft.linearizable_snapshot().await {
        Ok(read) => read,
        Err(ReadError::NotLeader(nl)) => return not_leader_answer(ctx, nl),
        Err(e) => return err(format!("cannot take a consistent backup: {e}")),
    };
    let header = crate::backup::header_for(
        &state,
        last_applied,
        ctx.raft.node_id(),
        ctx.raft.addr(),
        ctx.raft.voter_ids(),
        ctx.raft.member_addrs(),
        vigil_common::unix_ms(),
    );
    // Serializing a large state takes a while: off the runtime's workers.
    let encoded = tokio::task::spawn_blocking(move || crate::backup::encode(&header, &state)).await;
    let bytes = match encoded {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return err(format!("cannot write the backup: {e}")),
        Err(e) => return err(format!("cannot write the backup: {e}")),
    };
    let id = held.as_ref().map_or(1, |h| h.id + 1);
    tracing::info!(bytes = bytes.len(), ?last_applied, "backup taken");
    let backup = held.insert(HeldBackup { id, bytes });
    backup_chunk(Some(backup), id, 0)
}

/// The piece of the connection's backup `id` from `offset`.
fn backup_chunk(held: Option<&HeldBackup>, id: u64, offset: u64) -> AdminResponse {
    let Some(b) = held.filter(|b| b.id == id) else {
        return err(format!(
            "no backup {id} on this connection (it was taken on another connection, or replaced); run `vigilctl db backup` again"
        ));
    };
    let total = b.bytes.len() as u64;
    let Some(rest) = usize::try_from(offset)
        .ok()
        .and_then(|at| b.bytes.get(at..))
    else {
        return err(format!(
            "offset {offset} is past the end of backup {id} ({total} bytes)"
        ));
    };
    let n = rest.len().min(vigil_common::wire::BACKUP_CHUNK_BYTES);
    AdminResponse::BackupChunk {
        id,
        total,
        offset,
        data: rest[..n].to_vec(),
    }
}

/// The answer of a monitor that is not the leader to a request only the leader can serve.
fn not_leader(ctx: &AdminContext) -> AdminResponse {
    let m = ctx.raft.metrics();
    let leader = m.current_leader.and_then(|id| {
        m.membership_config
            .membership()
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, node)| node.addr.clone())
    });
    not_leader_answer(
        ctx,
        NotLeader {
            leader_id: m.current_leader,
            leader_addr: leader,
        },
    )
}

/// A one-node cluster's membership holds the monitor's admin address, which `vigilctl`
/// follows. With several monitors the membership holds Raft addresses, which `vigilctl`
/// cannot use: the answer names the leader's client endpoint from the replicated state
/// (each leader records it, issue 12 item 3), or none while it is not known (an election
/// under way, or a leader that has not recorded it yet): `vigilctl` then tries its next
/// monitor.
fn not_leader_answer(ctx: &AdminContext, nl: NotLeader) -> AdminResponse {
    if !ctx.raft.has_peers() {
        return AdminResponse::NotLeader {
            leader: nl.leader_addr,
        };
    }
    let leader = nl
        .leader_id
        .and_then(|id| ctx.raft.read(|s| s.monitors.get(&id).cloned()));
    AdminResponse::NotLeader { leader }
}

/// How long `server del` waits for the membership change to commit.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(20);

fn membership_answer(
    ctx: &AdminContext,
    res: Result<MembershipChange, MembershipError>,
    done: impl FnOnce() -> String,
) -> AdminResponse {
    match res {
        Ok(MembershipChange::Done) => json(&ServerChangeView {
            result: "ok".into(),
            message: done(),
        }),
        Ok(MembershipChange::Unchanged) => json(&ServerChangeView {
            result: "unchanged".into(),
            message: done(),
        }),
        Err(MembershipError::NotLeader(nl)) => not_leader_answer(ctx, nl),
        Err(e) => err(e.to_string()),
    }
}

fn operator_view(result: &str, message: String, peer: &PeerIdentity) -> AdminResponse {
    json(&OperatorView {
        result: result.into(),
        message,
        by: peer.name.clone(),
    })
}

/// `vigilctl host fence H [--force]`: the leader's engine runs H's fence agent now; its
/// verdict lands in the event log (and H's phase) like any power fence.
async fn operator_fence(
    ctx: &AdminContext,
    peer: &PeerIdentity,
    host: String,
    force: bool,
) -> AdminResponse {
    let phase = ctx
        .raft
        .read(|s| s.hosts.get(&host).map(|h| h.phase.clone()));
    let Some(phase) = phase else {
        return err(format!("unknown host {host:?}"));
    };
    if let crate::state::HostPhase::Fenced { proof, .. } = phase {
        return operator_view(
            "unchanged",
            format!("{host} is already fenced ({proof})"),
            peer,
        );
    }
    let h = host.clone();
    let Some((leader, refusal)) = ctx
        .engine
        .query(move |e, now| (e.is_leader(), e.fence_refusal(&h, force, now)))
        .await
    else {
        return err("the monitor's engine is not running");
    };
    if !leader {
        return not_leader(ctx);
    }
    if let Some(why) = refusal {
        return err(why);
    }
    ctx.engine
        .input(Input::OperatorFence {
            host: host.clone(),
            by: peer.name.clone(),
        })
        .await;
    operator_view(
        "started",
        format!(
            "fencing {host}: its fence agent runs now; `vigilctl host show {host}` shows its phase, `vigilctl events --host {host}` the result"
        ),
        peer,
    )
}

/// The value of a `config set` as the audit entry shows it: the fence entries may hold
/// passwords, so only their size.
fn shown_value(key: &str, value: &str) -> String {
    if key.starts_with("fencing.hosts") {
        format!("({} bytes)", value.len())
    } else {
        let v: String = value.chars().take(200).collect();
        format!("{v:?}")
    }
}

/// `vigilctl config show|get`: the committed settings (this monitor's file's before the
/// cluster has any) and how this monitor's file differs from them.
fn config_view(ctx: &AdminContext) -> crate::api::ConfigView {
    let record = ctx.raft.read(|s| s.settings.clone());
    let file = ctx.file_settings.as_ref();
    let (settings, revision, by, at_ms) = match &record {
        Some(r) => (&r.settings, r.revision, Some(r.by.clone()), Some(r.at_ms)),
        None => (file, 0, None, None),
    };
    crate::api::ConfigView {
        node: ctx.raft.node_id(),
        toml: settings.to_toml(),
        values: settings.flatten(),
        revision,
        by,
        at_ms,
        file_differs: vigil_common::settings::diff(settings, file),
    }
}

/// `vigilctl config set KEY VALUE` / `config unset KEY` (issue 12 item 9): the new settings
/// are made from the committed ones, checked (fields, the lease against this monitor's
/// storage interval, what a running cluster may change), and committed against the
/// revision they were made from; the state machine checks again and records one event per
/// changed key with who changed it.
async fn set_config(
    ctx: &AdminContext,
    peer: &PeerIdentity,
    key: String,
    value: Option<String>,
) -> AdminResponse {
    if ctx.raft.has_peers() && !ctx.raft.is_leader() {
        return not_leader(ctx);
    }
    let record = ctx.raft.read(|s| s.settings.clone());
    let change = crate::state::settings::proposed_change(
        record.as_ref(),
        &key,
        value.as_deref(),
        ctx.storage_interval_ms,
    );
    let (base_revision, next) = match change {
        Ok(Some(c)) => c,
        Ok(None) => {
            return json(&crate::api::ConfigChangeView {
                result: "unchanged".into(),
                revision: record.map_or(0, |r| r.revision),
                changes: Vec::new(),
            })
        }
        Err(e) => return err(e),
    };
    let changes = record
        .as_ref()
        .map(|r| vigil_common::settings::diff(&r.settings, &next))
        .unwrap_or_default();
    let written = write(
        ctx,
        StateCommand::SetSettings {
            at_ms: vigil_common::unix_ms(),
            by: actor(peer),
            base_revision,
            settings: next,
        },
    )
    .await;
    if !matches!(written, AdminResponse::Json(_)) {
        return written;
    }
    let revision = ctx
        .raft
        .read(|s| s.settings.as_ref().map_or(0, |r| r.revision));
    json(&crate::api::ConfigChangeView {
        result: "ok".into(),
        revision,
        changes,
    })
}

/// `vigilctl host place H --zone Z --cluster C` (issue 10 item 3): a host's zone and
/// cluster are pinned when it first registers, and only an operator moves it. Answers the
/// host as `host show` does.
async fn place_host(
    ctx: &AdminContext,
    peer: &PeerIdentity,
    host: String,
    zone: String,
    cluster: String,
) -> AdminResponse {
    let written = write(
        ctx,
        StateCommand::SetHostPlacement {
            at_ms: vigil_common::unix_ms(),
            host: host.clone(),
            zone,
            cluster,
            by: peer.name.clone(),
        },
    )
    .await;
    if !matches!(written, AdminResponse::Json(_)) {
        return written;
    }
    match hosts(ctx, Some(&host)).await.pop() {
        Some(h) => json(&h),
        None => err(format!("unknown host {host:?}")),
    }
}

/// `vigilctl host confirm-off H`: the operator's word that H is powered off, replicated as a
/// proof with their name. Refused while this monitor hears H.
async fn confirm_off(ctx: &AdminContext, peer: &PeerIdentity, host: String) -> AdminResponse {
    let h = host.clone();
    let Some((leader, refusal)) = ctx
        .engine
        .query(move |e, now| (e.is_leader(), e.confirm_off_refusal(&h, now)))
        .await
    else {
        return err("the monitor's engine is not running");
    };
    if !leader {
        return not_leader(ctx);
    }
    if let Some(why) = refusal {
        return err(why);
    }
    let cmd = StateCommand::OperatorConfirmedOff {
        at_ms: vigil_common::unix_ms(),
        host: host.clone(),
        by: peer.name.clone(),
    };
    match ctx.raft.write(cmd).await {
        Ok(StateResponse::Ok) => operator_view(
            "ok",
            format!(
                "{host} is fenced on your word (recorded as confirmed off by {}); its HA VMs start elsewhere",
                peer.name
            ),
            peer,
        ),
        Ok(StateResponse::Unchanged) => {
            operator_view("unchanged", format!("{host} is already fenced"), peer)
        }
        Ok(StateResponse::UnknownHost { host }) => err(format!("unknown host {host:?}")),
        Ok(other) => err(format!("confirm-off of {host} rejected: {other:?}")),
        Err(WriteError::NotLeader(nl)) => not_leader_answer(ctx, nl),
        Err(e) => err(e.to_string()),
    }
}

/// `vigilctl fencing release [--cluster C]`: lifts the mass-failure hold; the hosts it held
/// are fenced automatically.
async fn release_hold(
    ctx: &AdminContext,
    peer: &PeerIdentity,
    cluster: Option<String>,
) -> AdminResponse {
    let Some((leader, held)) = ctx
        .engine
        .query(|e, _| (e.is_leader(), e.held_clusters()))
        .await
    else {
        return err("the monitor's engine is not running");
    };
    if !leader {
        return not_leader(ctx);
    }
    let released: Vec<String> = held
        .iter()
        .filter(|c| cluster.as_ref().is_none_or(|w| w == *c))
        .cloned()
        .collect();
    if released.is_empty() {
        return err(match (&cluster, held.is_empty()) {
            (_, true) => "no fencing hold is in place".to_string(),
            (Some(c), false) => format!("cluster {c} is not held (held: {})", held.join(", ")),
            (None, false) => "no fencing hold is in place".to_string(),
        });
    }
    ctx.engine
        .input(Input::ReleaseHold {
            cluster,
            by: peer.name.clone(),
        })
        .await;
    operator_view(
        "released",
        format!(
            "released the mass-failure hold of cluster {}: its down hosts are fenced automatically now (`vigilctl events` shows each)",
            released.join(", ")
        ),
        peer,
    )
}

async fn write(ctx: &AdminContext, cmd: StateCommand) -> AdminResponse {
    match ctx.raft.write(cmd).await {
        Ok(StateResponse::Ok) => json(&WriteView {
            result: "ok".into(),
        }),
        Ok(StateResponse::Unchanged) => json(&WriteView {
            result: "unchanged".into(),
        }),
        Ok(StateResponse::UnknownHost { host }) => err(format!("unknown host {host:?}")),
        Ok(StateResponse::UnknownVm { vm }) => err(format!("unknown VM {vm:?}")),
        Ok(StateResponse::Invalid { reason }) | Ok(StateResponse::Stale { reason }) => err(reason),
        Ok(StateResponse::Batch { .. }) => err("unexpected batch answer"),
        Err(WriteError::NotLeader(nl)) => not_leader_answer(ctx, nl),
        Err(e) => err(e.to_string()),
    }
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Every server of the membership, as this monitor sees it.
fn servers(ctx: &AdminContext) -> Vec<ServerView> {
    let m = ctx.raft.metrics();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let leader_last = m.last_log_index;
    let mut servers = Vec::new();
    for (id, node) in membership.nodes() {
        let (state, term, index, commit) = if *id == m.id {
            (
                state_name(m.state).to_string(),
                Some(m.current_term),
                m.last_log_index,
                m.last_applied.map(|l| l.index),
            )
        } else {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map(|l| l.index);
            let state = if m.current_leader == Some(*id) {
                "leader"
            } else if voters.contains(id) {
                "follower"
            } else {
                "learner"
            };
            (state.to_string(), None, matched, None)
        };
        // Only the leader knows how far each server got.
        let lag = match (&m.replication, leader_last) {
            (Some(_), _) if *id == m.id => Some(0),
            (Some(_), Some(last)) => Some(last.saturating_sub(index.unwrap_or(0))),
            _ => None,
        };
        servers.push(ServerView {
            id: *id,
            addr: node.addr.clone(),
            state,
            term,
            index,
            commit,
            voter: voters.contains(id),
            lag,
        });
    }
    servers
}

async fn status(ctx: &AdminContext) -> StatusView {
    let m = ctx.raft.metrics();
    let servers = servers(ctx);
    let hosts = hosts(ctx, None).await;
    let count = |l: Liveness| hosts.iter().filter(|h| h.liveness == l).count();
    let phases = ctx.raft.read(|s| {
        use crate::state::Phase;
        let ha = || s.vms.values().filter(|v| v.ha);
        (
            ha().filter(|v| matches!(v.phase, Phase::Backoff { .. }))
                .count(),
            ha().filter(|v| matches!(v.phase, Phase::Recovering { .. }))
                .count(),
            ha().filter(|v| matches!(v.phase, Phase::GaveUp { .. }))
                .count(),
        )
    });
    let capacity = ctx
        .engine
        .query(|e, _| e.capacity().to_vec())
        .await
        .unwrap_or_default();
    StatusView {
        capacity,
        node: m.id,
        leader: m.current_leader,
        term: m.current_term,
        servers,
        hosts_total: hosts.len(),
        hosts_up: count(Liveness::Up),
        hosts_suspect: count(Liveness::Suspect),
        hosts_down: count(Liveness::Down),
        hosts_unknown: count(Liveness::Unknown),
        agents_connected: ctx.sessions.connected_count(),
        heartbeats_total: ctx.sessions.heartbeats_total(),
        version: vigil_common::VERSION.to_string(),
        hosts_fencing: hosts
            .iter()
            .filter(|h| matches!(h.phase, crate::state::HostPhase::Fencing { .. }))
            .count(),
        hosts_fenced: hosts
            .iter()
            .filter(|h| matches!(h.phase, crate::state::HostPhase::Fenced { .. }))
            .count(),
        hosts_maintenance: hosts.iter().filter(|h| h.maintenance).count(),
        vms_waiting: phases.0,
        vms_recovering: phases.1,
        vms_gave_up: phases.2,
        certificates: ctx.certs.views(vigil_common::unix_ms() as i64 / 1000),
        vip: ctx.vip.as_ref().map(|v| crate::api::VipView {
            address: v.address.clone(),
            interface: v.interface.clone(),
            held: *v.holding.borrow(),
        }),
    }
}

/// `vigilctl plan --fail H[,H]`: the leader's engine runs the real placement on today's state
/// as if those hosts had just been fenced (see `engine::plan`).
async fn plan(ctx: &AdminContext, fail: Vec<String>) -> AdminResponse {
    if fail.is_empty() {
        return err("name at least one host to fail (vigilctl plan --fail H[,H])");
    }
    let state = ctx.raft.state();
    let failed = fail.clone();
    let Some((leader, planned)) = ctx
        .engine
        .query(move |e, _now| {
            let s = state.read().unwrap_or_else(|p| p.into_inner());
            (
                e.is_leader(),
                e.plan_failures(&failed, &s, vigil_common::unix_ms()),
            )
        })
        .await
    else {
        return err("the monitor's engine is not running");
    };
    if !leader {
        // A follower's soft state (liveness, capacity) is not the leader's.
        return not_leader(ctx);
    }
    match planned {
        Ok(vms) => json_bounded(&PlanView { failed: fail, vms }, "plan"),
        Err(e) => err(e.to_string()),
    }
}

async fn hosts(ctx: &AdminContext, only: Option<&str>) -> Vec<HostView> {
    let records: Vec<_> = ctx.raft.read(|s| {
        s.hosts
            .values()
            .filter(|h| only.is_none_or(|o| o == h.name))
            .cloned()
            .collect()
    });
    host_views(ctx, records).await
}

/// Up to `n` host records in name order after `after`, as views.
async fn hosts_after(ctx: &AdminContext, after: Option<&str>, n: usize) -> Vec<HostView> {
    use std::ops::Bound;
    let records: Vec<_> = ctx.raft.read(|s| {
        let from = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        s.hosts
            .range((from, Bound::Unbounded))
            .take(n)
            .map(|(_, h)| h.clone())
            .collect()
    });
    host_views(ctx, records).await
}

/// Host records joined with the engine's soft state (liveness, session, facts).
async fn host_views(ctx: &AdminContext, records: Vec<crate::state::HostRecord>) -> Vec<HostView> {
    let names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    let soft = ctx
        .engine
        .query(move |e, now| {
            names
                .iter()
                .map(|n| {
                    (
                        e.liveness(n, now),
                        e.is_connected(n),
                        e.facts(n).cloned(),
                        e.hypervisor_health(n).cloned(),
                        e.condition(n).cloned(),
                        e.pools_of(n),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (live, connected, facts, hypervisor, condition, pools) = soft
                .get(i)
                .cloned()
                .unwrap_or((None, false, None, None, None, Vec::new()));
            HostView {
                name: r.name,
                zone: r.zone,
                cluster: r.cluster,
                tags: r.tags,
                liveness: live.as_ref().map(|l| l.state).unwrap_or(Liveness::Unknown),
                last_heartbeat_ms_ago: live.and_then(|l| l.silent_ms),
                connected,
                agent_version: r.agent_version,
                registered_at_ms: r.registered_at_ms,
                facts,
                hypervisor,
                maintenance: r.maintenance,
                phase: r.phase,
                condition,
                pools,
            }
        })
        .collect()
}

// --- issue 10 item 7 (scale): paged answers ---

/// JSON bytes one page may carry: a frame less 64 KiB of headroom for the envelope.
const PAGE_BUDGET: usize = codec::MAX_FRAME_LEN - 64 * 1024;

/// Most items one page holds, whatever the client asks.
const MAX_PAGE_ITEMS: usize = 10_000;

/// Like [`json`], but an answer that would not fit in a frame becomes an error that says
/// so (the unpaged requests of older `vigilctl`s), instead of a connection that just ends.
fn json_bounded<T: Serialize>(v: &T, what: &str) -> AdminResponse {
    let resp = json(v);
    match &resp {
        AdminResponse::Json(s) if s.len() > PAGE_BUDGET => err(format!(
            "the {what} answer is {} bytes, more than one frame ({} bytes) holds; this vigilctl does not page, use a newer one",
            s.len(),
            codec::MAX_FRAME_LEN
        )),
        _ => resp,
    }
}

/// Takes items while their JSON stays within [`PAGE_BUDGET`] (at least one) and at most
/// `limit`; says whether it stopped before the items ran out.
fn take_page<T: Serialize>(items: impl Iterator<Item = T>, limit: usize) -> (Vec<T>, bool) {
    let mut out = Vec::new();
    let mut size = 0;
    for item in items {
        let n = serde_json::to_string(&item).map(|s| s.len()).unwrap_or(0) + 1;
        if out.len() >= limit || (!out.is_empty() && size + n > PAGE_BUDGET) {
            return (out, true);
        }
        size += n;
        out.push(item);
    }
    (out, false)
}

async fn vm_page(ctx: &AdminContext, after: Option<String>, limit: u32) -> AdminResponse {
    let limit = (limit as usize).clamp(1, MAX_PAGE_ITEMS);
    let candidates = vms_after(ctx, after.as_deref(), limit + 1).await;
    let (vms, more) = take_page(candidates.into_iter(), limit);
    let next = if more {
        vms.last().map(|v| v.uuid.clone())
    } else {
        None
    };
    json(&crate::api::VmPage { vms, next })
}

async fn host_page(ctx: &AdminContext, after: Option<String>, limit: u32) -> AdminResponse {
    let limit = (limit as usize).clamp(1, MAX_PAGE_ITEMS);
    let candidates = hosts_after(ctx, after.as_deref(), limit + 1).await;
    let (hosts, more) = take_page(candidates.into_iter(), limit);
    let next = if more {
        hosts.last().map(|h| h.name.clone())
    } else {
        None
    };
    json(&crate::api::HostPage { hosts, next })
}

fn events_page(
    ctx: &AdminContext,
    limit: u32,
    host: Option<String>,
    vm: Option<String>,
    before: Option<u64>,
) -> AdminResponse {
    let limit = limit.clamp(1, 10_000) as usize;
    let (mut events, cut) = ctx.raft.read(|s| {
        let matching = s
            .events
            .iter()
            .rev()
            .filter(|e| before.is_none_or(|b| e.id < b))
            .filter(|e| host.as_ref().is_none_or(|h| e.host.as_ref() == Some(h)))
            .filter(|e| vm.as_ref().is_none_or(|v| e.vm.as_ref() == Some(v)))
            .cloned();
        take_page(matching, limit)
    });
    // Stopped by the byte budget (not by `limit`): the rest starts below the oldest here.
    let next_before = if cut && events.len() < limit {
        events.last().map(|e| e.id)
    } else {
        None
    };
    events.reverse();
    json(&crate::api::EventsPage {
        events,
        next_before,
    })
}

/// Every VM: the agents' reports merged with the replicated HA records.
async fn vms(ctx: &AdminContext) -> Vec<VmView> {
    vms_after(ctx, None, usize::MAX).await
}

/// The first `take` VMs (by uuid) with a uuid after `after`.
async fn vms_after(ctx: &AdminContext, after: Option<&str>, take: usize) -> Vec<VmView> {
    let after_owned = after.map(str::to_string);
    let reported: Vec<(String, DomainInfo)> = ctx
        .engine
        .query(move |e, _| {
            // Only what connected agents report now: the last inventory of a host that is
            // cut off (or fenced) is history, not where a VM runs.
            e.connected_domains_after(after_owned.as_deref(), take)
        })
        .await
        .unwrap_or_default();
    // The first `take` records after the cursor: with every reported domain after it, they
    // hold the first `take` of the union.
    let records: BTreeMap<String, VmRecord> = ctx.raft.read(|s| {
        let lower = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        s.vms
            .range::<str, _>((lower, std::ops::Bound::Unbounded))
            .take(take)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    let mut out: BTreeMap<String, VmView> = BTreeMap::new();
    for (host, d) in reported {
        let rec = records.get(&d.uuid);
        // A domain defined on several hosts: show where it runs, else where Vigil placed it.
        let running = matches!(d.state, DomainState::Running | DomainState::Paused);
        if let Some(existing) = out.get(&d.uuid) {
            let existing_running = matches!(
                existing.state,
                Some(DomainState::Running) | Some(DomainState::Paused)
            );
            let placed_here = rec.is_some_and(|r| r.host == host);
            if existing_running || (!running && !placed_here) {
                continue;
            }
        }
        out.insert(d.uuid.clone(), view(Some((&host, &d)), rec));
    }
    for (uuid, rec) in &records {
        out.entry(uuid.clone())
            .or_insert_with(|| view(None, Some(rec)));
    }
    out.into_values().take(take).collect()
}

fn view(reported: Option<(&str, &DomainInfo)>, rec: Option<&VmRecord>) -> VmView {
    let (uuid, name) = match (reported, rec) {
        (Some((_, d)), _) => (d.uuid.clone(), d.name.clone()),
        (None, Some(r)) => (r.uuid.clone(), r.name.clone()),
        (None, None) => (String::new(), String::new()),
    };
    VmView {
        uuid,
        name,
        host: reported
            .map(|(h, _)| h.to_string())
            .or_else(|| rec.map(|r| r.host.clone())),
        state: reported.map(|(_, d)| d.state),
        reason: reported.map(|(_, d)| d.reason),
        vcpus: reported
            .map(|(_, d)| d.vcpus)
            .or(rec.map(|r| r.vcpus))
            .unwrap_or(0),
        memory_kib: reported
            .map(|(_, d)| d.memory_kib)
            .or(rec.map(|r| r.memory_kib))
            .unwrap_or(0),
        ha: rec.is_some_and(|r| r.ha),
        ha_source: rec.map(|r| r.ha_source),
        priority: rec.map(|r| r.priority).unwrap_or(0),
        generation: rec.map(|r| r.generation).unwrap_or(0),
        reported_generation: reported.and_then(|(_, d)| d.meta.generation),
        phase: rec.map(|r| r.phase.name().to_string()),
        phase_detail: rec.map(|r| r.phase.clone()),
        definition_stored: rec.is_some_and(|r| r.definition.is_some()),
        failures_in_window: rec.map(|r| r.failures.len()).unwrap_or(0),
        last_recovery: rec.and_then(|r| r.last_recovery.clone()),
        anti_affinity: rec.and_then(|r| r.anti_affinity.clone()),
    }
}

/// Finds a VM by uuid or name; a name shared by several VMs is an error listing them.
async fn resolve(ctx: &AdminContext, vm: &str) -> Result<VmView, String> {
    let all = vms(ctx).await;
    if let Some(v) = all.iter().find(|v| v.uuid.eq_ignore_ascii_case(vm)) {
        return Ok(v.clone());
    }
    let named: Vec<&VmView> = all.iter().filter(|v| v.name == vm).collect();
    match named.as_slice() {
        [] => Err(format!(
            "unknown VM {vm:?} (no agent reports a domain with that name or uuid)"
        )),
        [one] => Ok((*one).clone()),
        many => Err(format!(
            "VM name {vm:?} is ambiguous; use one of the uuids: {}",
            many.iter()
                .map(|v| format!("{} on {}", v.uuid, v.host.as_deref().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
