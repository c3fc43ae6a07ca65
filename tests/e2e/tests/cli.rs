//! Bad input gets a clear error naming what is wrong, and nothing stored is lost.

#[path = "../harness.rs"]
mod harness;

use std::process::Command;
use std::time::Duration;

use harness::*;

#[test]
fn vigilctl_errors_name_the_problem() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let _a = AgentProc::start(&pki, &dir, "hv1", mon.addr, "");
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness("hv1").as_deref() == Some("up")).then_some(())
    })
    .expect("hv1 up");

    let err = ctl
        .json(&["host", "show", "nope"])
        .expect_err("unknown host");
    assert!(err.contains("unknown host \"nope\""), "{err}");
    let err = ctl
        .json(&["host", "tag", "add", "nope", "ha"])
        .expect_err("unknown host");
    assert!(err.contains("unknown host \"nope\""), "{err}");
    let err = ctl
        .json(&["host", "tag", "add", "hv1", "bad tag!"])
        .expect_err("bad tag");
    assert!(err.contains("tag \"bad tag!\""), "{err}");
    // The host is unharmed by the rejected writes.
    let h = ctl.json(&["host", "show", "hv1"]).expect("show");
    assert_eq!(h["tags"], serde_json::json!([]));
    // Adding twice is reported as nothing to do.
    ctl.json(&["host", "tag", "add", "hv1", "ha"]).expect("add");
    let out = ctl.run(&["host", "tag", "add", "hv1", "ha"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));

    // No monitor at that address: a clear error, not a hang.
    let dead = Ctl {
        tls: ctl.tls.clone(),
        monitors: vec![format!("127.0.0.1:{}", free_port()).parse().expect("addr")],
    };
    let err = dead.json(&["status"]).expect_err("no monitor");
    assert!(err.contains("no monitor could answer"), "{err}");

    // An agent certificate is not an admin certificate.
    let agent_ctl = Ctl {
        tls: pki.issue(vigil_common::tls::Role::Agent, "hv1"),
        monitors: vec![mon.addr],
    };
    let err = agent_ctl.json(&["status"]).expect_err("agent cert");
    assert!(err.contains("needs an admin certificate"), "{err}");

    // cert issue refuses to overwrite and names bad roles.
    let out = Command::new(bin("vigilctl"))
        .args(["cert", "issue", "--ca"])
        .arg(pki.ca_dir())
        .args(["--role", "boss", "--name", "x", "--out"])
        .arg(dir.join("x"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role \"boss\""));
    let out = Command::new(bin("vigilctl"))
        .args(["ca", "init", "--dir"])
        .arg(pki.ca_dir())
        .output()
        .expect("run");
    assert!(!out.status.success(), "ca init must not overwrite a CA");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn bad_config_files_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            "monitor",
            "node_id = 1\nlisten_addr = \"0.0.0.0:1\"\n",
            "listen_addr",
        ),
        (
            "monitor",
            "[detector]\ndown_after_ms = 100\n",
            "detector.down_after_ms",
        ),
        ("monitor", "node_id = 0\n", "node_id"),
        ("agent", "monitors = [\"nowhere\"]\n", "monitors"),
        ("agent", "zone = \"\"\n", "zone"),
    ];
    for (i, (which, text, field)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("{i}.toml"));
        std::fs::write(&p, text).expect("write");
        let out = Command::new(bin(which))
            .arg("--config")
            .arg(&p)
            .arg("--check")
            .output()
            .expect("run");
        assert!(!out.status.success(), "{which} accepted {text:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field),
            "{which} {text:?}: error does not name {field}: {err}"
        );
        assert!(
            err.contains(&p.display().to_string()),
            "error names the file: {err}"
        );
    }
    // A missing file is named too.
    let out = Command::new(bin("monitor"))
        .args(["--config", "/nonexistent/monitor.toml", "--check"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/monitor.toml"));
}
