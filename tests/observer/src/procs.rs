//! Whether a qemu process still lives, from /proc (no signals sent).
//!
//! A process is identified by its PID and its start time (field 22 of /proc/PID/stat, in clock
//! ticks since boot), so a recycled PID never passes for the old qemu. A zombie counts as gone:
//! its memory and open files (the VM's disks) are released.

use std::fs;
use std::path::Path;

/// One process: PID plus start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    pub start_ticks: u64,
}

/// State letter and start time from the text of /proc/PID/stat.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // "PID (COMM) S PPID ...": COMM may hold spaces and parentheses; the last ')' ends it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 of the whole line is fields[0] here; field 22 (starttime) is fields[19].
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The live (not zombie, not dead) process with this PID, if any.
pub fn live(pid: u32) -> Option<ProcId> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (state, start_ticks) = parse_stat(&stat)?;
    if matches!(state, 'Z' | 'X' | 'x') {
        return None;
    }
    Some(ProcId { pid, start_ticks })
}

impl ProcId {
    /// Whether this very process (same PID, same start time) still lives.
    pub fn alive(&self) -> bool {
        live(self.pid).is_some_and(|p| p.start_ticks == self.start_ticks)
    }
}

/// The live qemu of domain `name` from libvirt's pid file `PIDDIR/NAME.pid`.
pub fn qemu_of(pid_dir: &Path, name: &str) -> Option<ProcId> {
    let text = fs::read_to_string(pid_dir.join(format!("{name}.pid"))).ok()?;
    live(text.trim().parse().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let stat =
            "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 3 0 987654 1 2";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = live(std::process::id()).expect("own process in /proc");
        assert!(me.alive());
        let other = ProcId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!other.alive());
        assert!(live(u32::MAX - 1).is_none());
    }
}
