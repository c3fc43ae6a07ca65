//! A self-fence report is never dropped: one left in the agent's state directory by an
//! earlier agent process is delivered on connect, recorded once, noted by the monitor (the
//! agent then forgets it), and not recorded again after the agent restarts.

#[path = "../harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;

fn self_fenced_events(ctl: &Ctl) -> usize {
    ctl.events()
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("fenced itself"))
        })
        .count()
}

#[test]
fn a_persisted_self_fence_report_is_delivered_once_and_noted() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let state = dir.join("agent-hv1-state");
    std::fs::create_dir_all(&state).expect("state dir");
    let file = state.join("self-fence.json");
    std::fs::write(
        &file,
        r#"{"pending":[{"id":1234,"reason":"lease expired and no storage pool is reachable","destroyed":[],"wall_ms":1}]}"#,
    )
    .expect("seed a pending report");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let mut agent = AgentProc::start(&pki, &dir, "hv1", mon.addr, "");
    wait_for(Duration::from_secs(30), || {
        (self_fenced_events(&ctl) == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("the report never arrived: {:#?}", ctl.events()));
    // Noted: the agent no longer holds it.
    wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&file).ok()?;
        (!text.contains("1234")).then_some(())
    })
    .expect("the agent forgets a noted report");
    // Restarted, the agent has nothing to resend; and resends (if any) are not recorded again.
    agent.proc_.kill();
    let _agent = AgentProc::start(&pki, &dir, "hv1", mon.addr, "");
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness("hv1").as_deref() == Some("up")).then_some(())
    })
    .expect("hv1 up again");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(self_fenced_events(&ctl), 1, "{:#?}", ctl.events());
}
