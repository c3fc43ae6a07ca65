//! The operator's fencing commands against a real monitor over mutual TLS (issue 9, item 11):
//! `vigilctl host fence H` runs H's fence agent now, `vigilctl host confirm-off H` records the
//! operator's own proof, `vigilctl fencing release` lifts a mass-failure hold. Each is refused
//! when it does not fit (a host that is up, no hold), and each act is in the event log with
//! the admin certificate's name. (A real hold needs HA VMs, so libvirt: the hold and its
//! release are covered by the simulator's golden scenario 43.)

#[path = "../harness.rs"]
mod harness;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use harness::*;
use vigil_common::tls::Role;

fn phase(ctl: &Ctl, host: &str) -> Option<String> {
    let v = ctl.json(&["host", "show", host]).ok()?;
    v.get("phase")?.get("phase")?.as_str().map(String::from)
}

/// Down, and its session gone (the monitor refuses both verbs while the agent is connected).
fn gone(ctl: &Ctl, host: &str) -> bool {
    ctl.json(&["host", "show", host])
        .is_ok_and(|v| v["liveness"] == "down" && v["connected"] == serde_json::Value::Bool(false))
}

fn messages(ctl: &Ctl, host: &str) -> Vec<String> {
    ctl.events()
        .iter()
        .filter(|e| e.get("host").and_then(|h| h.as_str()) == Some(host))
        .filter_map(|e| e.get("message").and_then(|m| m.as_str()).map(String::from))
        .collect()
}

#[test]
fn vigilctl_fence_confirm_off_and_release_are_recorded_with_the_admin() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    std::fs::create_dir_all(&dir).expect("mkdir");
    // A fence agent that confirms power off (exit 0) and says it ran.
    let marker = dir.join("fenced-by-agent");
    let agent_script = dir.join("fence_fake");
    std::fs::write(
        &agent_script,
        format!(
            "#!/bin/sh\ncat > {:?}\nexit 0\n",
            marker.display().to_string()
        ),
    )
    .expect("write fence agent");
    std::fs::set_permissions(&agent_script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let fencing = format!(
        "[fencing]\n[[fencing.hosts]]\nhost = \"hv1\"\nagent = {:?}\n",
        agent_script.display().to_string()
    );
    let mon = MonitorProc::start(&pki, &dir, &format!("{DETECTOR_TOML}{fencing}"));
    let ctl = Ctl {
        tls: pki.issue(Role::Admin, "alice"),
        monitors: vec![mon.addr],
    };
    ctl.wait_ready(Duration::from_secs(20));
    let mut hv1 = AgentProc::start(&pki, &dir, "hv1", mon.addr, "");
    let mut hv2 = AgentProc::start(&pki, &dir, "hv2", mon.addr, "");
    for h in ["hv1", "hv2"] {
        wait_for(Duration::from_secs(30), || {
            (ctl.liveness(h).as_deref() == Some("up")).then_some(())
        })
        .unwrap_or_else(|| panic!("{h} never came up"));
    }

    // No hold: nothing to release.
    let e = ctl.json(&["fencing", "release"]).expect_err("no hold");
    assert!(e.contains("no fencing hold is in place"), "{e}");

    // A host that is up is neither fenced without --force nor confirmed off.
    let e = ctl.json(&["host", "fence", "hv1"]).expect_err("hv1 is up");
    assert!(e.contains("--force"), "{e}");
    let e = ctl
        .json(&["host", "confirm-off", "hv2"])
        .expect_err("hv2 is up");
    assert!(e.contains("not down"), "{e}");
    // A host without a fence agent cannot be fenced.
    let e = ctl
        .json(&["host", "fence", "hv2", "--force"])
        .expect_err("no fence agent for hv2");
    assert!(e.contains("no fence agent"), "{e}");

    // hv1 goes silent: the operator runs its fence agent.
    hv1.proc_.kill();
    wait_for(Duration::from_secs(30), || gone(&ctl, "hv1").then_some(())).expect("hv1 down");
    let v = ctl.json(&["host", "fence", "hv1"]).expect("fence hv1");
    assert_eq!(v["result"], "started", "{v}");
    assert_eq!(v["by"], "alice", "{v}");
    wait_for(Duration::from_secs(30), || {
        (phase(&ctl, "hv1").as_deref() == Some("fenced")).then_some(())
    })
    .unwrap_or_else(|| panic!("hv1 never fenced: {:#?}", messages(&ctl, "hv1")));
    assert!(marker.exists(), "the fence agent ran");
    let m = messages(&ctl, "hv1");
    assert!(
        m.iter()
            .any(|s| s.contains("operator alice asked for it (vigilctl host fence)")),
        "{m:#?}"
    );

    // hv2 goes silent: the operator confirms it off, on their word.
    hv2.proc_.kill();
    wait_for(Duration::from_secs(30), || gone(&ctl, "hv2").then_some(())).expect("hv2 down");
    let v = ctl
        .json(&["host", "confirm-off", "hv2"])
        .expect("confirm-off hv2");
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!(phase(&ctl, "hv2").as_deref(), Some("fenced"));
    let m = messages(&ctl, "hv2");
    assert!(
        m.iter()
            .any(|s| s.contains("operator alice confirmed it powered off")),
        "{m:#?}"
    );
    let events = ctl.events();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "host_confirmed_off" && e["by"] == "alice"),
        "{events:#?}"
    );
    // Once fenced, again is a no-op.
    let v = ctl
        .json(&["host", "confirm-off", "hv2"])
        .expect("confirm-off again");
    assert_eq!(v["result"], "unchanged", "{v}");
}
