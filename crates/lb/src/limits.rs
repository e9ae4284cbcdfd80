//! What one client address may ask of the load balancer: requests in
//! flight at once ([`InFlightPerIp`], each holding a slot until its answer
//! is taken) and a request rate ([`RateLimit`], governor's GCRA). Both are
//! keyed by address and bounded however many addresses come by.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use crate::selection::hash_bytes;

/// How many requests each client address has in flight: each holds a
/// backend connection until its answer is taken, so a client that never
/// reads (an HTTP/2 stream with a zero window) pins one per request.
pub struct InFlightPerIp {
    shards: Vec<Mutex<HashMap<IpAddr, u32>>>,
    max: u32,
}

/// One request's place in its address's count; given back on drop.
pub struct IpSlot {
    table: Arc<InFlightPerIp>,
    ip: IpAddr,
}

impl InFlightPerIp {
    pub fn new(max: u32) -> Option<Arc<Self>> {
        (max > 0).then(|| {
            Arc::new(InFlightPerIp {
                shards: (0..64).map(|_| Default::default()).collect(),
                max,
            })
        })
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let h = match ip {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        };
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    /// A slot for `ip`, or `None` when it has `max` in flight already.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self
            .table
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A per-client-address request rate (governor's GCRA, keyed).
pub struct RateLimit {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
}

impl RateLimit {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Some(RateLimit {
            limiter: governor::DefaultKeyedRateLimiter::keyed(quota),
        })
    }

    /// Whether `client` may make one more request now.
    pub fn allows(&self, client: IpAddr) -> bool {
        // Clients not seen for a while are forgotten, so the table stays
        // bounded however many addresses come by.
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client).is_ok()
    }
}
