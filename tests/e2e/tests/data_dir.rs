//! Starting a new cluster is an explicit act (issue 9, item 8): a monitor that finds no
//! database in its `data_dir` refuses to start unless told `--init`, and `--init` refuses a
//! `data_dir` that already holds a cluster. A missing or mistyped `data_dir` must never
//! silently create an empty cluster (generations from 0, HA flags gone).

#[path = "../harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use harness::*;

/// `EX_CONFIG`, the monitor's exit status when it refuses its data directory.
const EXIT_DATA_DIR: i32 = 78;

fn exit_of(mon: &mut MonitorProc) -> ExitStatus {
    wait_for(Duration::from_secs(20), || mon.proc_.try_exit()).unwrap_or_else(|| {
        panic!(
            "the monitor kept running; its log:\n{}",
            mon.proc_.log_text()
        )
    })
}

#[test]
fn a_monitor_with_a_missing_data_dir_refuses_to_start_without_init() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let (config, data_dir) = MonitorProc::write_config(&pki, &dir, addr, DETECTOR_TOML);
    let db = data_dir.join("raft.redb");

    // No database, no --init: refuses, names the path and the flag, creates nothing.
    let mut mon = MonitorProc::spawn_with(config.clone(), addr, data_dir.clone(), &dir, false);
    let st = exit_of(&mut mon);
    let log = mon.proc_.log_text();
    assert_eq!(st.code(), Some(EXIT_DATA_DIR), "{log}");
    assert!(
        log.contains(&db.display().to_string()),
        "names the path: {log}"
    );
    assert!(log.contains("--init"), "names the flag: {log}");
    assert!(
        !data_dir.exists(),
        "nothing created in {}",
        data_dir.display()
    );

    // With --init it starts and serves.
    let mut mon = MonitorProc::spawn_with(config.clone(), addr, data_dir.clone(), &dir, true);
    let ctl = Ctl::new(&pki, vec![addr]);
    ctl.wait_ready(Duration::from_secs(20));
    assert!(db.exists());
    let mut agent = AgentProc::start(&pki, &dir, "hv1", addr, "");
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness("hv1").as_deref() == Some("up")).then_some(())
    })
    .expect("hv1 up");
    ctl.json(&["host", "tag", "add", "hv1", "ha"]).expect("tag");
    agent.proc_.kill();
    mon.proc_.terminate();

    // --init again on the existing database: refused, the cluster untouched.
    let mut again = MonitorProc::spawn_with(config.clone(), addr, data_dir.clone(), &dir, true);
    let st = exit_of(&mut again);
    let log = again.proc_.log_text();
    assert_eq!(st.code(), Some(EXIT_DATA_DIR), "{log}");
    assert!(log.contains("already holds a cluster"), "{log}");
    assert!(log.contains(&db.display().to_string()), "{log}");

    // A normal start (no --init) runs the same cluster.
    let _mon = MonitorProc::spawn_with(config, addr, data_dir, &dir, false);
    ctl.wait_ready(Duration::from_secs(20));
    let hv1 = ctl.json(&["host", "show", "hv1"]).expect("hv1 kept");
    assert_eq!(hv1["tags"], serde_json::json!(["ha"]));
}
