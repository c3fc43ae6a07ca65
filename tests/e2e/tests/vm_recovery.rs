//! VM-crash recovery against a real (private) libvirtd with real QEMU domains: kill -9 of
//! qemu → restarted with a generation one higher; an operator's destroy is respected; stale
//! start orders are refused; a domain started behind Vigil's back with a stale generation is
//! destroyed and reported; a VM that crashes on every start backs off and gives up.

#[path = "../harness.rs"]
mod harness;
#[path = "../libvirt_sandbox.rs"]
mod libvirt_sandbox;

use std::time::{Duration, Instant};

use harness::*;
use libvirt_sandbox::LibvirtSandbox;
use serde_json::Value;

/// The sandbox, or `None` (skip) outside CI when libvirt/QEMU are not installed. In CI a
/// missing libvirt is a failure, not a skip.
fn sandbox() -> Option<LibvirtSandbox> {
    if !LibvirtSandbox::available() {
        let why = LibvirtSandbox::unavailable_reason().unwrap_or_default();
        if std::env::var_os("CI").is_some() {
            panic!("libvirt sandbox unavailable in CI: {why}");
        }
        eprintln!("skipping: {why}");
        return None;
    }
    Some(LibvirtSandbox::start().expect("start the libvirt sandbox"))
}

const RECOVERY_TOML: &str = "[recovery]\nmax_restarts_in_place = 3\nmax_relocations = 0\nwindow_ms = 600000\nbackoff_initial_ms = 300\nbackoff_max_ms = 2000\n";

struct Cluster {
    sb: LibvirtSandbox,
    mon: MonitorProc,
    agent: AgentProc,
    ctl: Ctl,
    pki: Pki,
}

fn cluster() -> Option<Cluster> {
    let sb = sandbox()?;
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, &format!("{DETECTOR_TOML}{RECOVERY_TOML}"));
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let agent = AgentProc::start(
        &pki,
        &dir,
        "hv1",
        mon.addr,
        &format!(
            "libvirt_uri = {:?}\npoll_interval_ms = 500\nlibvirt_deadline_ms = 30000",
            sb.uri
        ),
    );
    wait_for(Duration::from_secs(20), || {
        (ctl.liveness("hv1").as_deref() == Some("up")).then_some(())
    })
    .expect("hv1 up");
    Some(Cluster {
        sb,
        mon,
        agent,
        ctl,
        pki,
    })
}

impl Cluster {
    /// Defines and starts a test domain; returns its uuid.
    fn domain(&self, name: &str) -> String {
        let xml = LibvirtSandbox::domain_xml(name, 64);
        let path = self.pki.dir.path().join(format!("{name}.xml"));
        std::fs::write(&path, xml).expect("write xml");
        self.sb
            .virsh_ok(&["define", path.to_str().expect("utf8 path")]);
        self.sb.virsh_ok(&["start", name]);
        self.sb.virsh_ok(&["domuuid", name])
    }

    fn vm(&self, name: &str) -> Option<Value> {
        self.ctl.json(&["vm", "show", name]).ok()
    }

    fn wait_vm(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = None;
        wait_for(timeout, || {
            let v = self.vm(name)?;
            let ok = pred(&v);
            last = Some(v.clone());
            ok.then_some(v)
        })
        .unwrap_or_else(|| {
            panic!(
                "{name}: {what} not reached within {timeout:?}; last view: {last:#?}\nevents: {:#?}\nagent log:\n{}\nmonitor log:\n{}",
                self.ctl.events().iter().map(|e| e["message"].clone()).collect::<Vec<_>>(),
                self.agent.proc_.log_text(),
                self.mon.proc_.log_text()
            )
        })
    }

    fn enable_ha(&self, name: &str) {
        // The agent must have reported the domain first.
        self.wait_vm(name, "reported", Duration::from_secs(20), |v| {
            v["state"] == "running"
        });
        self.ctl
            .json(&["vm", "ha", "enable", name, "--priority", "5"])
            .expect("ha enable");
        self.wait_vm(name, "HA", Duration::from_secs(10), |v| {
            v["ha"] == true && v["phase"] == "running"
        });
    }

    fn kill_qemu(&self, name: &str) -> u32 {
        let pid = wait_for(Duration::from_secs(20), || self.sb.qemu_pid(name)).expect("qemu pid");
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        pid
    }

    fn messages(&self, uuid: &str) -> Vec<String> {
        self.ctl
            .json(&["events", "--limit", "1000"])
            .ok()
            .and_then(|v| v["events"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["vm"] == uuid)
            .filter_map(|e| e["message"].as_str().map(String::from))
            .collect()
    }
}

#[test]
fn killed_qemu_is_restarted_with_the_next_generation() {
    let Some(c) = cluster() else { return };
    let uuid = c.domain("crashy");
    c.enable_ha("crashy");
    let before = c.vm("crashy").expect("vm");
    assert_eq!(before["generation"], 0);

    let t0 = Instant::now();
    let old_pid = c.kill_qemu("crashy");
    let after = c.wait_vm("crashy", "restarted", Duration::from_secs(60), |v| {
        v["generation"] == 1 && v["phase"] == "running" && v["state"] == "running"
    });
    eprintln!(
        "kill -9 → running again (as seen by vigilctl): {:?}",
        t0.elapsed()
    );
    assert_eq!(after["reported_generation"], 1, "{after:#}");
    let new_pid = c.sb.qemu_pid("crashy").expect("new qemu");
    assert_ne!(new_pid, old_pid);
    assert!(
        c.sb.domstate("crashy").starts_with("running"),
        "{}",
        c.sb.domstate("crashy")
    );
    let rec = &after["last_recovery"];
    assert_eq!(rec["to_host"], "hv1");
    assert_eq!(rec["proof"]["proof"], "agent_reported_stopped", "{rec:#}");
    assert_eq!(rec["proof"]["host"], "hv1", "{rec:#}");

    // The agent shipped the HA VM's definition, so it could be started elsewhere.
    c.wait_vm(
        "crashy",
        "definition stored",
        Duration::from_secs(30),
        |v| v["definition_stored"] == true,
    );

    let log = c.messages(&uuid);
    let has = |s: &str| log.iter().any(|m| m.contains(s));
    assert!(has("crashed on hv1 (generation 0)"), "{log:#?}");
    assert!(has("restarting in place"), "{log:#?}");
    assert!(has("with generation 1"), "{log:#?}");
}

#[test]
fn an_operators_destroy_is_respected_and_a_stale_copy_is_destroyed() {
    let Some(c) = cluster() else { return };
    let uuid = c.domain("quiet");
    c.enable_ha("quiet");
    // Crash once, so the newest generation is 1.
    c.kill_qemu("quiet");
    c.wait_vm("quiet", "restarted", Duration::from_secs(60), |v| {
        v["generation"] == 1 && v["state"] == "running"
    });

    // An operator destroys it with virsh: Vigil respects that.
    c.sb.virsh_ok(&["destroy", "quiet"]);
    c.wait_vm("quiet", "stopped", Duration::from_secs(20), |v| {
        v["phase"] == "stopped"
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        c.sb.domstate("quiet").starts_with("shut off"),
        "{}",
        c.sb.domstate("quiet")
    );
    assert_eq!(
        c.vm("quiet").expect("vm")["generation"],
        1,
        "no restart was ordered"
    );

    // Someone starts an old copy (generation 0) behind Vigil's back: the agent destroys it.
    c.sb.virsh_ok(&[
        "metadata",
        "quiet",
        "--uri",
        "urn:vigil:vm:1",
        "--key",
        "vigil",
        "--config",
        "--set",
        "<vm generation=\"0\"/>",
    ]);
    c.sb.virsh_ok(&["start", "quiet"]);
    let destroyed = wait_for(Duration::from_secs(30), || {
        c.messages(&uuid)
            .into_iter()
            .find(|m| m.contains("destroyed VM quiet") && m.contains("generation 0"))
    });
    assert!(
        destroyed.is_some(),
        "stale copy not reported: {:#?}",
        c.messages(&uuid)
    );
    c.sb.wait_state("quiet", Duration::from_secs(20), |s| {
        s.starts_with("shut off")
    })
    .expect("stale copy destroyed");
    let v = c.vm("quiet").expect("vm");
    assert_eq!(
        v["phase"], "stopped",
        "a stale copy does not resume protection: {v:#}"
    );

    // Stopping through Vigil (no ACPI needed): also respected.
    c.sb.virsh_ok(&[
        "metadata",
        "quiet",
        "--uri",
        "urn:vigil:vm:1",
        "--key",
        "vigil",
        "--config",
        "--set",
        "<vm generation=\"1\"/>",
    ]);
    c.sb.virsh_ok(&["start", "quiet"]);
    c.wait_vm("quiet", "running again", Duration::from_secs(30), |v| {
        v["phase"] == "running"
    });
    c.ctl.json(&["vm", "stop", "quiet"]).expect("vm stop");
    c.sb.wait_state("quiet", Duration::from_secs(20), |s| {
        s.starts_with("shut off")
    })
    .expect("stopped through vigil");
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.sb.domstate("quiet").starts_with("shut off"));
    assert_eq!(c.vm("quiet").expect("vm")["phase"], "stopped");
}

#[test]
fn a_vm_that_crashes_on_every_start_gives_up_without_a_storm() {
    let Some(c) = cluster() else { return };
    let uuid = c.domain("doomed");
    c.enable_ha("doomed");
    let mut kills = 0;
    let mut last_pid = None;
    let end = Instant::now() + Duration::from_secs(120);
    // Kill every qemu that comes up, until Vigil gives up.
    while Instant::now() < end {
        let v = c.vm("doomed").expect("vm");
        if v["phase"] == "gave-up" {
            break;
        }
        if let Some(pid) = c.sb.qemu_pid("doomed") {
            if Some(pid) != last_pid && c.sb.domstate("doomed").starts_with("running") {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                last_pid = Some(pid);
                kills += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = c.wait_vm("doomed", "gave up", Duration::from_secs(30), |v| {
        v["phase"] == "gave-up"
    });
    // Budget: 3 restarts in place, then the 4th failure gives up.
    assert_eq!(v["generation"], 3, "{v:#}");
    assert_eq!(kills, 4, "every start was killed once");
    let log = c.messages(&uuid);
    assert!(log.iter().any(|m| m.contains("giving up")), "{log:#?}");
    assert!(log.iter().any(|m| m.contains("backoff")), "{log:#?}");
    // No storm afterwards.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        c.sb.domstate("doomed").starts_with("shut off"),
        "{}",
        c.sb.domstate("doomed")
    );
    assert_eq!(c.vm("doomed").expect("vm")["generation"], 3);
}

#[test]
fn start_orders_are_guarded_by_generations_on_the_agent() {
    use vigil_agent::executor::Executor;
    use vigil_agent::generations::Generations;
    use vigil_agent::libvirt::Hypervisor;
    use vigil_common::wire::{AgentCommand, CommandOutcome};

    let Some(sb) = sandbox() else { return };
    let xml = LibvirtSandbox::domain_xml("guarded", 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let hv = Hypervisor::open(&sb.uri, Duration::from_secs(30));
        let exec = Executor::new(Some(hv.clone()), Generations::in_memory());
        let uuid = hv.define(xml.clone()).await.expect("define");
        exec.merge_generations(&[(uuid.clone(), 5)], true);
        let stale = exec
            .execute(AgentCommand::StartDomain {
                uuid: uuid.clone(),
                generation: 4,
                definition: None,
            })
            .await;
        match stale {
            CommandOutcome::Failed { reason } => {
                assert!(reason.contains("generation 5 is newer"), "{reason}")
            }
            other => panic!("stale start accepted: {other:?}"),
        }
        assert!(sb.domstate("guarded").starts_with("shut off"));
        let ok = exec
            .execute(AgentCommand::StartDomain {
                uuid: uuid.clone(),
                generation: 6,
                definition: None,
            })
            .await;
        assert!(matches!(ok, CommandOutcome::Done { .. }), "{ok:?}");
        let d = hv.get(&uuid).await.expect("get").expect("exists");
        assert_eq!(d.meta.generation, Some(6));
        // The same order again is idempotent; a second copy is never started.
        let again = exec
            .execute(AgentCommand::StartDomain {
                uuid: uuid.clone(),
                generation: 6,
                definition: None,
            })
            .await;
        assert!(matches!(again, CommandOutcome::Done { ref detail } if detail.contains("already running")), "{again:?}");
        hv.destroy(&uuid).await.expect("destroy");
    });
}

#[test]
fn a_hung_libvirtd_is_reported_and_never_stalls_heartbeats() {
    let Some(sb) = sandbox() else { return };
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    // Beats every 100 ms, suspect after 800: heartbeats stalled behind a hung libvirt call
    // would be silent for the whole freeze (longer than the 1,000-ms libvirt deadline the
    // test waits out), while a loaded CI machine still has 700 ms to deliver each beat (the
    // shared 300-ms threshold left 200).
    let mon = MonitorProc::start(
        &pki,
        &dir,
        "[detector]\nheartbeat_interval_ms = 100\nsuspect_after_ms = 800\ndown_after_ms = 1600\n",
    );
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let _agent = AgentProc::start(
        &pki,
        &dir,
        "hv1",
        mon.addr,
        &format!(
            "libvirt_uri = {:?}\npoll_interval_ms = 200\nlibvirt_deadline_ms = 1000",
            sb.uri
        ),
    );
    let hv_state = |h: &Value| h["hypervisor"].clone();
    wait_for(Duration::from_secs(20), || {
        let h = ctl.json(&["host", "show", "hv1"]).ok()?;
        (h["liveness"] == "up" && hv_state(&h) == "Healthy").then_some(())
    })
    .expect("hv1 up with a healthy hypervisor");

    // Freeze libvirtd (SIGSTOP): every libvirt call now hangs.
    let pid = sb
        .recorded_pids()
        .into_iter()
        .find(|(n, _)| n == "libvirtd")
        .map(|(_, p)| p)
        .expect("libvirtd pid");
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
    };
    assert!(signal("-STOP").success());
    let unhealthy = wait_for(Duration::from_secs(20), || {
        let h = ctl.json(&["host", "show", "hv1"]).ok()?;
        hv_state(&h).get("Unhealthy").cloned().map(|u| (h, u))
    });
    // Let libvirtd go again before asserting, so a failure cannot leave it frozen.
    let (during, reason) = {
        let r = unhealthy;
        assert!(signal("-CONT").success());
        r.expect("hypervisor reported unhealthy while libvirtd hangs")
    };
    assert!(
        ["no answer after", "stuck on"]
            .iter()
            .any(|w| reason["reason"].as_str().unwrap_or("").contains(w)),
        "the reason names the hang: {reason}"
    );
    // Heartbeats went on: the host never left "up".
    assert_eq!(during["liveness"], "up", "{during}");
    let events: Vec<String> = ctl
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect();
    assert!(
        !events.iter().any(|m| m.contains("hv1 is suspect")),
        "{events:#?}"
    );
    // And it recovers once libvirtd answers again.
    wait_for(Duration::from_secs(30), || {
        let h = ctl.json(&["host", "show", "hv1"]).ok()?;
        (hv_state(&h) == "Healthy").then_some(())
    })
    .expect("healthy again");
}
