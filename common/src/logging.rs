//! Logging setup shared by the binaries: plain lines by default, JSON on request.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the default filter (`info`).
/// Logs go to stderr, which systemd hands to the journal.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,quinn=warn,quinn_proto=warn,openraft=warn,rustls=warn")
    });
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
