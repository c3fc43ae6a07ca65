//! Replacing a file so that a crash leaves either the old contents or the new, never an empty
//! or torn file: the one way the agent and the monitor write their state files (generations,
//! lease, self-fence reports), the shared-storage records and the TLS files they replace.
//!
//! The steps: write a temporary file in the same directory (so the rename cannot cross file
//! systems), `fsync` it, `rename` it over the target, then `fsync` the directory so that the
//! rename itself survives a power loss. The temporary file is removed when a step before the
//! rename fails; after a crash in between, a `.NAME.tmp.*` file may stay behind (harmless, it is
//! never read). Blocking: call it from a thread that may block on the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed atomic write: which file, which step, and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {step}: {source}")]
pub struct AtomicWriteError {
    /// The file that was to be replaced (not the temporary file).
    pub path: PathBuf,
    /// What failed: "create the temporary file", "write", "fsync", "rename", "fsync the
    /// directory".
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Replaces `path` with `bytes` atomically and durably. A new file gets the default mode
/// (0o666 less the umask). The directory must exist. An error at the last step ("fsync the
/// directory") comes after the rename: the file may hold the new contents already, it is
/// only not known to survive a power loss.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    write(path, bytes, None)
}

/// As [`write_atomic`], with the file created with `mode` (less the umask) from the start: a
/// secret is never readable by others, not even as the temporary file.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicWriteError> {
    write(path, bytes, Some(mode))
}

/// Distinguishes temporary files of concurrent writers in one process (the PID distinguishes
/// processes, e.g. two monitors writing the same record on a shared pool).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The temporary file next to `path`: `.NAME.tmp.PID.N`.
fn temp_path(path: &Path, dir: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

fn write(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), AtomicWriteError> {
    let fail = |step: &'static str| {
        move |source| AtomicWriteError {
            path: path.to_path_buf(),
            step,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temp_path(path, dir);
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    if let Some(mode) = mode {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(fail("create the temporary file"))?;
    let written = f
        .write_all(bytes)
        .map_err(fail("write"))
        .and_then(|()| f.sync_all().map_err(fail("fsync")));
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path).map_err(fail("rename"))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    match File::open(dir).and_then(|d| d.sync_all()) {
        // A file system that cannot sync a directory (EINVAL, ENOTSUP, ENOSYS): the rename
        // is as durable as it makes it.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        other => other.map_err(fail("fsync the directory")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").expect("first write");
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        write_atomic(&path, b"new contents").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new contents");
        assert_eq!(names(dir.path()), vec!["state.json".to_string()]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").expect("write");
        // A directory where the file should be: the rename over it fails after the
        // temporary file was written, so the target is untouched and the temporary removed.
        let blocked = dir.path().join("sub");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join("keep"), b"x").expect("fill");
        let err = write_atomic(&blocked, b"new").expect_err("rename over a directory");
        assert_eq!(err.step, "rename");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}: rename: ", blocked.display())),
            "{shown}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert_eq!(
            names(dir.path()),
            vec!["state.json".to_string(), "sub".to_string()]
        );
        // A missing directory fails at the first step and names the target.
        let missing = dir.path().join("nope").join("state.json");
        let err = write_atomic(&missing, b"new").expect_err("no directory");
        assert_eq!(err.step, "create the temporary file");
        assert!(err.to_string().contains("nope/state.json"), "{err}");
    }

    #[test]
    fn the_mode_applies_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("key.pem");
        write_atomic_mode(&path, b"secret", 0o600).expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
