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
use crate::api::{EventsView, HostView, PingView, ServerView, StatusView, WriteView};
use crate::detector::Liveness;
use crate::raft::{RaftNode, WriteError};
use crate::service::EngineHandle;
use crate::state::{StateCommand, StateResponse};

/// Everything the admin API reads from.
#[derive(Clone)]
pub struct AdminContext {
    pub raft: Arc<RaftNode>,
    pub engine: EngineHandle,
    pub sessions: Arc<Sessions>,
}

/// Serves one admin connection: any number of requests on one control stream.
pub async fn serve(conn: quinn::Connection, peer: PeerIdentity, ctx: AdminContext) {
    if !matches!(peer.role, Role::Admin | Role::Monitor) {
        let msg = format!(
            "certificate of {} has role {}; the admin API needs an admin certificate",
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
        let resp = handle(&ctx, req).await;
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

/// Answers one request.
pub async fn handle(ctx: &AdminContext, req: AdminRequest) -> AdminResponse {
    match req {
        AdminRequest::Status => json(&status(ctx).await),
        AdminRequest::HostList => json(&hosts(ctx, None).await),
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
        AdminRequest::Events { limit, host } => {
            let limit = limit.clamp(1, 10_000) as usize;
            let events = ctx.raft.read(|s| {
                let mut v: Vec<_> = s
                    .events
                    .iter()
                    .rev()
                    .filter(|e| host.as_ref().is_none_or(|h| e.host.as_ref() == Some(h)))
                    .take(limit)
                    .cloned()
                    .collect();
                v.reverse();
                v
            });
            json(&EventsView { events })
        }
        AdminRequest::HostPing { host } => {
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

async fn write(ctx: &AdminContext, cmd: StateCommand) -> AdminResponse {
    match ctx.raft.write(cmd).await {
        Ok(StateResponse::Ok) => json(&WriteView {
            result: "ok".into(),
        }),
        Ok(StateResponse::Unchanged) => json(&WriteView {
            result: "unchanged".into(),
        }),
        Ok(StateResponse::UnknownHost { host }) => err(format!("unknown host {host:?}")),
        Ok(StateResponse::Invalid { reason }) => err(reason),
        Err(WriteError::NotLeader(nl)) => AdminResponse::NotLeader {
            leader: nl.leader_addr,
        },
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

async fn status(ctx: &AdminContext) -> StatusView {
    let m = ctx.raft.metrics();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
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
        servers.push(ServerView {
            id: *id,
            addr: node.addr.clone(),
            state,
            term,
            index,
            commit,
            voter: voters.contains(id),
        });
    }
    let hosts = hosts(ctx, None).await;
    let count = |l: Liveness| hosts.iter().filter(|h| h.liveness == l).count();
    StatusView {
        node: m.id,
        leader: m.current_leader,
        term: m.current_term,
        servers,
        hosts_total: hosts.len(),
        hosts_up: count(Liveness::Up),
        hosts_suspect: count(Liveness::Suspect),
        hosts_down: count(Liveness::Down),
        hosts_unknown: count(Liveness::Unknown),
        agents_connected: ctx.sessions.connected_hosts().len(),
        heartbeats_total: ctx.sessions.heartbeats_total(),
        version: vigil_common::VERSION.to_string(),
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
    let names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    let soft = ctx
        .engine
        .query(move |e, now| {
            names
                .iter()
                .map(|n| (e.liveness(n, now), e.is_connected(n), e.facts(n).cloned()))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (live, connected, facts) = soft.get(i).cloned().unwrap_or((None, false, None));
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
            }
        })
        .collect()
}
