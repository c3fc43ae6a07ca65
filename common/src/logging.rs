//! Logging setup shared by the binaries: plain lines by default, JSON on request.
//!
//! Plain lines adapt to where stderr goes ([`plain_style`]):
//! - a terminal: colours and a timestamp, as before;
//! - a pipe or a file: no ANSI escape codes, a timestamp;
//! - the journal (systemd sets `JOURNAL_STREAM` to the `device:inode` of the stream it
//!   connected to stderr): no colours, no timestamp (journald stamps every line itself), and a
//!   syslog priority prefix per level (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug and
//!   trace), which journald parses from stream output (`SyslogLevelPrefix=` defaults to on),
//!   so `journalctl -p err` finds the errors.
//!
//! `--log-format json` is unchanged: one JSON object per line, with its own timestamp and level.
//!
//! The level comes from the config file's `log_level` (reloaded on SIGHUP, [`set_level`])
//! unless `RUST_LOG` is set, which then decides for the life of the process.

use std::fmt;
use std::io::IsTerminal;

use std::sync::OnceLock;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};

use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogLevel};

/// How plain lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainStyle {
    /// ANSI colour codes.
    pub ansi: bool,
    /// A timestamp at the start of each line.
    pub timestamp: bool,
    /// A syslog priority prefix (`<3>` ...) for journald.
    pub priority_prefix: bool,
}

/// The style for plain lines, from whether stderr is a terminal, the value of
/// `JOURNAL_STREAM` (if set) and stderr's own `(device, inode)` (if known).
///
/// stderr counts as the journal when `JOURNAL_STREAM` names stderr's device and inode, as
/// systemd documents it (a child that inherited the variable but writes elsewhere does not
/// get journal lines). When stderr's identity is unknown, the variable's presence decides.
pub fn plain_style(
    stderr_is_terminal: bool,
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
) -> PlainStyle {
    let journal = match (journal_stream.map(parse_journal_stream), stderr_id) {
        (None, _) => false,
        (Some(Some(named)), Some(actual)) => named == actual,
        // Set but unparsable, or stderr not inspectable: trust that systemd set it.
        (Some(_), _) => true,
    };
    PlainStyle {
        ansi: stderr_is_terminal && !journal,
        timestamp: !journal,
        priority_prefix: journal,
    }
}

/// `JOURNAL_STREAM`'s `device:inode`, both decimal.
fn parse_journal_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority journald reads from the start of a line.
pub fn syslog_prefix(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// Formats an event with `inner`, preceded by its syslog priority prefix.
struct Prefixed<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(syslog_prefix(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// stderr's `(device, inode)`, to compare with `JOURNAL_STREAM`.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether stderr is the journal's stream (`JOURNAL_STREAM` names it; see [`plain_style`]).
pub fn stderr_is_journal() -> bool {
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    plain_style(
        std::io::stderr().is_terminal(),
        journal_stream.as_deref(),
        stderr_id(),
    )
    .priority_prefix
}

/// The filter for Vigil's own lines at `level`; the QUIC, Raft and TLS libraries stay at
/// `warn` (their `info` lines are per connection and per election).
pub fn filter_directives(level: LogLevel) -> String {
    format!(
        "{},quinn=warn,quinn_proto=warn,openraft=warn,rustls=warn",
        level.as_str()
    )
}

/// The reloadable filter of the global subscriber (set by [`init`]).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why [`set_level`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("RUST_LOG is set in the environment and overrides log_level (unset it and restart to use log_level)")]
    Overridden,
    #[error("logging is not set up in this process")]
    NotInitialized,
    #[error("cannot replace the log filter: {0}")]
    Reload(String),
}

/// Whether `RUST_LOG` decides the filter (then `log_level` is not used).
fn rust_log() -> Option<EnvFilter> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|_| EnvFilter::try_from_default_env().ok())
}

/// Installs the global subscriber. `RUST_LOG` (when set and valid) overrides `level` (the
/// config file's `log_level`). Logs go to stderr, which systemd hands to the journal. The
/// filter can be replaced later with [`set_level`] (SIGHUP).
pub fn init(format: LogFormat, level: LogLevel) {
    let filter = rust_log().unwrap_or_else(|| EnvFilter::new(filter_directives(level)));
    let (filter, handle) = reload::Layer::new(filter);
    type Fmt = Box<dyn Layer<Layered<reload::Layer<EnvFilter, Registry>, Registry>> + Send + Sync>;
    let layer: Fmt = match format {
        LogFormat::Plain => {
            let journal_stream = std::env::var("JOURNAL_STREAM").ok();
            let style = plain_style(
                std::io::stderr().is_terminal(),
                journal_stream.as_deref(),
                stderr_id(),
            );
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(style.ansi);
            let base = tracing_subscriber::fmt::format()
                .with_target(false)
                .with_ansi(style.ansi);
            match (style.timestamp, style.priority_prefix) {
                (true, false) => layer.event_format(base).boxed(),
                (true, true) => layer.event_format(Prefixed(base)).boxed(),
                (false, false) => layer.event_format(base.without_time()).boxed(),
                (false, true) => layer.event_format(Prefixed(base.without_time())).boxed(),
            }
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the running filter with `level`'s (SIGHUP with a new `log_level`). Refused when
/// `RUST_LOG` decides the filter.
pub fn set_level(level: LogLevel) -> Result<(), LogLevelError> {
    if rust_log().is_some() {
        return Err(LogLevelError::Overridden);
    }
    let handle = FILTER.get().ok_or(LogLevelError::NotInitialized)?;
    handle
        .reload(EnvFilter::new(filter_directives(level)))
        .map_err(|e| LogLevelError::Reload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: (u64, u64) = (25, 4242);

    #[test]
    fn a_terminal_gets_colours_and_timestamps() {
        let s = plain_style(true, None, Some(ID));
        assert_eq!(
            s,
            PlainStyle {
                ansi: true,
                timestamp: true,
                priority_prefix: false
            }
        );
    }

    #[test]
    fn a_pipe_or_file_gets_no_escape_codes() {
        let s = plain_style(false, None, Some(ID));
        assert!(!s.ansi && s.timestamp && !s.priority_prefix);
    }

    #[test]
    fn the_journal_gets_priorities_and_no_timestamp_nor_colours() {
        for tty in [false, true] {
            let s = plain_style(tty, Some("25:4242"), Some(ID));
            assert_eq!(
                s,
                PlainStyle {
                    ansi: false,
                    timestamp: false,
                    priority_prefix: true
                },
                "tty={tty}"
            );
        }
    }

    #[test]
    fn an_inherited_journal_stream_naming_another_file_is_not_the_journal() {
        // A child started from a unit, its stderr redirected to a file.
        let s = plain_style(false, Some("25:9999"), Some(ID));
        assert!(!s.priority_prefix && s.timestamp && !s.ansi);
        let s = plain_style(true, Some("25:9999"), Some(ID));
        assert!(s.ansi && s.timestamp && !s.priority_prefix);
    }

    #[test]
    fn a_journal_stream_that_cannot_be_compared_is_trusted() {
        assert!(plain_style(false, Some("garbage"), Some(ID)).priority_prefix);
        assert!(plain_style(false, Some("25:4242"), None).priority_prefix);
    }

    #[test]
    fn priorities_are_the_syslog_ones() {
        assert_eq!(syslog_prefix(&Level::ERROR), "<3>");
        assert_eq!(syslog_prefix(&Level::WARN), "<4>");
        assert_eq!(syslog_prefix(&Level::INFO), "<6>");
        assert_eq!(syslog_prefix(&Level::DEBUG), "<7>");
        assert_eq!(syslog_prefix(&Level::TRACE), "<7>");
    }
}
