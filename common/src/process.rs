//! What both daemons do at their process edges: wait for a shutdown signal, and turn the
//! outcome of `run` into an exit code with the error logged and printed.

use std::process::ExitCode;

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Exit code of a daemon's `run`: the error chain goes to the log and to stderr, prefixed with
/// the program's name.
pub fn exit_code(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // Also before the subscriber exists (a config that does not load); under journald
            // with the error priority, so `journalctl -p err` shows it.
            let priority = if crate::logging::stderr_is_journal() {
                "<3>"
            } else {
                ""
            };
            eprintln!("{priority}{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
