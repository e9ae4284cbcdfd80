//! Backend selection: which backend takes the next request.
//!
//! The proxy owns the narrow [`BackendSelection`] trait; each algorithm is
//! one implementation, free of I/O and of the clock (time comes in the
//! [`Pick`]). Selection sees the whole pool snapshot and a filter saying
//! which backends may be used for this attempt (available, not yet tried),
//! so it allocates nothing per request.

mod hash;
mod least_conn;
mod p2c;
mod round_robin;
mod weighted;

use std::sync::Arc;
use std::time::Instant;

pub use hash::{hash_bytes, Rendezvous};
pub use least_conn::LeastConn;
pub use p2c::P2cEwma;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use crate::backend::Backend;
use crate::config::Algorithm;

/// What a selection may look at besides the backends.
pub struct Pick<'a> {
    pub usable: &'a dyn Fn(&Backend) -> bool,
    /// The request's hash key (for `hash`).
    pub key: Option<u64>,
    pub now: Instant,
}

pub trait BackendSelection: Send + Sync {
    fn select<'b>(&self, backends: &'b [Arc<Backend>], pick: &Pick<'_>)
        -> Option<&'b Arc<Backend>>;
}

pub fn for_algorithm(algorithm: Algorithm) -> Box<dyn BackendSelection> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::default()),
        Algorithm::Weighted => Box::new(SmoothWeighted::default()),
        Algorithm::LeastConn => Box::new(LeastConn::default()),
        Algorithm::P2cEwma => Box::new(P2cEwma),
        Algorithm::Hash => Box::new(Rendezvous),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::BackendConfig;

    pub fn pool(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let cfg = BackendConfig {
                    weight: *w,
                    name: Some(format!("b{i}")),
                    ..BackendConfig::new(format!("http://127.0.0.1:{}", 10000 + i))
                };
                Arc::new(
                    Backend::new(i as u64, &cfg, ([127, 0, 0, 1], 10000 + i as u16).into())
                        .unwrap(),
                )
            })
            .collect()
    }

    /// Picks `n` times, returns how many each backend got.
    pub fn spread(
        sel: &dyn BackendSelection,
        pool: &[Arc<Backend>],
        n: usize,
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Vec<usize> {
        let mut counts = vec![0; pool.len()];
        for i in 0..n {
            let pick = Pick {
                usable,
                key: Some(hash_bytes(&i.to_le_bytes())),
                now: Instant::now(),
            };
            let b = sel.select(pool, &pick).expect("a backend");
            counts[b.id as usize] += 1;
        }
        counts
    }

    pub fn any(_: &Backend) -> bool {
        true
    }
}
