//! Short-lived helper commands (`ip`, `virsh`, `vigilctl`): run, wait (always: no zombies), with
//! a deadline.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// Runs `argv` with stdin closed and the output captured; kills it (and still waits for it)
/// after `timeout`.
pub fn run<S: AsRef<str>>(argv: &[S], timeout: Duration) -> anyhow::Result<Output> {
    let argv: Vec<&str> = argv.iter().map(|s| s.as_ref()).collect();
    let (prog, args) = argv.split_first().context("empty command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {prog}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if timed_out {
        bail!(
            "`{}` did not finish within {:.1} s{}",
            argv.join(" "),
            timeout.as_secs_f64(),
            tail_msg(&stderr)
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `argv` and fails with its stderr unless it exits 0; returns stdout.
pub fn run_ok<S: AsRef<str>>(argv: &[S], timeout: Duration) -> anyhow::Result<String> {
    let o = run(argv, timeout)?;
    if !o.ok() {
        let argv: Vec<&str> = argv.iter().map(|s| s.as_ref()).collect();
        bail!(
            "`{}` failed ({}){}",
            argv.join(" "),
            o.status,
            tail_msg(&o.stderr)
        );
    }
    Ok(o.stdout)
}

/// `ip ARGS...`, which must succeed.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    run_ok(&argv, Duration::from_secs(15))
}

fn tail_msg(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        String::new()
    } else {
        let lines: Vec<&str> = t.lines().collect();
        let start = lines.len().saturating_sub(8);
        format!(": {}", lines[start..].join(" | "))
    }
}

/// The last `n` lines of a file (for error messages about a process that died).
pub fn tail_file(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
