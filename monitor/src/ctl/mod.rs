//! `vigilctl`: the operator's command line.
//!
//! Human tables by default, `--json` for scripts (the admin API's JSON, unchanged). Talks to
//! the monitors over QUIC with an admin certificate of the cluster CA; tries each `--monitor`
//! in turn and follows the leader for writes.

pub mod client;
pub mod db;
pub mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vigil_common::tls::{self, Role, TlsPaths};
use vigil_common::wire::AdminRequest;

use crate::api::{
    ConfigChangeView, ConfigView, EventsPage, EventsView, HostView, OperatorView, PingView,
    PlanView, ServerChangeView, ServersView, StatusView, VmView, WriteView,
};
use client::AdminClient;

#[derive(Debug, Parser)]
#[command(
    name = "vigilctl",
    version,
    about = "Control and inspect a Vigil cluster"
)]
pub struct Args {
    /// Monitor address (repeat for each monitor; the VIP works too).
    #[arg(
        long = "monitor",
        short = 'm',
        global = true,
        env = "VIGIL_MONITORS",
        value_delimiter = ','
    )]
    pub monitors: Vec<SocketAddr>,
    /// Cluster CA certificate.
    #[arg(
        long,
        global = true,
        env = "VIGIL_CA",
        default_value = "/etc/vigil/tls/ca.crt"
    )]
    pub ca: PathBuf,
    /// Admin certificate.
    #[arg(
        long,
        global = true,
        env = "VIGIL_CERT",
        default_value = "/etc/vigil/tls/admin.crt"
    )]
    pub cert: PathBuf,
    /// Admin private key.
    #[arg(
        long,
        global = true,
        env = "VIGIL_KEY",
        default_value = "/etc/vigil/tls/admin.key"
    )]
    pub key: PathBuf,
    /// Revocation list of the cluster CA: refuse a monitor whose certificate it lists.
    #[arg(long, global = true, env = "VIGIL_CRL")]
    pub crl: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for an answer.
    #[arg(long, global = true, default_value_t = 5)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Monitor servers (state, term, index, commit) and a host summary.
    Status,
    /// Where each HA VM of these hosts would go if they failed now (the real placement on
    /// today's state; changes nothing).
    Plan {
        /// The hosts to fail, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        fail: Vec<String>,
    },
    /// Hypervisor hosts.
    #[command(subcommand)]
    Host(HostCmd),
    /// Virtual machines: inventory, HA flag, recovery state.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The replicated event log, oldest first.
    Events {
        /// How many of the newest events to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only events about this host.
        #[arg(long)]
        host: Option<String>,
        /// Only events about this VM (name or uuid).
        #[arg(long)]
        vm: Option<String>,
    },
    /// The cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Certificates for agents, monitors and admins.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Automatic fencing (the mass-failure hold).
    #[command(subcommand)]
    Fencing(FencingCmd),
    /// The monitor servers (Raft members): list, add, remove.
    #[command(subcommand)]
    Server(ServerCmd),
    /// The monitor database: backup (restore is `vigil-monitor --restore FILE`).
    #[command(subcommand)]
    Db(DbCmd),
    /// The cluster-wide settings (detector, recovery, lease, fencing), kept in the
    /// replicated state: every monitor runs with the same ones.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// The cluster's settings as monitor.toml sections (secrets hidden), their revision and
    /// last change, and where the answering monitor's own file differs from them.
    Show,
    /// One setting (`recovery.ha_tag`) or a whole section (`detector`).
    Get {
        #[arg(value_name = "KEY")]
        setting: String,
    },
    /// Change one setting (admin certificate): checked, committed, and recorded in the
    /// event log with your certificate's name. VALUE is a TOML value: `3000`, `true`,
    /// `wait`, `"ha"`, or for `fencing.hosts` the whole list as `config get fencing.hosts`
    /// prints it (hidden passwords are kept). On a running cluster the lease only gets
    /// longer, and `detector.heartbeat_interval_ms` and `lease.isolation_response` stay.
    Set {
        #[arg(value_name = "KEY")]
        setting: String,
        value: String,
    },
    /// Put one setting back to its default (admin certificate).
    Unset {
        #[arg(value_name = "KEY")]
        setting: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbCmd {
    /// Write a backup of the cluster state to FILE (admin certificate).
    ///
    /// Every host, VM record, generation, tag, maintenance flag and event, as the leader
    /// sees it (a linearizable read), with a versioned header and a SHA-256 checksum,
    /// verified before it is written. The file is written atomically (temporary file,
    /// fsync, then put in place) with mode 0600; an existing FILE is kept unless --force.
    /// Restore it with `vigil-monitor --restore FILE` on one monitor with an empty data
    /// directory, then add the others back (`vigil-monitor --join` there, `vigilctl server
    /// add`); see docs/operations.md.
    Backup {
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Check a backup file and print its header (offline: talks to no monitor).
    ///
    /// Checks the magic, the format version, the lengths, the SHA-256 checksum and the
    /// contents, and names what is wrong.
    Inspect { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// Every monitor: address, voter or learner, state, term, index, commit and lag.
    List,
    /// Add monitor ID, reachable for Raft at ADDR (its `[raft] advertise`, host:port), as a
    /// voter: it joins as a learner, catches up, then votes. Run it on the leader; start the
    /// new monitor with `vigil-monitor --join` first.
    Add {
        id: u64,
        addr: String,
        /// Seconds to wait for it to catch up before giving up (it then stays a learner).
        #[arg(long, default_value_t = 20)]
        wait: u64,
    },
    /// Remove monitor ID from the cluster (it does not stay as a learner).
    Del { id: u64 },
    /// Bring back monitor ID after its database was lost or damaged. Start it with
    /// `vigil-monitor --reset` first (it keeps its old file aside and waits, silent); then
    /// this, against the leader, removes it from the membership, re-admits it, and adds it
    /// back: as a learner, caught up from the leader, then a voter.
    Reset {
        id: u64,
        /// Its Raft address (`[raft] advertise`, host:port); only needed when it is no
        /// longer a member.
        #[arg(long)]
        addr: Option<String>,
        /// Seconds to wait for it to catch up before giving up (it then stays a learner).
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum FencingCmd {
    /// Lift the mass-failure hold: the hosts it holds are fenced automatically now.
    Release {
        /// Only this cluster's hold (default: every held cluster).
        #[arg(long)]
        cluster: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// All hosts with liveness and facts.
    List,
    /// One host in detail.
    Show { host: String },
    /// Host tags (for example the ha_tag of dedicated HA hosts).
    #[command(subcommand)]
    Tag(TagCmd),
    /// Round trip through the host's agent.
    Ping { host: String },
    /// Maintenance: `on` moves the host's HA VMs to other hosts (stop there, start elsewhere)
    /// and keeps new ones off it; `off` gives it back.
    Maintenance {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        host: String,
    },
    /// Run the host's fence agent now (power it off), like `stonith_admin --fence`. A host
    /// that is up is refused without --force.
    Fence {
        host: String,
        /// Fence it even though the monitor hears it (its running guests are powered off).
        #[arg(long)]
        force: bool,
    },
    /// Record that you made sure the host is powered off (your word is the proof, recorded
    /// with your certificate's name): its HA VMs start elsewhere. Like `stonith_admin
    /// --confirm` or oVirt's "confirm host has been rebooted". Only for a host that is down.
    ConfirmOff { host: String },
    /// Move a host to another zone and cluster. A host's zone and cluster are pinned when it
    /// first registers (its agent cannot move it); after this, its agent's config must say
    /// the same (`zone`, `cluster`) or its hello is refused.
    Place {
        host: String,
        #[arg(long)]
        zone: String,
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Every VM the agents report, with HA state.
    List,
    /// One VM (name or uuid): host, state, HA, generation, last recovery and why.
    Show { vm: String },
    /// Turn HA on or off for a VM.
    #[command(subcommand)]
    Ha(HaCmd),
    /// Stop (destroy) a VM through Vigil; Vigil will not restart it.
    Stop { vm: String },
    /// Anti-affinity: VMs of one group are kept on different hosts where placement can.
    AntiAffinity {
        vm: String,
        /// The group; omit with --none to take the VM out of its group.
        group: Option<String>,
        #[arg(long, conflicts_with = "group")]
        none: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HaCmd {
    Enable {
        vm: String,
        /// Restart priority: higher first.
        #[arg(long)]
        priority: Option<i32>,
    },
    Disable {
        vm: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TagCmd {
    Add {
        host: String,
        tag: String,
    },
    #[command(alias = "remove")]
    Rm {
        host: String,
        tag: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create a new cluster CA (refuses to overwrite an existing one).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cluster, written into the CA certificate.
        #[arg(long, default_value = "vigil")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Issue a certificate signed by the cluster CA.
    Issue {
        /// Directory of the CA (ca.crt, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// agent, monitor, admin (reads and writes) or viewer (read-only admin API).
        #[arg(long)]
        role: Role,
        /// Host name (agents), monitor name, or operator name. Becomes the certificate's CN.
        #[arg(long)]
        name: String,
        /// Output directory (NAME.crt, NAME.key, ca.crt).
        #[arg(long)]
        out: PathBuf,
        /// Extra subject alternative names (DNS names or IP addresses).
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    // Issue 10 items 4 and 5.
    /// Name, role, serial number and expiry of a certificate file.
    Show { cert: PathBuf },
    /// Add certificates to the CA's revocation list (CA_DIR/ca.crl). Copy that file to every
    /// monitor (`[tls] crl`) and send them SIGHUP: new connections with a listed certificate
    /// are refused, and live sessions of one are closed.
    Revoke {
        /// Directory of the CA (ca.crt, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// Serial number (hex, as `vigilctl cert show` prints it). Repeatable.
        #[arg(long)]
        serial: Vec<String>,
        /// A certificate file to revoke (its serial is read from it). Repeatable.
        #[arg(long)]
        cert: Vec<PathBuf>,
    },
    /// Replace a certificate and its key in place by a new pair with the same name, role and
    /// addresses, signed by the CA. Run it where the CA key is, copy the two files to the
    /// holder, then send its daemon SIGHUP (no restart, sessions continue).
    Renew {
        /// Directory of the CA (ca.crt, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to renew (replaced).
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (replaced by a new key).
        #[arg(long)]
        key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

fn expiry_text(not_after: i64) -> String {
    let now = vigil_common::unix_ms() as i64 / 1000;
    let days = (not_after - now).div_euclid(86_400);
    let at = render::timestamp((not_after.max(0) as u64) * 1000);
    if not_after <= now {
        format!("EXPIRED at {at}")
    } else {
        format!("expires in {days} days ({at})")
    }
}

fn local_cert(args: &Args, cmd: &CertCmd) -> anyhow::Result<bool> {
    match cmd {
        CertCmd::Issue { .. } => return Ok(false),
        CertCmd::Show { cert } => {
            let i = tls::cert_info_file(cert)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"name": i.name, "role": i.role.to_string(), "serial": i.serial, "not_after": i.not_after})
                );
            } else {
                println!(
                    "{} certificate for {}, serial {}, {}",
                    i.role,
                    i.name,
                    i.serial,
                    expiry_text(i.not_after)
                );
            }
        }
        CertCmd::Revoke { ca, serial, cert } => {
            if serial.is_empty() && cert.is_empty() {
                anyhow::bail!("give at least one --serial or --cert to revoke");
            }
            let mut serials = serial.clone();
            for c in cert {
                serials.push(tls::cert_info_file(c)?.serial);
            }
            let r = tls::revoke(ca, &serials)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"crl": r.crl, "serials": r.serials, "already_revoked": r.already})
                );
            } else {
                for s in &r.already {
                    println!("serial {s} was already revoked");
                }
                println!(
                    "{} now lists {} revoked certificate(s). Copy it to every monitor's `[tls] crl` path and send the monitors SIGHUP",
                    r.crl.display(),
                    r.serials.len()
                );
            }
        }
        CertCmd::Renew {
            ca,
            cert,
            key,
            days,
        } => {
            let r = tls::renew(ca, cert, key, *days)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"cert": cert, "key": key, "name": r.new.name, "role": r.new.role.to_string(), "old_serial": r.old.serial, "serial": r.new.serial, "not_after": r.new.not_after})
                );
            } else {
                println!(
                    "renewed {} certificate for {}: {} (key {}), serial {} (was {}), {}. Copy both files to its holder and send the daemon SIGHUP",
                    r.new.role,
                    r.new.name,
                    cert.display(),
                    key.display(),
                    r.new.serial,
                    r.old.serial,
                    expiry_text(r.new.not_after)
                );
            }
        }
    }
    Ok(true)
}

/// Entry point of the `vigilctl` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigilctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One of the operator's fencing commands: prints what happens now.
async fn operator(c: &mut AdminClient, args: &Args, req: &AdminRequest) -> anyhow::Result<()> {
    let (v, raw) = c.call::<OperatorView>(req).await?;
    if args.json {
        print_json(&raw)
    } else {
        println!("{}", v.message);
        Ok(())
    }
}

// --- issue 10 item 7 (scale): paged answers ---

/// VMs asked for per page (the monitor also cuts a page before it outgrows a frame).
const VM_PAGE: u32 = 5_000;
/// Hosts asked for per page (likewise).
const HOST_PAGE: u32 = 1_000;

/// Every item of a paged list (`field` of each page, e.g. "vms"), page after page, following
/// the page's string cursor `next`; with `raw`, also each item's JSON as the monitor sent it
/// (so `--json` prints fields this vigilctl does not know), as one array.
async fn list_all<V: serde::de::DeserializeOwned>(
    c: &mut AdminClient,
    raw: bool,
    what: &str,
    field: &str,
    page: impl Fn(Option<String>) -> AdminRequest,
) -> anyhow::Result<(Vec<V>, serde_json::Value)> {
    let mut after: Option<String> = None;
    let mut views = Vec::new();
    let mut items = Vec::new();
    loop {
        // Parsed once: kept as JSON for `--json` (fields this vigilctl does not know
        // survive), decoded into views for the table.
        let (mut doc, _) = c.call::<serde_json::Value>(&page(after.clone())).await?;
        let got = match doc.get_mut(field).map(std::mem::take) {
            Some(serde_json::Value::Array(got)) => got,
            _ => anyhow::bail!("the monitor's {what} page has no \"{field}\" array"),
        };
        let next: Option<String> =
            serde_json::from_value(doc.get_mut("next").map(std::mem::take).unwrap_or_default())
                .with_context(|| format!("decoding the monitor's {what} cursor"))?;
        if raw {
            items.extend(got);
        } else {
            for v in got {
                views.push(
                    serde_json::from_value::<V>(v)
                        .with_context(|| format!("decoding an entry of the {what}"))?,
                );
            }
        }
        match next {
            Some(n) if after.as_deref().is_none_or(|a| n.as_str() > a) => after = Some(n),
            Some(n) => anyhow::bail!("the monitor's {what} cursor did not advance (at {n:?})"),
            None => break,
        }
    }
    Ok((views, serde_json::Value::Array(items)))
}

/// Entries asked per page: `default`, or `VIGILCTL_PAGE_SIZE` (for tests and for a
/// monitor on a slow link; the monitor cuts a page at a frame whatever is asked).
fn page_size(default: u32) -> u32 {
    std::env::var("VIGILCTL_PAGE_SIZE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Every VM, page after page.
async fn vm_list_all(
    c: &mut AdminClient,
    raw: bool,
) -> anyhow::Result<(Vec<VmView>, serde_json::Value)> {
    list_all(c, raw, "vm list", "vms", |after| AdminRequest::VmListPage {
        after,
        limit: page_size(VM_PAGE),
    })
    .await
}

/// Every host, page after page.
async fn host_list_all(
    c: &mut AdminClient,
    raw: bool,
) -> anyhow::Result<(Vec<HostView>, serde_json::Value)> {
    list_all(c, raw, "host list", "hosts", |after| {
        AdminRequest::HostListPage {
            after,
            limit: page_size(HOST_PAGE),
        }
    })
    .await
}

/// The newest `limit` events (of `host`, of `vm`), page after page, oldest first.
async fn events_all(
    c: &mut AdminClient,
    limit: u32,
    host: Option<String>,
    vm: Option<String>,
) -> anyhow::Result<EventsView> {
    let mut pages: Vec<Vec<crate::state::Event>> = Vec::new();
    let mut before: Option<u64> = None;
    let mut remaining = limit.max(1);
    loop {
        let req = AdminRequest::EventsPage {
            limit: remaining,
            host: host.clone(),
            vm: vm.clone(),
            before,
        };
        let (page, _) = c.call::<EventsPage>(&req).await?;
        let got = page.events.len() as u32;
        remaining = remaining.saturating_sub(got);
        pages.push(page.events);
        match page.next_before {
            Some(b) if got > 0 && remaining > 0 && before.is_none_or(|p| b < p) => before = Some(b),
            _ => break,
        }
    }
    // Each page is oldest first; later pages are older.
    Ok(EventsView {
        events: pages.into_iter().rev().flatten().collect(),
    })
}

/// The common shape of a read: ask, then print the JSON answer as it came (`--json`) or
/// rendered for a person.
async fn show<T: serde::de::DeserializeOwned>(
    c: &mut AdminClient,
    req: &AdminRequest,
    json: bool,
    render: fn(&T) -> String,
) -> anyhow::Result<()> {
    let (v, raw) = c.call::<T>(req).await?;
    if json {
        print_json(&raw)
    } else {
        print!("{}", render(&v));
        Ok(())
    }
}

/// A value fetched in pages: pretty JSON (`--json`) or `text` for a person.
fn print_either<V: serde::Serialize>(
    json: bool,
    raw: &V,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(raw)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

fn print_json(raw: &str) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(raw)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match &args.command {
        Command::Ca(CaCmd::Init { dir, name }) => {
            let files = tls::init_ca(dir, name)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"cert": files.cert, "key": files.key})
                );
            } else {
                println!(
                    "created CA certificate {} and key {}",
                    files.cert.display(),
                    files.key.display()
                );
            }
            return Ok(());
        }
        Command::Cert(CertCmd::Issue {
            ca,
            role,
            name,
            out,
            san,
            days,
        }) => {
            let f = tls::issue_cert(ca, *role, name, out, san, *days)?;
            let serial = tls::cert_info_file(&f.cert)?.serial;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"cert": f.cert, "key": f.key, "ca": f.ca, "role": role.to_string(), "name": name, "serial": serial})
                );
            } else {
                println!(
                    "issued {role} certificate for {name}: {} (key {}, CA {}), serial {serial}",
                    f.cert.display(),
                    f.key.display(),
                    f.ca.display()
                );
            }
            return Ok(());
        }
        Command::Cert(cmd) if local_cert(&args, cmd)? => return Ok(()),
        Command::Db(DbCmd::Inspect { file }) => return db::inspect(file, args.json),
        Command::Db(DbCmd::Backup { file, force }) => {
            // Before asking anything of the cluster: an existing file stays.
            db::check_target(file, *force)?;
        }
        _ => {}
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(remote(args))
}

async fn remote(args: Args) -> anyhow::Result<()> {
    let monitors = if args.monitors.is_empty() {
        vec![SocketAddr::from((
            [127, 0, 0, 1],
            vigil_common::config::DEFAULT_MONITOR_PORT,
        ))]
    } else {
        args.monitors.clone()
    };
    let paths = TlsPaths {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        crl: args.crl.clone(),
    };
    let mut c = AdminClient::new(&paths, monitors, Duration::from_secs(args.timeout.max(1)))?;
    let result = dispatch(&mut c, &args).await;
    c.close();
    result
}

async fn config_change(c: &mut AdminClient, args: &Args, req: &AdminRequest) -> anyhow::Result<()> {
    let (v, raw) = c.call::<ConfigChangeView>(req).await?;
    if args.json {
        print_json(&raw)
    } else {
        print!("{}", render::config_change(&v));
        Ok(())
    }
}

async fn server_change(c: &mut AdminClient, args: &Args, req: &AdminRequest) -> anyhow::Result<()> {
    let (v, raw) = c.call::<ServerChangeView>(req).await?;
    if args.json {
        print_json(&raw)?
    } else if v.result == "unchanged" {
        println!("nothing to do: {}", v.message)
    } else {
        println!("{}", v.message)
    }
    Ok(())
}

async fn dispatch(c: &mut AdminClient, args: &Args) -> anyhow::Result<()> {
    match &args.command {
        Command::Db(DbCmd::Backup { file, force }) => {
            // Encoding a large state on the leader takes a moment.
            c.set_timeout(Duration::from_secs(args.timeout.max(60)));
            db::backup(c, file, *force, args.json).await?
        }
        Command::Db(DbCmd::Inspect { .. }) => {}
        Command::Config(ConfigCmd::Show) => {
            show::<ConfigView>(c, &AdminRequest::ConfigShow, args.json, render::config).await?;
        }
        Command::Config(ConfigCmd::Get { setting: key }) => {
            let (v, _) = c.call::<ConfigView>(&AdminRequest::ConfigShow).await?;
            let value = vigil_common::settings::get_from(&v.values, key)?;
            if args.json {
                let doc = serde_json::json!({ "key": key, "value": value, "revision": v.revision });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("{}", value.as_deref().unwrap_or("(not set)"));
            }
        }
        Command::Config(ConfigCmd::Set {
            setting: key,
            value,
        }) => {
            let req = AdminRequest::ConfigSet {
                key: key.clone(),
                value: Some(value.clone()),
            };
            config_change(c, args, &req).await?
        }
        Command::Config(ConfigCmd::Unset { setting: key }) => {
            let req = AdminRequest::ConfigSet {
                key: key.clone(),
                value: None,
            };
            config_change(c, args, &req).await?
        }
        Command::Server(ServerCmd::List) => {
            show::<ServersView>(c, &AdminRequest::ServerList, args.json, render::servers).await?;
        }
        Command::Server(ServerCmd::Add { id, addr, wait }) => {
            // The monitor answers once the new server caught up (or gave up).
            c.set_timeout(Duration::from_secs(args.timeout.max(wait + 5)));
            let req = AdminRequest::ServerAdd {
                id: *id,
                addr: addr.clone(),
                wait_ms: wait.saturating_mul(1000),
            };
            server_change(c, args, &req).await?
        }
        Command::Server(ServerCmd::Reset { id, addr, wait }) => {
            c.set_timeout(Duration::from_secs(args.timeout.max(wait + 5)));
            let req = AdminRequest::ServerReset {
                id: *id,
                addr: addr.clone(),
                wait_ms: wait.saturating_mul(1000),
            };
            server_change(c, args, &req).await?
        }
        Command::Server(ServerCmd::Del { id }) => {
            c.set_timeout(Duration::from_secs(args.timeout.max(25)));
            server_change(c, args, &AdminRequest::ServerDel { id: *id }).await?
        }
        Command::Status => {
            show::<StatusView>(c, &AdminRequest::Status, args.json, render::status).await?;
        }
        Command::Plan { fail } => {
            show::<PlanView>(
                c,
                &AdminRequest::Plan { fail: fail.clone() },
                args.json,
                render::plan,
            )
            .await?;
        }
        Command::Host(HostCmd::List) => {
            let (v, raw) = host_list_all(c, args.json).await?;
            print_either(args.json, &raw, || render::host_list(&v))?;
        }
        Command::Host(HostCmd::Show { host }) => {
            show::<HostView>(
                c,
                &AdminRequest::HostShow { host: host.clone() },
                args.json,
                render::host_show,
            )
            .await?;
        }
        Command::Host(HostCmd::Maintenance { state, host }) => {
            let on = state == "on";
            let (v, raw) = c
                .call::<WriteView>(&AdminRequest::HostMaintenance {
                    host: host.clone(),
                    on,
                })
                .await?;
            if args.json {
                print_json(&raw)?
            } else if v.result == "unchanged" {
                println!(
                    "nothing to do: {host} is already {}",
                    if on {
                        "in maintenance"
                    } else {
                        "out of maintenance"
                    }
                );
            } else if on {
                println!("{host} is in maintenance: its HA VMs move to other hosts (see `vigilctl events --host {host}`)");
            } else {
                println!("{host} is out of maintenance");
            }
        }
        Command::Host(HostCmd::Tag(t)) => {
            let (req, verb) = match t {
                TagCmd::Add { host, tag } => (
                    AdminRequest::HostTagAdd {
                        host: host.clone(),
                        tag: tag.clone(),
                    },
                    "added to",
                ),
                TagCmd::Rm { host, tag } => (
                    AdminRequest::HostTagRemove {
                        host: host.clone(),
                        tag: tag.clone(),
                    },
                    "removed from",
                ),
            };
            let (v, raw) = c.call::<WriteView>(&req).await?;
            if args.json {
                print_json(&raw)?
            } else {
                let (TagCmd::Add { host, tag } | TagCmd::Rm { host, tag }) = t;
                if v.result == "unchanged" {
                    println!(
                        "nothing to do: tag {tag} already {} {host}",
                        if verb == "added to" {
                            "on"
                        } else {
                            "absent from"
                        }
                    );
                } else {
                    println!("tag {tag} {verb} {host}");
                }
            }
        }
        Command::Host(HostCmd::Ping { host }) => {
            let (v, raw) = c
                .call::<PingView>(&AdminRequest::HostPing { host: host.clone() })
                .await?;
            if args.json {
                print_json(&raw)?
            } else {
                println!(
                    "{}: agent answered in {:.2} ms",
                    v.host,
                    v.rtt_us as f64 / 1000.0
                );
            }
        }
        Command::Vm(VmCmd::List) => {
            let (v, raw) = vm_list_all(c, args.json).await?;
            print_either(args.json, &raw, || render::vm_list(&v))?;
        }
        Command::Vm(VmCmd::Show { vm }) => {
            let (v, raw) = c
                .call::<VmView>(&AdminRequest::VmShow { vm: vm.clone() })
                .await?;
            if args.json {
                print_json(&raw)?
            } else {
                print!("{}", render::vm_show(&v));
                let (ev, _) = c
                    .call::<EventsView>(&AdminRequest::Events {
                        limit: 10,
                        host: None,
                        vm: Some(v.uuid.clone()),
                    })
                    .await?;
                if !ev.events.is_empty() {
                    println!("\nRECENT EVENTS");
                    print!("{}", render::events(&ev));
                }
            }
        }
        Command::Vm(VmCmd::Ha(h)) => {
            let (vm, enable, priority) = match h {
                HaCmd::Enable { vm, priority } => (vm, true, *priority),
                HaCmd::Disable { vm } => (vm, false, None),
            };
            let (v, raw) = c
                .call::<WriteView>(&AdminRequest::VmHa {
                    vm: vm.clone(),
                    enable,
                    priority,
                })
                .await?;
            if args.json {
                print_json(&raw)?
            } else if v.result == "unchanged" {
                println!(
                    "nothing to do: HA already {} for {vm}",
                    if enable { "enabled" } else { "disabled" }
                );
            } else {
                println!(
                    "HA {} for {vm}",
                    if enable { "enabled" } else { "disabled" }
                );
            }
        }
        Command::Vm(VmCmd::Stop { vm }) => {
            let (_, raw) = c
                .call::<WriteView>(&AdminRequest::VmStop { vm: vm.clone() })
                .await?;
            if args.json {
                print_json(&raw)?
            } else {
                println!("{vm} stopped; Vigil will not restart it");
            }
        }
        Command::Vm(VmCmd::AntiAffinity { vm, group, none }) => {
            if group.is_none() && !*none {
                anyhow::bail!("give an anti-affinity group, or --none to leave the group");
            }
            let (_, raw) = c
                .call::<WriteView>(&AdminRequest::VmAntiAffinity {
                    vm: vm.clone(),
                    group: group.clone(),
                })
                .await?;
            if args.json {
                print_json(&raw)?
            } else {
                match group {
                    Some(g) => println!("{vm} is in anti-affinity group {g}"),
                    None => println!("{vm} is in no anti-affinity group"),
                }
            }
        }
        Command::Events { limit, host, vm } => {
            let vm_uuid = match vm {
                Some(v) => Some(
                    c.call::<VmView>(&AdminRequest::VmShow { vm: v.clone() })
                        .await?
                        .0
                        .uuid,
                ),
                None => None,
            };
            let v = events_all(c, *limit, host.clone(), vm_uuid).await?;
            print_either(args.json, &v, || render::events(&v))?;
        }
        Command::Host(HostCmd::Fence { host, force }) => {
            let req = AdminRequest::HostFence {
                host: host.clone(),
                force: *force,
            };
            operator(c, args, &req).await?
        }
        Command::Host(HostCmd::Place {
            host,
            zone,
            cluster,
        }) => {
            let (v, raw) = c
                .call::<HostView>(&AdminRequest::HostPlace {
                    host: host.clone(),
                    zone: zone.clone(),
                    cluster: cluster.clone(),
                })
                .await?;
            if args.json {
                print_json(&raw)?
            } else {
                println!(
                    "host {} is now in zone {}, cluster {}",
                    v.name, v.zone, v.cluster
                );
            }
        }
        Command::Host(HostCmd::ConfirmOff { host }) => {
            let req = AdminRequest::HostConfirmOff { host: host.clone() };
            operator(c, args, &req).await?
        }
        Command::Fencing(FencingCmd::Release { cluster }) => {
            let req = AdminRequest::FencingRelease {
                cluster: cluster.clone(),
            };
            operator(c, args, &req).await?
        }
        Command::Ca(_) | Command::Cert(_) => unreachable!("handled locally"),
    }
    Ok(())
}
