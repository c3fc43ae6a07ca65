//! Finding and removing faultfs mounts without touching them.
//!
//! Nothing here `stat`s the mountpoint itself: on a hung or dead FUSE mount that could block
//! or fail. Mounts are found in `/proc/self/mountinfo`, the mountpoint path is resolved through
//! its parent only.

use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Device major of the superblock.
    pub major: u32,
    /// Device minor of the superblock.
    pub minor: u32,
    /// Mount point (unescaped).
    pub mountpoint: PathBuf,
    /// Filesystem type, e.g. `fuse.vigil-faultfs`.
    pub fstype: String,
    /// Mount source, e.g. `vigil-faultfs:h1`.
    pub source: String,
}

impl MountEntry {
    /// The FUSE connection's directory name under `/sys/fs/fuse/connections`, for FUSE mounts.
    pub fn fuse_connection(&self) -> Option<String> {
        (self.fstype == "fuse" || self.fstype.starts_with("fuse."))
            .then(|| ((u64::from(self.major) << 20) | u64::from(self.minor)).to_string())
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    let (major, minor) = l.get(2)?.split_once(':')?;
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mountpoint: PathBuf::from(unescape(l.get(4)?)),
        fstype: (*r.first()?).to_owned(),
        source: unescape(r.get(1)?),
    })
}

/// Every mount in this mount namespace.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// Makes `path` absolute and resolves symlinks in its parent, without touching `path` itself.
pub fn resolve_mountpoint(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent
            .canonicalize()
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name)),
        _ => Ok(abs),
    }
}

/// Mounts stacked on `mountpoint` (bottom first).
pub fn mounts_at(mountpoint: &Path) -> io::Result<Vec<MountEntry>> {
    let target = resolve_mountpoint(mountpoint)?;
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.mountpoint == target)
        .collect())
}

/// Whether anything is mounted on `mountpoint` (from mountinfo; does not touch the path).
pub fn is_mounted(mountpoint: &Path) -> io::Result<bool> {
    Ok(!mounts_at(mountpoint)?.is_empty())
}

/// What [`cleanup()`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Mounts lazily detached from the mountpoint.
    pub detached: usize,
    /// FUSE connections aborted through `/sys/fs/fuse/connections/*/abort`.
    pub aborted: Vec<String>,
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

fn ensure_fusectl() -> io::Result<()> {
    if mounts()?.iter().any(|m| m.fstype == "fusectl") {
        return Ok(());
    }
    nix::mount::mount(
        Some("fusectl"),
        FUSECTL,
        Some("fusectl"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Removes whatever is mounted on `mountpoint` (typically the mount of a `vigil-faultfs`
/// server killed with `SIGKILL`): detaches each stacked mount lazily (`umount -l`), then aborts
/// each FUSE connection that is still alive (held by open files, working directories or copies
/// in other mount namespaces), so no process can stay blocked on it. Does nothing, successfully,
/// when nothing is mounted there.
pub fn cleanup(mountpoint: &Path) -> io::Result<CleanupReport> {
    let target = resolve_mountpoint(mountpoint)?;
    let mut report = CleanupReport::default();
    let mut connections = Vec::new();
    for _ in 0..32 {
        let Some(top) = mounts_at(&target)?.pop() else {
            break;
        };
        connections.extend(top.fuse_connection());
        match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => report.detached += 1,
            Err(nix::errno::Errno::EINVAL) if !is_mounted(&target)? => break,
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("umount -l {}: {e}", target.display()),
                ))
            }
        }
    }
    if !connections.is_empty() {
        if let Err(e) = ensure_fusectl() {
            eprintln!("vigil-faultfs cleanup: cannot mount fusectl on {FUSECTL}: {e}");
        }
        for conn in connections {
            let abort = Path::new(FUSECTL).join(&conn).join("abort");
            if abort.exists() {
                std::fs::write(&abort, "1")?;
                report.aborted.push(conn);
            }
        }
    }
    if is_mounted(&target)? {
        return Err(io::Error::other(format!(
            "{} is still mounted after cleanup",
            target.display()
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let l = "512 30 0:77 / /tmp/a\\040b/mnt rw,nosuid,nodev,relatime shared:300 - fuse.vigil-faultfs vigil-faultfs:h1 rw,user_id=0,group_id=0,allow_other";
        let m = parse_line(l).expect("parse");
        assert_eq!(m.mountpoint, PathBuf::from("/tmp/a b/mnt"));
        assert_eq!(m.fstype, "fuse.vigil-faultfs");
        assert_eq!(m.source, "vigil-faultfs:h1");
        assert_eq!((m.major, m.minor), (0, 77));
        assert_eq!(m.fuse_connection().as_deref(), Some("77"));
        let ext4 = "1 0 8:1 / / rw - ext4 /dev/sda1 rw";
        assert_eq!(parse_line(ext4).and_then(|m| m.fuse_connection()), None);
    }

    #[test]
    fn resolves_relative_paths_via_parent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = resolve_mountpoint(&dir.path().join("not-there")).expect("resolve");
        assert_eq!(
            p,
            dir.path()
                .canonicalize()
                .expect("canonicalize")
                .join("not-there")
        );
    }

    #[test]
    fn cleanup_of_nothing_is_ok() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            cleanup(dir.path()).expect("cleanup"),
            CleanupReport::default()
        );
    }
}
