//! Cluster identities: the cluster CA, certificates for agents, monitors and admins, and the
//! rustls/quinn configurations that enforce mutual TLS against that CA only.
//!
//! A certificate says *who* (subject common name) and *what* (subject organizational unit:
//! `vigil-agent`, `vigil-monitor` or `vigil-admin`). Monitors take a peer's identity from its
//! verified certificate, never from a message. Every monitor certificate also carries the DNS
//! name [`MONITOR_SERVER_NAME`], which clients verify, so any monitor and the floating VIP are
//! reachable by plain address.
//!
//! Only rustls' `ring` provider is compiled in, and it is passed explicitly everywhere, so no
//! process-wide default provider has to be installed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};

use crate::atomic_file::write_atomic_mode;
use crate::wire::MONITOR_SERVER_NAME;

/// File names inside a CA directory and a certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A hypervisor agent: may register and heartbeat as the host named in the certificate.
    Agent,
    /// A monitor: may serve agents and admins, and talk Raft to other monitors.
    Monitor,
    /// An operator (`vigilctl`): may use the admin API, reads and writes.
    Admin,
    // Issue 10 item 4: a read-only operator.
    /// A read-only operator (`vigilctl`): status, lists, show, events; every write refused.
    Viewer,
}

impl Role {
    pub fn as_ou(self) -> &'static str {
        match self {
            Role::Agent => "vigil-agent",
            Role::Monitor => "vigil-monitor",
            Role::Admin => "vigil-admin",
            Role::Viewer => "vigil-viewer",
        }
    }

    pub fn from_ou(ou: &str) -> Option<Role> {
        match ou {
            "vigil-agent" => Some(Role::Agent),
            "vigil-monitor" => Some(Role::Monitor),
            "vigil-admin" => Some(Role::Admin),
            "vigil-viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Monitor => "monitor",
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "monitor" => Ok(Role::Monitor),
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?}; expected agent, monitor, admin or viewer"
            )),
        }
    }
}

/// The verified identity of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Replacing a file failed (the error names the file and the step).
    #[error(transparent)]
    Write(#[from] crate::atomic_file::AtomicWriteError),
    #[error("{path} already exists; refusing to overwrite it (remove it first if you mean it)")]
    AlreadyExists { path: PathBuf },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    BadPem { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration failed: {0}")]
    Verifier(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate cannot be parsed: {0}")]
    BadPeerCertificate(String),
    #[error("peer certificate has no common name")]
    NoCommonName,
    #[error("peer certificate has organizational unit {0:?}, which is not a Vigil role")]
    NoRole(String),
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The crypto provider used everywhere: rustls with ring, nothing else.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Writes `contents` to `path`, refusing to replace an existing file. Keys get mode 0600.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            TlsError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn validate_cert_name(name: &str) -> Result<(), TlsError> {
    let bad = |reason: &str| TlsError::BadName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

/// Paths produced by [`init_ca`].
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a new cluster CA in `dir` (`ca.crt`, `ca.key`). Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path, cluster_name: &str) -> Result<CaFiles, TlsError> {
    validate_cert_name(cluster_name)?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::AlreadyExists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("Vigil cluster CA {cluster_name}"),
    );
    dn.push(DnType::OrganizationName, "Vigil");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time_now();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(20 * 365 * 24 * 3600);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok(CaFiles {
        cert: cert_path,
        key: key_path,
    })
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Paths produced by [`issue_cert`].
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A CA loaded for signing.
pub struct CaSigner {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    pub cert_path: PathBuf,
}

impl CaSigner {
    /// Loads `ca.crt` and `ca.key` from `ca_dir`.
    pub fn load(ca_dir: &Path) -> Result<CaSigner, TlsError> {
        let cert_path = ca_dir.join(CA_CERT_FILE);
        let key_path = ca_dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadPem {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::BadPem {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
        Ok(CaSigner {
            issuer,
            cert_pem,
            cert_path,
        })
    }

    /// Issues a certificate in memory: returns (certificate PEM, private key PEM).
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        extra_sans: &[String],
        valid_days: u32,
    ) -> Result<(String, String), TlsError> {
        validate_cert_name(name)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_ou());
        dn.push(DnType::OrganizationName, "Vigil");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Monitor => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Agent | Role::Admin | Role::Viewer => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        let dns = |s: &str| -> Result<SanType, TlsError> {
            Ok(SanType::DnsName(s.try_into().map_err(
                |e: rcgen::Error| TlsError::BadName {
                    name: s.to_string(),
                    reason: e.to_string(),
                },
            )?))
        };
        let mut sans = vec![dns(name)?];
        if role == Role::Monitor {
            sans.push(dns(MONITOR_SERVER_NAME)?);
        }
        for s in extra_sans {
            match s.parse::<std::net::IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(dns(s)?),
            }
        }
        params.subject_alt_names = sans;
        let now = time_now();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(u64::from(valid_days.max(1)) * 24 * 3600);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Issues a certificate for `name` with `role`, signed by the CA in `ca_dir`, into `out_dir`
/// as `NAME.crt`, `NAME.key` and a copy of `ca.crt`. `extra_sans` adds DNS names or IP
/// addresses (monitors: the addresses peers use). Refuses to overwrite existing files.
pub fn issue_cert(
    ca_dir: &Path,
    role: Role,
    name: &str,
    out_dir: &Path,
    extra_sans: &[String],
    valid_days: u32,
) -> Result<IssuedFiles, TlsError> {
    validate_cert_name(name)?;
    let ca = CaSigner::load(ca_dir)?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let cert_path = out_dir.join(format!("{name}.crt"));
    let key_path = out_dir.join(format!("{name}.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::AlreadyExists { path: p.clone() });
        }
    }
    let (cert_pem, key_pem) = ca.issue(role, name, extra_sans, valid_days)?;
    write_new(&key_path, &key_pem, true)?;
    write_new(&cert_path, &cert_pem, false)?;
    let ca_copy = out_dir.join(CA_CERT_FILE);
    if ca_copy != ca.cert_path {
        match fs::read_to_string(&ca_copy) {
            Ok(existing) if existing == ca.cert_pem => {}
            Ok(_) => {
                return Err(TlsError::BadPem {
                    path: ca_copy,
                    message: "holds a different CA certificate; refusing to overwrite it".into(),
                })
            }
            Err(_) => write_new(&ca_copy, &ca.cert_pem, false)?,
        }
    }
    Ok(IssuedFiles {
        cert: cert_path,
        key: key_path,
        ca: ca_copy,
    })
}

/// Paths of one party's TLS material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate that peers must chain to.
    pub ca: PathBuf,
    /// This party's certificate.
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
    /// Certificate revocation list of the cluster CA (PEM, `vigilctl cert revoke`): peers
    /// whose certificate it lists are refused at the handshake. Reloaded on SIGHUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// Loaded TLS material.
pub struct TlsMaterial {
    pub roots: RootCertStore,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Revocation lists to check peers against (empty: none).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl TlsMaterial {
    /// Material from PEM text already in memory (CA, certificate, key).
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        use rustls_pki_types::pem::PemObject;
        let mem = PathBuf::from("<memory>");
        let bad = |m: String| TlsError::BadPem {
            path: mem.clone(),
            message: m,
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        Ok(TlsMaterial {
            roots,
            chain,
            key,
            crls: Vec::new(),
        })
    }
}

impl TlsPaths {
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca = load_certs(&self.ca)?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| TlsError::BadPem {
                path: self.ca.clone(),
                message: e.to_string(),
            })?;
        }
        let chain = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let crls = match &self.crl {
            Some(p) => vec![load_crl(p, &self.ca)?],
            None => Vec::new(),
        };
        Ok(TlsMaterial {
            roots,
            chain,
            key,
            crls,
        })
    }
}

/// Reads a PEM CRL and checks it is issued by the CA in `ca_path` (a CRL of another CA would
/// leave every peer's revocation status unknown, which refuses them all).
fn load_crl(
    path: &Path,
    ca_path: &Path,
) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let data = fs::read(path).map_err(io_err(path))?;
    let crl =
        CertificateRevocationListDer::from_pem_slice(&data).map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            message: format!("no PEM X509 CRL: {e}"),
        })?;
    let (_, parsed) = x509_parser::parse_x509_crl(&crl).map_err(|e| TlsError::BadPem {
        path: path.to_path_buf(),
        message: format!("unreadable CRL: {e}"),
    })?;
    let ca = load_certs(ca_path)?;
    let issued_by_ca = ca.iter().any(|c| {
        x509_parser::parse_x509_certificate(c)
            .is_ok_and(|(_, c)| c.subject().as_raw() == parsed.issuer().as_raw())
    });
    if !issued_by_ca {
        return Err(TlsError::BadPem {
            path: path.to_path_buf(),
            message: format!(
                "CRL issued by {:?}, not by the cluster CA of {}",
                parsed.issuer().to_string(),
                ca_path.display()
            ),
        });
    }
    Ok(crl)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let data = fs::read(path).map_err(io_err(path))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&data).collect();
    let certs = certs.map_err(|e| TlsError::BadPem {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let data = fs::read(path).map_err(io_err(path))?;
    match PrivatePkcs8KeyDer::from_pem_slice(&data) {
        Ok(k) => Ok(PrivateKeyDer::Pkcs8(k)),
        Err(_) => PrivateKeyDer::from_pem_slice(&data).map_err(|_| TlsError::NoKey {
            path: path.to_path_buf(),
        }),
    }
}

/// Transport settings shared by both ends.
#[derive(Debug, Clone, Copy)]
pub struct TransportTuning {
    /// A connection with no traffic for this long is dead.
    pub idle_timeout: Duration,
    /// Send QUIC keep-alives this often (`None`: never).
    pub keep_alive: Option<Duration>,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            idle_timeout: Duration::from_millis(3000),
            keep_alive: Some(Duration::from_millis(500)),
        }
    }
}

fn transport(t: TransportTuning) -> Result<Arc<quinn::TransportConfig>, TlsError> {
    let mut tc = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout)
        .map_err(|e| TlsError::Verifier(format!("idle timeout: {e}")))?;
    tc.max_idle_timeout(Some(idle));
    tc.keep_alive_interval(t.keep_alive);
    // A control stream per connection is all Vigil needs; keep per-connection memory small so
    // one monitor can hold tens of thousands of agents.
    tc.max_concurrent_bidi_streams(4u32.into());
    tc.max_concurrent_uni_streams(0u32.into());
    tc.stream_receive_window((256u32 * 1024).into());
    tc.receive_window((512u32 * 1024).into());
    tc.send_window(512 * 1024);
    Ok(Arc::new(tc))
}

/// The server side (monitor): requires a client certificate chaining to the cluster CA.
pub fn server_config(
    material: TlsMaterial,
    alpn: &[&[u8]],
    tuning: TransportTuning,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with(material, alpn, tuning, None)
}

/// [`server_config`], also refusing certificates the material's CRLs list, and calling
/// `on_expired` for each refused client whose certificate is genuine (chains to the CA, not
/// revoked) but expired: the refused party is then known by name.
pub fn server_config_with(
    material: TlsMaterial,
    alpn: &[&[u8]],
    tuning: TransportTuning,
    on_expired: Option<ExpiredHook>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(material.roots), provider.clone());
    if !material.crls.is_empty() {
        // Our chains are leaf + root: only the leaf can be revoked.
        builder = builder
            .with_crls(material.crls)
            .only_check_end_entity_revocation();
    }
    let inner = builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = match on_expired {
        Some(hook) => Arc::new(ExpiryAwareVerifier { inner, hook }),
        None => inner,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain, material.key)?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(tuning)?);
    Ok(cfg)
}

/// The client side (agent, vigilctl, monitor peers): presents its certificate and accepts only
/// servers whose certificate chains to the cluster CA and names [`MONITOR_SERVER_NAME`].
pub fn client_config(
    material: TlsMaterial,
    alpn: &[u8],
    tuning: TransportTuning,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(material.roots);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if material.crls.is_empty() {
        builder.with_root_certificates(roots)
    } else {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .with_crls(material.crls)
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        builder.with_webpki_verifier(verifier)
    };
    let mut tls = builder.with_client_auth_cert(material.chain, material.key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(tuning)?);
    Ok(cfg)
}

/// Reads name and role from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(TlsError::NoCommonName)?
        .to_string();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or("")
        .to_string();
    let role = Role::from_ou(&ou).ok_or(TlsError::NoRole(ou))?;
    Ok(PeerIdentity { name, role })
}

/// The verified identity of the peer of an established QUIC connection.
///
/// rustls has already verified the chain against the cluster CA before the handshake
/// completed; this only reads the leaf certificate's subject.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, TlsError> {
    let any = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    identity_from_der(leaf)
}

/// The ALPN protocol negotiated on a connection.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

// ---- Issue 10 items 4 and 5: certificate facts, revocation, renewal, expired peers. ----

/// What the monitors (and operators) need to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub name: String,
    pub role: Role,
    /// The serial number, lowercase hex without separators (what `vigilctl cert revoke
    /// --serial` takes).
    pub serial: String,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial number as the user typed it (hex, `:` separators allowed), normalized.
pub fn parse_serial(s: &str) -> Result<String, TlsError> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    if clean.is_empty() || clean.len() % 2 != 0 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(TlsError::BadName {
            name: s.to_string(),
            reason: "a serial number is an even number of hex digits (as `vigilctl cert show` prints it)"
                .into(),
        });
    }
    Ok(normalize_serial(&clean))
}

/// Leading zero bytes do not change a serial's value.
fn normalize_serial(hex: &str) -> String {
    let mut h = hex;
    while h.len() > 2 && h.starts_with("00") {
        h = &h[2..];
    }
    h.to_string()
}

/// Name, role, serial and expiry of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, TlsError> {
    let id = identity_from_der(der)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    Ok(CertInfo {
        name: id.name,
        role: id.role,
        serial: normalize_serial(&hex(cert.raw_serial())),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// [`cert_info`] of the first certificate of a PEM file.
pub fn cert_info_file(path: &Path) -> Result<CertInfo, TlsError> {
    let certs = load_certs(path)?;
    let first = certs.first().ok_or_else(|| TlsError::NoCertificate {
        path: path.to_path_buf(),
    })?;
    cert_info(first).map_err(|e| TlsError::BadPem {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// [`cert_info`] of the verified leaf certificate of a connection's peer.
pub fn peer_cert_info(conn: &quinn::Connection) -> Result<CertInfo, TlsError> {
    let any = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    cert_info(leaf)
}

/// File name of the CRL inside a CA directory.
pub const CA_CRL_FILE: &str = "ca.crl";

/// Replaces `path` by `contents` atomically and durably ([`crate::atomic_file`]); a secret
/// is created 0600 from the start.
fn replace_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let mode = if secret { 0o600 } else { 0o644 };
    Ok(write_atomic_mode(path, contents.as_bytes(), mode)?)
}

/// The serials a DER CRL lists (normalized hex).
pub fn crl_serials(der: &[u8]) -> Result<Vec<String>, TlsError> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| TlsError::BadPeerCertificate(format!("unreadable CRL: {e}")))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| normalize_serial(&hex(r.raw_serial())))
        .collect())
}

/// The outcome of [`revoke`].
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The CRL written (`ca.crl` in the CA directory).
    pub crl: PathBuf,
    /// Every serial the CRL now lists.
    pub serials: Vec<String>,
    /// Serials of this call that were already listed.
    pub already: Vec<String>,
}

/// Adds `serials` to the CA's revocation list `ca_dir/ca.crl` (created if missing), signed by
/// the CA. Copy it to every monitor (their `[tls] crl`) and send them SIGHUP.
pub fn revoke(ca_dir: &Path, serials: &[String]) -> Result<Revoked, TlsError> {
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
    let ca = CaSigner::load(ca_dir)?;
    let crl_path = ca_dir.join(CA_CRL_FILE);
    let now = time_now();
    // (serial hex, revocation time) already listed.
    let mut listed: Vec<(String, time::OffsetDateTime)> = Vec::new();
    if crl_path.exists() {
        use rustls_pki_types::pem::PemObject;
        let data = fs::read(&crl_path).map_err(io_err(&crl_path))?;
        let der =
            CertificateRevocationListDer::from_pem_slice(&data).map_err(|e| TlsError::BadPem {
                path: crl_path.clone(),
                message: e.to_string(),
            })?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| TlsError::BadPem {
            path: crl_path.clone(),
            message: e.to_string(),
        })?;
        for r in crl.iter_revoked_certificates() {
            listed.push((
                normalize_serial(&hex(r.raw_serial())),
                r.revocation_date.to_datetime(),
            ));
        }
    }
    let mut already = Vec::new();
    for s in serials {
        let s = parse_serial(s)?;
        if listed.iter().any(|(l, _)| *l == s) {
            already.push(s);
        } else {
            listed.push((s, now));
        }
    }
    let mut revoked_certs = Vec::new();
    for (s, at) in &listed {
        let mut bytes = Vec::with_capacity(s.len() / 2);
        for i in (0..s.len()).step_by(2) {
            let b = u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| TlsError::BadName {
                name: s.clone(),
                reason: e.to_string(),
            })?;
            bytes.push(b);
        }
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: *at,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now - Duration::from_secs(60),
        // Monitors do not enforce next_update (a stale CRL is better than refusing everyone);
        // the date only has to be later than this_update.
        next_update: now + Duration::from_secs(20 * 365 * 24 * 3600),
        crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer)?;
    replace_file(&crl_path, &crl.pem()?, false)?;
    Ok(Revoked {
        crl: crl_path,
        serials: listed.into_iter().map(|(s, _)| s).collect(),
        already,
    })
}

/// The outcome of [`renew`].
#[derive(Debug, Clone)]
pub struct Renewed {
    pub old: CertInfo,
    pub new: CertInfo,
}

/// Issues a new key and certificate for the holder of `cert` (same name, role and subject
/// alternative names, `valid_days` from now) and replaces `cert` and `key` in place (each
/// atomically, the key first). The daemon using them picks them up on SIGHUP.
pub fn renew(ca_dir: &Path, cert: &Path, key: &Path, valid_days: u32) -> Result<Renewed, TlsError> {
    let ca = CaSigner::load(ca_dir)?;
    let certs = load_certs(cert)?;
    let der = certs.first().ok_or_else(|| TlsError::NoCertificate {
        path: cert.to_path_buf(),
    })?;
    let old = cert_info(der).map_err(|e| TlsError::BadPem {
        path: cert.to_path_buf(),
        message: e.to_string(),
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadPem {
        path: cert.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut extra = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d)
                    if *d != old.name && *d != MONITOR_SERVER_NAME =>
                {
                    extra.push(d.to_string())
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => {
                        let a: [u8; 4] = [b[0], b[1], b[2], b[3]];
                        extra.push(std::net::IpAddr::from(a).to_string())
                    }
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        extra.push(std::net::IpAddr::from(a).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let (cert_pem, key_pem) = ca.issue(old.role, &old.name, &extra, valid_days)?;
    replace_file(key, &key_pem, true)?;
    replace_file(cert, &cert_pem, false)?;
    let new = cert_info_file(cert)?;
    Ok(Renewed { old, new })
}

impl CaSigner {
    /// Issues a certificate valid from `not_before` to `not_after` (Unix seconds): tests use
    /// it for certificates that are already expired.
    pub fn issue_between(
        &self,
        role: Role,
        name: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<(String, String), TlsError> {
        validate_cert_name(name)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_ou());
        dn.push(DnType::OrganizationName, "Vigil");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let at = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| TlsError::BadName {
                name: t.to_string(),
                reason: e.to_string(),
            })
        };
        params.not_before = at(not_before)?;
        params.not_after = at(not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A client refused at the handshake because its certificate expired, although it is genuine
/// (chains to the cluster CA and is not revoked): who it is, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredPeer {
    pub info: CertInfo,
}

/// Called (on the handshake's thread: keep it short) for each [`ExpiredPeer`].
pub type ExpiredHook = Arc<dyn Fn(ExpiredPeer) + Send + Sync>;

/// The cluster's client verifier, which on an expired certificate verifies it again as of
/// its last valid second: if that passes, the peer is identified (and reported through the
/// hook), and refused all the same.
struct ExpiryAwareVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    hook: ExpiredHook,
}

impl std::fmt::Debug for ExpiryAwareVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpiryAwareVerifier")
            .field("inner", &self.inner)
            .finish()
    }
}

impl rustls::server::danger::ClientCertVerifier for ExpiryAwareVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) = &result
        {
            if let Ok(info) = cert_info(end_entity) {
                if info.not_after > 0 {
                    let then =
                        UnixTime::since_unix_epoch(Duration::from_secs(info.not_after as u64 - 1));
                    if self
                        .inner
                        .verify_client_cert(end_entity, intermediates, then)
                        .is_ok()
                    {
                        (self.hook)(ExpiredPeer { info });
                    }
                }
            }
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_certs_roundtrip_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").expect("ca");
        let err = init_ca(&ca, "test").expect_err("second init must refuse");
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err}");

        let out = dir.path().join("certs");
        let files = issue_cert(&ca, Role::Agent, "hv1", &out, &[], 30).expect("issue");
        let pem = fs::read(&files.cert).expect("read");
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(&pem).expect("pem");
        assert_eq!(
            identity_from_der(&der).expect("identity"),
            PeerIdentity {
                name: "hv1".into(),
                role: Role::Agent
            }
        );
        let again = issue_cert(&ca, Role::Agent, "hv1", &out, &[], 30).expect_err("exists");
        assert!(matches!(again, TlsError::AlreadyExists { .. }));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.key).expect("meta").permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "private key must not be readable by others"
            );
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").expect("ca");
        let err = issue_cert(&ca, Role::Agent, "../evil", dir.path(), &[], 30).expect_err("bad");
        assert!(err.to_string().contains("../evil"), "{err}");
    }

    #[test]
    fn revoke_lists_serials_once_and_a_foreign_crl_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").expect("ca");
        let out = dir.path().join("certs");
        let a = issue_cert(&ca, Role::Agent, "hv1", &out, &[], 30).expect("issue");
        let b = issue_cert(&ca, Role::Viewer, "bob", &out, &[], 30).expect("issue");
        let sa = cert_info_file(&a.cert).expect("info").serial;
        let vb = cert_info_file(&b.cert).expect("info");
        assert_eq!(vb.role, Role::Viewer);
        assert_eq!("viewer".parse::<Role>(), Ok(Role::Viewer));

        let r = revoke(&ca, std::slice::from_ref(&sa)).expect("revoke");
        assert_eq!(r.serials, vec![sa.clone()]);
        // With separators and upper case, plus a new one: listed once each.
        let colon = sa
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let r = revoke(&ca, &[colon, vb.serial.clone()]).expect("revoke again");
        assert_eq!(r.serials, vec![sa.clone(), vb.serial.clone()]);
        assert_eq!(r.already, vec![sa.clone()]);
        let paths = TlsPaths {
            ca: a.ca.clone(),
            cert: a.cert.clone(),
            key: a.key.clone(),
            crl: Some(r.crl.clone()),
        };
        let m = paths.load().expect("load with CRL");
        assert_eq!(crl_serials(&m.crls[0]).expect("serials").len(), 2);

        let e = revoke(&ca, &["xyz".into()]).expect_err("bad serial");
        assert!(e.to_string().contains("xyz"), "{e}");

        // A CRL of another CA is refused with a clear error.
        let other = dir.path().join("other");
        init_ca(&other, "other").expect("other ca");
        let foreign = revoke(&other, &[sa]).expect("foreign revoke");
        let bad = TlsPaths {
            crl: Some(foreign.crl),
            ..paths
        };
        let e = bad.load().err().expect("foreign CRL must be refused");
        assert!(e.to_string().contains("not by the cluster CA"), "{e}");
    }

    #[test]
    fn renew_keeps_name_role_and_addresses_with_a_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").expect("ca");
        let out = dir.path().join("certs");
        let f = issue_cert(
            &ca,
            Role::Monitor,
            "mon1",
            &out,
            &["10.0.0.1".into(), "mon1.example".into()],
            10,
        )
        .expect("issue");
        let old_key = fs::read_to_string(&f.key).expect("key");
        let r = renew(&ca, &f.cert, &f.key, 825).expect("renew");
        assert_eq!((r.new.name.as_str(), r.new.role), ("mon1", Role::Monitor));
        assert_ne!(r.new.serial, r.old.serial);
        assert!(r.new.not_after - r.old.not_after > 800 * 86_400);
        assert_ne!(fs::read_to_string(&f.key).expect("key"), old_key);
        let der = load_certs(&f.cert).expect("certs").remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let sans: Vec<String> = c
            .subject_alternative_name()
            .expect("san")
            .expect("san")
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        for want in ["mon1.example", "0a:00:00:01", MONITOR_SERVER_NAME] {
            assert!(sans.iter().any(|s| s.contains(want)), "{want} in {sans:?}");
        }
        // The renewed pair loads and matches.
        TlsPaths {
            ca: f.ca,
            cert: f.cert,
            key: f.key,
            crl: None,
        }
        .load()
        .expect("load renewed");
    }
}
