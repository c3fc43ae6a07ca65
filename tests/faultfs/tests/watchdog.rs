//! The lab's fake watchdog on real FUSE mounts (root, /dev/fuse): the Linux watchdog ioctls as
//! a program issues them, feeding, expiry running its action exactly once, the magic close,
//! a close without 'V' and a killed opener leaving it armed, the control socket's off/reset,
//! and garbage that must not crash it.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil_faultfs::control;
use vigil_faultfs::watchdog::client::WatchdogDevice;
use vigil_faultfs::watchdog::{self, wdioc, MountedWatchdog, State, WatchdogOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vigil-lab-watchdog");

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    mnt: PathBuf,
    /// Each expiry action appends one line here.
    fired: PathBuf,
    timeline: PathBuf,
}

fn fixture() -> Fixture {
    assert!(
        nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists(),
        "these tests mount FUSE filesystems: run them as root on a machine with /dev/fuse"
    );
    let tmp = tempfile::Builder::new()
        .prefix("watchdog-test-")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().canonicalize().expect("canonicalize");
    let mnt = dir.join("hv9");
    fs::create_dir(&mnt).expect("mkdir mountpoint");
    Fixture {
        fired: dir.join("fired"),
        timeline: dir.join("timeline.jsonl"),
        dir,
        mnt,
        _tmp: tmp,
    }
}

impl Fixture {
    fn options(&self, timeout_secs: u32) -> WatchdogOptions {
        let mut o = WatchdogOptions::new(&self.mnt);
        o.name = "hv9".into();
        o.timeout_secs = timeout_secs;
        o.timeline = Some(self.timeline.clone());
        o.action = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo \"$VIGIL_WATCHDOG_NAME $VIGIL_WATCHDOG_EXPIRED_MS\" >> '{}'",
                self.fired.display()
            )
            .into(),
        ];
        o
    }

    fn mount(&self, timeout_secs: u32) -> MountedWatchdog {
        watchdog::mount(&self.options(timeout_secs)).expect("mount the watchdog")
    }

    fn device(&self) -> PathBuf {
        self.mnt.join(watchdog::DEVICE_FILE)
    }

    /// How many times the action ran.
    fn fired(&self) -> usize {
        fs::read_to_string(&self.fired)
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn wait_fired(&self, n: usize, within: Duration) -> Duration {
        let t0 = Instant::now();
        while self.fired() < n {
            assert!(
                t0.elapsed() < within,
                "the action ran {} time(s), expected {n} within {within:?}",
                self.fired()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t0.elapsed()
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

#[test]
fn the_fake_watchdog_answers_the_linux_watchdog_ioctls() {
    let f = fixture();
    let m = f.mount(10);
    let dev = WatchdogDevice::open(&f.device()).expect("open arms it");
    assert_eq!(m.handle().status().state, State::Armed);
    let (options, identity) = dev.support().expect("WDIOC_GETSUPPORT");
    assert_eq!(identity, wdioc::IDENTITY);
    assert_eq!(options, wdioc::SUPPORT_OPTIONS);
    assert_eq!(
        dev.timeout().expect("WDIOC_GETTIMEOUT"),
        10,
        "default timeout"
    );
    assert_eq!(dev.set_timeout(3).expect("WDIOC_SETTIMEOUT"), 3, "accepted");
    assert_eq!(dev.timeout().expect("WDIOC_GETTIMEOUT"), 3, "read back");
    dev.keepalive().expect("WDIOC_KEEPALIVE");
    let left = dev.time_left().expect("WDIOC_GETTIMELEFT");
    assert!((2..=3).contains(&left), "time left {left}");
    let e = dev.set_timeout(0).expect_err("0 s refused");
    assert_eq!(errno_of(&e), libc::EINVAL);
    let e = dev.set_timeout(-1).expect_err("negative refused");
    assert_eq!(errno_of(&e), libc::EINVAL);
    assert_eq!(
        dev.timeout().expect("GETTIMEOUT"),
        3,
        "unchanged by refusals"
    );
    // Only one opener, as /dev/watchdog.
    let e = WatchdogDevice::open(&f.device()).expect_err("second opener");
    assert_eq!(errno_of(&e), libc::EBUSY);
    // The status file tells the same as the control socket.
    let status = fs::read_to_string(f.mnt.join(watchdog::STATUS_FILE)).expect("status file");
    assert!(
        status.contains("state=armed") && status.contains("timeout_secs=3"),
        "{status}"
    );
    dev.magic_close().expect("magic close");
    assert_eq!(f.fired(), 0);
    drop(m);
}

#[test]
fn fed_it_stays_quiet_and_unfed_it_resets_the_host_once() {
    let f = fixture();
    let m = f.mount(10);
    let mut dev = WatchdogDevice::open(&f.device()).expect("open");
    assert_eq!(dev.set_timeout(1).expect("SETTIMEOUT"), 1);
    // Fed for 3 s (three timeouts) by writes and by WDIOC_KEEPALIVE: nothing happens.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        dev.feed().expect("feed");
        std::thread::sleep(Duration::from_millis(150));
        dev.keepalive().expect("keepalive");
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(f.fired(), 0, "a fed watchdog must not act");
    // A hung feeder: still open, not fed after this last feed. The action runs after about
    // the timeout.
    let fed_last = Instant::now();
    dev.feed().expect("last feed");
    f.wait_fired(1, Duration::from_secs(3));
    let after = fed_last.elapsed();
    assert!(
        after >= Duration::from_millis(950),
        "acted {after:?} after the last feed, before the 1 s timeout"
    );
    // Once: not again, although nobody feeds it and the opener still holds it.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(f.fired(), 1, "the action must run exactly once");
    assert_eq!(m.handle().status().state, State::Fired);
    // The host is off: feeding a reset host does nothing but fail.
    assert!(dev.feed().is_err());
    // The expiry is in the lab's timeline, with the host and the time.
    let tl = fs::read_to_string(&f.timeline).expect("timeline");
    let events: Vec<serde_json::Value> = tl
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(events.len(), 1, "{tl}");
    assert_eq!(events[0]["verb"], "watchdog-reset");
    assert_eq!(events[0]["kind"], "fault");
    assert_eq!(events[0]["target"], "hv9");
    assert_eq!(events[0]["detail"]["timeout_secs"], 1);
    assert_eq!(events[0]["detail"]["held_open"], true);
    let fired_line = fs::read_to_string(&f.fired).expect("fired");
    assert!(fired_line.starts_with("hv9 "), "{fired_line}");
    drop(dev);
    drop(m);
}

#[test]
fn the_magic_close_disarms_it() {
    let f = fixture();
    let m = f.mount(1);
    let mut dev = WatchdogDevice::open(&f.device()).expect("open");
    dev.feed().expect("feed");
    dev.magic_close().expect("magic close");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(f.fired(), 0, "disarmed by the magic close");
    assert_eq!(m.handle().status().state, State::Disarmed);
    // And it can be armed again by the next opener (a restarted agent).
    let dev = WatchdogDevice::open(&f.device()).expect("reopen");
    assert_eq!(m.handle().status().state, State::Armed);
    dev.magic_close().expect("magic close");
}

#[test]
fn a_close_without_the_magic_v_leaves_it_armed() {
    let f = fixture();
    let m = f.mount(1);
    let mut dev = WatchdogDevice::open(&f.device()).expect("open");
    // A 'V' taken back by a later write: the close does not disarm.
    dev.write(b"V").expect("magic");
    dev.write(b"x").expect("feed");
    drop(dev);
    std::thread::sleep(Duration::from_millis(200));
    let s = m.handle().status();
    assert_eq!(s.state, State::Armed, "{s:?}");
    assert!(!s.open);
    f.wait_fired(1, Duration::from_secs(3));
}

struct Killable(Child);

impl Drop for Killable {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_opener_does_not_disarm_it_and_off_and_reset_work_over_the_control_socket() {
    let f = fixture();
    let sock = f.dir.join("wd.sock");
    let log = fs::File::create(f.dir.join("wd.log")).expect("log");
    let o = f.options(10);
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--mountpoint")
        .arg(&f.mnt)
        .arg("--control")
        .arg(&sock)
        .arg("--name")
        .arg("hv9")
        .arg("--timeout-secs")
        .arg("10")
        .arg("--timeline")
        .arg(&f.timeline)
        .arg("--")
        .args(&o.action)
        .stdin(Stdio::null())
        .stderr(log);
    let server = Killable(cmd.spawn().expect("spawn vigil-lab-watchdog serve"));
    let t = Duration::from_secs(2);
    let t0 = Instant::now();
    while control::request(&sock, "status", t).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "watchdog not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let field = |name: &str| -> String {
        let a = control::request(&sock, "status", t).expect("status");
        watchdog::parse_answer(&a)
            .expect("ok answer")
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    };
    assert_eq!(field("state"), "disarmed");

    // An "agent" that arms it (1 s), feeds it, and is SIGKILLed: the kernel closes its file
    // without the magic 'V', so the watchdog stays armed and resets the host.
    let mut agent = Killable(
        Command::new(BIN)
            .arg("try")
            .arg(f.device())
            .args(["--timeout-secs", "1", "--feed-secs", "100"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the feeding opener"),
    );
    let t0 = Instant::now();
    while field("state") != "armed" || field("timeout_secs") != "1" {
        assert!(t0.elapsed() < Duration::from_secs(10), "never armed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(f.fired(), 0, "fed by the live opener");
    agent.0.kill().expect("SIGKILL the opener");
    let _ = agent.0.wait();
    f.wait_fired(1, Duration::from_secs(3));
    assert_eq!(field("state"), "fired");
    assert_eq!(field("expiries"), "1");

    // Power-on: reset → disarmed, default timeout; arm again, then the host loses power
    // (crash-host): `off` stops it for good, no second action.
    let a = control::request(&sock, "reset", t).expect("reset");
    assert!(
        a.contains("state=disarmed") && a.contains("timeout_secs=10"),
        "{a}"
    );
    let dev = WatchdogDevice::open(&f.device()).expect("open after reset");
    assert_eq!(dev.set_timeout(1).expect("SETTIMEOUT"), 1);
    let a = control::request(&sock, "off", t).expect("off");
    assert!(a.contains("state=off"), "{a}");
    drop(dev);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(f.fired(), 1, "a host that is off is not reset again");
    let e = WatchdogDevice::open(&f.device()).expect_err("a powered-off host runs nothing");
    assert_eq!(errno_of(&e), libc::EIO);
    assert!(control::request(&sock, "bogus", t)
        .expect("answer")
        .starts_with("error:"));

    // SIGTERM: unmounts and exits 0.
    terminate(server, &f.mnt);
}

#[test]
fn garbage_writes_and_ioctls_do_not_crash_it() {
    let f = fixture();
    let m = f.mount(10);
    let mut dev = WatchdogDevice::open(&f.device()).expect("open");
    // Big and odd writes feed it.
    let big = vec![0xA5u8; 1 << 20];
    assert_eq!(dev.write(&big).expect("big write"), big.len());
    assert_eq!(dev.write(b"").expect("empty write"), 0);
    // Unknown commands of every shape: ENOTTY, never a crash.
    let ioc = |dir: u32, ty: u8, nr: u32, size: u32| {
        (dir << 30) | (size << 16) | (u32::from(ty) << 8) | nr
    };
    let mut buf = [0u8; 256];
    for cmd in [
        ioc(0, b'W', 5, 0),
        ioc(1, b'W', 6, 4),
        ioc(2, b'W', 99, 4),
        ioc(3, b'X', 6, 4),
        ioc(2, b'W', 7, 200),
        wdioc::SETOPTIONS,
        0,
    ] {
        let r = dev.ioctl_raw(cmd, &mut buf);
        assert!(r.is_err(), "ioctl {cmd:#x} answered {r:?}");
    }
    // The device has no read.
    let mut rd = OpenOptions::new()
        .read(true)
        .open(f.mnt.join(watchdog::STATUS_FILE))
        .expect("status");
    let mut s = String::new();
    rd.read_to_string(&mut s).expect("read status");
    assert!(s.contains("name=hv9"), "{s}");
    let e = fs::read(f.device()).expect_err("second open (read) while held");
    assert_eq!(errno_of(&e), libc::EBUSY);
    // Still alive and well.
    assert_eq!(dev.set_timeout(5).expect("SETTIMEOUT"), 5);
    dev.keepalive().expect("keepalive");
    dev.feed().expect("feed");
    assert_eq!(m.handle().status().state, State::Armed);
    dev.magic_close().expect("magic close");
    let mut again = WatchdogDevice::open(&f.device()).expect("reopen");
    again.write(b"xxV").expect("magic in the middle");
    drop(again);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(m.handle().status().state, State::Disarmed);
    let _ = std::io::stderr().flush();
}

#[test]
fn an_opener_in_another_mount_namespace_arms_feeds_and_disarms_it() {
    // The lab's agents run under `ip netns exec`, i.e. in a copy of the mount namespace taken
    // after the watchdog was mounted: the device must work from there.
    let f = fixture();
    let m = f.mount(10);
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "--"])
        .arg(BIN)
        .arg("try")
        .arg(f.device())
        .args(["--timeout-secs", "4", "--feed-secs", "1", "--magic-close"])
        .output()
        .expect("run unshare");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("timeout 4 s"), "{text}");
    std::thread::sleep(Duration::from_millis(200));
    let s = m.handle().status();
    assert_eq!(s.state, State::Disarmed, "{s:?}");
    assert_eq!(s.opens, 1);
    assert!(s.feeds >= 2, "{s:?}");
    assert_eq!(f.fired(), 0);
}

#[test]
fn the_expiry_action_may_switch_its_own_watchdog_off() {
    // The lab's action is `crash-host`, which switches the host's watchdog off over the
    // control socket while the watchdog waits for it: no deadlock, and no second expiry.
    let f = fixture();
    let sock = f.dir.join("wd.sock");
    let script = format!(
        "'{BIN}' ctl --control '{}' off && echo \"$VIGIL_WATCHDOG_NAME\" >> '{}'",
        sock.display(),
        f.fired.display()
    );
    let server = Killable(
        Command::new(BIN)
            .arg("serve")
            .arg("--mountpoint")
            .arg(&f.mnt)
            .arg("--control")
            .arg(&sock)
            .args(["--name", "hv9", "--timeout-secs", "1"])
            .arg("--timeline")
            .arg(&f.timeline)
            .args(["--", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stderr(fs::File::create(f.dir.join("wd.log")).expect("log"))
            .spawn()
            .expect("spawn vigil-lab-watchdog serve"),
    );
    let t = Duration::from_secs(2);
    let t0 = Instant::now();
    while control::request(&sock, "status", t).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "watchdog not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(WatchdogDevice::open(&f.device()).expect("open arms it"));
    f.wait_fired(1, Duration::from_secs(5));
    let t0 = Instant::now();
    let a = loop {
        let a = control::request(&sock, "status", t).expect("status");
        if a.contains("actions_done=1") || t0.elapsed() > Duration::from_secs(3) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        a.contains("state=off") && a.contains("expiries=1") && a.contains("actions_done=1"),
        "{a}"
    );
    terminate(server, &f.mnt);
}

/// SIGTERM, wait for exit 0, and check the mount is gone (a SIGKILLed server would leave a
/// dead mount in the temp dir).
fn terminate(mut server: Killable, mnt: &Path) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = server.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}");
    assert!(!vigil_faultfs::is_mounted(mnt).expect("mountinfo"));
}
