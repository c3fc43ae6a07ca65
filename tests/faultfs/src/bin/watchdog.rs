//! `vigil-lab-watchdog`: the lab's per-host fake watchdog. A FUSE mount whose file `watchdog`
//! behaves like Linux's `/dev/watchdog`; on expiry it runs the command after `--` once (the lab
//! passes its `crash-host H`), and records the expiry in the lab's timeline.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vigil_faultfs::watchdog::{self, client::WatchdogDevice, WatchdogOptions};
use vigil_faultfs::{control, now_ms};

#[derive(Parser)]
#[command(
    name = "vigil-lab-watchdog",
    version,
    about = "The lab's fake host watchdog: /dev/watchdog over FUSE, whose expiry runs a command (the host's power loss)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the watchdog on MOUNTPOINT (device MOUNTPOINT/watchdog) and serve until SIGTERM.
    Serve {
        /// Existing empty directory to mount on.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Unix socket for the one-line control protocol (status | off | reset).
        #[arg(long)]
        control: PathBuf,
        /// The host it belongs to (default: the mountpoint's last component).
        #[arg(long)]
        name: Option<String>,
        /// Timeout until WDIOC_SETTIMEOUT changes it (and after each reset).
        #[arg(long, default_value_t = 10)]
        timeout_secs: u32,
        /// The magic close 'V' does not disarm it.
        #[arg(long)]
        nowayout: bool,
        /// The lab's timeline (JSON lines): each expiry appends a `watchdog-reset` event.
        #[arg(long)]
        timeline: Option<PathBuf>,
        /// The observer's timeline: each expiry appends a `fault` mark.
        #[arg(long)]
        mark: Option<PathBuf>,
        /// Run on expiry, once per expiry (with VIGIL_WATCHDOG_NAME and
        /// VIGIL_WATCHDOG_EXPIRED_MS in its environment).
        #[arg(last = true)]
        action: Vec<OsString>,
    },
    /// Send one control command (status | off | reset) and print the answer.
    Ctl {
        #[arg(long)]
        control: PathBuf,
        command: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Open a watchdog device, set a timeout, feed it N times a second for S seconds, then
    /// close it (with the magic 'V' when --magic-close). Never point it at a real device.
    Try {
        device: PathBuf,
        #[arg(long, default_value_t = 2)]
        timeout_secs: i32,
        #[arg(long, default_value_t = 3)]
        feed_secs: u64,
        #[arg(long)]
        magic_close: bool,
    },
    /// Remove a dead mount (server killed).
    Cleanup {
        #[arg(long)]
        mountpoint: PathBuf,
    },
}

fn main() -> ExitCode {
    let res = match Cli::parse().cmd {
        Cmd::Serve {
            mountpoint,
            control,
            name,
            timeout_secs,
            nowayout,
            timeline,
            mark,
            action,
        } => {
            let mut o = WatchdogOptions::new(mountpoint);
            if let Some(n) = name {
                o.name = n;
            }
            o.timeout_secs = timeout_secs;
            o.nowayout = nowayout;
            o.timeline = timeline;
            o.mark = mark;
            o.action = action;
            serve(&o, &control)
        }
        Cmd::Ctl {
            control,
            command,
            timeout_ms,
        } => ctl(&control, &command, Duration::from_millis(timeout_ms)),
        Cmd::Try {
            device,
            timeout_secs,
            feed_secs,
            magic_close,
        } => try_device(&device, timeout_secs, feed_secs, magic_close),
        Cmd::Cleanup { mountpoint } => vigil_faultfs::cleanup(&mountpoint)
            .map(|r| println!("cleanup {}: detached {}", mountpoint.display(), r.detached))
            .with_context(|| format!("cleanup {}", mountpoint.display())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} vigil-lab-watchdog: error: {e:#}", now_ms());
            ExitCode::FAILURE
        }
    }
}

fn ctl(control: &Path, command: &str, timeout: Duration) -> anyhow::Result<()> {
    let answer = control::request(control, command, timeout)
        .with_context(|| format!("control socket {}", control.display()))?;
    println!("{answer}");
    if answer.starts_with("ok") {
        Ok(())
    } else {
        anyhow::bail!("command {command:?} refused")
    }
}

fn serve(o: &WatchdogOptions, control_path: &Path) -> anyhow::Result<()> {
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGHUP);
    stop.thread_block().context("blocking SIGTERM/SIGINT")?;
    let mounted = watchdog::mount(o)
        .with_context(|| format!("mounting the watchdog on {}", o.mountpoint.display()))?;
    let handle = mounted.handle();
    let server = control::serve_lines(
        control_path,
        std::sync::Arc::new(move |line: &str| handle.command(line)),
    )
    .with_context(|| format!("control socket {}", control_path.display()))?;
    eprintln!(
        "{} vigil-lab-watchdog[{}]: ready pid={} device={} control={}",
        now_ms(),
        o.name,
        std::process::id(),
        mounted.device().display(),
        control_path.display()
    );
    let sig = stop.wait().context("sigwait")?;
    eprintln!(
        "{} vigil-lab-watchdog[{}]: {sig:?}: stopping (no expiry from now on) and unmounting",
        now_ms(),
        o.name
    );
    drop(server);
    mounted.unmount().context("unmounting")?;
    Ok(())
}

fn try_device(device: &Path, timeout: i32, feed_secs: u64, magic: bool) -> anyhow::Result<()> {
    let mut d =
        WatchdogDevice::open(device).with_context(|| format!("opening {}", device.display()))?;
    let (options, identity) = d.support().context("WDIOC_GETSUPPORT")?;
    let got = d.set_timeout(timeout).context("WDIOC_SETTIMEOUT")?;
    println!("{identity}: options {options:#x}, timeout {got} s");
    for _ in 0..feed_secs * 2 {
        d.feed().context("feeding write")?;
        d.keepalive().context("WDIOC_KEEPALIVE")?;
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "time left {} s",
        d.time_left().context("WDIOC_GETTIMELEFT")?
    );
    if magic {
        d.magic_close().context("magic close")?;
        println!("closed with the magic 'V': disarmed");
    } else {
        drop(d);
        println!("closed without the magic 'V': still armed");
    }
    Ok(())
}
