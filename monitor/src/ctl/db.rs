//! `vigilctl db backup FILE` and `vigilctl db inspect FILE`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use vigil_common::wire::{AdminRequest, AdminResponse};

use super::client::AdminClient;
use crate::backup::{self, Backup, BackupHeader, MAX_BACKUP_LEN};

/// A backup holds every VM definition: readable by its owner only.
const BACKUP_MODE: u32 = 0o600;

/// Refuses an existing `file` unless `force` (checked before the backup is taken, and again,
/// atomically, when it is written).
pub fn check_target(file: &Path, force: bool) -> anyhow::Result<()> {
    if !force && file.symlink_metadata().is_ok() {
        bail!(
            "{} exists: not replaced (use --force to replace it)",
            file.display()
        );
    }
    Ok(())
}

/// Takes a backup on the leader and returns the file's bytes, verified (checksum and
/// contents) before they are written anywhere.
pub async fn fetch(c: &mut AdminClient) -> anyhow::Result<(Vec<u8>, Backup)> {
    let first = c.request(&AdminRequest::DbBackup).await?;
    let (id, total, mut bytes) = match first {
        AdminResponse::BackupChunk {
            id,
            total,
            offset: 0,
            data,
        } => (id, total, data),
        AdminResponse::BackupChunk { offset, .. } => {
            bail!("the monitor's backup started at offset {offset}, not 0")
        }
        AdminResponse::Error { message } => bail!("{message}"),
        AdminResponse::NotLeader { leader } => {
            bail!("no leader reachable (last known: {leader:?})")
        }
        AdminResponse::Json(_) => bail!("the monitor answered JSON where a backup was expected"),
    };
    if total > MAX_BACKUP_LEN as u64 {
        bail!("the monitor's backup is {total} bytes, above the limit of {MAX_BACKUP_LEN}");
    }
    bytes.reserve((total as usize).saturating_sub(bytes.len()));
    while (bytes.len() as u64) < total {
        let offset = bytes.len() as u64;
        let req = AdminRequest::DbBackupChunk { id, offset };
        match c.request_same_connection(&req).await.with_context(|| {
            format!("fetching the backup at byte {offset} of {total} (run it again)")
        })? {
            AdminResponse::BackupChunk {
                id: got,
                offset: at,
                data,
                ..
            } if got == id && at == offset && !data.is_empty() => bytes.extend_from_slice(&data),
            AdminResponse::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer at byte {offset} of the backup: {other:?}"),
        }
    }
    if bytes.len() as u64 != total {
        bail!(
            "the monitor sent {} bytes of a {total}-byte backup",
            bytes.len()
        );
    }
    let decoded = backup::decode(&bytes).context("the backup the monitor sent does not verify")?;
    Ok((bytes, decoded))
}

/// `vigilctl db backup FILE [--force]`.
pub async fn backup(
    c: &mut AdminClient,
    file: &Path,
    force: bool,
    json: bool,
) -> anyhow::Result<()> {
    let (bytes, decoded) = fetch(c).await?;
    write_file(file, &bytes, force)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"file": file, "bytes": bytes.len(), "header": decoded.header})
        );
    } else {
        println!(
            "wrote {} ({} bytes): {}",
            file.display(),
            bytes.len(),
            describe(&decoded.header)
        );
    }
    Ok(())
}

/// `vigilctl db inspect FILE`.
pub fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    let decoded = read_file(file)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&decoded.header)?);
    } else {
        println!(
            "{} is a valid backup: {}",
            file.display(),
            describe(&decoded.header)
        );
    }
    Ok(())
}

/// Reads and verifies a backup file (refusing one above the size limit before reading it).
pub fn read_file(file: &Path) -> anyhow::Result<Backup> {
    Ok(backup::read_file(file)?)
}

fn describe(h: &BackupHeader) -> String {
    let at = super::render::timestamp(h.created_at_ms);
    let position = h
        .last_applied
        .map(|l| format!("log index {} (term {})", l.index, l.leader_id.term))
        .unwrap_or_else(|| "an empty log".into());
    format!(
        "taken at {at} on monitor node {} ({}) at {position}, Vigil {}; {} hosts, {} VMs, {} events",
        h.source_node, h.source_addr, h.vigil_version, h.hosts, h.vms, h.events
    )
}

/// Writes `bytes` to `file` atomically: a temporary file in the same directory (mode 0600),
/// fsync'd, then put in place, then the directory fsync'd. Without `force` the last step
/// is a hard link, which fails if `file` exists (it is never replaced, even by a race);
/// with it, a rename over it.
pub fn write_file(file: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    if force {
        return vigil_common::atomic_file::write_atomic_mode(file, bytes, BACKUP_MODE)
            .map_err(anyhow::Error::from);
    }
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", file.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(BACKUP_MODE)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::hard_link(&tmp, file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!(
                    "{} exists: not replaced (use --force to replace it)",
                    file.display()
                )
            } else {
                anyhow!("putting the backup in place at {}: {e}", file.display())
            }
        })?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync of {}", dir.display()))?;
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_replaces_without_force_and_replaces_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("b.vigil");
        write_file(&file, b"one", false).expect("new file");
        assert_eq!(std::fs::read(&file).expect("read"), b"one");
        let e = write_file(&file, b"two", false).expect_err("exists");
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(check_target(&file, false).is_err());
        assert!(check_target(&file, true).is_ok());
        assert_eq!(std::fs::read(&file).expect("read"), b"one");
        write_file(&file, b"three", true).expect("forced");
        assert_eq!(std::fs::read(&file).expect("read"), b"three");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn inspect_refuses_what_does_not_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("junk");
        std::fs::write(&file, b"not a backup at all").expect("write");
        let e = read_file(&file).expect_err("junk");
        assert!(format!("{e:#}").contains("not a Vigil backup"), "{e:#}");
    }
}
