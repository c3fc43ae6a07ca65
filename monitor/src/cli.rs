//! The `vigil-monitor` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::info;
use vigil_common::config::{LogFormat, MonitorConfig, DEFAULT_MONITOR_CONFIG};

use crate::server::Monitor;

#[derive(Debug, Parser)]
#[command(name = "vigil-monitor", version, about = "Vigil replicated monitor")]
pub struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_MONITOR_CONFIG, env = "VIGIL_MONITOR_CONFIG")]
    pub config: PathBuf,
    /// Log format (overrides the file's `log_format`).
    #[arg(long, value_parser = str::parse::<LogFormat>)]
    pub log_format: Option<LogFormat>,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

/// Entry point of the `vigil-monitor` binary.
pub fn main() -> ExitCode {
    vigil_common::process::exit_code("vigil-monitor", run(Args::parse()))
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
        vigil_common::process::shutdown_signal().await;
        info!("shutdown requested");
        monitor.shutdown().await;
        anyhow::Ok(())
    })
}
