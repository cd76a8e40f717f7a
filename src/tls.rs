//! TLS for both ports (rustls, ring provider; TLS 1.2 and 1.3).
//!
//! - The public port: server authentication only; ALPN `h2` and `http/1.1`.
//! - The internal port, when `--internal-tls-*` are given: mutual TLS. Every node has a
//!   certificate signed by the cluster's CA and presents it both as a server and as a client;
//!   each side accepts only a peer whose chain ends at that CA. ALPN `h2` only.
//!
//! ```text
//!   node A (Peers, client)                         node B (internal port, server)
//!   cert A + key A ──── TLS handshake ─────▶  requires a client cert chaining to the CA
//!   verifies B's cert: chains to the CA and   presents cert B
//!   names the host A dialled (DNS or IP SAN)
//! ```
//!
//! The client checks the server's name as any HTTPS client does: a node's certificate must
//! carry, as a DNS or IP subject alternative name, the host of the internal address the other
//! nodes dial (its `--advertise-internal`, else its bound `--internal-addr`). The server does
//! not check a name: any certificate the CA signed is a member, so the CA must be the cluster's
//! own (the cluster secret is checked as well, on every request).
//!
//! Certificate, key and (for mTLS) CA files are PEM. They are checked for changes every
//! [`RELOAD_EVERY`] and reloaded when any file's modification time or size changes, so a
//! renewed certificate or an extended CA bundle is used for new connections without a restart
//! (by the server and by the client side alike). A set that fails to load leaves the previous
//! one in service and logs why. The key file must not be readable by group or others.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The files of one port's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM), mode 0600.
    pub key: PathBuf,
    /// CA bundle (PEM) that signs every peer's certificate: `Some` makes it mutual TLS (the
    /// internal port), `None` server-only TLS (the public port).
    pub ca: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the {what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// One consistent load of the files.
struct Loaded {
    server: Arc<ServerConfig>,
    /// This node's certificate and key, presented as a client (mutual TLS only).
    client_key: Option<Arc<CertifiedKey>>,
    /// Verifies peers' server certificates against the CA (mutual TLS only).
    server_verifier: Option<Arc<WebPkiServerVerifier>>,
}

fn load_files(files: &TlsFiles) -> Result<Loaded, String> {
    let (cert, key) = (&files.cert, &files.key);
    let certs = read_certs(cert, "certificate")?;
    // The permission check reads the file as a secret; the PEM parser reads it again.
    let _ = crate::config::read_secret_file(key)
        .map_err(|e| format!("cannot use the TLS key {}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "the TLS key {} is not a PEM private key: {e}",
            key.display()
        )
    })?;
    let provider = provider();
    let mismatch = |e: rustls::Error| format!("the TLS key does not fit the certificate: {e}");
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let Some(ca) = &files.ca else {
        let mut server = builder
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(mismatch)?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        return Ok(Loaded {
            server: Arc::new(server),
            client_key: None,
            server_verifier: None,
        });
    };
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca, "CA bundle")? {
        roots
            .add(c)
            .map_err(|e| format!("the CA bundle {} has a bad certificate: {e}", ca.display()))?;
    }
    let roots = Arc::new(roots);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("the CA bundle {}: {e}", ca.display()))?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("the CA bundle {}: {e}", ca.display()))?;
    let client_key =
        CertifiedKey::from_der(certs.clone(), key_der.clone_key(), &provider).map_err(mismatch)?;
    let mut server = builder
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs, key_der)
        .map_err(mismatch)?;
    // The internal port: HTTP/2, or a node-pair stream.
    server.alpn_protocols = vec![b"h2".to_vec(), crate::transport::stream::ALPN.to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        client_key: Some(Arc::new(client_key)),
        server_verifier: Some(server_verifier),
    })
}

/// Loads a server configuration from PEM files (checks them, as at start).
///
/// # Errors
/// A file that cannot be read, holds no certificate or key, a key file readable by others, a
/// key that does not match the certificate, or a CA bundle with no usable certificate.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    load_files(files).map(|l| l.server)
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

type Stamps = [Option<(SystemTime, u64)>; 3];

/// The current TLS configuration of a port, swapped when the files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Loads the files once.
    ///
    /// # Errors
    /// As [`load`].
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, String> {
        let loaded = load_files(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An acceptor with the configuration in service now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.loaded().server.clone())
    }

    /// A client configuration for mutual TLS with the other nodes: it presents this node's
    /// certificate and accepts a server whose certificate chains to the CA and names the host
    /// dialled. Both follow reloads. No ALPN is set: the HTTP/2 connector sets `h2`.
    ///
    /// # Errors
    /// When these files have no CA (server-only TLS).
    pub fn client_config(self: &Arc<Self>) -> Result<ClientConfig, String> {
        if self.files.ca.is_none() {
            return Err("client TLS needs a CA bundle".into());
        }
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CurrentCa(self.clone())))
            .with_client_cert_resolver(Arc::new(CurrentCert(self.clone()))))
    }

    fn stamps(&self) -> Stamps {
        [
            stamp(&self.files.cert),
            stamp(&self.files.key),
            self.files.ca.as_deref().and_then(stamp),
        ]
    }

    /// Watches the files until `stop`, reloading on change.
    pub fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut last = self.stamps();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RELOAD_EVERY) => {}
                    _ = stop.changed() => return,
                }
                let now = self.stamps();
                if now == last {
                    continue;
                }
                match load_files(&self.files) {
                    Ok(loaded) => {
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
                        last = now;
                        tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate");
                    }
                    // Renewal tools write the files one after the other: a half-written set is
                    // retried at the next check, the old certificate serving meanwhile.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS reload failed; keeping the old certificate")
                    }
                }
            }
        })
    }
}

/// Presents the certificate in service now as the client certificate.
#[derive(Debug)]
struct CurrentCert(Arc<ReloadingTls>);

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.loaded().client_key.clone()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a server against the CA bundle in service now (webpki: chain, validity, name).
#[derive(Debug)]
struct CurrentCa(Arc<ReloadingTls>);

impl CurrentCa {
    fn verifier(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.0
            .loaded()
            .server_verifier
            .clone()
            .ok_or_else(|| rustls::Error::General("no CA bundle loaded".into()))
    }
}

impl ServerCertVerifier for CurrentCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
