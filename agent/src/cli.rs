//! The `vigil-agent` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::info;
use vigil_common::config::{AgentConfig, LogFormat, DEFAULT_AGENT_CONFIG};

use crate::runner::{resolve_identity, AgentRunner};

#[derive(Debug, Parser)]
#[command(name = "vigil-agent", version, about = "Vigil hypervisor agent")]
pub struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_AGENT_CONFIG, env = "VIGIL_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Log format (overrides the file's `log_format`).
    #[arg(long, value_parser = str::parse::<LogFormat>)]
    pub log_format: Option<LogFormat>,
    /// Check the configuration and certificate, print the identity, and exit.
    #[arg(long)]
    pub check: bool,
}

/// Entry point of the `vigil-agent` binary.
pub fn main() -> ExitCode {
    vigil_common::process::exit_code("vigil-agent", run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    vigil_common::logging::init(args.log_format.unwrap_or(cfg.log_format));
    let host = resolve_identity(&cfg, &args.config)?;
    if args.check {
        println!(
            "host {host}, zone {}, cluster {}, monitors {:?}",
            cfg.zone, cfg.cluster, cfg.monitors
        );
        return Ok(());
    }
    // Before anything reads or writes the state directory, and held until the process ends.
    let _state_lock = crate::state_lock::lock_state_dir(&cfg.state_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("vigil-agent")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Installed first: SIGHUP's default action would end the process.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let runner = AgentRunner::new(&cfg, host.clone())?;
        let reloader = runner.tls_reloader();
        info!(%host, zone = %cfg.zone, cluster = %cfg.cluster, "vigil-agent {} starting", vigil_common::VERSION);
        let task = tokio::spawn(runner.run(stop_rx));
        let shutdown = vigil_common::process::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = hup.recv() => {
                    // Only the certificate: other settings need a restart.
                    let result = AgentConfig::load(&args.config)
                        .map_err(anyhow::Error::from)
                        .and_then(|c| reloader.reload(&c.tls));
                    match result {
                        Ok(msg) => info!("SIGHUP: {msg}"),
                        Err(e) => tracing::error!("SIGHUP: reload failed, keeping the current certificate: {e:#}"),
                    }
                }
            }
        }
        info!("shutdown requested");
        let _ = stop_tx.send(true);
        task.await.context("agent task panicked")?
    })
}
