//! TLS termination with rustls (ring provider): certificate chain and key
//! from PEM files, ALPN offering h2 and http/1.1.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::Error;

pub fn acceptor(cfg: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| {
            Error::Tls(format!(
                "reading certificates from {}: {e}",
                cfg.cert.display()
            ))
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            Error::Tls(format!(
                "parsing certificates in {}: {e}",
                cfg.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no certificate",
            cfg.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| {
        Error::Tls(format!(
            "reading the private key from {}: {e}",
            cfg.key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
