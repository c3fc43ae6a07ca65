//! The `vigil-agent` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info, warn};
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
    let mut cfg = AgentConfig::load(&args.config)?;
    // The format in effect (a SIGHUP compares the file with what runs).
    cfg.log_format = args.log_format.unwrap_or(cfg.log_format);
    vigil_common::logging::init(cfg.log_format, cfg.log_level);
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
        let mut running = cfg.clone();
        let shutdown = vigil_common::process::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = hup.recv() => reload(&reloader, &args.config, &mut running),
            }
        }
        info!("shutdown requested");
        let _ = stop_tx.send(true);
        task.await.context("agent task panicked")?
    })
}

/// SIGHUP: re-reads the configuration file; applies `[tls]` (the next connection's
/// certificate) and `log_level`, and names every other changed setting as needing a restart
/// (vigil_common::reload). A file that does not load changes nothing.
fn reload(reloader: &crate::runner::TlsReloader, config: &Path, running: &mut AgentConfig) {
    let new = match AgentConfig::load(config) {
        Ok(new) => new,
        Err(e) => {
            error!(
                "SIGHUP: keeping the running configuration and certificate: {}",
                vigil_common::reload::one_line(&e)
            );
            return;
        }
    };
    let plan = running.reload_plan(&new);
    match reloader.reload(&new.tls) {
        Ok(msg) => {
            info!("SIGHUP: {msg}");
            running.tls = new.tls.clone();
        }
        Err(e) => error!("SIGHUP: reload failed, keeping the current certificate: {e:#}"),
    }
    vigil_common::reload::apply_log_level(&mut running.log_level, new.log_level);
    if let Some(msg) = plan.restart_message(config) {
        warn!("{msg}");
    }
}
