//! Backup and restore of the monitor database (issue 12 item 6), with real processes: a
//! monitor (`--init`, `[raft] listen`) holds hosts (a real agent and seeder agents running
//! the real agent session code), HA VMs with generations, tags, a maintenance flag, an
//! anti-affinity group, priorities and events; `vigilctl db backup` writes a backup; every
//! monitor's data is wiped; `vigil-monitor --restore` rebuilds a one-node cluster from the
//! file; the agents come back to it; a second backup of the restored cluster is compared
//! with the first field by field (hosts, VM records, the event log as a prefix); then a
//! second monitor is added back (`--join`, `vigilctl server add`) and holds the same state.
//! And the refusals: a restore over an existing database (exit 78, nothing touched), a
//! corrupt file, an existing backup file without `--force`, a viewer certificate.
//!
//! `cargo test -p vigil-e2e --test backup_restore`

#[path = "../cluster_support.rs"]
mod cluster_support;
#[path = "../harness.rs"]
mod harness;
#[path = "../scale_support.rs"]
mod scale_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::*;
use vigil_common::tls::Role;
use vigil_monitor::backup::{self, Backup};

const WAIT: Duration = Duration::from_secs(30);

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().expect("addr")
}

/// Runs `vigil-monitor --config CONFIG FLAGS` and waits (bounded) for it to exit: for
/// starts that must be refused. Returns (exit code, log).
fn refused_start(config: &Path, flags: &[&str], log: &Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("monitor"));
    cmd.arg("--config").arg(config).args(flags);
    let mut p = Proc::spawn(cmd, log.to_path_buf());
    let status = wait_for(WAIT, || p.try_exit())
        .unwrap_or_else(|| panic!("the monitor was expected to refuse {flags:?} and exit"));
    (status.code(), p.log_text())
}

fn backup_to(ctl: &Ctl, file: &Path) -> Backup {
    let out = ctl.run(&["db", "backup", file.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "db backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("wrote"), "{text}");
    backup::read_file(file).expect("the backup verifies")
}

#[test]
fn backup_wipe_restore_add_back_keeps_every_field() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("mon1");
    let addr = loopback();
    let raft = loopback();
    let extra = format!("{DETECTOR_TOML}[raft]\nlisten = \"{raft}\"\n");
    let (config, data_dir) = MonitorProc::write_config_as(&pki, &dir, addr, 1, "mon1", &extra);
    let mut mon =
        MonitorProc::spawn_flags(config.clone(), addr, data_dir.clone(), &dir, &["--init"]);
    let ctl = Ctl::new(&pki, vec![addr]);
    ctl.wait_started(&mut mon, WAIT).expect("mon1 started");

    // Hosts and VMs, the way production gets them: agents' hellos and inventories.
    let seeders = scale_support::Seeders::start(&pki.ca_dir(), addr, 2, 3, WAIT);
    let _hv1 = AgentProc::start(&pki, &dir, "hv1", addr, "zone = \"z1\"\ncluster = \"c1\"");
    for h in ["hv1", "seed0000", "seed0001"] {
        wait_for(WAIT, || {
            (ctl.liveness(h).as_deref() == Some("up")).then_some(())
        })
        .unwrap_or_else(|| panic!("{h} never came up"));
    }
    let vm = |h, i| scale_support::vm_uuid(h, i);
    for args in [
        vec!["host", "tag", "add", "seed0000", "ha"],
        vec!["host", "tag", "add", "seed0000", "rack-7"],
        vec!["host", "tag", "add", "hv1", "gpu"],
        vec!["host", "maintenance", "on", "hv1"],
        vec!["vm", "ha", "disable", &vm(1, 2)],
        vec!["vm", "ha", "enable", &vm(0, 1), "--priority", "7"],
        vec!["vm", "anti-affinity", &vm(0, 0), "db"],
        vec!["vm", "anti-affinity", &vm(1, 0), "db"],
    ] {
        ctl.json(&args)
            .unwrap_or_else(|e| panic!("vigilctl {args:?}: {e}"));
    }

    // The backup, through the real vigilctl.
    let file = pki.dir.path().join("cluster.vigil-backup");
    let before = backup_to(&ctl, &file);
    let s = &before.state;
    assert_eq!(s.hosts.len(), 3, "{:?}", s.hosts.keys());
    assert_eq!(s.vms.len(), 6);
    assert_eq!(before.header.source_node, 1);
    assert!(before.header.last_applied.is_some());
    assert!(s.hosts["seed0000"].tags.contains("rack-7"));
    assert!(s.hosts["hv1"].maintenance);
    assert!(!s.vms[&vm(1, 2)].ha);
    assert_eq!(s.vms[&vm(0, 1)].priority, 7);
    assert_eq!(s.vms[&vm(0, 0)].anti_affinity.as_deref(), Some("db"));
    assert!(s.vms.values().all(|v| v.generation == 1));
    assert!(s.events.len() >= 10, "{}", s.events.len());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file).expect("meta").permissions(),
    );
    assert_eq!(
        mode & 0o077,
        0,
        "the backup is readable by others: {mode:o}"
    );

    // Never over an existing file without --force; a viewer may not take one.
    let again = ctl.run(&["db", "backup", file.to_str().expect("path")]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let viewer = Ctl {
        tls: pki.issue(Role::Viewer, "bob"),
        monitors: vec![addr],
    };
    let other = pki.dir.path().join("viewer.vigil-backup");
    let refused = viewer.run(&["db", "backup", other.to_str().expect("path")]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs an admin certificate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!other.exists());
    let inspect = ctl
        .json(&["db", "inspect", file.to_str().expect("path")])
        .expect("inspect");
    assert_eq!(inspect["hosts"], 3);

    // A restore never replaces what is stored: refused on mon1's live data directory.
    mon.proc_.terminate();
    let (code, log) = refused_start(
        &config,
        &["--restore", file.to_str().expect("path")],
        &dir.join("refused-restore.log"),
    );
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("--restore refused"), "{log}");
    assert!(data_dir.join("raft.redb").exists());

    // Wipe all; a corrupt file is refused and creates nothing.
    std::fs::remove_dir_all(&data_dir).expect("wipe");
    let corrupt = pki.dir.path().join("corrupt.vigil-backup");
    let mut bytes = std::fs::read(&file).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&corrupt, &bytes).expect("write");
    let (code, log) = refused_start(
        &config,
        &["--restore", corrupt.to_str().expect("path")],
        &dir.join("corrupt-restore.log"),
    );
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("checksum mismatch"), "{log}");
    assert!(!data_dir.join("raft.redb").exists());

    // Restore (same node id, addresses and certificate), and the agents find it again.
    let mut mon = MonitorProc::spawn_flags(
        config.clone(),
        addr,
        data_dir.clone(),
        &dir,
        &["--restore", file.to_str().expect("path")],
    );
    ctl.wait_started(&mut mon, WAIT)
        .expect("restored mon1 started");
    for h in ["hv1", "seed0000", "seed0001"] {
        wait_for(WAIT, || {
            (ctl.liveness(h).as_deref() == Some("up")).then_some(())
        })
        .unwrap_or_else(|| panic!("{h} never came back after the restore"));
    }
    // Every host listed its domains: the restored leader acts again.
    let adopted = wait_for(WAIT, || {
        ctl.events()
            .iter()
            .any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("every host listed its domains"))
            })
            .then_some(())
    });
    assert!(adopted.is_some(), "{:#?}", ctl.events());

    let after_file = pki.dir.path().join("restored.vigil-backup");
    let after = backup_to(&ctl, &after_file);
    let t = &after.state;
    // Field by field: every host record and every VM record as it was.
    assert_eq!(
        t.hosts.keys().collect::<Vec<_>>(),
        s.hosts.keys().collect::<Vec<_>>()
    );
    for (name, h) in &s.hosts {
        let r = &t.hosts[name];
        assert_eq!(r.zone, h.zone, "{name} zone");
        assert_eq!(r.cluster, h.cluster, "{name} cluster");
        assert_eq!(r.tags, h.tags, "{name} tags");
        assert_eq!(r.maintenance, h.maintenance, "{name} maintenance");
        assert_eq!(r.phase, h.phase, "{name} phase");
        assert_eq!(
            r.registered_at_ms, h.registered_at_ms,
            "{name} registered_at_ms"
        );
        assert_eq!(r, h, "host {name}");
    }
    assert_eq!(
        t.vms.keys().collect::<Vec<_>>(),
        s.vms.keys().collect::<Vec<_>>()
    );
    for (uuid, v) in &s.vms {
        let r = &t.vms[uuid];
        assert_eq!(r.generation, v.generation, "{uuid} generation");
        assert_eq!(r.host, v.host, "{uuid} host");
        assert_eq!(
            (r.ha, r.priority),
            (v.ha, v.priority),
            "{uuid} ha, priority"
        );
        assert_eq!(r.anti_affinity, v.anti_affinity, "{uuid} anti-affinity");
        assert_eq!(r.phase, v.phase, "{uuid} phase");
        assert_eq!(r, v, "VM {uuid}");
    }
    // Every event kept, with its id; the restored cluster's own come after them.
    let kept: Vec<_> = t.events.iter().take(s.events.len()).cloned().collect();
    let orig: Vec<_> = s.events.iter().cloned().collect();
    assert_eq!(kept, orig, "the event log is a prefix of the restored one");
    let new: Vec<&str> = t
        .events
        .iter()
        .skip(s.events.len())
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        new.iter().any(|m| m.contains("restored from a backup")),
        "{new:#?}"
    );
    assert!(!new.iter().any(|m| m.contains("fencing host")), "{new:#?}");
    assert!(!new.iter().any(|m| m.contains("ordered start")), "{new:#?}");
    let r = t.restored.as_ref().expect("marked restored");
    assert!(r.adopted);
    assert_eq!(r.backup_created_at_ms, before.header.created_at_ms);
    // Raft went on from the backup's position.
    let (b, a) = (
        before.header.last_applied.expect("position"),
        after.header.last_applied.expect("position"),
    );
    assert!(a > b, "{a:?} after {b:?}");

    // Add another monitor back, as to any cluster: it receives the state.
    let dir2 = pki.dir.path().join("mon2");
    let addr2 = loopback();
    let raft2 = loopback();
    let extra2 = format!("{DETECTOR_TOML}[raft]\nlisten = \"{raft2}\"\n");
    let (config2, data2) = MonitorProc::write_config_as(&pki, &dir2, addr2, 2, "mon2", &extra2);
    let mut mon2 = MonitorProc::spawn_flags(config2, addr2, data2, &dir2, &["--join"]);
    let ctl2 = Ctl::new(&pki, vec![addr2]);
    ctl2.wait_started(&mut mon2, WAIT).expect("mon2 started");
    let out = ctl.run(&["server", "add", "2", &raft2.to_string()]);
    assert!(
        out.status.success(),
        "server add 2: {}\nmon2 log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&mon2.proc_.log_text(), 30)
    );
    let on_mon2 = wait_for(WAIT, || {
        let v = ctl2.json(&["vm", "show", &vm(0, 1)]).ok()?;
        (v["priority"] == 7 && v["generation"] == 1).then_some(v)
    });
    assert!(on_mon2.is_some(), "mon2 never held the restored VM record");
    let hv = ctl2
        .json(&["host", "show", "seed0000"])
        .expect("host on mon2");
    assert_eq!(hv["tags"], serde_json::json!(["ha", "rack-7"]));
    let hv1 = ctl2.json(&["host", "show", "hv1"]).expect("hv1 on mon2");
    assert_eq!(hv1["maintenance"], true);
    drop(seeders);
}

/// A backup larger than one admin frame comes in pieces on one connection, through the
/// real vigilctl code (`ctl::db::fetch`) against a real monitor, and is the state as it was.
#[test]
fn a_large_backup_is_fetched_in_pieces_and_verifies() {
    use vigil_monitor::state::{EventKind, Severity, StateCommand};
    let pki = Pki::new();
    let dir = pki.dir.path().join("mon");
    let cfg = vigil_common::config::MonitorConfig {
        data_dir: dir.join("data"),
        listen: loopback(),
        tls: pki.issue(Role::Monitor, "mon1"),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mon =
            vigil_monitor::server::Monitor::start(cfg, vigil_monitor::server::StartMode::Init)
                .await
                .expect("monitor");
        assert!(mon.raft.wait_for_leader(WAIT).await.is_some());
        mon.raft
            .write(StateCommand::RegisterHost {
                at_ms: 1,
                name: "hv1".into(),
                zone: "z1".into(),
                cluster: "c1".into(),
                agent_version: "test".into(),
            })
            .await
            .expect("host");
        let filler = "x".repeat(400);
        for i in 0..4_000u64 {
            mon.raft
                .write(StateCommand::RecordEvent {
                    at_ms: 1_000 + i,
                    severity: Severity::Info,
                    host: Some("hv1".into()),
                    kind: EventKind::HostRejoined,
                    message: format!("event {i} {filler}"),
                })
                .await
                .expect("event");
        }
        mon.raft.ensure_linearizable().await.expect("leader");
        let before = mon.raft.read(|s| s.clone());
        let ctl_tls = pki.issue(Role::Admin, "operator");
        let mut c = vigil_monitor::ctl::client::AdminClient::new(
            &ctl_tls,
            vec![mon.local_addr],
            Duration::from_secs(30),
        )
        .expect("client");
        let (bytes, decoded) = vigil_monitor::ctl::db::fetch(&mut c).await.expect("fetch");
        c.close();
        assert!(
            bytes.len() > 3 * vigil_common::wire::BACKUP_CHUNK_BYTES,
            "{} bytes: not several pieces",
            bytes.len()
        );
        assert_eq!(backup::decode(&bytes).expect("decode"), decoded);
        assert_eq!(decoded.state.hosts, before.hosts);
        assert_eq!(decoded.state.vms, before.vms);
        let kept: Vec<_> = decoded
            .state
            .events
            .iter()
            .take(before.events.len())
            .collect();
        assert_eq!(kept, before.events.iter().collect::<Vec<_>>());
        assert_eq!(decoded.header.events, decoded.state.events.len());
        mon.shutdown().await;
    });
}

/// The guard against two clusters: a restore while monitors of the backed-up cluster still
/// run would make a second decider for the same hosts (both would order starts, and a VM
/// could run twice). Three monitors; mon1's data is lost while mon2 and mon3 go on: the
/// restore on mon1 is refused, names them, and creates nothing. Once they are stopped, the
/// same restore goes ahead.
#[test]
fn a_restore_is_refused_while_the_old_cluster_still_runs() {
    let pki = Pki::new();
    let mut cluster = cluster_support::start_cluster(&pki, pki.dir.path(), 3, DETECTOR_TOML, WAIT)
        .unwrap_or_else(|e| panic!("three monitors: {e}"));
    let leader = cluster.leader;
    let file = pki.dir.path().join("three.vigil-backup");
    let taken = backup_to(&cluster.leader().ctl, &file);
    assert_eq!(
        taken.header.source_members.len(),
        3,
        "{:?}",
        taken.header.source_members
    );

    // The monitor to restore on, and the two that still run.
    let restore_on = if leader == 1 { 2 } else { 1 };
    let m = cluster
        .members
        .iter_mut()
        .find(|m| m.id == restore_on)
        .expect("member");
    m.mon.proc_.kill();
    std::fs::remove_dir_all(&m.mon.data_dir).expect("wipe");
    let config = m.mon.config.clone();
    let data_dir = m.mon.data_dir.clone();
    let log_dir = config.parent().expect("dir").to_path_buf();
    let flags = ["--restore", file.to_str().expect("path")];
    let (code, log) = refused_start(&config, &flags, &log_dir.join("refused-while-running.log"));
    assert_eq!(code, Some(78), "{log}");
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != restore_on).collect();
    for id in &others {
        assert!(
            log.contains("--restore refused") && log.contains(&format!("mon{id} at")),
            "mon{id} not named: {log}"
        );
    }
    assert!(
        !data_dir.join("raft.redb").exists(),
        "a refused restore created a database"
    );

    // The old cluster stopped: the same restore builds the new one-node cluster.
    for m in cluster.members.iter_mut().filter(|m| m.id != restore_on) {
        m.mon.proc_.kill();
    }
    let addr = cluster
        .members
        .iter()
        .find(|m| m.id == restore_on)
        .expect("member")
        .mon
        .addr;
    let mut mon = MonitorProc::spawn_flags(config, addr, data_dir, &log_dir, &flags);
    let ctl = Ctl::new(&pki, vec![addr]);
    ctl.wait_started(&mut mon, WAIT)
        .expect("the restore goes ahead once the old cluster is stopped");
    let status = ctl.json(&["server", "list"]).expect("server list");
    assert_eq!(
        status["servers"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}
