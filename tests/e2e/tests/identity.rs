//! Mutual TLS and identity: only certificates of the cluster CA get in, the identity comes
//! from the certificate, and protocol versions are checked.

#[path = "../harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::*;
use vigil_agent::session::{Session, SessionError};
use vigil_common::tls::{self, Role, TransportTuning};
use vigil_common::wire::{self, Hello, HostFacts, Preamble};

fn hello(host: &str) -> Hello {
    Hello {
        host: host.into(),
        agent_version: "test".into(),
        zone: "default".into(),
        cluster: "default".into(),
        facts: HostFacts::default(),
        instance: 1,
        pools: vec![],
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint")
}

fn host_names(ctl: &Ctl) -> Vec<String> {
    ctl.json(&["host", "list"])
        .expect("host list")
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|h| h["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn agent_from_another_ca_or_without_certificate_is_never_registered() {
    let pki = Pki::new();
    let foreign = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));

    // A foreign agent: its certificate is valid, but from another CA. It trusts our CA so
    // that only the monitor's client verification can stop it.
    let mut t = foreign.issue(Role::Agent, "intruder");
    t.ca = pki.issue(Role::Agent, "hv-good").ca;
    let mut intruder = AgentProc::start_with_tls(&t, &dir, "intruder", mon.addr, "");

    // A client with no certificate at all, straight on QUIC.
    let rt = rt();
    let no_cert = rt.block_on(async {
        let material = pki.issue(Role::Agent, "hv-good").load().expect("load");
        let mut tls_cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(material.roots)
            .with_no_client_auth();
        tls_cfg.alpn_protocols = vec![wire::ALPN_AGENT.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg).expect("quic");
        let cfg = quinn::ClientConfig::new(Arc::new(quic));
        Session::open(&endpoint(), cfg, mon.addr, hello("nocert")).await
    });
    assert!(
        no_cert.is_err(),
        "a client without certificate got a session"
    );

    // Positive control: a good agent registers meanwhile.
    let _good = AgentProc::start(&pki, &dir, "hv-good", mon.addr, "");
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness("hv-good").as_deref() == Some("up")).then_some(())
    })
    .expect("the good agent comes up");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(host_names(&ctl), vec!["hv-good".to_string()]);
    assert!(
        mon.proc_.log_text().contains("handshake failed"),
        "monitor should log the refused handshakes:\n{}",
        mon.proc_.log_text()
    );
    // The intruder keeps retrying and says why in its log.
    intruder.proc_.kill();
    let ilog = intruder.proc_.log_text();
    assert!(
        ilog.contains("cannot reach monitor") || ilog.contains("refused"),
        "{ilog}"
    );
}

#[test]
fn agent_cannot_report_as_another_host() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let victim = pki.issue(Role::Agent, "hv2");
    let _victim_agent =
        AgentProc::start_with_tls(&victim, &dir, "hv2", mon.addr, "zone = \"z-real\"");
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness("hv2").as_deref() == Some("up")).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "hv2 never came up\nmonitor log:\n{}\nagent log:\n{}",
            mon.proc_.log_text(),
            _victim_agent.proc_.log_text()
        )
    });

    let rt = rt();
    let t = pki.issue(Role::Agent, "hv1");
    let result = rt.block_on(async {
        let cfg = vigil_agent::runner::client_config(&t).expect("client config");
        let mut h = hello("hv2");
        h.zone = "z-fake".into();
        Session::open(&endpoint(), cfg, mon.addr, h).await
    });
    match result {
        Err(SessionError::Refused { reason, .. }) => {
            assert!(
                reason.contains("certificate is for host \"hv1\""),
                "{reason}"
            );
            assert!(reason.contains("claims host \"hv2\""), "{reason}");
        }
        Err(other) => panic!("refused for the wrong reason: {other}"),
        Ok(_) => panic!("an agent spoke for another host"),
    }
    // hv2's record is untouched and hv1 was not registered by the attempt.
    let hv2 = ctl.json(&["host", "show", "hv2"]).expect("hv2");
    assert_eq!(hv2["zone"], "z-real");
    assert!(!host_names(&ctl).contains(&"hv1".to_string()));

    // An admin certificate cannot pose as an agent either.
    let admin = pki.issue(Role::Admin, "operator");
    let result = rt.block_on(async {
        let material = admin.load().expect("load");
        let cfg = tls::client_config(material, wire::ALPN_AGENT, TransportTuning::default())
            .expect("cfg");
        Session::open(&endpoint(), cfg, mon.addr, hello("operator")).await
    });
    match result {
        Err(SessionError::Refused { reason, .. }) => {
            assert!(reason.contains("only agent certificates"), "{reason}")
        }
        other => panic!("admin certificate accepted as agent: {:?}", other.err()),
    }

    // The agent binary refuses a config whose host differs from its certificate.
    let cfg_path = dir.join("mismatch.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "host = \"hv9\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            t.ca.display().to_string(),
            t.cert.display().to_string(),
            t.key.display().to_string()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(bin("agent"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("--check")
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("field `host`") && err.contains("hv9") && err.contains("hv1"),
        "{err}"
    );
}

#[test]
fn a_different_protocol_version_is_refused_naming_both_versions() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let t = pki.issue(Role::Agent, "hv1");
    let rt = rt();
    let reason = rt.block_on(async {
        let cfg = vigil_agent::runner::client_config(&t).expect("cfg");
        let conn = endpoint()
            .connect_with(cfg, mon.addr, wire::MONITOR_SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let future = Preamble {
            version: wire::PROTOCOL_VERSION + 41,
        };
        send.write_all(&future.to_bytes()).await.expect("write");
        let mut buf = [0u8; 8];
        let _ = recv.read_exact(&mut buf).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(
                    u32::try_from(c.error_code.into_inner()).ok(),
                    Some(wire::close::VERSION_MISMATCH)
                );
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            other => panic!("expected an application close, got {other:?}"),
        }
    });
    let v = wire::PROTOCOL_VERSION;
    assert!(
        reason.contains(&format!("monitor speaks version {v}")),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("agent speaks version {}", v + 41)),
        "{reason}"
    );
}
