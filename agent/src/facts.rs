//! Host facts for heartbeats, from the crate `sysinfo` and `/proc`.
//!
//! Collection is cheap (a read of `/proc/meminfo` and `/proc/loadavg` per beat) and touches
//! nothing that can hang, so it runs on the heartbeat task itself.

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
use vigil_common::wire::HostFacts;

/// Gathers [`HostFacts`]; keep one per agent and call [`FactsCollector::collect`] per beat.
pub struct FactsCollector {
    sys: System,
    hostname: String,
    cpus: u32,
    boot_id: String,
}

impl Default for FactsCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl FactsCollector {
    pub fn new() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let cpus = sys.cpus().len().max(1) as u32;
        FactsCollector {
            sys,
            hostname: System::host_name().unwrap_or_default(),
            cpus,
            boot_id: read_boot_id(),
        }
    }

    /// Fresh facts: memory and load are re-read, the rest is fixed for the process lifetime.
    pub fn collect(&mut self) -> HostFacts {
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let load = System::load_average();
        HostFacts {
            hostname: self.hostname.clone(),
            cpus: self.cpus,
            memory_total_bytes: self.sys.total_memory(),
            memory_available_bytes: self.sys.available_memory(),
            load_avg: [load.one as f32, load.five as f32, load.fifteen as f32],
            uptime_s: System::uptime(),
            boot_id: self.boot_id.clone(),
        }
    }
}

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_describe_this_machine() {
        let mut c = FactsCollector::new();
        let f = c.collect();
        assert!(f.cpus >= 1);
        assert!(f.memory_total_bytes > 0);
        assert!(f.memory_available_bytes <= f.memory_total_bytes);
        assert!(f.uptime_s > 0);
        if std::path::Path::new("/proc/sys/kernel/random/boot_id").exists() {
            assert_eq!(f.boot_id.len(), 36, "boot id is a uuid: {:?}", f.boot_id);
        }
    }
}
