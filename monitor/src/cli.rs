//! The `vigil-monitor` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info};
use vigil_common::config::{LogFormat, MonitorConfig, DEFAULT_MONITOR_CONFIG};

use crate::server::Monitor;

#[derive(Debug, Parser)]
#[command(name = "vigil-monitor", version, about = "Vigil replicated monitor")]
pub struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_MONITOR_CONFIG, env = "VIGIL_MONITOR_CONFIG")]
    pub config: PathBuf,
    /// Log format (overrides the file's `log_format`).
    #[arg(long, value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

/// Entry point of the `vigil-monitor` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("vigil-monitor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = MonitorConfig::load(&args.config)?;
    vigil_common::logging::init(args.log_format.unwrap_or(cfg.log_format));
    if args.check {
        println!("{} is valid", args.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vigil-monitor")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let monitor = Monitor::start(cfg).await?;
        shutdown_signal().await;
        info!("shutdown requested");
        monitor.shutdown().await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
