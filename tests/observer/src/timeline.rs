//! The timeline file: one JSON object per line, appended by the watcher and by `mark`.
//!
//! Line kinds (all carry `t_ms`, Unix milliseconds of this machine's wall clock):
//! - a VM change: `{"t_ms", "host", "uuid", "name", "event": "running"|"stopped", "source":
//!   "event"|"poll"|"pid", "detail", "pid"?}`;
//! - a host change: `{"t_ms", "host", "event": "host-unreachable"|"host-reachable", "detail"}`;
//! - the watcher's own start and stop: `{"t_ms", "event": "observer-start"|"observer-stop", ...}`;
//! - a mark written by someone else: `{"t_ms", KIND: TEXT}`, e.g. `{"t_ms": .., "fault": "crash-host hv1"}`.
//!
//! Every line is written with one `write` call on a file opened with `O_APPEND`, so lines from
//! concurrent writers (the watcher and any number of `mark` calls) never interleave.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// `event` of a VM line whose domain has a qemu process (libvirt: active).
pub const RUNNING: &str = "running";
/// `event` of a VM line whose domain's qemu process is gone.
pub const STOPPED: &str = "stopped";
pub const HOST_UNREACHABLE: &str = "host-unreachable";
pub const HOST_REACHABLE: &str = "host-reachable";
pub const OBSERVER_START: &str = "observer-start";
pub const OBSERVER_STOP: &str = "observer-stop";

/// Keys a mark kind may not use.
const RESERVED: [&str; 8] = [
    "t_ms", "host", "uuid", "name", "event", "source", "detail", "pid",
];

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One line of the timeline. Fields are written in this order; absent ones are left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub t_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Marks (`"fault": "..."`) and the observer-start fields.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Record {
    /// A VM line.
    pub fn vm(
        t_ms: u64,
        host: &str,
        uuid: &str,
        name: &str,
        running: bool,
        source: &str,
        detail: String,
    ) -> Record {
        Record {
            t_ms,
            host: Some(host.to_string()),
            uuid: Some(uuid.to_string()),
            name: Some(name.to_string()),
            event: Some(if running { RUNNING } else { STOPPED }.to_string()),
            source: Some(source.to_string()),
            detail: Some(detail),
            ..Record::default()
        }
    }

    /// A host line.
    pub fn host(t_ms: u64, host: &str, event: &str, detail: String) -> Record {
        Record {
            t_ms,
            host: Some(host.to_string()),
            event: Some(event.to_string()),
            detail: Some(detail),
            ..Record::default()
        }
    }

    /// A mark `{"t_ms", KIND: TEXT}`.
    pub fn mark(t_ms: u64, kind: &str, text: &str) -> anyhow::Result<Record> {
        check_kind(kind)?;
        let mut extra = BTreeMap::new();
        extra.insert(
            kind.to_string(),
            serde_json::Value::String(text.to_string()),
        );
        Ok(Record {
            t_ms,
            extra,
            ..Record::default()
        })
    }

    /// The line, with its newline.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"t_ms\":{},\"error\":\"cannot encode: {e}\"}}",
                self.t_ms
            )
        });
        s.push('\n');
        s
    }
}

/// A mark kind is a short lower-case word that is not one of the reserved keys.
pub fn check_kind(kind: &str) -> anyhow::Result<()> {
    let ok = !kind.is_empty()
        && kind.len() <= 32
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        bail!("--kind must be 1-32 of [a-z0-9_-], got {kind:?}");
    }
    if RESERVED.contains(&kind) {
        bail!("--kind {kind:?} is a reserved timeline key");
    }
    Ok(())
}

/// An append-only timeline file shared by the watcher's threads.
pub struct Writer {
    file: Mutex<File>,
}

impl Writer {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> anyhow::Result<Writer> {
        Ok(Writer {
            file: Mutex::new(open_append(path)?),
        })
    }

    /// Appends one record as one line (one `write`); logs and carries on when that fails.
    pub fn write(&self, rec: &Record) {
        let line = rec.to_line();
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|()| f.flush()) {
            tracing::error!(error = %e, "cannot append to the timeline");
        }
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {} for appending", path.display()))
}

/// `vigil-observer mark`: appends `{"t_ms": now, KIND: TEXT}` to `path`.
pub fn append_mark(path: &Path, kind: &str, text: &str) -> anyhow::Result<Record> {
    let rec = Record::mark(now_ms(), kind, text)?;
    let mut f = open_append(path)?;
    f.write_all(rec.to_line().as_bytes())
        .with_context(|| format!("append to {}", path.display()))?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_line_has_the_documented_shape() {
        let line = Record::vm(
            5,
            "hv1",
            "u-1",
            "web",
            true,
            "event",
            "started/booted".into(),
        )
        .to_line();
        assert_eq!(
            line,
            "{\"t_ms\":5,\"host\":\"hv1\",\"uuid\":\"u-1\",\"name\":\"web\",\"event\":\"running\",\"source\":\"event\",\"detail\":\"started/booted\"}\n"
        );
    }

    #[test]
    fn marks_round_trip_and_reserved_kinds_are_refused() {
        let rec = Record::mark(7, "fault", "crash-host hv1").expect("mark");
        assert_eq!(rec.to_line(), "{\"t_ms\":7,\"fault\":\"crash-host hv1\"}\n");
        let back: Record = serde_json::from_str(rec.to_line().trim()).expect("parse");
        assert_eq!(back, rec);
        assert!(Record::mark(1, "host", "x").is_err());
        assert!(Record::mark(1, "Fault!", "x").is_err());
    }
}
