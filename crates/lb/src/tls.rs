//! TLS termination with rustls (ring provider): the certificate chain and
//! key from PEM files, reloaded when they change (see `scaleout-tls`),
//! optionally client certificates from a CA; ALPN offering h2 and
//! http/1.1. And the connector for `https://` backends.

use crate::config::{TlsConfig, UpstreamTlsConfig};
use crate::error::Error;

pub fn acceptor(cfg: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, Error> {
    scaleout_tls::ServerTls {
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        client_ca: cfg.client_ca.clone(),
    }
    .acceptor(&[b"h2", b"http/1.1"])
    .map_err(|e| Error::Tls(e.to_string()))
}

pub fn connector(cfg: &UpstreamTlsConfig) -> Result<tokio_rustls::TlsConnector, Error> {
    scaleout_tls::ClientTls {
        ca: Some(cfg.ca.clone()),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    }
    .connector()
    .map_err(|e| Error::Tls(format!("to the backends: {e}")))
}
