//! How this node reaches the other nodes: plain HTTP, or HTTPS with the
//! cluster's CA and this node's own certificate (mutual TLS on the Raft
//! port). One process runs one node, and a cluster is TLS throughout or
//! not at all, so the mode is set once, at start, for the whole process:
//! every URL this node makes for a peer and every HTTP client it builds
//! follow it.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// A node's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTls {
    /// This node's certificate chain and key, served on both ports and
    /// shown to peers as a client.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster's CA: peers' certificates must chain to it, on both
    /// sides of every Raft RPC.
    pub ca: PathBuf,
    /// When set, API clients must present a certificate this CA issued.
    pub api_client_ca: Option<PathBuf>,
}

impl DbTls {
    /// The Raft port: only peers (a certificate from the cluster's CA).
    pub fn raft_server(&self) -> scaleout_tls::ServerTls {
        scaleout_tls::ServerTls {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: Some(self.ca.clone()),
        }
    }

    /// The API port.
    pub fn api_server(&self) -> scaleout_tls::ServerTls {
        scaleout_tls::ServerTls {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.api_client_ca.clone(),
        }
    }

    /// How this node calls its peers.
    pub fn client(&self) -> scaleout_tls::ClientTls {
        scaleout_tls::ClientTls {
            ca: Some(self.ca.clone()),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
        }
    }
}

static TLS: OnceLock<rustls::ClientConfig> = OnceLock::new();

/// Sets the process's mode from the node's config (once; later calls
/// keep the first).
pub fn init(tls: Option<&DbTls>) -> Result<(), scaleout_tls::TlsError> {
    if let Some(tls) = tls {
        let config = tls.client().config()?;
        let _ = TLS.set(config);
    }
    Ok(())
}

/// `https` once TLS is on, else `http`.
pub fn scheme() -> &'static str {
    if TLS.get().is_some() {
        "https"
    } else {
        "http"
    }
}

/// An HTTP client for peers, with the cluster's TLS when it has one. A
/// builder that fails is an error: falling back to a default client would
/// drop the timeout and the TLS the caller asked for.
pub fn client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, reqwest::Error> {
    let builder = match TLS.get() {
        Some(config) => builder.use_preconfigured_tls(config.clone()),
        None => builder,
    };
    builder.build()
}

/// The default timeout of calls between nodes.
pub const TIMEOUT: Duration = Duration::from_secs(30);
