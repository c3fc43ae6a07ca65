//! The `vigil-monitor` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info, warn};
use vigil_common::config::{LogFormat, MonitorConfig, DEFAULT_MONITOR_CONFIG};

use crate::server::{DataDirError, Monitor, StartMode, EXIT_DATA_DIR};

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
    /// Create a new, empty cluster database in `data_dir` (the first start of a new cluster
    /// only). Without it the monitor refuses to start when it finds no database; with it, it
    /// refuses when one exists.
    #[arg(long, conflicts_with = "join")]
    pub init: bool,
    /// Join an existing monitor cluster (needs `[raft] listen`): create an empty database
    /// in `data_dir` and wait, taking no Raft message, until the leader admits and adds this
    /// monitor (`vigilctl server add`; at a formation, the `--init` monitor admits its
    /// `[raft] peers`). Refused when `data_dir` already holds a cluster.
    #[arg(long)]
    pub join: bool,
    /// Build a new one-node cluster in `data_dir` from a backup file (`vigilctl db backup`)
    /// and run it. Refused when `data_dir` already holds a database (nothing stored is
    /// replaced). Start the other monitors with `--join` and add them with `vigilctl server
    /// add`. Later starts of this monitor are without `--restore`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["init", "join"])]
    pub restore: Option<PathBuf>,
    /// Bring this monitor back after its database was lost or damaged (needs `[raft]
    /// listen`): the old `raft.redb` is moved aside (kept, never deleted), the monitor
    /// starts empty and takes no Raft message until the leader re-admits it: then run
    /// `vigilctl server reset NODE_ID` against the leader. Later starts are without it.
    #[arg(long, conflicts_with_all = ["init", "join", "restore"])]
    pub reset: bool,
    /// Remove the `[vip]` address from its interface if it is there, and exit (0 when it is
    /// absent, or when there is no `[vip]`). For the unit's `ExecStopPost=`: a monitor
    /// killed with SIGKILL cannot remove the VIP itself. Never starts the monitor.
    #[arg(long, conflicts_with_all = ["init", "join", "check", "restore", "reset"])]
    pub drop_vip: bool,
}

/// Entry point of the `vigil-monitor` binary.
pub fn main() -> ExitCode {
    let result = run(Args::parse());
    let data_dir_refusal = result
        .as_ref()
        .err()
        .is_some_and(|e| e.downcast_ref::<DataDirError>().is_some());
    let code = vigil_common::process::exit_code("vigil-monitor", result);
    if data_dir_refusal {
        // A distinct status: restarting cannot help until an operator acts.
        ExitCode::from(EXIT_DATA_DIR)
    } else {
        code
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = MonitorConfig::load(&args.config)?;
    // The format in effect (a SIGHUP compares the file with what runs).
    cfg.log_format = args.log_format.unwrap_or(cfg.log_format);
    vigil_common::logging::init(cfg.log_format, cfg.log_level);
    if args.check {
        println!("{} is valid", args.config.display());
        return Ok(());
    }
    if args.drop_vip {
        return drop_vip(&cfg);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vigil-monitor")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mode = if let Some(file) = args.restore.clone() {
            StartMode::Restore(file)
        } else if args.init {
            StartMode::Init
        } else if args.join {
            StartMode::Join
        } else if args.reset {
            StartMode::Reset
        } else {
            StartMode::Existing
        };
        // Installed first: SIGHUP's default action would end the process.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let mut running = cfg.clone();
        let monitor = Monitor::start(cfg, mode).await?;
        // The unit is `Type=notify`: ready once agents and vigilctl are served. (Without
        // NOTIFY_SOCKET this does nothing.)
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let shutdown = vigil_common::process::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = hup.recv() => reload(&monitor, &args.config, &mut running),
            }
        }
        info!("shutdown requested");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        monitor.shutdown().await;
        anyhow::Ok(())
    })
}

/// SIGHUP: re-reads the configuration file; applies its `[tls]` section (certificate, key,
/// CA, CRL, for new handshakes) and `log_level`, and names every other changed setting as
/// needing a restart (vigil_common::reload: the engine's timings never change under it). A
/// file that does not load changes nothing.
fn reload(monitor: &Monitor, config: &std::path::Path, running: &mut MonitorConfig) {
    let new = match MonitorConfig::load(config) {
        Ok(new) => new,
        Err(e) => {
            error!(
                "SIGHUP: keeping the running configuration and certificates: {}",
                vigil_common::reload::one_line(&e)
            );
            return;
        }
    };
    let plan = running.reload_plan(&new);
    match monitor.reload_tls(&new.tls) {
        Ok(msg) => {
            info!("SIGHUP: {msg}");
            running.tls = new.tls.clone();
        }
        Err(e) => error!("SIGHUP: reload failed, keeping the current certificates: {e:#}"),
    }
    vigil_common::reload::apply_log_level(&mut running.log_level, new.log_level);
    if let Some(msg) = plan.restart_message(config) {
        warn!("{msg}");
    }
}

/// `--drop-vip`: removes a VIP left on this machine by a monitor that could not remove it
/// (SIGKILL, a crash). Idempotent.
fn drop_vip(cfg: &MonitorConfig) -> anyhow::Result<()> {
    let Some(vip) = &cfg.vip else {
        println!("no [vip] configured: nothing to remove");
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let target = rt.block_on(crate::vip::drop_configured(vip))?;
    println!(
        "VIP {}/{} is not on {} (removed if it was)",
        target.0, target.1, vip.interface
    );
    Ok(())
}
