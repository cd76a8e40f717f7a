//! TLS on the public port (rustls, ring provider; TLS 1.2 and 1.3; ALPN `h2` and `http/1.1`).
//!
//! The certificate chain and private key are PEM files. They are checked for changes every
//! [`RELOAD_EVERY`] and reloaded when either file's modification time or size changes, so a
//! renewed certificate (cert-manager, certbot) is served to new connections without a restart.
//! A file that fails to load leaves the previous certificate in service and logs why. The key
//! file must not be readable by group or others.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Loads a server configuration from PEM files.
///
/// # Errors
/// A file that cannot be read, holds no certificate or key, a key file readable by others, or a
/// key that does not match the certificate.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate {} is not valid PEM: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    // The permission check reads the file as a secret; the PEM parser reads it again.
    let _ = crate::config::read_secret_file(key)
        .map_err(|e| format!("cannot use the TLS key {}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "the TLS key {} is not a PEM private key: {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("the TLS key does not fit the certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The current TLS configuration, swapped when the files change.
pub struct ReloadingTls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadingTls {
    /// Loads the files once.
    ///
    /// # Errors
    /// As [`load`].
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Arc<Self>, String> {
        let config = load(&cert, &key)?;
        Ok(Arc::new(Self {
            cert,
            key,
            current: RwLock::new(config),
        }))
    }

    /// An acceptor with the configuration in service now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        TlsAcceptor::from(config)
    }

    /// Watches the files until `stop`, reloading on change.
    pub fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut last = (stamp(&self.cert), stamp(&self.key));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RELOAD_EVERY) => {}
                    _ = stop.changed() => return,
                }
                let now = (stamp(&self.cert), stamp(&self.key));
                if now == last {
                    continue;
                }
                match load(&self.cert, &self.key) {
                    Ok(config) => {
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                        last = now;
                        tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
                    }
                    // Renewal tools write the two files one after the other: a half-written pair
                    // is retried at the next check, the old certificate serving meanwhile.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS reload failed; keeping the old certificate")
                    }
                }
            }
        })
    }
}
