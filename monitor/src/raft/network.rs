//! The network of a monitor without peers. A one-node cluster has nobody to talk to, so
//! openraft never calls it; should it, every RPC fails with [`RPCError::Unreachable`] (never a
//! storage error, which would stop Raft). Monitors with peers use [`super::quic`].

use openraft::error::{
    Fatal, InstallSnapshotError, RPCError, RaftError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, Snapshot, Vote};

use super::TypeConfig;

/// Why every RPC fails.
#[derive(Debug, Clone, thiserror::Error)]
#[error("multi-monitor networking not enabled yet (cannot reach Raft node {target} at {addr:?})")]
pub struct NetworkDisabled {
    pub target: u64,
    pub addr: String,
}

/// Creates [`DisabledNetwork`] clients.
#[derive(Debug, Clone, Default)]
pub struct DisabledNetworkFactory;

/// A "connection" to a peer that always reports it unreachable.
#[derive(Debug, Clone)]
pub struct DisabledNetwork {
    target: u64,
    addr: String,
}

impl DisabledNetwork {
    fn unreachable(&self) -> Unreachable {
        Unreachable::new(&NetworkDisabled {
            target: self.target,
            addr: self.addr.clone(),
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for DisabledNetworkFactory {
    type Network = DisabledNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        DisabledNetwork {
            target,
            addr: node.addr.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for DisabledNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote<u64>,
        _snapshot: Snapshot<TypeConfig>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_rpc_is_unreachable() {
        let mut factory = DisabledNetworkFactory;
        let mut client = factory
            .new_client(2, &BasicNode::new("10.0.0.2:7000"))
            .await;
        let err = client
            .vote(
                VoteRequest::new(Vote::new(1, 1), None),
                RPCOption::new(std::time::Duration::from_millis(100)),
            )
            .await
            .expect_err("unreachable");
        assert!(matches!(err, RPCError::Unreachable(_)));
        assert!(err
            .to_string()
            .contains("multi-monitor networking not enabled yet"));
    }
}
