//! What keeps one client from spoiling the app for others: who the client
//! is behind the load balancer, and a per-client limit on creating links.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota};

/// Clients tracked at once before stale entries are swept.
const TRACKED: usize = 100_000;

/// The client's address: the last `X-Forwarded-For` entry when the peer
/// is a trusted proxy (the load balancer appends the address it saw),
/// else the peer itself.
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trusted.iter().any(|net| net.contains(&peer_ip)) {
        return peer_ip;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .map_or(peer_ip, |ip| ip.to_canonical())
}

/// The proxies trusted by default: loopback and the private ranges, where
/// the load balancer sits in every layout scaleout runs.
pub fn default_trusted() -> Vec<ipnet::IpNet> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ]
    .iter()
    .filter_map(|n| n.parse().ok())
    .collect()
}

/// Links one client may create: `per_minute`, in bursts of `burst`.
pub struct CreateLimit {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl CreateLimit {
    /// `per_minute` 0 turns the limit off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        CreateLimit { limiter }
    }

    /// Whether `client` may create one more link now; when not, how many
    /// seconds until it may.
    pub fn check(&self, client: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() > TRACKED {
            limiter.retain_recent();
        }
        limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            wait.as_secs().max(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9"),
        );
        let trusted = default_trusted();
        let via_lb: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let direct: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert_eq!(client_ip(&h, via_lb, &trusted).to_string(), "203.0.113.9");
        assert_eq!(client_ip(&h, direct, &trusted).to_string(), "198.51.100.7");
        h.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(client_ip(&h, via_lb, &trusted).to_string(), "127.0.0.1");
    }

    #[test]
    fn each_client_gets_its_own_burst() {
        let limit = CreateLimit::new(60, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limit.check(a).is_ok());
        }
        assert!(limit.check(a).is_err(), "a's burst is spent");
        assert!(limit.check(b).is_ok(), "b is not held back by a");
        let off = CreateLimit::new(0, 0);
        assert!((0..1000).all(|_| off.check(a).is_ok()));
    }
}
