//! Two agent processes must never run on one state directory (issue 9, item 7).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vigil_common::tls::{self, Role};

#[test]
fn a_second_agent_on_the_same_state_dir_exits_naming_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    tls::init_ca(&ca, "test").expect("init CA");
    let certs = dir.path().join("certs");
    tls::issue_cert(&ca, Role::Agent, "hv1", &certs, &[], 30).expect("issue cert");
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "monitors = [\"127.0.0.1:9\"]\nreconnect_ms = 100\nstate_dir = {:?}\nlibvirt_enabled = false\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            state.display().to_string(),
            certs.join("ca.crt").display().to_string(),
            certs.join("hv1.crt").display().to_string(),
            certs.join("hv1.key").display().to_string(),
        ),
    )
    .expect("write config");
    let agent = env!("CARGO_BIN_EXE_vigil-agent");
    let log1 = std::fs::File::create(dir.path().join("agent1.log")).expect("log");
    let mut first = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log1.try_clone().expect("clone")))
        .stderr(Stdio::from(log1))
        .spawn()
        .expect("spawn the first agent");
    // The first agent is up once it logged its start (it took the lock before that).
    let log1 = dir.path().join("agent1.log");
    let end = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log1)
        .unwrap_or_default()
        .contains("starting")
    {
        if let Ok(Some(st)) = first.try_wait() {
            panic!(
                "the first agent exited ({st}): {}",
                std::fs::read_to_string(&log1).unwrap_or_default()
            );
        }
        assert!(Instant::now() < end, "the first agent never started");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut second = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second agent");
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(st)) = second.try_wait() {
            break Some(st);
        }
        if Instant::now() >= end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        let _ = first.kill();
        let _ = first.wait();
        panic!("the second agent kept running on the first one's state_dir");
    };
    let out = second.wait_with_output().expect("second agent output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let still_running = first.try_wait().ok().flatten().is_none();
    let _ = first.kill();
    let _ = first.wait();
    assert!(!status.success(), "the second agent must fail: {stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.id())),
        "the error must name the first agent's PID: {stderr}"
    );
    assert!(
        stderr.contains(&state.display().to_string()),
        "the error must name the state_dir: {stderr}"
    );
    assert!(still_running, "the first agent must keep running");
}
