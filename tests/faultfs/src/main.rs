//! `vigil-faultfs`: mount a fault-injecting FUSE passthrough, drive it, clean up after it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vigil_faultfs::{control, now_ms, Mode, MountOptions};

#[derive(Parser)]
#[command(
    name = "vigil-faultfs",
    version,
    about = "Shared primary storage that fails the way NFS fails (FUSE passthrough with ok/eio/hang)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING on MOUNTPOINT and serve in the foreground until SIGTERM/SIGINT.
    Mount {
        /// Directory to mirror; several instances may share it.
        #[arg(long)]
        backing: PathBuf,
        /// Existing empty directory to mount on.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Unix socket for the one-line control protocol (ok|eio|hang|status).
        #[arg(long)]
        control: PathBuf,
        /// Instance name for logs and status (default: the mountpoint's last component).
        #[arg(long)]
        name: Option<String>,
        /// Mode to start in.
        #[arg(long, default_value = "ok")]
        mode: Mode,
        /// Let the kernel page cache serve reads (no FOPEN_DIRECT_IO): cached data then stays
        /// readable during a fault, as on a real NFS client.
        #[arg(long)]
        page_cache: bool,
        /// FUSE dispatch threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Send one command to a running instance and print its answer.
    Ctl {
        /// The instance's control socket.
        #[arg(long)]
        control: PathBuf,
        /// ok | eio | hang | status
        command: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Remove a dead mount (server killed): lazy unmount, abort the FUSE connection.
    Cleanup {
        /// Where the dead mount is.
        #[arg(long)]
        mountpoint: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Mount {
            backing,
            mountpoint,
            control,
            name,
            mode,
            page_cache,
            threads,
        } => {
            let mut opts = MountOptions::new(backing, mountpoint);
            if let Some(name) = name {
                opts.name = name;
            }
            opts.direct_io = !page_cache;
            opts.threads = threads;
            serve(&opts, &control, mode)
        }
        Cmd::Ctl {
            control,
            command,
            timeout_ms,
        } => ctl(&control, &command, Duration::from_millis(timeout_ms)),
        Cmd::Cleanup { mountpoint } => vigil_faultfs::cleanup(&mountpoint)
            .map(|r| {
                println!(
                    "cleanup {}: detached {} mount(s), aborted connection(s) [{}]",
                    mountpoint.display(),
                    r.detached,
                    r.aborted.join(",")
                );
            })
            .with_context(|| format!("cleanup {}", mountpoint.display())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} vigil-faultfs: error: {e:#}", now_ms());
            ExitCode::FAILURE
        }
    }
}

fn ctl(control: &std::path::Path, command: &str, timeout: Duration) -> anyhow::Result<()> {
    let answer = control::request(control, command, timeout)
        .with_context(|| format!("control socket {}", control.display()))?;
    println!("{answer}");
    if answer.starts_with("ok") {
        Ok(())
    } else {
        anyhow::bail!("command {command:?} refused")
    }
}

fn serve(opts: &MountOptions, control_path: &std::path::Path, mode: Mode) -> anyhow::Result<()> {
    // Block the stop signals before any thread exists (threads inherit the mask); the main
    // thread then takes them synchronously with sigwait.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGHUP);
    stop.thread_block().context("blocking SIGTERM/SIGINT")?;
    // Modes and umasks come from the kernel request; do not mask them again.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());

    let mounted = vigil_faultfs::mount(opts).with_context(|| {
        format!(
            "mounting {} on {}",
            opts.backing.display(),
            opts.mountpoint.display()
        )
    })?;
    let server = control::serve(control_path, mounted.controller())
        .with_context(|| format!("control socket {}", control_path.display()))?;
    if mode != Mode::Ok {
        mounted.set_mode(mode);
    }
    eprintln!(
        "{} vigil-faultfs[{}]: ready pid={} control={}",
        now_ms(),
        opts.name,
        std::process::id(),
        control_path.display()
    );
    let sig = stop.wait().context("sigwait")?;
    eprintln!(
        "{} vigil-faultfs[{}]: {sig:?}: failing pending requests (eio) and unmounting",
        now_ms(),
        opts.name
    );
    mounted.set_mode(Mode::Eio);
    drop(server);
    let lazy = mounted.unmount().context("unmounting")?;
    eprintln!(
        "{} vigil-faultfs[{}]: unmounted{}",
        now_ms(),
        opts.name,
        if lazy {
            " (lazily: still busy; its users get errors)"
        } else {
            ""
        }
    );
    Ok(())
}
