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
    pub async fn request(&mut self, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
        let mut errors = Vec::new();
        let mut candidates = self.monitors.clone();
        let mut redirects = 0;
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
                Ok(AdminResponse::NotLeader { leader: Some(l) }) if redirects < 3 => {
                    redirects += 1;
                    if let Ok(a) = l.parse::<SocketAddr>() {
                        candidates.insert(i, a);
                    }
                    errors.push(format!("{addr}: not the leader (leader at {l})"));
                }
                Ok(AdminResponse::NotLeader { leader }) => {
                    errors.push(format!("{addr}: not the leader (leader {leader:?})"));
                }
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    self.stream = None;
                    errors.push(format!("{addr}: {e:#}"));
                }
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
        }
    }

    pub fn close(&self) {
        self.endpoint.close(wire::close::NORMAL.into(), b"bye");
    }
}

fn describe_close(e: quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!("monitor refused: {}", String::from_utf8_lossy(&c.reason))
        }
        other => other.to_string(),
    }
}
