//! The floating VIP (`vigil_monitor::vip`) in real network namespaces: two private namespaces
//! joined by a veth pair; the VIP task runs in the first (on a thread that entered it with
//! `setns`, with its own current-thread runtime), an `AF_PACKET` capture in the second.
//!
//! Needs root (namespaces, netlink address changes, raw sockets) and `ip` (iproute2); each
//! test skips with a message otherwise. Every test makes its own namespaces
//! (`vigil-vip-test-<pid>-<name>-a|b`), removes them on drop (also when it fails), and uses
//! addresses from 198.18.0.0/15 only (and 2001:2::/48, its IPv6 counterpart).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use tokio::sync::watch;
use vigil_common::config::VipConfig;
use vigil_monitor::vip;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 10);
const DEV: &str = "vip0";
const PEER_DEV: &str = "vip1";

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the VIP namespace tests need root (network namespaces, netlink, raw sockets)");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipping: the VIP namespace tests need `ip` (iproute2)");
        return false;
    }
    true
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by `vip0` (in `a`) and `vip1` (in `b`), both up; removed on drop.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new(test: &str) -> Pair {
        let pid = std::process::id();
        let pair = Pair {
            a: format!("vigil-vip-test-{pid}-{test}-a"),
            b: format!("vigil-vip-test-{pid}-{test}-b"),
        };
        // Our own leftovers of an earlier run with the same pid only.
        pair.remove();
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "-n", &pair.a, "link", "add", DEV, "type", "veth", "peer", "name", PEER_DEV, "netns",
            &pair.b,
        ]);
        for (ns, dev) in [(&pair.a, DEV), (&pair.b, PEER_DEV)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &pair.a, "addr", "add", "198.18.7.1/24", "dev", DEV]);
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            "198.18.7.2/24",
            "dev",
            PEER_DEV,
        ]);
        pair
    }

    fn remove(&self) {
        for ns in [&self.a, &self.b] {
            if Path::new("/run/netns").join(ns).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    fn path(ns: &str) -> PathBuf {
        Path::new("/run/netns").join(ns)
    }

    /// Whether `vip0` in `a` carries the VIP (as `ip -n a addr show` says).
    fn has_vip(&self) -> bool {
        ip(&["-n", &self.a, "-4", "addr", "show", "dev", DEV]).contains(&format!("inet {VIP}/32"))
    }

    fn wait_vip(&self, present: bool, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            if self.has_vip() == present {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Enters `ns` on this thread (network namespace only).
fn enter(ns: &str) {
    let f = File::open(Pair::path(ns)).expect("open the namespace");
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// The VIP task of `cfg`, run in namespace `ns` on its own thread.
struct Running {
    leading: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    holding: watch::Receiver<bool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Running {
    fn start(ns: &str, cfg: VipConfig, leading: bool) -> Running {
        let (leading_tx, leading_rx) = watch::channel(leading);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (holding_tx, holding_rx) = mpsc::channel();
        let ns = ns.to_string();
        let thread = thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (task, holding) = vip::spawn_with_holding(cfg, leading_rx, stop_rx);
                holding_tx.send(holding).expect("send holding");
                task.await.expect("the VIP task panicked");
            });
        });
        let holding = holding_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the VIP task started");
        Running {
            leading: leading_tx,
            stop: stop_tx,
            holding,
            thread: Some(thread),
        }
    }

    fn lead(&self, on: bool) {
        self.leading.send_replace(on);
    }

    fn holding(&self) -> bool {
        *self.holding.borrow()
    }

    /// Sends stop and waits (bounded) for the task to end.
    fn stop(mut self) {
        self.stop.send_replace(true);
        let t = self.thread.take().expect("running");
        let until = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() {
            assert!(
                Instant::now() < until,
                "the VIP task did not end after stop"
            );
            thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("the VIP thread panicked");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Gratuitous ARPs for `VIP` seen on `vip1` in `ns`, with the time each arrived.
struct Capture {
    frames: mpsc::Receiver<(Instant, [u8; 6])>,
}

impl Capture {
    fn start(ns: &str, for_how_long: Duration) -> Capture {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = ns.to_string();
        thread::spawn(move || {
            enter(&ns);
            let fd = socket::socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .expect("AF_PACKET socket");
            let link = vip::link_addr(PEER_DEV).expect("vip1's link address");
            socket::bind(fd.as_raw_fd(), &link).expect("bind to vip1");
            socket::setsockopt(
                &fd,
                socket::sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::new(0, 100_000),
            )
            .expect("SO_RCVTIMEO");
            let _ = ready_tx.send(());
            let until = Instant::now() + for_how_long;
            let mut buf = [0u8; 2048];
            while Instant::now() < until {
                let Ok(n) = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                    continue;
                };
                let f = &buf[..n];
                let garp = n >= 42
                    && f[0..6] == [0xff; 6]
                    && f[12..14] == [0x08, 0x06]
                    && f[20..22] == [0, 1]
                    && f[28..32] == VIP.octets()
                    && f[38..42] == VIP.octets();
                if garp {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&f[22..28]);
                    if tx.send((Instant::now(), mac)).is_err() {
                        return;
                    }
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture ready");
        Capture { frames: rx }
    }

    /// Waits for up to `n` GARPs, at most `within`.
    fn take(&self, n: usize, within: Duration) -> Vec<(Instant, [u8; 6])> {
        let until = Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < n {
            let left = until.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(f) => got.push(f),
                Err(_) => break,
            }
        }
        got
    }
}

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = ip(&["-n", ns, "-o", "link", "show", "dev", dev]);
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a MAC in `ip link show`");
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

fn cfg() -> VipConfig {
    let mut c = VipConfig::new(VIP.to_string(), DEV);
    c.garp_count = 3;
    c.garp_interval_ms = 100;
    c.garp_repeat_after_ms = 1_500;
    c
}

#[test]
fn vip_follows_leading_with_gratuitous_arps_and_is_dropped_on_step_down_and_stop() {
    if !can_run() {
        return;
    }
    let pair = Pair::new("follow");
    let vip = Running::start(&pair.a, cfg(), false);
    thread::sleep(Duration::from_millis(100));
    assert!(!pair.has_vip(), "a follower does not carry the VIP");
    assert!(!vip.holding());

    let capture = Capture::start(&pair.b, Duration::from_secs(5));
    let t0 = Instant::now();
    vip.lead(true);
    assert!(pair.wait_vip(true, Duration::from_secs(3)), "VIP added");
    let garps = capture.take(3, Duration::from_secs(3));
    assert_eq!(
        garps.len(),
        3,
        "garp_count gratuitous ARPs seen on the peer"
    );
    let mac = mac_of(&pair.a, DEV);
    for (_, sender) in &garps {
        assert_eq!(*sender, mac, "sent from vip0's MAC");
    }
    assert!(
        garps[0].0.duration_since(t0) < Duration::from_millis(1_000),
        "the first GARP goes out at once"
    );
    // Spaced, not a burst. Measured on the last one: a capture thread that a loaded machine
    // delays reads two GARPs back to back (a gap of 9 ms was seen under CI-like load), but
    // nothing is received before it is sent, and the sender waits `garp_interval_ms` between
    // sends, so the last one arrives at least (count - 1) intervals after the lead began.
    let last = garps[2].0.duration_since(t0);
    assert!(
        last >= Duration::from_millis(2 * 100),
        "GARPs are spaced by garp_interval_ms: the third arrived {last:?} after the lead"
    );
    assert!(
        capture.take(1, Duration::from_millis(400)).is_empty(),
        "no more than garp_count GARPs"
    );
    assert!(vip.holding(), "holding is reported");
    // The second burst, garp_repeat_after_ms after the add, while it still leads.
    let again = capture.take(3, Duration::from_secs(3));
    assert_eq!(again.len(), 3, "a second burst of garp_count GARPs");
    let first_again = again[0].0.duration_since(t0);
    assert!(
        first_again >= Duration::from_millis(1_500),
        "the second burst came {first_again:?} after the lead, before garp_repeat_after_ms"
    );

    vip.lead(false);
    assert!(
        pair.wait_vip(false, Duration::from_secs(2)),
        "VIP removed on step-down"
    );
    vip.lead(true);
    assert!(
        pair.wait_vip(true, Duration::from_secs(2)),
        "VIP added again"
    );
    vip.stop();
    assert!(
        !pair.has_vip(),
        "VIP removed before the task ended (shutdown)"
    );
}

#[test]
fn adds_racing_step_downs_end_in_the_latest_state() {
    if !can_run() {
        return;
    }
    let pair = Pair::new("race");
    let mut c = cfg();
    c.garp_count = 0;
    let vip = Running::start(&pair.a, c, false);
    for round in 0..5 {
        for _ in 0..200 {
            vip.lead(true);
            vip.lead(false);
        }
        // The last word is "follower": whatever add was in flight, the VIP ends removed.
        thread::sleep(Duration::from_millis(200));
        assert!(!pair.has_vip(), "round {round}: VIP left after a step-down");
        for _ in 0..200 {
            vip.lead(false);
            vip.lead(true);
        }
        assert!(
            pair.wait_vip(true, Duration::from_secs(2)),
            "round {round}: VIP added"
        );
        thread::sleep(Duration::from_millis(100));
        assert!(pair.has_vip(), "round {round}: the VIP stays while leading");
    }
    // Lead, then stop at once: the add may be in flight; stop still removes it.
    vip.lead(false);
    vip.lead(true);
    vip.stop();
    assert!(!pair.has_vip(), "VIP removed at stop");
}

#[test]
fn a_stale_vip_is_removed_at_start_and_a_present_one_is_fine_when_leading() {
    if !can_run() {
        return;
    }
    let pair = Pair::new("stale");
    let vip_cidr = format!("{VIP}/32");
    ip(&["-n", &pair.a, "addr", "add", &vip_cidr, "dev", DEV]);
    let vip = Running::start(&pair.a, cfg(), false);
    assert!(
        pair.wait_vip(false, Duration::from_secs(2)),
        "a VIP left by a killed monitor is removed by a follower"
    );
    vip.stop();

    ip(&["-n", &pair.a, "addr", "add", &vip_cidr, "dev", DEV]);
    let vip = Running::start(&pair.a, cfg(), true);
    let until = Instant::now() + Duration::from_secs(2);
    while !vip.holding() {
        assert!(Instant::now() < until, "already present counts as added");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(pair.has_vip());
    vip.stop();
    assert!(!pair.has_vip());
}

#[test]
fn hooks_run_with_the_role_and_a_hanging_hook_neither_blocks_nor_survives() {
    if !can_run() {
        return;
    }
    let pair = Pair::new("hooks");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("hooks.log");
    let pidfile = dir.path().join("sleeper.pid");
    let mut c = cfg();
    c.hook_timeout_ms = 2_000;
    // The leader hook logs, then hangs with a grandchild (killed with its process group).
    c.leader_hook = Some(format!(
        "echo \"$VIGIL_VIP_ROLE $VIGIL_VIP_ADDRESS $VIGIL_VIP_INTERFACE\" >> {log}; sleep 30 & echo $! > {pid}; wait",
        log = log.display(),
        pid = pidfile.display()
    ));
    c.follower_hook = Some(format!(
        "echo \"$VIGIL_VIP_ROLE\" >> {log}; exit 3",
        log = log.display()
    ));
    let vip = Running::start(&pair.a, c, false);
    let wait_log = |lines: usize| {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().count() >= lines {
                return text;
            }
            assert!(Instant::now() < until, "hook log: {text:?}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(wait_log(1), "follower\n", "the follower hook runs at start");
    let t0 = Instant::now();
    vip.lead(true);
    assert!(pair.wait_vip(true, Duration::from_secs(2)));
    assert!(
        t0.elapsed() < Duration::from_millis(1_000),
        "the VIP does not wait for hooks"
    );
    let text = wait_log(2);
    assert_eq!(
        text.lines().nth(1),
        Some(format!("leader {VIP} {DEV}").as_str())
    );
    vip.lead(false);
    assert!(
        pair.wait_vip(false, Duration::from_millis(1_000)),
        "the step-down does not wait for the hanging leader hook (2 s timeout)"
    );
    // The follower hook runs once the leader hook timed out (2 s) and was killed.
    assert_eq!(wait_log(3).lines().nth(2), Some("follower"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    let gone = {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            // A zombie counts as gone: /proc/PID/stat state Z, or no entry at all.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            if stat.is_empty() || state == Some("Z") {
                break true;
            }
            if Instant::now() > until {
                break false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(
        gone,
        "the hook's grandchild was killed with its process group"
    );
    vip.stop();
    assert!(!pair.has_vip());
}

#[test]
fn a_missing_interface_is_an_error_naming_the_field() {
    if !can_run() {
        return;
    }
    let pair = Pair::new("noif");
    let ns = pair.a.clone();
    let result = thread::spawn(move || {
        enter(&ns);
        vip::check(&VipConfig::new(VIP.to_string(), "eth-missing")).map(|_| ())
    })
    .join()
    .expect("thread");
    let e = result.expect_err("no such interface in the namespace");
    assert!(e.to_string().contains("vip.interface"), "{e}");
    let ns = pair.a.clone();
    let t = thread::spawn(move || {
        enter(&ns);
        vip::check(&VipConfig::new(VIP.to_string(), DEV))
    })
    .join()
    .expect("thread")
    .expect("vip0 exists in the namespace");
    assert_eq!(t.interface, DEV);
}

#[tokio::test]
async fn the_monitor_refuses_to_start_with_a_missing_vip_interface_naming_the_field() {
    // No root needed: the check comes before anything is opened or created.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = vigil_common::config::MonitorConfig {
        data_dir: dir.path().join("data"),
        ..Default::default()
    };
    cfg.vip = Some(VipConfig::new("198.18.7.10", "vigil-nope0"));
    let err = match vigil_monitor::server::Monitor::start(
        cfg.clone(),
        vigil_monitor::server::StartMode::Init,
    )
    .await
    {
        Ok(_) => panic!("started with a missing VIP interface"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("vip.interface"), "{err}");
    assert!(err.contains("vigil-nope0"), "{err}");
    assert!(!cfg.data_dir.exists(), "nothing created");
}

#[test]
fn a_one_node_monitor_takes_the_vip_as_leader_and_drops_it_at_shutdown() {
    if !can_run() {
        return;
    }
    use vigil_common::tls::{self, Role, TlsPaths};
    let pair = Pair::new("monitor");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let out = dir.path().join("certs");
    tls::init_ca(&ca, "vip-test").expect("CA");
    tls::issue_cert(&ca, Role::Monitor, "mon1", &out, &[], 825).expect("cert");
    let mut cfg = vigil_common::config::MonitorConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: TlsPaths {
            ca: out.join("ca.crt"),
            cert: out.join("mon1.crt"),
            key: out.join("mon1.key"),
            crl: None,
        },
        ..Default::default()
    };
    cfg.vip = Some(cfg_for_monitor());
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let ns = pair.a.clone();
    let t = thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mon =
                vigil_monitor::server::Monitor::start(cfg, vigil_monitor::server::StartMode::Init)
                    .await
                    .expect("monitor starts");
            let mut holding = mon.vip_holding.clone().expect("a [vip]");
            let held = tokio::time::timeout(Duration::from_secs(20), holding.wait_for(|h| *h))
                .await
                .is_ok();
            held_tx.send(held).expect("send");
            // Wait (without blocking the runtime) for the test to look, then shut down.
            while go_rx.try_recv().is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            mon.shutdown().await;
        });
    });
    let held = held_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the monitor thread reports");
    assert!(held, "the one-node leader holds the VIP");
    assert!(pair.has_vip(), "and the address is on vip0");
    go_tx.send(()).expect("go");
    t.join().expect("the monitor thread");
    assert!(
        !pair.has_vip(),
        "the VIP is removed by the time shutdown returns"
    );
}

fn cfg_for_monitor() -> VipConfig {
    let mut c = cfg();
    c.garp_count = 1;
    c
}

#[test]
fn an_ipv6_vip_is_added_and_removed_too() {
    if !can_run() {
        return;
    }
    // 2001:2::/48 is IPv6's benchmarking range (RFC 5180), the counterpart of 198.18.0.0/15.
    let pair = Pair::new("v6");
    let has =
        || ip(&["-n", &pair.a, "-6", "addr", "show", "dev", DEV]).contains("inet6 2001:2::10/128");
    let vip = Running::start(&pair.a, VipConfig::new("2001:2::10", DEV), true);
    let until = Instant::now() + Duration::from_secs(3);
    while !has() {
        assert!(Instant::now() < until, "IPv6 VIP added");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(vip.holding());
    vip.lead(false);
    let until = Instant::now() + Duration::from_secs(3);
    while has() {
        assert!(Instant::now() < until, "IPv6 VIP removed");
        thread::sleep(Duration::from_millis(20));
    }
    vip.stop();
}

#[test]
fn the_gratuitous_arps_correct_a_stale_neighbour_entry_on_the_peer() {
    if !can_run() {
        return;
    }
    // The peer still maps the VIP to the old leader's MAC, as after a failover.
    let pair = Pair::new("neigh");
    let vip_s = VIP.to_string();
    ip(&[
        "-n",
        &pair.b,
        "neigh",
        "replace",
        &vip_s,
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        PEER_DEV,
        "nud",
        "stale",
    ]);
    let mac = mac_of(&pair.a, DEV);
    let want = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let vip = Running::start(&pair.a, cfg(), true);
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let n = ip(&["-n", &pair.b, "neigh", "show", &vip_s, "dev", PEER_DEV]);
        if n.contains(&want) {
            break;
        }
        assert!(Instant::now() < until, "the peer's entry still says: {n}");
        thread::sleep(Duration::from_millis(20));
    }
    vip.stop();
}

/// `vigil-monitor --drop-vip` (the unit's `ExecStopPost=`): removes a VIP that a SIGKILLed
/// monitor left behind, succeeds again when it is gone, and with no `[vip]` at all.
#[test]
fn drop_vip_removes_a_leftover_vip_and_is_idempotent() {
    if !can_run() {
        return;
    }
    let pair = Pair::new("dropvip");
    let dir = tempfile::tempdir().expect("tempdir");
    let with_vip = dir.path().join("monitor.toml");
    std::fs::write(
        &with_vip,
        format!("listen = \"0.0.0.0:7440\"\nadvertise = \"198.18.7.1:7440\"\n[vip]\naddress = \"{VIP}\"\ninterface = \"{DEV}\"\n"),
    )
    .expect("write config");
    let without_vip = dir.path().join("plain.toml");
    std::fs::write(&without_vip, "listen = \"0.0.0.0:7440\"\n").expect("write config");
    let drop_vip = |config: &Path| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.a,
                env!("CARGO_BIN_EXE_vigil-monitor"),
            ])
            .arg("--config")
            .arg(config)
            .arg("--drop-vip")
            .output()
            .expect("run vigil-monitor --drop-vip");
        assert!(
            out.status.success(),
            "--drop-vip with {}: {}{}",
            config.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&[
        "-n",
        &pair.a,
        "addr",
        "add",
        &format!("{VIP}/32"),
        "dev",
        DEV,
    ]);
    assert!(pair.has_vip());
    drop_vip(&with_vip);
    assert!(!pair.has_vip(), "--drop-vip removed the leftover VIP");
    assert!(
        ip(&["-n", &pair.a, "-4", "addr", "show", "dev", DEV]).contains("198.18.7.1/24"),
        "and nothing else"
    );
    drop_vip(&with_vip);
    drop_vip(&without_vip);
}
