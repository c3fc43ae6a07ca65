//! Real FUSE mounts: passthrough, `eio`, `hang`, two instances on one backing directory,
//! mount namespaces, `SIGTERM`, `SIGKILL` + cleanup. Needs root and /dev/fuse.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{errno, proc_mounts_mention, run, start, within, Lab, NsShell, BIN};
use std::path::Path;

use vigil_faultfs::{control, Mode, ServerOptions, ServerProcess};

const EIO: i32 = 5;
const SEC: Duration = Duration::from_secs(1);

#[test]
fn passthrough_works() {
    let lab = Lab::new(1);
    let m = &lab.h(0).mnt;

    // Heartbeat-style write + fsync + read back, visible in the backing dir.
    let hb = m.join("heartbeat");
    let mut f = File::create(&hb).expect("create");
    f.write_all(b"beat 1\n").expect("write");
    f.sync_all().expect("fsync");
    f.sync_data().expect("fdatasync");
    drop(f);
    assert_eq!(fs::read(&hb).expect("read"), b"beat 1\n");
    assert_eq!(
        fs::read(lab.backing.join("heartbeat")).expect("read backing"),
        b"beat 1\n"
    );

    // Append, overwrite at offset, truncate, read at offset.
    let mut f = OpenOptions::new()
        .append(true)
        .open(&hb)
        .expect("open append");
    f.write_all(b"beat 2\n").expect("append");
    drop(f);
    assert_eq!(fs::read_to_string(&hb).expect("read"), "beat 1\nbeat 2\n");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&hb)
        .expect("open rw");
    f.write_all_at(b"B", 0).expect("pwrite");
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 7).expect("pread");
    assert_eq!(&buf, b"beat 2");
    f.set_len(4).expect("ftruncate");
    drop(f);
    assert_eq!(fs::read(&hb).expect("read"), b"Beat");

    // Rename, readdir, unlink, mkdir/rmdir, symlink, chmod, hard link.
    fs::rename(&hb, m.join("hb2")).expect("rename");
    assert!(!hb.exists());
    fs::create_dir(m.join("dir")).expect("mkdir");
    fs::write(m.join("dir/inner"), b"x").expect("write inner");
    fs::rename(m.join("dir"), m.join("dir2")).expect("rename dir");
    assert_eq!(fs::read(m.join("dir2/inner")).expect("read moved"), b"x");
    let mut names: Vec<String> = fs::read_dir(m)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["dir2", "hb2"]);
    std::os::unix::fs::symlink("hb2", m.join("link")).expect("symlink");
    assert_eq!(
        fs::read_link(m.join("link")).expect("readlink"),
        std::path::Path::new("hb2")
    );
    assert_eq!(fs::read(m.join("link")).expect("read via link"), b"Beat");
    fs::hard_link(m.join("hb2"), m.join("hb3")).expect("link");
    assert_eq!(fs::metadata(m.join("hb3")).expect("stat").nlink(), 2);
    fs::set_permissions(m.join("hb2"), fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(
        fs::metadata(lab.backing.join("hb2"))
            .expect("stat backing")
            .mode()
            & 0o777,
        0o640
    );
    // The same inode number as in the backing directory.
    assert_eq!(
        fs::metadata(m.join("hb2")).expect("stat").ino(),
        fs::metadata(lab.backing.join("hb2")).expect("stat").ino()
    );
    for name in ["hb2", "hb3", "link", "dir2/inner"] {
        fs::remove_file(m.join(name)).expect("unlink");
    }
    fs::remove_dir(m.join("dir2")).expect("rmdir");
    assert_eq!(fs::read_dir(m).expect("readdir").count(), 0);
    assert_eq!(fs::read_dir(&lab.backing).expect("readdir").count(), 0);

    // statfs reports the backing filesystem.
    let st = nix::sys::statvfs::statvfs(m).expect("statvfs");
    assert!(st.blocks() > 0);

    // Another user reaches it (allow_other, no default_permissions).
    fs::write(m.join("public"), b"for everyone").expect("write");
    fs::set_permissions(m.join("public"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let (st, out) = run(
        &lab.root,
        10 * SEC,
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(m.join("public")),
    );
    assert!(st.success(), "nobody cannot read: {out}");
    assert_eq!(out, "for everyone");
    // Files created by another user belong to that user.
    let (st, out) = run(
        &lab.root,
        10 * SEC,
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "touch"])
            .arg(m.join("by-nobody")),
    );
    assert!(st.success(), "nobody cannot create: {out}");
    assert_eq!(
        fs::metadata(lab.backing.join("by-nobody"))
            .expect("stat")
            .uid(),
        65534
    );
}

#[test]
fn qemu_img_creates_and_uses_images_through_the_mount() {
    let lab = Lab::new(1);
    let m = &lab.h(0).mnt;
    let img = m.join("disk.qcow2");
    let t = 60 * SEC;
    let (st, out) = run(
        &lab.root,
        t,
        Command::new("qemu-img")
            .args(["create", "-f", "qcow2"])
            .arg(&img)
            .arg("16M"),
    );
    assert!(st.success(), "qemu-img create: {out}");
    let (st, out) = run(
        &lab.root,
        t,
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&img),
    );
    assert!(st.success(), "qemu-img info: {out}");
    assert!(out.contains("\"format\": \"qcow2\""), "{out}");
    assert!(out.contains("\"virtual-size\": 16777216"), "{out}");
    // Guest-style I/O through the qcow2 layer, with and without O_DIRECT.
    let (st, out) = run(
        &lab.root,
        t,
        Command::new("qemu-io")
            .args([
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "flush",
            ])
            .arg(&img),
    );
    assert!(st.success() && !out.contains("fail"), "qemu-io: {out}");
    let (st, out) = run(
        &lab.root,
        t,
        Command::new("qemu-io")
            .args(["-t", "none", "-c", "read -P 0xab 0 1M"])
            .arg(&img),
    );
    assert!(
        st.success() && !out.contains("fail"),
        "qemu-io -t none: {out}"
    );
    let (st, out) = run(
        &lab.root,
        t,
        Command::new("qemu-img").arg("check").arg(&img),
    );
    assert!(st.success(), "qemu-img check: {out}");
    // A raw copy, converted on the mount.
    let raw = m.join("disk.raw");
    let (st, out) = run(
        &lab.root,
        t,
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    assert!(st.success(), "qemu-img convert: {out}");
    assert_eq!(fs::metadata(&raw).expect("stat raw").len(), 16 << 20);
    let mut head = vec![0u8; 4096];
    File::open(lab.backing.join("disk.raw"))
        .expect("open raw")
        .read_exact(&mut head)
        .expect("read raw");
    assert!(head.iter().all(|&b| b == 0xab));
}

#[test]
fn eio_fails_everything_promptly_and_ok_recovers() {
    let lab = Lab::new(1);
    let h = lab.h(0);
    let f = h.mnt.join("f");
    fs::write(&f, b"data").expect("write");
    let open_rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .expect("open");

    h.server.set_mode(Mode::Eio).expect("eio");
    let path = f.clone();
    let results = within(5 * SEC, move || {
        let t0 = Instant::now();
        let errs = vec![
            ("open", errno(File::open(&path))),
            ("stat", errno(fs::metadata(&path))),
            ("read", errno(open_rw.read_at(&mut [0u8; 4], 0))),
            ("write", errno(open_rw.write_at(b"x", 0))),
            ("fsync", errno(open_rw.sync_all())),
            ("create", errno(File::create(path.with_file_name("new")))),
            ("readdir", errno(fs::read_dir(path.with_file_name("")))),
            ("unlink", errno(fs::remove_file(&path))),
        ];
        (errs, t0.elapsed())
    });
    let (errs, elapsed) = results.expect("EIO calls must not block");
    for (op, e) in &errs {
        assert_eq!(*e, EIO, "{op} gave errno {e}");
    }
    assert!(elapsed < SEC, "8 failing calls took {elapsed:?}");

    h.server.set_mode(Mode::Ok).expect("ok");
    assert_eq!(fs::read(&f).expect("read after ok"), b"data");
    fs::write(h.mnt.join("new"), b"n").expect("create after ok");
    assert_eq!(
        fs::read(lab.backing.join("new")).expect("backing"),
        b"n",
        "writes go through again"
    );
}

#[test]
fn hang_blocks_until_ok_while_control_answers() {
    let lab = Lab::new(1);
    let h = lab.h(0);
    let f = h.mnt.join("f");
    fs::write(&f, b"payload").expect("write");
    let file = File::open(&f).expect("open");

    h.server.set_mode(Mode::Hang).expect("hang");
    let read = start(move || {
        let mut buf = [0u8; 7];
        file.read_exact_at(&mut buf, 0).map(|()| buf)
    });
    let p = f.clone();
    let stat = start(move || fs::metadata(&p).map(|m| m.len()));
    assert!(read.wait(SEC).is_none(), "read finished while hung");
    assert!(
        stat.wait(Duration::ZERO).is_none(),
        "stat finished while hung"
    );

    // The control channel keeps answering while data operations hang.
    let t0 = Instant::now();
    let st = h.server.status().expect("status while hung");
    assert!(t0.elapsed() < SEC, "status took {:?}", t0.elapsed());
    assert_eq!(st.mode, Mode::Hang);
    assert!(st.parked >= 2, "parked={}", st.parked);

    let t_ok = Instant::now();
    h.server.set_mode(Mode::Ok).expect("ok");
    let (buf, at) = read.wait(5 * SEC).expect("read released by ok");
    assert_eq!(&buf.expect("read succeeds after ok"), b"payload");
    assert!(at.duration_since(t_ok) < SEC);
    let (len, _) = stat.wait(5 * SEC).expect("stat released by ok");
    assert_eq!(len.expect("stat succeeds after ok"), 7);

    // Leaving hang for eio answers the parked requests with EIO.
    h.server.set_mode(Mode::Hang).expect("hang");
    let p = f.clone();
    let stat = start(move || fs::metadata(&p).map(|m| m.len()));
    assert!(stat.wait(Duration::from_millis(300)).is_none());
    h.server.set_mode(Mode::Eio).expect("eio");
    let (res, _) = stat.wait(5 * SEC).expect("stat released by eio");
    assert_eq!(errno(res), EIO);
    h.server.set_mode(Mode::Ok).expect("ok");
}

#[test]
fn two_instances_on_one_backing_dir_fail_independently() {
    let lab = Lab::new(2);
    let (a, b) = (lab.h(0), lab.h(1));
    fs::write(a.mnt.join("shared"), b"from a").expect("write via a");
    assert_eq!(
        fs::read(b.mnt.join("shared")).expect("read via b"),
        b"from a"
    );

    b.server.set_mode(Mode::Eio).expect("eio on b");
    assert_eq!(errno(fs::read(b.mnt.join("shared"))), EIO);
    assert_eq!(
        fs::read(a.mnt.join("shared")).expect("a still works"),
        b"from a"
    );
    fs::write(a.mnt.join("while-b-down"), b"a wrote").expect("a writes");
    assert_eq!(errno(fs::metadata(b.mnt.join("while-b-down"))), EIO);

    b.server.set_mode(Mode::Ok).expect("ok on b");
    assert_eq!(
        fs::read(b.mnt.join("while-b-down")).expect("b sees a's file"),
        b"a wrote"
    );
    // And renames/unlinks made through one are seen by the other.
    fs::rename(b.mnt.join("shared"), b.mnt.join("renamed")).expect("rename via b");
    assert!(!a.mnt.join("shared").exists());
    assert_eq!(
        fs::read(a.mnt.join("renamed")).expect("a sees rename"),
        b"from a"
    );

    // A hang on one instance leaves the other alone.
    a.server.set_mode(Mode::Hang).expect("hang a");
    let p = a.mnt.join("renamed");
    let hung = start(move || fs::read(&p));
    assert_eq!(
        within(2 * SEC, {
            let p = b.mnt.join("renamed");
            move || fs::read(p).map_err(|e| e.to_string())
        })
        .expect("b not blocked by a's hang"),
        Ok(b"from a".to_vec())
    );
    assert!(hung.wait(Duration::ZERO).is_none());
    a.server.set_mode(Mode::Ok).expect("ok a");
    assert!(hung.wait(5 * SEC).expect("released").0.is_ok());
}

#[test]
fn a_later_mount_namespace_sees_the_mount_and_its_modes() {
    let lab = Lab::new(1);
    let h = lab.h(0);
    fs::write(h.mnt.join("f"), b"x").expect("write");
    // `unshare --mount` copies the mounts present now (private propagation by default); the
    // copy talks to the same server, so it follows the mode.
    let mut ns = NsShell::spawn(&[]);
    let probe = format!(
        "if cat '{}' >/dev/null 2>&1; then echo ok; else echo fail; fi",
        h.mnt.join("f").display()
    );
    assert_eq!(ns.ask(&probe), "ok");
    h.server.set_mode(Mode::Eio).expect("eio");
    assert_eq!(ns.ask(&probe), "fail");
    h.server.set_mode(Mode::Hang).expect("hang");
    let released = {
        let hung = start({
            let p = h.mnt.join("f");
            move || fs::read(p)
        });
        std::thread::sleep(Duration::from_millis(200));
        h.server.set_mode(Mode::Ok).expect("ok");
        hung.wait(5 * SEC).is_some()
    };
    assert!(released);
    assert_eq!(ns.ask(&probe), "ok");
    // Written in the namespace, read outside.
    ns.ask(&format!("echo from-ns > '{}'", h.mnt.join("g").display()));
    assert_eq!(fs::read(lab.backing.join("g")).expect("read"), b"from-ns\n");
}

#[test]
fn under_a_shared_parent_mounts_and_unmounts_reach_slave_namespaces() {
    let mut lab = Lab::new_shared(0);
    // The namespace exists before the faultfs mount.
    let mut ns = NsShell::spawn(&["--propagation", "slave"]);
    lab.add_host("h0");
    let mnt = lab.h(0).mnt.clone();
    fs::write(mnt.join("f"), b"x").expect("write");
    let probe = format!(
        "if cat '{}' >/dev/null 2>&1; then echo ok; else echo fail; fi",
        mnt.join("f").display()
    );
    assert_eq!(ns.ask(&probe), "ok", "mount made later did not propagate");
    lab.h(0).server.set_mode(Mode::Eio).expect("eio");
    assert_eq!(ns.ask(&probe), "fail");
    lab.h(0).server.set_mode(Mode::Ok).expect("ok");
    let st = lab.hosts[0]
        .server
        .terminate(10 * SEC)
        .expect("terminate")
        .expect("exited");
    assert!(st.success());
    let listed = ns.ask(&format!(
        "grep -c ' {} ' /proc/self/mountinfo || true",
        mnt.display()
    ));
    assert_eq!(listed, "0", "unmount did not propagate into the namespace");
}

#[test]
fn sigterm_releases_hung_requests_unmounts_and_exits_zero() {
    let mut lab = Lab::new(1);
    let mnt = lab.h(0).mnt.clone();
    fs::write(mnt.join("f"), b"x").expect("write");
    lab.h(0).server.set_mode(Mode::Hang).expect("hang");
    let p = mnt.join("f");
    let hung = start(move || fs::read(&p));
    assert!(hung.wait(Duration::from_millis(300)).is_none());
    let server = &mut lab.hosts[0].server;
    let st = server
        .terminate(10 * SEC)
        .expect("terminate")
        .expect("exits after SIGTERM");
    assert!(st.success(), "exit status {st}");
    let (res, _) = hung.wait(5 * SEC).expect("hung read released");
    assert!(res.is_err(), "read of a vanishing mount should fail");
    assert!(!proc_mounts_mention(&mnt), "still mounted after SIGTERM");
    assert!(!lab.h(0).sock.exists(), "control socket left behind");
}

#[test]
fn sigkill_then_cleanup_leaves_no_mount_and_nothing_hung() {
    let mut lab = Lab::new(1);
    let mnt = lab.h(0).mnt.clone();
    fs::write(mnt.join("f"), b"x").expect("write");
    lab.h(0).server.set_mode(Mode::Hang).expect("hang");
    let p = mnt.join("f");
    let hung = start(move || fs::read(&p));
    assert!(hung.wait(Duration::from_millis(300)).is_none());

    let server = &mut lab.hosts[0].server;
    let pid = server.pid();
    server.kill().expect("SIGKILL + reap");
    // The kernel aborts the connection when the server's /dev/fuse closes: waiters error out.
    let (res, _) = hung
        .wait(5 * SEC)
        .expect("hung read released by the server's death");
    assert!(res.is_err());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "server not reaped"
    );
    assert!(
        proc_mounts_mention(&mnt),
        "dead mount expected before cleanup"
    );
    assert!(within(5 * SEC, {
        let m = mnt.clone();
        move || fs::metadata(m).is_err()
    })
    .expect("the dead mount fails, it does not hang"));

    // A new server refuses to stack on the dead mount...
    let mut opts = ServerOptions::new(&lab.backing, &mnt, lab.root.join("again.sock"));
    opts.log = Some(lab.root.join("again.log"));
    let err = ServerProcess::spawn(Path::new(BIN), &opts).expect_err("mounting over a dead mount");
    assert!(err.to_string().contains("cleanup"), "{err}");

    let (st, out) = run(
        &lab.root,
        10 * SEC,
        Command::new(BIN)
            .arg("cleanup")
            .arg("--mountpoint")
            .arg(&mnt),
    );
    assert!(st.success(), "cleanup: {out}");
    assert!(!proc_mounts_mention(&mnt), "still mounted after cleanup");

    // ...and mounts fine once it is cleaned up, with the data intact.
    let again = ServerProcess::spawn(Path::new(BIN), &opts).expect("remount after cleanup");
    assert_eq!(fs::read(mnt.join("f")).expect("read after remount"), b"x");
    drop(again);
    assert!(!proc_mounts_mention(&mnt));
    // Running it again on a clean mountpoint is harmless.
    let (st, out) = run(
        &lab.root,
        10 * SEC,
        Command::new(BIN)
            .arg("cleanup")
            .arg("--mountpoint")
            .arg(&mnt),
    );
    assert!(st.success(), "second cleanup: {out}");
}

#[test]
fn cleanup_aborts_a_frozen_server_so_waiters_are_freed() {
    let mut lab = Lab::new(1);
    let mnt = lab.h(0).mnt.clone();
    fs::write(mnt.join("f"), b"x").expect("write");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(lab.h(0).server.pid()).expect("pid"));
    // A stopped server still holds /dev/fuse: requests wait, and the kernel will not abort.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    // kill() returns before every thread has stopped: wait until all of them are in state T,
    // or a request could still be served in that window.
    let deadline = std::time::Instant::now() + 5 * SEC;
    loop {
        let all_stopped = fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.filter_map(|t| t.ok()).all(|t| {
                    fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|st| {
                            st.rsplit(')')
                                .next()
                                .map(|r| r.trim_start().starts_with('T'))
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if all_stopped {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server threads never stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let p = mnt.join("f");
    let hung = start(move || fs::read(&p));
    assert!(hung.wait(Duration::from_millis(500)).is_none());

    let report = vigil_faultfs::cleanup(&mnt).expect("cleanup");
    assert_eq!(report.detached, 1);
    assert_eq!(report.aborted.len(), 1, "{report:?}");
    let (res, _) = hung.wait(5 * SEC).expect("waiter freed by abort");
    assert!(res.is_err());
    assert!(!proc_mounts_mention(&mnt));

    let server = &mut lab.hosts[0].server;
    server.kill().expect("SIGKILL a stopped server + reap");
}

#[test]
fn measure_switch_and_error_latency() {
    let lab = Lab::new(1);
    let h = lab.h(0);
    let f = h.mnt.join("f");
    fs::write(&f, b"x").expect("write");
    let n = 50u32;

    let mut ctl = Vec::new();
    for i in 0..n {
        let mode = if i % 2 == 0 { Mode::Eio } else { Mode::Ok };
        let t0 = Instant::now();
        control::set_mode(&h.sock, mode, 5 * SEC).expect("set mode");
        ctl.push(t0.elapsed());
        // In effect as soon as the answer is back.
        assert_eq!(fs::metadata(&f).is_ok(), mode == Mode::Ok);
    }

    let ok_stat = time_n(n, || assert!(fs::metadata(&f).is_ok()));
    h.server.set_mode(Mode::Eio).expect("eio");
    let eio_stat = time_n(n, || assert_eq!(errno(fs::metadata(&f)), EIO));
    let eio_open = time_n(n, || assert_eq!(errno(File::open(&f)), EIO));
    h.server.set_mode(Mode::Ok).expect("ok");

    let mut release = Vec::new();
    for _ in 0..10 {
        h.server.set_mode(Mode::Hang).expect("hang");
        let p = f.clone();
        let pending = start(move || fs::metadata(&p).is_ok());
        let deadline = Instant::now() + 5 * SEC;
        while h.server.status().expect("status").parked == 0 {
            assert!(Instant::now() < deadline, "stat never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        control::set_mode(&h.sock, Mode::Ok, 5 * SEC).expect("ok");
        let (ok, at) = pending.wait(5 * SEC).expect("released");
        assert!(ok);
        release.push(at.duration_since(t0));
    }

    eprintln!("FAULTFS-MEASURE ctl set-mode round trip: {}", summary(&ctl));
    eprintln!(
        "FAULTFS-MEASURE stat in ok:            {}",
        summary(&ok_stat)
    );
    eprintln!(
        "FAULTFS-MEASURE stat -> EIO:           {}",
        summary(&eio_stat)
    );
    eprintln!(
        "FAULTFS-MEASURE open -> EIO:           {}",
        summary(&eio_open)
    );
    eprintln!(
        "FAULTFS-MEASURE hang->ok release:      {}",
        summary(&release)
    );
    assert!(eio_stat.iter().all(|d| *d < SEC));
}

fn time_n(n: u32, mut f: impl FnMut()) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .collect()
}

fn summary(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = v.iter().map(|d| us(*d)).sum::<f64>() / v.len().max(1) as f64;
    format!(
        "n={} median={:.0}us mean={:.0}us max={:.0}us",
        v.len(),
        us(v[v.len() / 2]),
        mean,
        us(v[v.len() - 1])
    )
}
