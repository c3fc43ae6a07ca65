//! The admin client: connects to the monitors in turn, follows "not leader" redirects.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use vigil_common::codec;
use vigil_common::tls::{self, TlsPaths, TransportTuning};
use vigil_common::wire::{self, AdminRequest, AdminResponse, Preamble};

/// A connected admin session.
pub struct AdminClient {
    monitors: Vec<SocketAddr>,
    client: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    stream: Option<(
        SocketAddr,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    )>,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(
        paths: &TlsPaths,
        monitors: Vec<SocketAddr>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        if monitors.is_empty() {
            bail!("no monitor address given (use --monitor or VIGIL_MONITORS)");
        }
        let material = paths.load().context("loading vigilctl's TLS files")?;
        let client = tls::client_config(material, wire::ALPN_ADMIN, TransportTuning::default())?;
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .context("opening a UDP socket")?;
        Ok(AdminClient {
            monitors,
            client,
            endpoint,
            stream: None,
            timeout,
        })
    }

    /// Changes how long each answer is waited for.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    async fn connect(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let fut = async {
            let conn = self
                .endpoint
                .connect_with(self.client.clone(), addr, wire::MONITOR_SERVER_NAME)?
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&Preamble::current().to_bytes()).await?;
            let mut pre = [0u8; Preamble::LEN];
            if let Err(e) = recv.read_exact(&mut pre).await {
                if let Some(reason) = conn.close_reason() {
                    return Err(anyhow!(describe_close(reason)));
                }
                return Err(anyhow!("no answer: {e}"));
            }
            Preamble::check(pre, "vigilctl", "monitor")?;
            anyhow::Ok((conn, send, recv))
        };
        let (conn, send, recv) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))??;
        self.stream = Some((addr, conn, send, recv));
        Ok(())
    }

    /// Sends a request to the first monitor that answers, following leader redirects.
    ///
    /// Monitors are tried in the order given. A follower that names the leader
    /// (`NotLeader { leader: Some(addr) }`) sends the request there next (each named address
    /// at most once per round, so two monitors naming each other cannot loop); one that knows
    /// no leader sends it to the next monitor. A round in which some monitor answered "not
    /// the leader" is repeated after a pause, a few times: an election is under way.
    pub async fn request(&mut self, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
        let mut errors = Vec::new();
        for round in 0..=ELECTION_ROUNDS {
            if round > 0 {
                tokio::time::sleep(ELECTION_PAUSE).await;
            }
            errors.clear();
            let mut candidates = self.monitors.clone();
            let mut redirected: Vec<SocketAddr> = Vec::new();
            let mut not_leader = false;
            let mut i = 0;
            while i < candidates.len() {
                let addr = candidates[i];
                i += 1;
                if self.stream.as_ref().map(|s| s.0) != Some(addr) {
                    self.stream = None;
                    if let Err(e) = self.connect(addr).await {
                        errors.push(format!("{addr}: {e:#}"));
                        continue;
                    }
                }
                match self.exchange(req).await {
                    Ok(AdminResponse::NotLeader { leader }) => {
                        not_leader = true;
                        match redirect_target(leader.as_deref(), addr, &redirected) {
                            Some(a) => {
                                redirected.push(a);
                                candidates.insert(i, a);
                                errors
                                    .push(format!("{addr}: not the leader (the leader is at {a})"));
                            }
                            None => errors.push(format!(
                                "{addr}: not the leader ({})",
                                match leader {
                                    Some(l) => format!("it names {l:?}, already tried"),
                                    None => "no leader known: an election under way, or no quorum"
                                        .into(),
                                }
                            )),
                        }
                    }
                    Ok(resp) => return Ok(resp),
                    Err(e) => {
                        self.stream = None;
                        errors.push(format!("{addr}: {e:#}"));
                    }
                }
            }
            if !not_leader {
                break;
            }
        }
        bail!("no monitor could answer:\n  {}", errors.join("\n  "))
    }

    async fn exchange(&mut self, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
        let timeout = self.timeout;
        let (_, conn, send, recv) = self
            .stream
            .as_mut()
            .ok_or_else(|| anyhow!("not connected"))?;
        let fut = async {
            codec::write_frame(send, req).await?;
            match codec::read_frame::<_, AdminResponse>(recv).await? {
                Some(r) => anyhow::Ok(r),
                None => Err(anyhow!("monitor closed the stream")),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => match conn.close_reason() {
                Some(reason) => Err(anyhow!(describe_close(reason))),
                None => Err(e),
            },
            Err(_) => Err(anyhow!("no answer within {timeout:?}")),
        }
    }

    /// Sends a request and decodes the JSON answer; an error answer becomes an error.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        req: &AdminRequest,
    ) -> anyhow::Result<(T, String)> {
        match self.request(req).await? {
            AdminResponse::Json(s) => {
                let v = serde_json::from_str(&s).context("decoding the monitor's answer")?;
                Ok((v, s))
            }
            AdminResponse::Error { message } => bail!("{message}"),
            AdminResponse::NotLeader { leader } => {
                bail!("no leader reachable (last known: {leader:?})")
            }
            AdminResponse::BackupChunk { .. } => {
                bail!("the monitor answered with backup bytes where a JSON answer was expected")
            }
        }
    }

    /// Sends a request on the connection the last [`Self::request`] was answered on, with
    /// no redirects and no other monitor: for requests about that connection's own state (the
    /// pieces of a backup it took).
    pub async fn request_same_connection(
        &mut self,
        req: &AdminRequest,
    ) -> anyhow::Result<AdminResponse> {
        let res = self.exchange(req).await;
        if res.is_err() {
            self.stream = None;
        }
        res
    }

    pub fn close(&self) {
        self.endpoint.close(wire::close::NORMAL.into(), b"bye");
    }
}

/// Rounds repeated after the first when a monitor answered "not the leader" (an election is
/// under way: it takes about a second).
const ELECTION_ROUNDS: u32 = 4;
/// The pause before each repeated round.
const ELECTION_PAUSE: Duration = Duration::from_millis(500);

/// Where a "not the leader" answer from `from` sends the request next: the named leader, if
/// it is an address, not `from` itself, and not already followed this round.
pub fn redirect_target(
    leader: Option<&str>,
    from: SocketAddr,
    followed: &[SocketAddr],
) -> Option<SocketAddr> {
    let a = leader?.parse::<SocketAddr>().ok()?;
    (a != from && !followed.contains(&a)).then_some(a)
}

fn describe_close(e: quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!("monitor refused: {}", String::from_utf8_lossy(&c.reason))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_followed_once_and_never_to_garbage() {
        let a: SocketAddr = "10.0.0.1:7440".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:7440".parse().expect("addr");
        assert_eq!(redirect_target(Some("10.0.0.2:7440"), a, &[]), Some(b));
        // Already followed this round (two followers naming a dead leader): not again.
        assert_eq!(redirect_target(Some("10.0.0.2:7440"), a, &[b]), None);
        // A monitor naming itself, nothing, or something that is no address.
        assert_eq!(redirect_target(Some("10.0.0.1:7440"), a, &[]), None);
        assert_eq!(redirect_target(None, a, &[]), None);
        assert_eq!(redirect_target(Some("not an address"), a, &[]), None);
    }
}
