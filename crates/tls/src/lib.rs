//! TLS for every scaleout hop, with rustls (ring provider).
//!
//! - [`ServerTls`]: a certificate chain and key from PEM files, reloaded
//!   when the files change (checked at most once a second, on a
//!   handshake), so a renewed certificate is served without a restart;
//!   optionally a CA whose client certificates are required (mutual TLS).
//! - [`ClientTls`]: the CA that server certificates must chain to (the
//!   system's roots are not used: every scaleout hop is private), and
//!   optionally this side's own certificate for mutual TLS.
//! - [`LocalCa`]: a CA made on the spot (rcgen) that issues certificates
//!   for `scaleout up --tls`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

/// A TLS setup that cannot work, saying which file and why.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn fail(msg: String) -> TlsError {
    TlsError(msg)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(format!("reading certificates from {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("parsing certificates in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(fail(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        fail(format!(
            "reading the private key from {}: {e}",
            path.display()
        ))
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| fail(format!("CA certificate in {}: {e}", ca.display())))?;
    }
    Ok(roots)
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert)?;
    let key = read_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| fail(format!("the private key in {}: {e}", cert.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| fail(format!("{} and its key do not fit: {e}", cert.display())))?;
    Ok(Arc::new(certified))
}

/// A server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA issued.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// A rustls server config offering `alpn` (e.g. `h2`, `http/1.1`).
    pub fn config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let resolver = Arc::new(Reloading::new(self.cert.clone(), self.key.clone())?);
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| fail(format!("client CA {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    pub fn acceptor(&self, alpn: &[&[u8]]) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        Ok(tokio_rustls::TlsAcceptor::from(self.config(alpn)?))
    }
}

/// The served certificate, read again when its files change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Option<(SystemTime, SystemTime)>,
    checked: Instant,
}

/// How often, at most, the files are looked at again.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let loaded = Loaded {
            key: certified_key(&cert, &key)?,
            stamp: stamp(&cert, &key),
            checked: Instant::now(),
        };
        Ok(Reloading {
            cert,
            key,
            state: Mutex::new(loaded),
        })
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now.is_some() && now != state.stamp {
                // A half-written pair fails to load: keep serving the old
                // one and try again on a later handshake.
                match certified_key(&self.cert, &self.key) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                        state.key = key;
                        state.stamp = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded"),
                }
            }
        }
        Some(state.key.clone())
    }
}

/// A client's TLS files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA server certificates must chain to.
    pub ca: Option<PathBuf>,
    /// This side's certificate and key, for servers that want one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    pub fn config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| fail("TLS to a peer needs the CA that issued its certificate".into()))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots(ca)?);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| fail(format!("{} and its key do not fit: {e}", cert.display()))),
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(fail(
                "a client certificate needs both the certificate and its key".into(),
            )),
        }
    }

    pub fn connector(&self) -> Result<tokio_rustls::TlsConnector, TlsError> {
        Ok(tokio_rustls::TlsConnector::from(Arc::new(self.config()?)))
    }
}

/// A certificate authority made on the spot.
pub struct LocalCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A PEM certificate and its PEM key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl LocalCa {
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(e.to_string()))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
        Ok(LocalCa { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), good for
    /// both serving and being a client (mutual TLS between peers).
    pub fn issue(&self, names: &[String]) -> Result<Issued, TlsError> {
        let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let mut params =
            rcgen::CertificateParams::new(names.to_vec()).map_err(|e| fail(e.to_string()))?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_local_ca_issues_what_its_clients_trust_and_bad_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::new("test CA").unwrap();
        let issued = ca.issue(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let server = ServerTls {
            cert: write(dir.path(), "c.pem", &issued.cert_pem),
            key: write(dir.path(), "k.pem", &issued.key_pem),
            client_ca: Some(write(dir.path(), "ca.pem", &ca.cert_pem())),
        };
        server.config(&[b"http/1.1"]).unwrap();
        let client = ClientTls {
            ca: Some(dir.path().join("ca.pem")),
            cert: Some(dir.path().join("c.pem")),
            key: Some(dir.path().join("k.pem")),
        };
        client.config().unwrap();

        let other = LocalCa::new("other").unwrap().issue(&["x".into()]).unwrap();
        let mismatched = ServerTls {
            key: write(dir.path(), "other-k.pem", &other.key_pem),
            ..server.clone()
        };
        let err = mismatched.config(&[]).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let missing = ServerTls {
            cert: dir.path().join("nope.pem"),
            ..server
        };
        assert!(missing
            .config(&[])
            .unwrap_err()
            .to_string()
            .contains("nope.pem"));
        let half = ClientTls {
            key: None,
            ..client
        };
        assert!(half.config().is_err());
    }
}
