//! The lab's own state file (`ROOT/lab.json`, written by `up` and `down`) and its timeline
//! (`ROOT/timeline.jsonl`, one JSON object per line, appended by every verb).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::layout::{now_ms, Lab};

/// One machine of the lab: a hypervisor host, a monitor, or a BMC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub index: u32,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// The veth end on the switch namespace's bridge.
    pub switch_port: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpParams {
    pub hosts: u32,
    pub monitors: u32,
    pub vms_per_host: u32,
    pub ha_tag: Option<String>,
    pub tagged_hosts: u32,
    /// The hosts' watchdog timeout (`--watchdog-secs`), when the watchdog is part of the lab.
    #[serde(default)]
    pub watchdog_secs: u32,
}

/// Optional parts of the lab, present when their programs exist.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Components {
    pub faultfs: bool,
    pub observer: bool,
    pub bmc: bool,
    /// A fake watchdog per host (`vigil-lab-watchdog`), armed by its agent.
    #[serde(default)]
    pub watchdog: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    /// Random id; every process the lab starts carries it in `VIGIL_LAB_ID`.
    pub id: String,
    pub prefix: String,
    pub root: PathBuf,
    /// `starting`, `up`, `failed`, `down`.
    pub state: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub params: UpParams,
    pub switch_ns: String,
    /// Every network namespace this lab creates (written before the first is created).
    pub namespaces: Vec<String>,
    pub hosts: Vec<Node>,
    pub monitors: Vec<Node>,
    pub bmcs: Vec<Node>,
    /// Monitors that run a vigil-monitor (every monitor of the lab).
    pub monitors_started: Vec<String>,
    /// The monitors' floating VIP (labs made before it existed have none).
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// The operator's machine, where vigilctl runs (labs made before it existed have none).
    #[serde(default)]
    pub ops: Option<Node>,
    pub vms: Vec<VmSpec>,
    pub components: Components,
    /// FUSE mount points (faultfs), for `down`.
    pub mountpoints: Vec<PathBuf>,
    pub up_ms: Option<u64>,
    pub up_phases: Vec<(String, u64)>,
    pub notes: Vec<String>,
    /// `up --installed DIR`: the root the packages were installed or extracted into; the lab
    /// runs its binaries with the command lines of its units and configs edited from its
    /// /etc/vigil (src/installed.rs). None: the build's binaries and the lab's own configs.
    #[serde(default)]
    pub installed: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub host: String,
}

impl LabState {
    pub fn load(lab: &Lab) -> anyhow::Result<Option<LabState>> {
        let p = lab.state_file();
        match fs::read_to_string(&p) {
            Ok(t) => Ok(Some(
                serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&mut self, lab: &Lab) -> anyhow::Result<()> {
        self.updated_ms = now_ms();
        let p = lab.state_file();
        fs::create_dir_all(&lab.root)?;
        let tmp = p.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> anyhow::Result<&Node> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name} in this lab (hosts: {})", names(&self.hosts)))
    }

    pub fn monitor(&self, name: &str) -> anyhow::Result<&Node> {
        self.monitors
            .iter()
            .find(|h| h.name == name)
            .with_context(|| {
                format!(
                    "no monitor {name} in this lab (monitors: {})",
                    names(&self.monitors)
                )
            })
    }

    /// Any node by name.
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.hosts
            .iter()
            .chain(&self.monitors)
            .chain(&self.bmcs)
            .chain(&self.ops)
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in this lab"))
    }

    pub fn is_up(&self) -> bool {
        self.state == "up"
    }

    /// Addresses (`IP:7440`) of the monitors that run a vigil-monitor.
    pub fn monitor_endpoints(&self) -> Vec<String> {
        self.monitors
            .iter()
            .filter(|m| self.monitors_started.contains(&m.name))
            .map(|m| format!("{}:{}", m.addr, crate::layout::MONITOR_PORT))
            .collect()
    }

    /// What agents and vigilctl are given: the VIP first (it follows the leader), then every
    /// monitor, so that a VIP in flight cuts nobody off (design brief, "The monitors' own HA").
    pub fn client_endpoints(&self) -> Vec<String> {
        self.vip
            .map(|v| format!("{v}:{}", crate::layout::MONITOR_PORT))
            .into_iter()
            .chain(self.monitor_endpoints())
            .collect()
    }
}

/// One line of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: u64,
    /// `fault` (an injected fault or its repair) or `lab` (up, down).
    pub kind: String,
    pub verb: String,
    pub target: Option<String>,
    pub text: String,
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(
        ts_ms: u64,
        kind: &str,
        verb: &str,
        target: Option<&str>,
        text: &str,
        detail: serde_json::Value,
    ) -> Event {
        Event {
            ts_ms,
            kind: kind.into(),
            verb: verb.into(),
            target: target.map(String::from),
            text: text.into(),
            detail,
        }
    }
}

/// Appends an event to the timeline (one `write` of one line: safe with concurrent writers).
pub fn record(lab: &Lab, ev: &Event) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(ev)?;
    line.push('\n');
    fs::create_dir_all(&lab.root)?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.timeline())?;
    f.write_all(line.as_bytes())?;
    Ok(())
}

pub fn read_timeline(lab: &Lab) -> Vec<Event> {
    fs::read_to_string(lab.timeline())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A random id (16 bytes from the kernel's generator, hex).
pub fn new_lab_id() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `hv1, hv2, hv3`: the nodes' names, for an error that lists what exists.
pub fn names(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
