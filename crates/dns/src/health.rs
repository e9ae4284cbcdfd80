//! Health checks of every answered address: `GET` of the health URL with
//! `{ip}` replaced; what passes (2xx or 3xx within the timeout) and the
//! `rise`/`fall` verdict are `scaleout-health`'s, the load balancer's too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use scaleout_health::{Thresholds, Transition, Verdict};
use tokio_util::sync::CancellationToken;

use crate::zone::Zone;
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

    /// Forgets the addresses no longer in the zone (one added again is
    /// checked afresh).
    fn keep_only(&self, addrs: &[IpAddr]) {
        if let Ok(mut m) = self.up.write() {
            m.retain(|a, _| addrs.contains(a));
        }
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
    const AGENT: &str = "scaleout-dns health check";
    let (authority, path) = url_for(template, ip)?;
    scaleout_health::within(timeout, async {
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match tls {
            None => scaleout_health::probe(tcp, &authority, &path, AGENT).await,
            Some(connector) => {
                // The address checked is the name its certificate must carry.
                let name = rustls::pki_types::ServerName::from(ip);
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                scaleout_health::probe(stream, &authority, &path, AGENT).await
            }
        }
    })
    .await
}

/// Checks every address until shutdown.
pub async fn run(
    zone: Arc<RwLock<Zone>>,
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
    let thresholds = Thresholds {
        rise: cfg.rise,
        fall: cfg.fall,
    };
    let mut states: HashMap<IpAddr, Verdict> = HashMap::new();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The zone's addresses now: the records API may have changed them.
        let addrs = zone.read().map(|z| z.all_addrs()).unwrap_or_default();
        states.retain(|a, _| addrs.contains(a));
        health.keep_only(&addrs);
        let mut checks = tokio::task::JoinSet::new();
        for addr in &addrs {
            let (template, addr, timeout) = (template.clone(), *addr, cfg.timeout);
            let tls = tls.clone();
            checks
                .spawn(async move { (addr, check(&template, addr, tls.as_ref(), timeout).await) });
        }
        while let Some(Ok((addr, result))) = checks.join_next().await {
            let state = states.entry(addr).or_insert_with(Verdict::new_up);
            match state.observe(result.is_ok(), thresholds) {
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
