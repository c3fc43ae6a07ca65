//! `vigil-lab`: the multi-host lab CLI. See tests/lab/README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use vigil_lab::faults::{self, PartitionFrom, StorageAction};
use vigil_lab::lab::{self, print_flush, Report, UpOpts};
use vigil_lab::layout::{Lab, DEFAULT_PREFIX, DEFAULT_ROOT};

#[derive(Debug, Parser)]
#[command(
    name = "vigil-lab",
    version,
    about = "Vigil's lab: hypervisor hosts and monitors in network namespaces on one machine, with fault injection"
)]
struct Cli {
    /// Lab root: state, logs, certificates, the hosts' libvirt directories.
    #[arg(long, global = true, env = "VIGIL_LAB_DIR", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Prefix of the lab's network namespaces (PREFIX-sw, PREFIX-hv1, PREFIX-mon1, ...).
    #[arg(long, global = true, env = "VIGIL_LAB_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the lab: namespaces, bridge, CA, monitors, libvirt sandboxes, agents, VMs.
    Up {
        /// Hypervisor hosts hv1..hvN (198.18.1.N).
        #[arg(long, default_value_t = 3)]
        hosts: u32,
        /// Monitor hosts mon1..monM (198.18.0.M), each running vigil-monitor; with more than one they form a Raft cluster and the leader holds the VIP 198.18.0.250.
        #[arg(long, default_value_t = 1)]
        monitors: u32,
        /// QEMU (TCG, 64 MiB, diskless) domains per host, started and marked HA.
        #[arg(long, default_value_t = 1)]
        vms_per_host: u32,
        /// Host tag for HA recoveries, added to the first --tagged-hosts hosts.
        #[arg(long, requires = "tagged_hosts")]
        ha_tag: Option<String>,
        /// How many hosts (hv1..hvJ) carry --ha-tag.
        #[arg(long, requires = "ha_tag")]
        tagged_hosts: Option<u32>,
        /// On failure, leave everything for inspection instead of tearing it down.
        #[arg(long)]
        keep_on_failure: bool,
        /// Do not start these optional parts even if present: faultfs, observer, bmc, watchdog.
        #[arg(long, value_delimiter = ',')]
        without: Vec<String>,
        /// Timeout of each host's fake watchdog (its agent's `[watchdog] timeout_secs`);
        /// default 4. Not with --installed (the shipped timeout_secs is used).
        #[arg(long, conflicts_with = "installed")]
        watchdog_secs: Option<u32>,
        /// Give the monitor a fence agent per host (fence_ipmilan against the lab's BMCs), so
        /// that a failed host is fenced and its HA VMs move (ha_tag hosts first).
        #[arg(long)]
        fencing: bool,
        /// Run what the packages ship: DIR is a root the vigil-agent and vigil-monitor .debs
        /// were installed or extracted into (`dpkg -x PKG.deb DIR`). The lab then runs
        /// DIR/usr/sbin/vigil-agent, DIR/usr/sbin/vigil-monitor and DIR/usr/bin/vigilctl
        /// with the command lines of DIR's units (ExecStartPre, ExecStart, ExecStopPost),
        /// and each host's and monitor's config is DIR/etc/vigil/*.toml with only what an
        /// operator must change set (addresses, node id, peers, certificates, data
        /// directories, VIP, fencing entries, pools; tests/lab/src/installed.rs names each
        /// key and why); every other shipped value stays, the shipped detector and lease
        /// timings included.
        #[arg(long, value_name = "DIR")]
        installed: Option<PathBuf>,
    },
    /// Remove every namespace, process and mount of the lab (also after a crash of the lab
    /// itself); idempotent.
    Down,
    /// Hosts, monitors, processes, partitions and the faults so far.
    Status,
    /// Run vigilctl against the lab (inside a monitor namespace, with the lab's admin
    /// certificate): `vigil-lab ctl -- host list`.
    Ctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Power loss of a host: SIGKILL to its agent, libvirtd, virtlogd and every QEMU at once.
    CrashHost {
        host: String,
        /// Who cut the power (recorded in the timeline): cli, bmc, watchdog.
        #[arg(long, default_value = "cli", hide = true)]
        source: String,
    },
    /// After crash-host: start the host's libvirt and agent again, with no domain running.
    PowerOn { host: String },
    /// Cut a host's or a monitor's network; its processes keep running.
    Partition {
        /// A host (hv1) or a monitor (mon2).
        host: String,
        /// monitors: silently drop traffic between it and every (other) monitor, both ways;
        /// for a host that includes the VIP, for a monitor it splits the monitor cluster
        /// and the hosts still reach it; all: take its switch port down.
        #[arg(long, value_enum, default_value = "monitors")]
        from: PartitionFrom,
    },
    /// Undo every partition of a host or a monitor.
    Heal { host: String },
    /// SIGKILL a host's agent (its VMs keep running).
    KillAgent { host: String },
    /// SIGTERM a host's agent, as `systemctl stop` does (its VMs keep running)
    StopAgent { host: String },
    /// Start a host's agent again (as systemd would).
    StartAgent { host: String },
    /// SIGKILL a monitor's vigil-monitor.
    KillMonitor { monitor: String },
    /// Stop (SIGTERM) and start a monitor's vigil-monitor, or start it after kill-monitor.
    RestartMonitor { monitor: String },
    /// Shared storage faults through vigil-faultfs: fail (EIO), hang, heal.
    Storage {
        #[arg(value_enum)]
        action: StorageAction,
        /// Only this host's view of the storage (default: every host).
        #[arg(long)]
        host: Option<String>,
    },
    /// fence_ipmilan against a host's BMC from a monitor namespace (status, off, on, reboot,
    /// monitor); extra key=value fence options may follow.
    Bmc {
        host: String,
        action: String,
        extra: Vec<String>,
    },
    /// The independent duplicate checker over the observer's timeline (vigil-observer check).
    Check,
    /// Can node FROM reach node TO (TCP; a refusal counts as an answer)? Exit 0 if so, 1 if not.
    Reach {
        from: String,
        to: String,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// The lab's timeline (faults and lab events, Unix-ms timestamps).
    Timeline,
    /// Internal: the lab supervisor (started by `up`, or by a caller that wants to own it).
    #[command(hide = true)]
    Supervise,
    /// Internal: TCP reachability probe, run inside a namespace by `reach`.
    #[command(hide = true)]
    ProbeTcp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Internal: called by a host's BMC: status | off | on.
    #[command(hide = true)]
    PowerHook {
        host: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            if json {
                println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
            }
            eprintln!("vigil-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn emit(json: bool, r: Report) {
    if json {
        print_flush(&format!(
            "{}\n",
            serde_json::to_string_pretty(&r.json).unwrap_or_default()
        ));
    } else {
        let mut t = r.text;
        if !t.ends_with('\n') {
            t.push('\n');
        }
        print_flush(&t);
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let lab = Lab::new(cli.root.clone(), cli.prefix.clone())?;
    let json = cli.json;
    let done = |r: Report| {
        emit(json, r);
        Ok(0)
    };
    match cli.cmd {
        Cmd::Up {
            hosts,
            monitors,
            vms_per_host,
            ha_tag,
            tagged_hosts,
            keep_on_failure,
            without,
            fencing,
            watchdog_secs,
            installed,
        } => {
            for w in &without {
                if !["faultfs", "observer", "bmc", "watchdog"].contains(&w.as_str()) {
                    anyhow::bail!(
                        "--without: unknown part {w:?} (faultfs, observer, bmc, watchdog)"
                    );
                }
            }
            done(lab::up(
                &lab,
                &UpOpts {
                    hosts,
                    monitors,
                    vms_per_host,
                    ha_tag,
                    tagged_hosts,
                    keep_on_failure,
                    without,
                    fencing,
                    watchdog_secs: watchdog_secs.unwrap_or(4),
                    installed,
                },
            )?)
        }
        Cmd::Down => done(lab::down(&lab)?),
        Cmd::Status => done(lab::status(&lab)?),
        Cmd::Ctl { args } => lab::ctl_passthrough(&lab, &args, json),
        Cmd::CrashHost { host, source } => done(faults::crash_host(&lab, &host, &source)?),
        Cmd::PowerOn { host } => done(faults::power_on(&lab, &host, "cli")?),
        Cmd::Partition { host, from } => done(faults::partition(&lab, &host, from)?),
        Cmd::Heal { host } => done(faults::heal(&lab, &host)?),
        Cmd::KillAgent { host } => done(faults::kill_agent(&lab, &host)?),
        Cmd::StopAgent { host } => done(faults::stop_agent(&lab, &host)?),
        Cmd::StartAgent { host } => done(faults::start_agent(&lab, &host)?),
        Cmd::KillMonitor { monitor } => done(faults::kill_monitor(&lab, &monitor)?),
        Cmd::RestartMonitor { monitor } => done(faults::restart_monitor(&lab, &monitor)?),
        Cmd::Storage { action, host } => done(faults::storage(&lab, action, host.as_deref())?),
        Cmd::Bmc {
            host,
            action,
            extra,
        } => done(faults::bmc(&lab, &host, &action, &extra)?),
        Cmd::Check => faults::check(&lab),
        Cmd::Reach {
            from,
            to,
            timeout_ms,
        } => {
            let (ok, r) = faults::reach(&lab, &from, &to, timeout_ms)?;
            emit(json, r);
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::Timeline => {
            let mut events = vigil_lab::state::read_timeline(&lab);
            events.sort_by_key(|e| e.ts_ms);
            let text: String = events
                .iter()
                .map(|e| {
                    format!(
                        "{} {:<6} {:<16} {:<6} {}\n",
                        e.ts_ms,
                        e.kind,
                        e.verb,
                        e.target.as_deref().unwrap_or("-"),
                        e.text
                    )
                })
                .collect();
            done(Report::new(json!({"ok": true, "events": events}), text))
        }
        Cmd::Supervise => {
            lab::require_root()?;
            vigil_lab::supervisor::serve(lab)?;
            Ok(0)
        }
        Cmd::ProbeTcp { addr, timeout_ms } => Ok(faults::probe_tcp(addr, timeout_ms)),
        Cmd::PowerHook { host, args } => faults::power_hook(&lab, &host, &args),
    }
}
