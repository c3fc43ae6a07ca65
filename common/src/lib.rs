//! Vigil's shared vocabulary: the wire protocol and its codec, identities and TLS, the
//! configuration files, and logging setup. Both the agent and the monitor depend on it.
#![forbid(unsafe_code)]

pub mod atomic_file;
pub mod codec;
pub mod config;
pub mod domain;
pub mod domain_policy;
pub mod generation_guard;
pub mod isolation;
pub mod logging;
pub mod pem {
    //! Re-exports for reading PEM files without a direct dependency on rustls-pki-types.
    pub use rustls_pki_types::pem::PemObject;
    pub use rustls_pki_types::CertificateDer;
}
pub mod names;
pub mod process;
pub mod reload;
pub mod settings;
pub mod storage;
pub mod table;
pub mod tls;
pub mod wire;

/// Version of this build, sent in handshakes and shown by `vigilctl`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch, from the wall clock (for timestamps only, never for
/// timeouts: those use `Instant`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
