//! What /proc says about processes, namespaces and mounts.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The fields of /proc/PID/stat the lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    /// Start time in clock ticks since boot: with the PID, it names a process uniquely.
    pub starttime: u64,
}

pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain anything, including ") ": split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field N is f[N - 3].
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        starttime: f.get(19)?.parse().ok()?,
    })
}

/// True when PID runs (is not a zombie) and, if given, started at `starttime`.
pub fn alive(pid: i32, starttime: Option<u64>) -> bool {
    if pid <= 0 {
        return false;
    }
    match stat(pid) {
        Some(s) => {
            !matches!(s.state, 'Z' | 'X' | 'x') && starttime.is_none_or(|t| t == s.starttime)
        }
        None => false,
    }
}

pub fn starttime(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.starttime)
}

/// Every PID in /proc.
pub fn all_pids() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The inode of a process's network namespace.
pub fn netns_of_pid(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// The inode of a named network namespace (`ip netns`), while it exists.
pub fn netns_inode(name: &str) -> Option<u64> {
    let p = Path::new("/run/netns").join(name);
    let m = std::fs::metadata(&p).ok()?;
    // A stale file without the nsfs mount is no namespace: nsfs inodes live on device 0:4
    // (or another anonymous device); a plain file on tmpfs has the file's own inode. Compare
    // with /proc/self/ns/net's device to tell them apart.
    let own = std::fs::metadata("/proc/self/ns/net").ok()?;
    (m.dev() == own.dev()).then_some(m.ino())
}

/// Live (non-zombie) processes in the network namespace with inode `ino`.
pub fn pids_in_netns(ino: u64) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| netns_of_pid(p) == Some(ino) && alive(p, None))
        .collect()
}

/// True when the process's environment contains exactly `KEY=VALUE`.
pub fn environ_has(pid: i32, key: &str, value: &str) -> bool {
    let want = format!("{key}={value}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| b.split(|&c| c == 0).any(|e| e == want.as_bytes()))
        .unwrap_or(false)
}

/// This process and its ancestors (never to be killed by a sweep).
pub fn self_and_ancestors() -> Vec<i32> {
    let mut v = vec![std::process::id() as i32];
    let mut p = std::process::id() as i32;
    for _ in 0..64 {
        match stat(p) {
            Some(s) if s.ppid > 0 => {
                v.push(s.ppid);
                p = s.ppid;
            }
            _ => break,
        }
    }
    v
}

/// Live children of `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.ppid == pid && s.state != 'Z'))
        .collect()
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort();
    v.dedup();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v
}

/// /proc/self/mountinfo escapes blanks, tabs, newlines and backslashes as \ooo.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat() {
        let me = std::process::id() as i32;
        let s = stat(me).expect("own stat");
        assert!(alive(me, Some(s.starttime)));
        assert!(!alive(me, Some(s.starttime + 1)));
        assert!(self_and_ancestors().contains(&me));
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/x\\"), "/x\\");
    }
}
