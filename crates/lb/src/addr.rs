//! Where a backend listens: `http(s)://host:port`, parsed and checked once
//! (config validation and the admin API use the same rule), resolved once
//! when the backend is added.

use std::net::SocketAddr;

use crate::error::ConfigError;

/// Where a backend listens, parsed from `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
    /// `https://`: the load balancer speaks TLS to it.
    pub tls: bool,
}

impl BackendAddr {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let url = url::Url::parse(raw)
            .map_err(|e| ConfigError::new(format!("backend {raw:?} is not a URL: {e}")))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => {
                return Err(ConfigError::new(format!(
                    "backend {raw:?}: give an http:// or https:// URL"
                )))
            }
        };
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(ConfigError::new(format!(
                "backend {raw:?}: give only http(s)://host:port, no path, query or user"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| ConfigError::new(format!("backend {raw:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        Ok(BackendAddr { host, port, tls })
    }

    /// `host:port`, bracketing IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host (once, when the backend is added).
    pub async fn resolve(&self) -> Result<SocketAddr, ConfigError> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| ConfigError::new(format!("cannot resolve {}: {e}", self.authority())))?;
        addrs
            .next()
            .ok_or_else(|| ConfigError::new(format!("{} resolves to no address", self.authority())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_urls() {
        let a = BackendAddr::parse("http://localhost:8081").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("localhost", 8081));
        assert_eq!(
            BackendAddr::parse("http://[::1]:80/").unwrap().authority(),
            "[::1]:80"
        );
        assert_eq!(BackendAddr::parse("http://10.0.0.1").unwrap().port, 80);
        let tls = BackendAddr::parse("https://web-1.test").unwrap();
        assert!(tls.tls && !a.tls);
        assert_eq!(tls.port, 443);
        for bad in [
            "ftp://x:1",
            "127.0.0.1:80",
            "http://x:1/path",
            "http://u@x:1",
        ] {
            assert!(BackendAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
