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

// ---- Issue 10: an agent certificate speaks only for its own host --------------------------

/// A client that speaks the agent protocol by hand, frame by frame, with a real agent
/// certificate: what an attacker who owns one hypervisor (and so its certificate) can run
/// instead of the agent.
struct RawAgent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// How a raw session ended before it started: the monitor's close code and reason.
#[derive(Debug)]
struct Refusal {
    code: Option<u32>,
    reason: String,
}

impl RawAgent {
    async fn connect(
        t: &tls::TlsPaths,
        monitor: std::net::SocketAddr,
        hello: Hello,
    ) -> Result<RawAgent, Refusal> {
        let closed = |conn: &quinn::Connection, what: String| match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => Refusal {
                code: u32::try_from(c.error_code.into_inner()).ok(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            other => Refusal {
                code: None,
                reason: format!("{what} ({other:?})"),
            },
        };
        let cfg = vigil_agent::runner::client_config(t).expect("client config");
        let endpoint = endpoint();
        let conn = endpoint
            .connect_with(cfg, monitor, wire::MONITOR_SERVER_NAME)
            .expect("connect")
            .await
            .map_err(|e| Refusal {
                code: None,
                reason: e.to_string(),
            })?;
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        send.write_all(&Preamble::current().to_bytes())
            .await
            .expect("preamble");
        vigil_common::codec::write_frame(&mut send, &wire::AgentToMonitor::Hello(hello))
            .await
            .expect("hello");
        let mut pre = [0u8; Preamble::LEN];
        if let Err(e) = recv.read_exact(&mut pre).await {
            return Err(closed(&conn, e.to_string()));
        }
        match tokio::time::timeout(
            Duration::from_secs(5),
            vigil_common::codec::read_frame::<_, wire::MonitorToAgent>(&mut recv),
        )
        .await
        {
            Ok(Ok(Some(wire::MonitorToAgent::Welcome(_)))) => Ok(RawAgent {
                _endpoint: endpoint,
                conn,
                send,
                recv,
            }),
            Ok(other) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                Err(closed(&conn, format!("no welcome: {other:?}")))
            }
            Err(_) => Err(closed(&conn, "no welcome within 5 s".into())),
        }
    }

    /// Runs the session like an agent would (a heartbeat every 100 ms, whatever comes in is
    /// read and dropped); frames sent on the returned channel go out in order between beats.
    fn run(self) -> tokio::sync::mpsc::Sender<wire::AgentToMonitor> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<wire::AgentToMonitor>(4096);
        let RawAgent {
            _endpoint: endpoint,
            conn,
            mut send,
            mut recv,
        } = self;
        tokio::spawn(async move {
            while let Ok(Some(_)) =
                vigil_common::codec::read_frame::<_, wire::MonitorToAgent>(&mut recv).await
            {
            }
        });
        tokio::spawn(async move {
            let _keep = (endpoint, conn);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut seq = 0u64;
            loop {
                let frame = tokio::select! {
                    _ = tick.tick() => {
                        seq += 1;
                        wire::AgentToMonitor::Heartbeat(wire::Heartbeat {
                            seq,
                            facts: HostFacts::default(),
                            mono_ms: seq * 100,
                            pools: vec![],
                            watchdog_ms: None,
                        })
                    }
                    f = rx.recv() => match f { Some(f) => f, None => return },
                };
                if vigil_common::codec::write_frame(&mut send, &frame)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        tx
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &p.pid().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {}", p.pid());
}

fn wait_up(ctl: &Ctl, mon: &MonitorProc, host: &str) {
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness(host).as_deref() == Some("up")).then_some(())
    })
    .unwrap_or_else(|| panic!("{host} never came up\n{}", mon.proc_.log_text()));
}

/// Issue 10 item 1: command results were matched by a global id, so any agent could answer
/// a command sent to another host (a forged "unreachable" probe answer makes a live host look
/// dead). The attacker owns hvB and runs its own client with hvB's real certificate; it
/// answers every command id while a ping to hvA is pending. The monitor must not take it.
#[test]
fn a_command_result_from_another_hosts_session_is_not_taken() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let hv_a = AgentProc::start(&pki, &dir, "hvA", mon.addr, "");
    let mut hv_b = AgentProc::start(&pki, &dir, "hvB", mon.addr, "");
    wait_up(&ctl, &mon, "hvA");
    wait_up(&ctl, &mon, "hvB");
    // Positive control: hvA answers its pings.
    assert!(ctl.json(&["host", "ping", "hvA"]).is_ok());

    // hvB is taken over: its agent is replaced by the attacker's client.
    hv_b.proc_.kill();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let t = pki.issue(Role::Agent, "hvB");
    let rogue = rt
        .block_on(RawAgent::connect(&t, mon.addr, hello("hvB")))
        .expect("the rogue gets a session with hvB's own certificate");
    let forger = rt.spawn(async move {
        let send = rogue.run();
        loop {
            for id in 0..512u64 {
                let forged = wire::AgentToMonitor::CommandResult {
                    id,
                    outcome: wire::CommandOutcome::Failed {
                        reason: "FORGED by hvB: unreachable".into(),
                    },
                    seq: u64::MAX,
                };
                if send.send(forged).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });

    // hvA is alive but slow to answer for a moment (stopped): its ping stays pending, exposed
    // to the forger.
    signal(&hv_a.proc_, "-STOP");
    let out = ctl.run(&["host", "ping", "hvA"]);
    signal(&hv_a.proc_, "-CONT");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("FORGED"),
        "the monitor took hvB's answer to a command sent to hvA: {text}"
    );
    assert!(!out.status.success(), "hvA was stopped, yet: {text}");
    let log = mon.proc_.log_text();
    assert!(
        log.contains("ignored a command result from another session"),
        "the monitor should warn about the foreign result:\n{log}"
    );
    forger.abort();
    // hvA, running again, is answered normally.
    wait_for(Duration::from_secs(20), || {
        ctl.json(&["host", "ping", "hvA"]).ok()
    })
    .expect("hvA answers its ping again");
}

const VM_UUID: &str = "6d3f1a52-8c1e-4d8b-9a57-1f0e2b3c4d5e";

/// The inactive XML of a plain guest, as libvirt dumps it.
const GOOD_DEFINITION: &str = r#"<domain type='qemu'>
  <name>web1</name>
  <uuid>6d3f1a52-8c1e-4d8b-9a57-1f0e2b3c4d5e</uuid>
  <metadata>
    <vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true"/>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>"#;

/// The same guest with a command line that libvirt hands to QEMU verbatim: code that runs
/// on whichever hypervisor defines it.
const HOSTILE_DEFINITION: &str = r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>6d3f1a52-8c1e-4d8b-9a57-1f0e2b3c4d5e</uuid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=x,path=/tmp/pwn,server=on'/>
  </qemu:commandline>
</domain>"#;

fn ha_domain(generation: u64) -> vigil_common::domain::DomainInfo {
    use vigil_common::domain::{DomainInfo, DomainState, StateReason, VigilMeta};
    DomainInfo {
        uuid: VM_UUID.into(),
        name: "web1".into(),
        state: DomainState::Running,
        reason: StateReason::Booted,
        vcpus: 1,
        memory_kib: 65536,
        disks: vec![],
        pools: Some(vec![]),
        meta: VigilMeta {
            ha: Some(true),
            priority: None,
            generation: Some(generation),
        },
        persistent: true,
    }
}

fn inventory(generation: u64, seq: u64) -> wire::AgentToMonitor {
    wire::AgentToMonitor::Inventory {
        domains: vec![ha_domain(generation)],
        health: vigil_common::domain::HypervisorHealth::Healthy,
        seq,
    }
}

fn events_of_kind(ctl: &Ctl, kind: &str) -> Vec<serde_json::Value> {
    ctl.events()
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Issue 10 item 2: an agent could claim another host's VM (a higher generation moved it)
/// and then replace its stored definition, which is defined verbatim on other hypervisors
/// (`<qemu:commandline>` runs code there). hvA really runs the VM; the attacker, holding
/// hvB's certificate, claims it (inventory, event, definition). Nothing moves, nothing is
/// replaced, one conflict event is raised; and even the owner's own hostile definition is
/// refused, with the stored one kept.
#[test]
fn a_host_cannot_claim_another_hosts_vm_nor_plant_a_hostile_definition() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // hvA reports what its libvirt runs (no libvirt here: the frames its agent would send).
    let a_tls = pki.issue(Role::Agent, "hvA");
    let hv_a = rt
        .block_on(RawAgent::connect(&a_tls, mon.addr, hello("hvA")))
        .expect("hvA session");
    let hv_a = rt.block_on(async { hv_a.run() });
    rt.block_on(hv_a.send(inventory(0, 1))).expect("send");
    let vm = wait_for(Duration::from_secs(20), || {
        ctl.json(&["vm", "show", VM_UUID])
            .ok()
            .filter(|v| v["ha"] == true)
    })
    .unwrap_or_else(|| panic!("the VM never registered\n{}", mon.proc_.log_text()));
    assert_eq!(vm["host"], "hvA", "{vm}");
    rt.block_on(hv_a.send(wire::AgentToMonitor::Definition {
        uuid: VM_UUID.into(),
        xml: GOOD_DEFINITION.into(),
    }))
    .expect("send");
    wait_for(Duration::from_secs(20), || {
        (!events_of_kind(&ctl, "vm_definition_stored").is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the good definition was not stored\n{}",
            mon.proc_.log_text()
        )
    });

    // The attacker on hvB claims the VM, several times and by every path.
    let b_tls = pki.issue(Role::Agent, "hvB");
    let rogue = rt
        .block_on(RawAgent::connect(&b_tls, mon.addr, hello("hvB")))
        .expect("hvB session");
    let rogue = rt.block_on(async { rogue.run() });
    for seq in 1..=3 {
        rt.block_on(rogue.send(inventory(99, seq))).expect("send");
    }
    rt.block_on(rogue.send(wire::AgentToMonitor::DomainEvent {
        event: vigil_common::domain::DomainEvent {
            uuid: VM_UUID.into(),
            name: "web1".into(),
            kind: vigil_common::domain::LifecycleKind::Started,
            raw_event: 2,
            raw_detail: 0,
            at_ms: 1,
        },
        generation: Some(99),
        seq: 4,
    }))
    .expect("send");
    rt.block_on(rogue.send(wire::AgentToMonitor::Definition {
        uuid: VM_UUID.into(),
        xml: HOSTILE_DEFINITION.into(),
    }))
    .expect("send");
    let conflict = wait_for(Duration::from_secs(10), || {
        let c = events_of_kind(&ctl, "vm_ownership_conflict");
        (!c.is_empty()).then_some(c)
    });
    std::thread::sleep(Duration::from_millis(1000));
    let vm = ctl.json(&["vm", "show", VM_UUID]).expect("vm show");
    assert_eq!(vm["generation"], 0, "the claim raised the generation: {vm}");
    assert!(
        events_of_kind(&ctl, "vm_moved").is_empty(),
        "the claim moved the VM: {:?}",
        ctl.events()
    );
    assert_eq!(
        events_of_kind(&ctl, "vm_definition_stored").len(),
        1,
        "the claimant replaced the definition: {:?}",
        ctl.events()
    );
    let conflict = conflict.unwrap_or_else(|| panic!("no conflict event: {:?}", ctl.events()));
    assert_eq!(
        events_of_kind(&ctl, "vm_ownership_conflict").len(),
        1,
        "one event per conflict episode, not per report: {conflict:?}"
    );
    let msg = conflict[0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("hvB") && msg.contains("hvA"), "{msg}");

    // The owner itself cannot plant a hostile definition either: refused, the stored one
    // kept, and the refusal says what is wrong.
    rt.block_on(hv_a.send(wire::AgentToMonitor::Definition {
        uuid: VM_UUID.into(),
        xml: HOSTILE_DEFINITION.into(),
    }))
    .expect("send");
    let refused = wait_for(Duration::from_secs(10), || {
        let r = events_of_kind(&ctl, "vm_definition_refused");
        (!r.is_empty()).then_some(r)
    })
    .unwrap_or_else(|| panic!("no refusal event: {:?}", ctl.events()));
    let msg = refused[0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("qemu:commandline"), "{msg}");
    assert_eq!(events_of_kind(&ctl, "vm_definition_stored").len(), 1);
    let vm = ctl.json(&["vm", "show", VM_UUID]).expect("vm show");
    assert_eq!(vm["definition_stored"], true, "{vm}");
}

/// Issue 10 item 3: zone and cluster in a hello were self-asserted, so a host could move
/// itself into another zone (and be chosen to restart VMs there, or avoid being fenced).
/// They are pinned in the host record when it first registers; a hello that differs is
/// refused, naming both values, and only an operator moves a host.
#[test]
fn an_agent_cannot_move_its_host_into_another_zone() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(&pki, &dir, DETECTOR_TOML);
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(20));
    let mut agent = AgentProc::start(
        &pki,
        &dir,
        "hvA",
        mon.addr,
        "zone = \"z1\"\ncluster = \"c1\"",
    );
    wait_up(&ctl, &mon, "hvA");
    assert_eq!(
        ctl.json(&["host", "show", "hvA"]).expect("show")["zone"],
        "z1"
    );
    agent.proc_.kill();

    let rt = rt();
    let t = pki.issue(Role::Agent, "hvA");
    let mut moved = hello("hvA");
    moved.zone = "z2".into();
    moved.cluster = "c1".into();
    let refusal = match rt.block_on(RawAgent::connect(&t, mon.addr, moved.clone())) {
        Ok(_) => panic!("an agent moved its own host into zone z2"),
        Err(r) => r,
    };
    assert_eq!(refusal.code, Some(wire::close::UNAUTHORIZED), "{refusal:?}");
    assert!(
        refusal.reason.contains("z1") && refusal.reason.contains("z2"),
        "the refusal must name both zones: {}",
        refusal.reason
    );
    let shown = ctl.json(&["host", "show", "hvA"]).expect("show");
    assert_eq!(shown["zone"], "z1", "{shown}");
    wait_for(Duration::from_secs(10), || {
        (!events_of_kind(&ctl, "host_placement_refused").is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("no event for the refusal: {:?}", ctl.events()));

    // The operator moves the host; then its agent, configured for z2, is welcome.
    let out = ctl
        .json(&["host", "place", "hvA", "--zone", "z2", "--cluster", "c1"])
        .expect("host place");
    assert_eq!(out["zone"], "z2", "{out}");
    rt.block_on(RawAgent::connect(&t, mon.addr, moved))
        .expect("the hello matches the record the operator wrote");
    assert_eq!(
        ctl.json(&["host", "show", "hvA"]).expect("show")["zone"],
        "z2"
    );
}
