//! Power fencing through ClusterLabs fence agents (`fence_ipmilan`, `fence_redfish`, ...): the
//! I/O edge of proof 2 of "The one rule" (docs/architecture.md). No decisions live here: the
//! engine decides whom to fence and when; this module runs one agent call and reports exactly
//! what it said.
//!
//! The interface is ClusterLabs' (fence-agents' `doc/FenceAgentAPI.md`): the agent reads
//! `key=value` lines on stdin (`action=off`, then every configured option) and answers with its
//! exit code. For `off`, `on` and `reboot`, 0 means done (the agent has confirmed the new power
//! state itself), anything else is a failure; for `status`, 0 means the power is on, 2 that it is
//! off, anything else is an error. [`fence`] returns `Ok` for `off` **only** when the agent exited
//! 0: that, and nothing else, is the proof that the host is off.
//!
//! Process handling: the agent runs in its own process group; on timeout (or when the future of
//! [`fence`] is dropped) the whole group gets SIGKILL and the agent is reaped, so neither it nor
//! the helpers it started (`ipmitool`, ...) outlive the call. Descendants that put themselves in
//! another process group or session escape that kill (fence agents do not do this). Grandchildren
//! are reparented to the init process (or a subreaper), which reaps them.
//!
//! Lab and tests: [`FenceHostConfig::netns`] runs the agent as `ip netns exec NETNS AGENT` (the
//! same PID and process group: `ip` execs the agent after entering the namespace).
//!
//! Secrets: the values of password-like options ([`vigil_common::config::is_secret_fence_option`])
//! are masked as `****` in the captured stdout/stderr, in errors and in `Debug` output.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use vigil_common::config::{is_secret_fence_option, FenceHostConfig};

/// At most this much of the agent's stdout and of its stderr is kept.
pub const OUTPUT_LIMIT: usize = 4096;
/// The stderr excerpt carried by [`FenceError::Failed`].
const EXCERPT_LIMIT: usize = 512;
/// After the agent exits, how long to wait for its output pipes to reach end-of-file (a helper
/// it left behind may hold them open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// Where fence agents live on Debian/RHEL when the monitor's PATH lacks the sbin directories.
const EXTRA_PATH: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// What to ask the fence agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceAction {
    /// Power the host off (proof 2 when it succeeds).
    Off,
    /// Power the host on.
    On,
    /// Report the power state.
    Status,
    /// Power-cycle the host (the agent confirms "off" before "on" with the default method).
    Reboot,
}

impl FenceAction {
    /// The `action=` value of the ClusterLabs interface.
    pub fn as_str(self) -> &'static str {
        match self {
            FenceAction::Off => "off",
            FenceAction::On => "on",
            FenceAction::Status => "status",
            FenceAction::Reboot => "reboot",
        }
    }
}

impl std::fmt::Display for FenceAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host's power state as the fence agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    On,
    Off,
}

/// A fence-agent call that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceOutcome {
    pub action: FenceAction,
    /// `Off` after a successful `off`, `On` after `on`, the reported state for `status`; `None`
    /// after `reboot` (the agent does not report the state it left the host in).
    pub power: Option<PowerState>,
    /// Wall time from spawning the agent to its exit.
    pub took: Duration,
    /// The agent's stdout, at most [`OUTPUT_LIMIT`] bytes, secrets masked.
    pub stdout: String,
    /// The agent's stderr, at most [`OUTPUT_LIMIT`] bytes, secrets masked.
    pub stderr: String,
}

/// Why fencing a host proved nothing (the engine's [`crate::engine::Input::FenceDone`]); it
/// retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FenceFailure {
    #[error("no fence agent configured for {host}")]
    NotConfigured { host: String },
    /// The fence agent ran and did not confirm power off.
    #[error(transparent)]
    Agent(std::sync::Arc<FenceError>),
}

impl PartialEq for FenceFailure {
    /// Equal when they read the same (a fence agent's error holds an `io::Error`).
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

/// A fence-agent call that did not succeed. None of these is proof that the host is off.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The agent program (or `ip`, for [`FenceHostConfig::netns`]) is missing or not executable.
    #[error("fence agent program {program:?} not found: {detail}")]
    NotFound { program: String, detail: String },
    /// The agent did not exit in time; its process group was killed and it was reaped.
    #[error("fence agent {agent} (action {action}) did not finish within {after:?}; its process group was killed")]
    Timeout {
        agent: String,
        action: FenceAction,
        after: Duration,
    },
    /// The agent exited with a code that does not mean success for this action (`code` is
    /// `None` when a signal ended it).
    #[error("fence agent {agent} (action {action}) failed ({}): {stderr}", exit_text(*.code, *.signal))]
    Failed {
        agent: String,
        action: FenceAction,
        code: Option<i32>,
        signal: Option<i32>,
        /// The end of its stderr (or stdout when stderr was empty), secrets masked.
        stderr: String,
    },
    /// Spawning, feeding or waiting for the agent failed.
    #[error("fence agent {agent} (action {action}): {context}: {source}")]
    Io {
        agent: String,
        action: FenceAction,
        context: &'static str,
        source: std::io::Error,
    },
}

fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "no exit code".into(),
    }
}

/// Runs `cfg.agent` with `action` and returns what it reported. `default_timeout` applies
/// unless `cfg.timeout_ms` is set (normally `fencing.timeout_ms`).
///
/// Blocking work is limited to spawning and a few thread spawns; waiting is async (the child is
/// polled every few milliseconds, at most every 50 ms). Dropping the returned future kills the
/// agent's process group.
pub async fn fence(
    cfg: &FenceHostConfig,
    action: FenceAction,
    default_timeout: Duration,
) -> Result<FenceOutcome, FenceError> {
    let limit = cfg
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(default_timeout);
    let agent_name = cfg.agent.clone();
    let io_err = |context: &'static str| {
        let agent = agent_name.clone();
        move |source| FenceError::Io {
            agent,
            action,
            context,
            source,
        }
    };

    let program = resolve_program(&cfg.agent)?;
    let mut cmd = match &cfg.netns {
        Some(ns) => {
            let ip = resolve_program("ip")?;
            let mut c = Command::new(ip);
            c.args(["netns", "exec"]).arg(ns).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .process_group(0);

    let secrets: Vec<String> = cfg
        .options
        .iter()
        .filter(|(k, v)| is_secret_fence_option(k) && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect();

    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            FenceError::NotFound {
                program: program.display().to_string(),
                detail: e.to_string(),
            }
        } else {
            io_err("spawn")(e)
        }
    })?;
    let mut guard = GroupGuard { child: Some(child) };
    let child = guard.child_mut();

    // Feed stdin from a thread: a small write never blocks, but an agent that does not read
    // must not be able to stall us. Closing stdin (the thread ends) is the agent's end of input.
    let input = stdin_text(cfg, action);
    let stdin = child.stdin.take();
    let out = Capture::start(child.stdout.take());
    let err = Capture::start(child.stderr.take());
    if let Some(mut stdin) = stdin {
        std::thread::Builder::new()
            .name("fence-stdin".into())
            .spawn(move || {
                // EPIPE when the agent exits without reading: its exit code tells.
                let _ = stdin.write_all(input.as_bytes());
            })
            .map_err(io_err("stdin thread"))?;
    }
    let out = out.map_err(io_err("stdout thread"))?;
    let err = err.map_err(io_err("stderr thread"))?;

    let deadline = start + limit;
    let mut poll = Duration::from_millis(2);
    let status: ExitStatus = loop {
        if let Some(s) = guard.child_mut().try_wait().map_err(io_err("wait"))? {
            break s;
        }
        let now = Instant::now();
        if now >= deadline {
            guard.kill_and_reap_async().await;
            tracing::warn!(agent = %cfg.agent, host = %cfg.host, %action, ?limit, "fence agent timed out; process group killed");
            return Err(FenceError::Timeout {
                agent: cfg.agent.clone(),
                action,
                after: limit,
            });
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
        poll = (poll * 2).min(Duration::from_millis(50));
    };
    let took = start.elapsed();
    guard.disarm();

    let grace_end = Instant::now() + OUTPUT_GRACE;
    while !(out.done() && err.done()) && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stdout = out.text(&secrets);
    let stderr = err.text(&secrets);

    let code = status.code();
    let power = match (action, code) {
        (FenceAction::Status, Some(0)) => Some(Some(PowerState::On)),
        (FenceAction::Status, Some(2)) => Some(Some(PowerState::Off)),
        (FenceAction::Off, Some(0)) => Some(Some(PowerState::Off)),
        (FenceAction::On, Some(0)) => Some(Some(PowerState::On)),
        (FenceAction::Reboot, Some(0)) => Some(None),
        _ => None,
    };
    match power {
        Some(power) => {
            tracing::info!(agent = %cfg.agent, host = %cfg.host, %action, ?power, ?took, "fence agent done");
            Ok(FenceOutcome {
                action,
                power,
                took,
                stdout,
                stderr,
            })
        }
        None => {
            let source = if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            };
            let excerpt = tail(source.trim(), EXCERPT_LIMIT);
            tracing::warn!(agent = %cfg.agent, host = %cfg.host, %action, ?code, ?took, stderr = %excerpt, "fence agent failed");
            Err(FenceError::Failed {
                agent: cfg.agent.clone(),
                action,
                code,
                signal: status.signal(),
                stderr: excerpt,
            })
        }
    }
}

/// The agent's stdin: `action=...`, then every option, one `key=value` a line.
fn stdin_text(cfg: &FenceHostConfig, action: FenceAction) -> String {
    let mut s = format!("action={}\n", action.as_str());
    for (k, v) in &cfg.options {
        s.push_str(k);
        s.push('=');
        s.push_str(v);
        s.push('\n');
    }
    s
}

/// An absolute path is taken as is; a bare name is searched in PATH, then in the sbin
/// directories (where fence agents live).
fn resolve_program(name: &str) -> Result<PathBuf, FenceError> {
    let not_found = |detail: String| FenceError::NotFound {
        program: name.to_string(),
        detail,
    };
    if name.contains('/') {
        let p = Path::new(name);
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(not_found("no executable file at this path".into()))
        };
    }
    if name.is_empty() {
        return Err(not_found("empty program name".into()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(EXTRA_PATH.iter().map(PathBuf::from));
    for dir in dirs {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let p = dir.join(name);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(not_found(format!(
        "not in PATH nor in {}",
        EXTRA_PATH.join(", ")
    )))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Owns the agent until it is reaped; dropping it while armed kills the agent's process group
/// (the agent is its leader: `process_group(0)`) and reaps the agent on a helper thread.
struct GroupGuard {
    child: Option<Child>,
}

impl GroupGuard {
    fn child_mut(&mut self) -> &mut Child {
        // Invariant: `child` is Some until `disarm` or a kill consumes the guard's child.
        self.child.as_mut().expect("fence agent child present")
    }

    fn disarm(&mut self) {
        self.child = None;
    }

    /// SIGKILL to the whole group, then reap the leader (off the async runtime's threads).
    async fn kill_and_reap_async(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            let reap = tokio::task::spawn_blocking(move || {
                let mut child = child;
                let _ = child.wait();
            });
            let _ = reap.await;
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            // Reaping a SIGKILLed process is immediate unless it sits in uninterruptible sleep:
            // do it on a thread so a drop never blocks the caller.
            let spawned = std::thread::Builder::new()
                .name("fence-reap".into())
                .spawn(move || {
                    let _ = child.wait();
                });
            if spawned.is_err() {
                tracing::warn!("cannot spawn a thread to reap a killed fence agent");
            }
        }
    }
}

/// SIGKILL to the process group led by `child` (not yet reaped, so its PGID, which is its PID,
/// cannot have been reused). `killpg(2)` through nix: no shell, no `unsafe` here.
fn kill_group(child: &mut Child) {
    let pid = child.id();
    let killed = match i32::try_from(pid) {
        Ok(pgid) => killpg(Pid::from_raw(pgid), Signal::SIGKILL).map_err(std::io::Error::from),
        Err(_) => Err(std::io::Error::other(format!("pid {pid} out of range"))),
    };
    if let Err(e) = killed {
        // At least end the leader (SIGKILL), so that it can be reaped.
        tracing::warn!(pgid = pid, error = %e, "kill of the fence agent's process group failed");
        let _ = child.kill();
    }
}

/// A pipe drained by a thread; keeps its first bytes.
struct Capture {
    inner: Arc<Mutex<CaptureState>>,
}

#[derive(Default)]
struct CaptureState {
    /// The first bytes (a little more than [`OUTPUT_LIMIT`], so that masking a secret that
    /// straddles the limit still works).
    head: Vec<u8>,
    total: usize,
    done: bool,
}

const CAPTURE_KEEP: usize = OUTPUT_LIMIT + 1024;

impl Capture {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> std::io::Result<Capture> {
        let inner = Arc::new(Mutex::new(CaptureState::default()));
        match pipe {
            None => {
                lock(&inner).done = true;
            }
            Some(mut pipe) => {
                let state = inner.clone();
                std::thread::Builder::new()
                    .name("fence-output".into())
                    .spawn(move || {
                        let mut buf = [0u8; 8192];
                        loop {
                            match pipe.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    let mut s = lock(&state);
                                    let room = CAPTURE_KEEP.saturating_sub(s.head.len());
                                    let take = room.min(n);
                                    s.head.extend_from_slice(&buf[..take]);
                                    s.total += n;
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(_) => break,
                            }
                        }
                        lock(&state).done = true;
                    })?;
            }
        }
        Ok(Capture { inner })
    }

    fn done(&self) -> bool {
        lock(&self.inner).done
    }

    /// The captured text, secrets masked, at most [`OUTPUT_LIMIT`] bytes plus a note of what
    /// was dropped.
    fn text(&self, secrets: &[String]) -> String {
        let s = lock(&self.inner);
        let mut text = String::from_utf8_lossy(&s.head).into_owned();
        for secret in secrets {
            text = text.replace(secret.as_str(), "****");
        }
        let total = s.total;
        drop(s);
        if text.len() > OUTPUT_LIMIT || total > CAPTURE_KEEP {
            let mut cut = OUTPUT_LIMIT.min(text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(&format!("\n[output truncated; {total} bytes in all]"));
        }
        text
    }
}

fn lock(m: &Mutex<CaptureState>) -> std::sync::MutexGuard<'_, CaptureState> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The last `limit` bytes of `s` (on a char boundary).
fn tail(s: &str, limit: usize) -> String {
    if s.len() <= limit {
        return s.to_string();
    }
    let mut start = s.len() - limit;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("aéé", 3), "…é");
    }

    #[test]
    fn stdin_lists_the_action_first() {
        let mut cfg = FenceHostConfig {
            host: "hv1".into(),
            agent: "fence_x".into(),
            options: Default::default(),
            timeout_ms: None,
            netns: None,
        };
        cfg.options.insert("ip".into(), "198.18.0.9".into());
        cfg.options.insert("password".into(), "pw".into());
        assert_eq!(
            stdin_text(&cfg, FenceAction::Off),
            "action=off\nip=198.18.0.9\npassword=pw\n"
        );
    }
}
