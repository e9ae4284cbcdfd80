//! Health checks of every answered address: `GET` of the health URL with
//! `{ip}` replaced, a 2xx within the timeout passes; `rise`/`fall` checks
//! in a row change the verdict (the load balancer's state machine).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use scaleout_lb::health::{HealthState, Transition};
use tokio_util::sync::CancellationToken;

use crate::HealthConfig;

/// The verdict for each address; addresses never checked are healthy.
#[derive(Default)]
pub struct Health {
    up: RwLock<HashMap<IpAddr, bool>>,
}

impl Health {
    pub fn is_up(&self, addr: IpAddr) -> bool {
        self.up
            .read()
            .map_or(true, |m| m.get(&addr).copied().unwrap_or(true))
    }

    pub fn snapshot(&self) -> Vec<(IpAddr, bool)> {
        let mut all: Vec<_> = self
            .up
            .read()
            .map(|m| m.iter().map(|(a, u)| (*a, *u)).collect())
            .unwrap_or_default();
        all.sort();
        all
    }

    fn set(&self, addr: IpAddr, up: bool) {
        if let Ok(mut m) = self.up.write() {
            m.insert(addr, up);
        }
    }
}

/// The health URL for one address.
pub fn url_for(template: &str, ip: IpAddr) -> Result<(String, String), String> {
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let url = template.replace("{ip}", &host);
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("health URL {template:?} must start with http:// or https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || !template.contains("{ip}") {
        return Err(format!(
            "health URL {template:?} must look like http://{{ip}}:PORT/path"
        ));
    }
    Ok((authority.to_string(), path.to_string()))
}

async fn check(
    template: &str,
    ip: IpAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let (authority, path) = url_for(template, ip)?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (send, conn) = match tls {
            None => hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await,
            Some(connector) => {
                // The address checked is the name its certificate must carry.
                let name = rustls::pki_types::ServerName::from(ip);
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return finish(send, &authority, &path).await;
            }
        }
        .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        finish(send, &authority, &path).await
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// The check's request on an open connection: a 2xx passes.
async fn finish(
    mut send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    authority: &str,
    path: &str,
) -> Result<(), String> {
    let req = hyper::Request::get(path)
        .header("host", authority)
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("status {}", resp.status()))
    }
}

/// Checks every address until shutdown.
pub async fn run(
    addrs: Vec<IpAddr>,
    cfg: HealthConfig,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let Some(template) = cfg.url.clone() else {
        return;
    };
    let tls = match &cfg.ca {
        Some(ca) => match (scaleout_tls::ClientTls {
            ca: Some(ca.clone()),
            cert: None,
            key: None,
        })
        .connector()
        {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "health checks over TLS cannot start");
                return;
            }
        },
        None => None,
    };
    let mut states: HashMap<IpAddr, HealthState> =
        addrs.iter().map(|a| (*a, HealthState::new_up())).collect();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut checks = tokio::task::JoinSet::new();
        for addr in &addrs {
            let (template, addr, timeout) = (template.clone(), *addr, cfg.timeout);
            let tls = tls.clone();
            checks
                .spawn(async move { (addr, check(&template, addr, tls.as_ref(), timeout).await) });
        }
        while let Some(Ok((addr, result))) = checks.join_next().await {
            let state = states.entry(addr).or_insert_with(HealthState::new_up);
            match state.observe(result.is_ok(), cfg.rise, cfg.fall) {
                Some(Transition::WentDown) => {
                    tracing::warn!(%addr, reason = %result.err().unwrap_or_default(), "address is DOWN: left out of answers");
                    health.set(addr, false);
                }
                Some(Transition::WentUp) => {
                    tracing::info!(%addr, "address is UP: back in answers");
                    health.set(addr, true);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_made_per_address() {
        let (a, p) = url_for("http://{ip}:8080/healthz", "127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!((a.as_str(), p.as_str()), ("127.0.0.2:8080", "/healthz"));
        let (a, _) = url_for("http://{ip}:80", "::1".parse().unwrap()).unwrap();
        assert_eq!(a, "[::1]:80");
        assert!(url_for("https://{ip}/", "::1".parse().unwrap()).is_ok());
        assert!(url_for("ftp://{ip}/", "::1".parse().unwrap()).is_err());
        assert!(url_for("http://lb:80/", "::1".parse().unwrap()).is_err());
    }
}
