//! Tests against libvirt's in-process `test:///default` driver (no libvirtd, no QEMU).
//!
//! Every connection in this process to `test:///default` shares one driver state (with its
//! running domain "test"), and tests run in parallel: each test defines its own uniquely named
//! domains and only reads the shared "test" domain.

use super::*;
use vigil_common::domain::LifecycleKind;

const URI: &str = "test:///default";
const DEADLINE: Duration = Duration::from_secs(10);

fn unique_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "vigil-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn domain_xml(name: &str, metadata: &str) -> String {
    format!(
        r#"<domain type='test'>
  <name>{name}</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>2</vcpu>
  <os><type>hvm</type></os>
  <metadata>{metadata}</metadata>
  <devices>
    <disk type='file' device='disk'><source file='/srv/vm/{name}.qcow2'/><target dev='vda'/></disk>
    <disk type='block' device='disk'><source dev='/dev/vg/{name}'/><target dev='vdb'/></disk>
  </devices>
</domain>"#
    )
}

async fn get_some(hv: &Hypervisor, uuid: &str) -> DomainInfo {
    hv.get(uuid)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("domain {uuid} missing"))
}

#[tokio::test]
async fn lists_and_gets_the_default_test_domain() {
    let hv = Hypervisor::open(URI, DEADLINE);
    let all = hv.list().await.expect("list");
    let test = all
        .iter()
        .find(|d| d.name == "test")
        .expect("the test driver's domain")
        .clone();
    assert_eq!(test.state, DomainState::Running);
    assert_eq!(test.uuid.len(), 36);
    assert_eq!(test.uuid, test.uuid.to_ascii_lowercase());
    assert!(test.vcpus >= 1);
    assert!(test.memory_kib > 0);
    assert!(test.persistent);
    assert_eq!(hv.health(), HypervisorHealth::Healthy);
    assert!(hv.connects() >= 1);

    // Upper-case input is normalised.
    let again = get_some(&hv, &test.uuid.to_ascii_uppercase()).await;
    assert_eq!(again.name, "test");
    assert_eq!(
        hv.get("00000000-0000-4000-8000-000000000001")
            .await
            .expect("get"),
        None
    );
}

#[tokio::test]
async fn define_start_set_generation_destroy_round_trip() {
    let hv = Hypervisor::open(URI, DEADLINE);
    let name = unique_name("cycle");
    let xml = domain_xml(
        &name,
        r#"<vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true" priority="10"/>"#,
    );
    let uuid = hv.define(xml).await.expect("define");

    let d = get_some(&hv, &uuid).await;
    assert_eq!(d.name, name);
    assert_eq!(d.uuid, uuid);
    assert_eq!(
        (d.state, d.reason),
        (DomainState::Shutoff, StateReason::NeverStarted)
    );
    assert_eq!(d.vcpus, 2);
    assert_eq!(d.memory_kib, 131072);
    assert!(d.persistent);
    assert_eq!(
        d.disks,
        vec![format!("/srv/vm/{name}.qcow2"), format!("/dev/vg/{name}")]
    );
    assert_eq!(
        d.meta,
        VigilMeta {
            ha: Some(true),
            priority: Some(10),
            generation: None
        }
    );
    assert!(hv
        .list()
        .await
        .expect("list")
        .iter()
        .any(|x| x.uuid == uuid));

    hv.start(&uuid).await.expect("start");
    let d = get_some(&hv, &uuid).await;
    assert_eq!(
        (d.state, d.reason),
        (DomainState::Running, StateReason::Booted)
    );
    // Starting a running domain is an error from libvirt (the code depends on the driver:
    // VIR_ERR_OPERATION_INVALID from QEMU, VIR_ERR_INTERNAL_ERROR from the test driver).
    let err = hv.start(&uuid).await.expect_err("second start");
    assert!(matches!(err, HvError::Libvirt { .. }), "{err:?}");
    assert!(err.to_string().contains(&uuid), "{err}");

    // Generation goes to the live definition and the persistent config, keeping ha/priority.
    hv.set_generation(&uuid, 7).await.expect("set_generation");
    let want = VigilMeta {
        ha: Some(true),
        priority: Some(10),
        generation: Some(7),
    };
    assert_eq!(get_some(&hv, &uuid).await.meta, want);
    let inactive = hv.inactive_xml(&uuid).await.expect("inactive_xml");
    assert_eq!(xml::parse_meta(&inactive).expect("parse"), want);
    assert!(inactive.contains(&format!("<name>{name}</name>")));
    hv.set_generation(&uuid, 8).await.expect("set_generation");
    assert_eq!(get_some(&hv, &uuid).await.meta.generation, Some(8));

    hv.destroy(&uuid).await.expect("destroy");
    let d = get_some(&hv, &uuid).await;
    assert_eq!(
        (d.state, d.reason),
        (DomainState::Shutoff, StateReason::Destroyed)
    );
    // Already shut off: still Ok.
    hv.destroy(&uuid).await.expect("destroy again");
    // The config kept the generation while shut off.
    assert_eq!(get_some(&hv, &uuid).await.meta.generation, Some(8));
    assert_eq!(hv.health(), HypervisorHealth::Healthy);
}

#[tokio::test]
async fn set_ha_meta_keeps_generation_and_can_clear() {
    let hv = Hypervisor::open(URI, DEADLINE);
    let uuid = hv
        .define(domain_xml(&unique_name("meta"), ""))
        .await
        .expect("define");
    assert_eq!(get_some(&hv, &uuid).await.meta, VigilMeta::default());

    hv.set_ha_meta(&uuid, Some(true), Some(3))
        .await
        .expect("set_ha_meta");
    hv.set_generation(&uuid, 2).await.expect("set_generation");
    hv.set_ha_meta(&uuid, None, Some(-1))
        .await
        .expect("set_ha_meta");
    let meta = get_some(&hv, &uuid).await.meta;
    assert_eq!(
        meta,
        VigilMeta {
            ha: None,
            priority: Some(-1),
            generation: Some(2)
        }
    );
    // A recorded generation means the domain was started before: not "never started".
    assert_eq!(get_some(&hv, &uuid).await.reason, StateReason::Other);
}

#[tokio::test]
async fn errors_name_the_operation_and_domain() {
    let hv = Hypervisor::open(URI, DEADLINE);
    let missing = "00000000-0000-4000-8000-0000000000aa";
    for err in [
        hv.start(missing).await.expect_err("start"),
        hv.destroy(missing).await.expect_err("destroy"),
        hv.inactive_xml(missing).await.expect_err("inactive_xml"),
        hv.set_generation(missing, 1)
            .await
            .expect_err("set_generation"),
    ] {
        assert!(
            matches!(&err, HvError::NotFound { uuid, .. } if uuid == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains(missing), "{err}");
    }
    let err = hv.start("not-a-uuid").await.expect_err("invalid");
    assert!(matches!(err, HvError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains("start"), "{err}");
    let err = hv
        .define("<domain type='test'><name>x</name>".into())
        .await
        .expect_err("bad xml");
    assert!(matches!(err, HvError::Libvirt { .. }), "{err:?}");
    assert!(err.op().starts_with("define"), "{err}");
    // Answers about domains, even errors, keep the hypervisor healthy.
    assert_eq!(hv.health(), HypervisorHealth::Healthy);
}

#[tokio::test]
async fn destroy_is_reported_as_a_destroyed_event() {
    let hv = Hypervisor::open(URI, DEADLINE);
    let mut rx = hv.events().expect("receiver");
    assert!(hv.events().is_none(), "the receiver is handed out once");
    let uuid = hv
        .define(domain_xml(&unique_name("events"), ""))
        .await
        .expect("define");
    hv.start(&uuid).await.expect("start");
    hv.destroy(&uuid).await.expect("destroy");

    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(&LifecycleKind::Destroyed) {
        let ev = tokio::time::timeout_at(until, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no Destroyed event; saw {seen:?}"))
            .expect("channel open");
        if ev.uuid == uuid {
            if ev.kind == LifecycleKind::Destroyed {
                assert_eq!(ev.raw_event, sys::VIR_DOMAIN_EVENT_STOPPED as i32);
                assert_eq!(
                    ev.raw_detail,
                    sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED as i32
                );
                assert!(ev.name.starts_with("vigil-events-"));
                assert!(ev.at_ms > 0);
            }
            seen.push(ev.kind);
        }
    }
    assert_eq!(
        seen,
        vec![
            LifecycleKind::Defined,
            LifecycleKind::Started,
            LifecycleKind::Destroyed
        ]
    );
    assert_eq!(hv.events_dropped(), 0);
}

/// Issue 9 item 1 (a sub-case no test covered): a start already queued on the libvirt worker
/// when fencing begins must not reach libvirt. The refusal is checked on the worker right
/// before `virDomainCreate`, so a start queued behind a slow call, whose flag is set while
/// it waits, is refused and the domain stays off.
#[tokio::test]
async fn a_start_queued_when_fencing_begins_never_reaches_libvirt() {
    let hv = Hypervisor::open(URI, Duration::from_secs(5));
    let victim = hv
        .define(domain_xml(&unique_name("queued"), ""))
        .await
        .expect("define");
    let fencing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The worker is busy for 300 ms (within its deadline); the start queues behind it.
    let stall = {
        let hv = hv.clone();
        tokio::spawn(async move { hv.stall_for_test(Duration::from_millis(300)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = {
        let (hv, victim, fencing) = (hv.clone(), victim.clone(), fencing.clone());
        tokio::spawn(async move { hv.start_unless(&victim, fencing).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Fencing begins while the start waits in the queue.
    fencing.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = stall.await.expect("join");
    let err = start
        .await
        .expect("join")
        .expect_err("a start queued before fencing began must be refused");
    assert!(err.to_string().contains("fencing itself"), "{err}");
    assert_eq!(get_some(&hv, &victim).await.state, DomainState::Shutoff);
    // Control: with the flag clear the same start goes through.
    fencing.store(false, std::sync::atomic::Ordering::SeqCst);
    hv.start_unless(&victim, fencing).await.expect("start");
    assert_eq!(get_some(&hv, &victim).await.state, DomainState::Running);
    hv.destroy(&victim).await.expect("destroy");
}

#[tokio::test]
async fn a_stuck_worker_times_out_fails_fast_and_recovers() {
    let deadline = Duration::from_millis(300);
    let hv = Hypervisor::open(URI, deadline);
    let victim = hv
        .define(domain_xml(&unique_name("stuck"), ""))
        .await
        .expect("define");
    assert_eq!(hv.health(), HypervisorHealth::Healthy);

    // The worker hangs for 2 s, as on a hung libvirtd.
    let stall = {
        let hv = hv.clone();
        tokio::spawn(async move { hv.stall_for_test(Duration::from_secs(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Queued behind the stall: times out at the deadline, and must never run later.
    let t = Instant::now();
    let err = hv.start(&victim).await.expect_err("queued start");
    assert!(matches!(err, HvError::Timeout { .. }), "{err:?}");
    assert!(
        t.elapsed() < deadline + Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(hv.health(), HypervisorHealth::Unhealthy { .. }));
    assert!(matches!(
        stall.await.expect("join"),
        Err(HvError::Timeout { .. })
    ));

    // Worker stuck for longer than the deadline: later calls fail at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = match hv.health() {
        HypervisorHealth::Unhealthy { since_ms, .. } => since_ms,
        h => panic!("expected unhealthy, got {h:?}"),
    };
    for _ in 0..3 {
        let t = Instant::now();
        let err = hv.list().await.expect_err("list while stuck");
        assert!(matches!(err, HvError::Timeout { .. }), "{err:?}");
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        assert!(err.to_string().contains("list"), "{err}");
    }
    // The unhealthy spell keeps its start time.
    assert!(
        matches!(hv.health(), HypervisorHealth::Unhealthy { since_ms, .. } if since_ms == since)
    );

    // Once the worker is free again, calls succeed and health recovers.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match hv.list().await {
            Ok(_) => break,
            Err(HvError::Timeout { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
    assert_eq!(hv.health(), HypervisorHealth::Healthy);
    // The stale start was skipped, not replayed.
    let d = get_some(&hv, &victim).await;
    assert_eq!(d.state, DomainState::Shutoff);
}

#[tokio::test]
async fn an_unreachable_daemon_is_unavailable_and_unhealthy() {
    let hv = Hypervisor::open(
        "qemu+unix:///system?socket=/nonexistent/vigil-libvirt-sock",
        Duration::from_secs(5),
    );
    let err = hv.list().await.expect_err("list");
    assert!(matches!(err, HvError::Unavailable { .. }), "{err:?}");
    assert!(matches!(hv.health(), HypervisorHealth::Unhealthy { .. }));
    assert_eq!(hv.connects(), 0);
}

#[test]
fn uuid_arguments_are_checked_and_normalised() {
    let (op, u) = checked("start", " 4DEA22B3-1D52-D8F3-2516-782E98AB3FA0 ").expect("valid");
    assert_eq!(u, "4dea22b3-1d52-d8f3-2516-782e98ab3fa0");
    assert_eq!(op, "start 4dea22b3-1d52-d8f3-2516-782e98ab3fa0");
    for bad in [
        "",
        "4dea22b31d52d8f32516782e98ab3fa0",
        "4dea22b3-1d52-d8f3-2516-782e98ab3fa",
        "4dea22b3-1d52-d8f3-2516-782e98ab3fz0",
        "4dea22b3-1d52-d8f3-2516-782e98ab3f\u{0}0",
    ] {
        assert!(checked("start", bad).is_err(), "{bad:?}");
    }
}

/// Survives a libvirtd restart: reconnects, reports the outage meanwhile, and registers for
/// events again. Needs a real `libvirtd` that the test may start and kill itself, so it is
/// ignored by default; scripts/test.sh (and so CI) runs it in a private mount namespace, as:
///
/// ```sh
/// unshare --mount --fork sh -c 'mount -t tmpfs tmpfs /run && \
///   for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt; do mount -t tmpfs tmpfs $d; done && \
///   printf "%s\n" "user = \"root\"" "group = \"root\"" >/etc/libvirt/qemu.conf && \
///   VIGIL_TEST_LIBVIRTD=libvirtd cargo test -p vigil-agent libvirt -- --ignored'
/// ```
///
/// QEMU must run as root there (the `qemu.conf` above): as `libvirt-qemu`, which cannot use
/// `/dev/kvm` on a machine without working KVM, libvirt finds its capability cache stale on every
/// look and re-probes QEMU, so each libvirtd start takes ~15 s and the reconnection below misses
/// its budget (CI failure of 2026-12-07).
#[tokio::test]
#[ignore = "starts and kills a real libvirtd: scripts/test.sh runs it in a private mount namespace"]
async fn survives_a_libvirtd_restart() {
    let Ok(daemon) = std::env::var("VIGIL_TEST_LIBVIRTD") else {
        eprintln!("VIGIL_TEST_LIBVIRTD not set: skipped");
        return;
    };
    let socket = "/run/libvirt/libvirt-sock";
    // Ends the libvirtd it holds when dropped, so a failed assertion leaves none running
    // (two did once, after the reconnection timed out).
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let spawn = || {
        let child = std::process::Command::new(&daemon)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn libvirtd");
        let until = Instant::now() + Duration::from_secs(30);
        while !std::path::Path::new(socket).exists() {
            assert!(Instant::now() < until, "libvirtd did not create {socket}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon(child)
    };
    let t0 = Instant::now();
    let mut child = spawn();
    // Generous: the first QEMU capability probe takes ~20 s here.
    let hv = Hypervisor::open("qemu:///system", Duration::from_secs(60));
    let mut rx = hv.events().expect("receiver");
    hv.list().await.expect("list");
    assert_eq!(hv.connects(), 1);
    eprintln!("first connection after {:?}", t0.elapsed());

    child.0.kill().expect("kill libvirtd");
    child.0.wait().expect("reap libvirtd");
    let _ = std::fs::remove_file(socket);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match hv.list().await {
            Err(HvError::Unavailable { .. }) => break,
            Ok(_) if Instant::now() < until => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("expected Unavailable while libvirtd is down, got {other:?}"),
        }
    }
    assert!(matches!(hv.health(), HypervisorHealth::Unhealthy { .. }));

    let t1 = Instant::now();
    let _child = spawn();
    eprintln!("second libvirtd's socket after {:?}", t1.elapsed());
    // The worker reconnects in the background (no call needed) and re-registers for events.
    // Budget: the worker's longest backoff (5 s) plus one libvirtd start on a warm cache.
    let until = Instant::now() + Duration::from_secs(20);
    while hv.connects() < 2 {
        assert!(
            Instant::now() < until,
            "no reconnection after {:?}; health {:?}",
            t1.elapsed(),
            hv.health()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("reconnected after {:?}", t1.elapsed());
    assert_eq!(hv.health(), HypervisorHealth::Healthy);
    let name = unique_name("restart");
    let xml = format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='KiB'>65536</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n</domain>"
    );
    let uuid = hv.define(xml).await.expect("define after restart");
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event after the restart")
            .expect("channel open");
        if ev.uuid == uuid {
            break ev;
        }
    };
    assert_eq!(ev.kind, LifecycleKind::Defined);
}
