//! What the packaging tests share: the workspace, root detection, running commands, the
//! test profile's binaries, and a clean Debian 12 root from a cached mmdebstrap tarball.
#![allow(dead_code)] // each test binary uses its own part

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BASE_CACHE: &str = "/var/cache/vigil-test";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

pub fn output(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("{shown}: {e} (is it installed? scripts/setup.sh installs it)"))
}

pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn place(from: &Path, to: &Path) {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).expect("mkdir");
    }
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

pub const BINARIES: [(&str, &str); 3] = [
    ("vigil-agent", env!("CARGO_BIN_EXE_pkg-vigil-agent")),
    ("vigil-monitor", env!("CARGO_BIN_EXE_pkg-vigil-monitor")),
    ("vigilctl", env!("CARGO_BIN_EXE_pkg-vigilctl")),
];

pub fn debian_mirror() -> String {
    let mut uris = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "sources") {
                for l in fs::read_to_string(e.path()).unwrap_or_default().lines() {
                    if let Some(u) = l.strip_prefix("URIs:") {
                        uris.extend(u.split_whitespace().map(str::to_string));
                    }
                }
            }
        }
    }
    for l in fs::read_to_string("/etc/apt/sources.list")
        .unwrap_or_default()
        .lines()
    {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() == Some(&"deb") && w.len() > 2 {
            uris.push(w[1].to_string());
        }
    }
    uris.into_iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .find(|u| u.ends_with("/debian"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// A minbase bookworm tarball with the packages' dependencies (libvirt0, passwd), cached:
/// made once per machine (about a minute), then extracted per test in seconds, offline.
/// Made under a name of this process (tests in parallel, on a machine without the cache, each
/// make their own), then renamed into place.
pub fn base_tarball() -> PathBuf {
    let cache = Path::new(BASE_CACHE);
    fs::create_dir_all(cache).expect("create /var/cache/vigil-test");
    let tar = cache.join("bookworm-minbase-libvirt0.tar");
    if !tar.exists() {
        let mirror = debian_mirror();
        let partial = cache.join(format!(
            "bookworm-minbase-libvirt0.tar.partial-{}",
            std::process::id()
        ));
        run(Command::new("mmdebstrap")
            // --format: the name ends in .partial-PID, which mmdebstrap would make a directory.
            .args([
                "--variant=minbase",
                "--include=libvirt0,passwd",
                "--quiet",
                "--format=tar",
            ])
            .arg("bookworm")
            .arg(&partial)
            .arg(format!("deb {mirror} bookworm main"))
            .arg(format!("deb {mirror} bookworm-updates main")));
        fs::rename(&partial, &tar).expect("rename the base tarball");
    }
    tar
}

/// A clean Debian root from [`base_tarball`] in a fresh temporary directory named `prefix…`
/// (removed on drop; nothing is mounted).
pub fn debian_root(prefix: &str) -> tempfile::TempDir {
    let tar = base_tarball();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-xf")
        .arg(tar));
    dir
}
