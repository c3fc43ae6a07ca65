//! Where everything of a lab lives: the lab root's files, namespace names, addresses, and the
//! programs the lab runs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Default lab root (not under /run: the sandboxes bind their own /run over it).
pub const DEFAULT_ROOT: &str = "/var/lib/vigil-lab";
/// Default prefix of the lab's network namespaces (`vl-sw`, `vl-hv1`, `vl-mon1`, ...).
pub const DEFAULT_PREFIX: &str = "vl";
/// UDP port of every monitor.
pub const MONITOR_PORT: u16 = 7440;
/// The monitors' Raft port (`[raft] listen`), for the other monitors only.
pub const RAFT_PORT: u16 = 7441;
/// Zone and cluster of every lab host.
pub const ZONE: &str = "z1";
pub const CLUSTER: &str = "c1";
/// Memory of each lab VM.
pub const VM_MEMORY_MIB: u32 = 64;
/// Size of each VM's qcow2 disk on the shared storage.
pub const VM_DISK_SIZE: &str = "16M";
/// UDP port of each host's BMC (IPMI over LAN).
pub const BMC_PORT: u16 = 623;
/// Name of the environment variable that marks every process the lab starts (value: lab id).
pub const LAB_ID_ENV: &str = "VIGIL_LAB_ID";

/// A lab root and namespace prefix.
#[derive(Debug, Clone)]
pub struct Lab {
    pub root: PathBuf,
    pub prefix: String,
}

impl Lab {
    pub fn new(root: PathBuf, prefix: String) -> anyhow::Result<Lab> {
        if !root.is_absolute() {
            bail!("the lab root must be an absolute path: {}", root.display());
        }
        let s = root.to_string_lossy();
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/+-".contains(c))
        {
            bail!(
                "the lab root may only contain [A-Za-z0-9._/+-] (it goes into libvirt URIs): {s}"
            );
        }
        for t in ["/run", "/var/run", "/proc", "/sys", "/dev"] {
            if s == t || s.starts_with(&format!("{t}/")) {
                bail!("the lab root may not be inside {t}: {s}");
            }
        }
        if s == "/" {
            bail!("the lab root may not be /");
        }
        // The longest unix socket path a host gets: ROOT/hosts/hvNNN/libvirt/run/libvirt/libvirt-sock.
        if s.len() + "/hosts/hv254/libvirt/run/libvirt/libvirt-admin-sock".len() >= 108 {
            bail!("the lab root is too long for unix socket paths: {s}");
        }
        if prefix.is_empty()
            || prefix.len() > 4
            || !prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!("the namespace prefix must be 1 to 4 characters [a-z0-9]: {prefix:?}");
        }
        Ok(Lab { root, prefix })
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("lab.json")
    }
    pub fn procs_file(&self) -> PathBuf {
        self.root.join("procs.json")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("supervisor.sock")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.root.join("supervisor.log")
    }
    pub fn timeline(&self) -> PathBuf {
        self.root.join("timeline.jsonl")
    }
    pub fn observer_timeline(&self) -> PathBuf {
        self.root.join("observer").join("timeline.jsonl")
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log_file(&self, proc_name: &str) -> PathBuf {
        self.logs_dir()
            .join(format!("{}.log", proc_name.replace('/', "-")))
    }
    pub fn storage_backing(&self) -> PathBuf {
        self.root.join("storage").join("backing")
    }
    /// The common mount point of the shared storage: empty in the root namespace; inside each
    /// host's libvirt sandbox its own faultfs view is bound here (`VIGIL_SANDBOX_BIND`), so a
    /// VM's disk has the same path on every host.
    pub fn storage_shared(&self) -> PathBuf {
        self.root.join("storage").join("shared")
    }
    /// A VM's disk: created in the backing directory, used by QEMU through the shared path.
    pub fn vm_disk_backing(&self, vm: &str) -> PathBuf {
        self.storage_backing().join(format!("{vm}.qcow2"))
    }
    pub fn vm_disk_shared(&self, vm: &str) -> PathBuf {
        self.storage_shared().join(format!("{vm}.qcow2"))
    }
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.root.join("hosts").join(host)
    }
    pub fn libvirt_dir(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("libvirt")
    }
    pub fn libvirt_uri(&self, host: &str) -> String {
        format!(
            "qemu+unix:///system?socket={}/run/libvirt/libvirt-sock",
            self.libvirt_dir(host).display()
        )
    }
    pub fn qemu_pid_dir(&self, host: &str) -> PathBuf {
        self.libvirt_dir(host).join("run/libvirt/qemu")
    }
    pub fn host_storage_mount(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("storage")
    }
    pub fn host_faultfs_socket(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("faultfs.sock")
    }
    /// The mount point of a host's fake watchdog (`vigil-lab-watchdog`).
    pub fn host_watchdog_dir(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("watchdog")
    }
    /// The host's watchdog device, as its agent's `[watchdog] device` names it.
    pub fn host_watchdog_device(&self, host: &str) -> PathBuf {
        self.host_watchdog_dir(host).join("watchdog")
    }
    /// The control socket of a host's fake watchdog (status | off | reset).
    pub fn host_watchdog_socket(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("watchdog.sock")
    }
    pub fn bmc_dir(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("bmc")
    }
    pub fn power_file(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("power")
    }
    pub fn monitor_dir(&self, mon: &str) -> PathBuf {
        self.root.join("monitors").join(mon)
    }
    pub fn netns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    pub fn switch_ns(&self) -> String {
        self.netns("sw")
    }
}

pub fn host_name(i: u32) -> String {
    format!("hv{i}")
}
pub fn monitor_name(j: u32) -> String {
    format!("mon{j}")
}
pub fn bmc_name(i: u32) -> String {
    format!("bmc{i}")
}
/// Octets are checked by `up` (1..=254).
pub fn host_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i as u8)
}
pub fn monitor_addr(j: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, j as u8)
}
pub fn bmc_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i as u8)
}
/// The monitors' floating VIP (`[vip]`): held by whichever monitor leads, on its `eth0`.
pub fn vip_addr() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 250)
}
/// The operator's machine (`ops`): where `vigil-lab ctl` runs vigilctl, through the VIP,
/// on no host and no monitor, so that no host or monitor fault takes the operator with it.
pub const OPS_NAME: &str = "ops";
pub fn ops_addr() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 3, 1)
}
/// Prefix length of every lab address (all inside 198.18.0.0/15).
pub const PREFIX_LEN: u8 = 16;

/// The programs the lab runs, found in this order: a per-program environment variable,
/// `$VIGIL_BIN_DIR/NAME`, `NAME` next to the vigil-lab executable, then the `lab-NAME` copy
/// that `cargo build -p vigil-lab` puts there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    Agent,
    Monitor,
    Vigilctl,
    Faultfs,
    Observer,
    Watchdog,
}

impl Program {
    pub fn file_name(self) -> &'static str {
        match self {
            Program::Agent => "vigil-agent",
            Program::Monitor => "vigil-monitor",
            Program::Vigilctl => "vigilctl",
            Program::Faultfs => "vigil-faultfs",
            Program::Observer => "vigil-observer",
            Program::Watchdog => "vigil-lab-watchdog",
        }
    }
    pub fn env_var(self) -> &'static str {
        match self {
            Program::Agent => "VIGIL_AGENT_BIN",
            Program::Monitor => "VIGIL_MONITOR_BIN",
            Program::Vigilctl => "VIGILCTL_BIN",
            Program::Faultfs => "VIGIL_FAULTFS_BIN",
            Program::Observer => "VIGIL_OBSERVER_BIN",
            Program::Watchdog => "VIGIL_WATCHDOG_BIN",
        }
    }
    /// Where the program's source lives (for "missing" messages).
    pub fn source(self) -> &'static str {
        match self {
            Program::Agent => "agent/",
            Program::Monitor | Program::Vigilctl => "monitor/",
            Program::Faultfs | Program::Watchdog => "tests/faultfs",
            Program::Observer => "tests/observer",
        }
    }

    /// The program's path, or None when it is nowhere to be found.
    pub fn find(self) -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(self.env_var()) {
            let p = PathBuf::from(p);
            return is_executable(&p).then_some(p);
        }
        if let Some(d) = std::env::var_os("VIGIL_BIN_DIR") {
            let p = Path::new(&d).join(self.file_name());
            if is_executable(&p) {
                return Some(p);
            }
        }
        let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
        // Integration tests run from target/*/deps: the binaries are one level up.
        let dirs = if dir.file_name().is_some_and(|n| n == "deps") {
            vec![dir.clone(), dir.parent()?.to_path_buf()]
        } else {
            vec![dir]
        };
        for d in dirs {
            for name in [
                self.file_name().to_string(),
                format!("lab-{}", self.file_name()),
            ] {
                let p = d.join(name);
                if is_executable(&p) {
                    return Some(p);
                }
            }
        }
        None
    }

    /// The program's path, or an error that says where it comes from.
    pub fn require(self) -> anyhow::Result<PathBuf> {
        self.find().with_context(|| {
            format!(
                "{} not found (set {} or VIGIL_BIN_DIR, or build {} with `cargo build --bins`)",
                self.file_name(),
                self.env_var(),
                self.source()
            )
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The repository's `scripts/` directory: `$VIGIL_SCRIPTS_DIR`, or the one this crate was
/// built from.
pub fn scripts_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VIGIL_SCRIPTS_DIR") {
        return PathBuf::from(d);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts");
    built.canonicalize().unwrap_or(built)
}

pub fn sandbox_script() -> anyhow::Result<PathBuf> {
    let p = scripts_dir().join("libvirt-sandbox.sh");
    if !p.is_file() {
        bail!(
            "{} not found (set VIGIL_SCRIPTS_DIR to the repository's scripts/)",
            p.display()
        );
    }
    Ok(p)
}

/// `scripts/lab-bmc.sh`, when it exists.
pub fn bmc_script() -> Option<PathBuf> {
    let p = scripts_dir().join("lab-bmc.sh");
    p.is_file().then_some(p)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_and_prefixes_are_checked() {
        assert!(Lab::new(PathBuf::from(DEFAULT_ROOT), DEFAULT_PREFIX.into()).is_ok());
        for bad in ["relative", "/run/lab", "/var/run/x", "/", "/with space"] {
            assert!(
                Lab::new(PathBuf::from(bad), "vl".into()).is_err(),
                "{bad} accepted"
            );
        }
        let long = format!("/{}", "x".repeat(80));
        assert!(Lab::new(PathBuf::from(long), "vl".into()).is_err());
        for bad in ["", "VL", "toolong", "v-l"] {
            assert!(
                Lab::new(PathBuf::from(DEFAULT_ROOT), bad.into()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn names_and_addresses() {
        let lab = Lab::new(PathBuf::from("/var/lib/x"), "vt".into()).expect("lab");
        assert_eq!(lab.netns("hv2"), "vt-hv2");
        assert_eq!(lab.switch_ns(), "vt-sw");
        assert_eq!(host_addr(3).to_string(), "198.18.1.3");
        assert_eq!(monitor_addr(1).to_string(), "198.18.0.1");
        assert_eq!(bmc_addr(2).to_string(), "198.18.2.2");
        assert_eq!(
            lab.libvirt_uri("hv1"),
            "qemu+unix:///system?socket=/var/lib/x/hosts/hv1/libvirt/run/libvirt/libvirt-sock"
        );
        assert_eq!(
            lab.log_file("hv1/agent"),
            PathBuf::from("/var/lib/x/logs/hv1-agent.log")
        );
    }
}
