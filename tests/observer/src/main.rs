//! `vigil-observer`: watch lab hosts' libvirt, mark faults, check the timeline for duplicates.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vigil_observer::check;
use vigil_observer::timeline::{self, now_ms, Record, OBSERVER_START, OBSERVER_STOP};
use vigil_observer::watch::{HostSpec, HostWatch, Timing};

#[derive(Parser)]
#[command(
    name = "vigil-observer",
    version,
    about = "Independent duplicate checker: watches each host's libvirt, writes a JSON-lines timeline, checks that no VM ran on two hosts at once"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch hosts until SIGTERM/SIGINT, appending one line per observed change to --out.
    Watch {
        /// The timeline (JSON lines), appended to.
        #[arg(long)]
        out: PathBuf,
        /// NAME=URI or NAME=URI,PIDDIR (libvirt's qemu pid-file directory of that host, used to
        /// tell whether its qemu processes still live while its libvirtd is unreachable).
        #[arg(long = "host", required = true)]
        hosts: Vec<HostSpec>,
        /// Poll interval of each host's active domains, in ms.
        #[arg(long, default_value_t = 100)]
        poll_ms: u64,
        /// A poll without an answer for this long counts as libvirtd unreachable, in ms.
        #[arg(long, default_value_t = 2000)]
        deadline_ms: u64,
    },
    /// Append a mark {"t_ms": now, KIND: TEXT} to the timeline.
    Mark {
        #[arg(long)]
        out: PathBuf,
        /// The mark's key, e.g. fault (gaps report fault->back times from these).
        #[arg(long, default_value = "fault")]
        kind: String,
        #[arg(long)]
        text: String,
    },
    /// Check a timeline: exit 1 if any VM ran on two hosts at once; report every gap.
    Check {
        timeline: PathBuf,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,vigil_observer=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil-observer: error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Watch {
            out,
            hosts,
            poll_ms,
            deadline_ms,
        } => {
            watch(out, hosts, poll_ms, deadline_ms)?;
            Ok(0)
        }
        Cmd::Mark { out, kind, text } => {
            timeline::append_mark(&out, &kind, &text)?;
            Ok(0)
        }
        Cmd::Check { timeline, json } => {
            let text = std::fs::read_to_string(&timeline)
                .with_context(|| format!("read {}", timeline.display()))?;
            let report = check::check_text(&text);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", check::render(&report));
            }
            Ok(if report.ok { 0 } else { 1 })
        }
    }
}

fn watch(out: PathBuf, hosts: Vec<HostSpec>, poll_ms: u64, deadline_ms: u64) -> anyhow::Result<()> {
    if poll_ms == 0 || deadline_ms == 0 {
        bail!("--poll-ms and --deadline-ms must be positive");
    }
    let mut names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!("two --host with the same NAME");
    }
    // Before any connection is opened (lifecycle events and the poll connections' keepalive).
    if let Err(e) = vigil_agent::libvirt::events::ensure_event_loop() {
        tracing::warn!(error = %e, "no libvirt event loop: polling only");
    }
    let writer = Arc::new(timeline::Writer::open(&out)?);
    let mut start = Record {
        t_ms: now_ms(),
        event: Some(OBSERVER_START.into()),
        ..Record::default()
    };
    let host_map: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|h| {
            let v = serde_json::json!({
                "uri": h.uri,
                "pid_dir": h.pid_dir.as_ref().map(|p| p.display().to_string()),
            });
            (h.name.clone(), v)
        })
        .collect();
    start
        .extra
        .insert("hosts".into(), serde_json::Value::Object(host_map));
    start.extra.insert("poll_ms".into(), poll_ms.into());
    start.pid = Some(std::process::id());
    writer.write(&start);

    let stop = Arc::new(AtomicBool::new(false));
    let timing = Timing {
        poll: Duration::from_millis(poll_ms),
        deadline: Duration::from_millis(deadline_ms),
    };
    let mut threads = Vec::new();
    for spec in hosts {
        tracing::info!(host = %spec.name, uri = %spec.uri, pid_dir = ?spec.pid_dir, "watching");
        let w = HostWatch::new(spec, timing, writer.clone(), stop.clone())?;
        threads.push(w.spawn()?);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let why = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        anyhow::Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        })
    })?;
    stop.store(true, Ordering::Relaxed);
    // Each watcher ends within a poll interval, or a deadline when a poll hangs; do not wait
    // for one stuck inside libvirt longer than that.
    let end = Instant::now() + timing.deadline + timing.poll + Duration::from_millis(500);
    for t in &threads {
        while !t.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    writer.write(&Record {
        t_ms: now_ms(),
        event: Some(OBSERVER_STOP.into()),
        detail: Some(why.into()),
        ..Record::default()
    });
    tracing::info!(signal = why, "stopped");
    Ok(())
}
