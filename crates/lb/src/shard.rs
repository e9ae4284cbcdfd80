//! Per-thread shards of shared hot-path state (the upstream pool, the retry
//! budget): each runtime thread mostly touches its own shard, so no lock on
//! the hot path is contended — a lock holder that loses its CPU cannot stall
//! the other threads (the tail-latency cost of a shared mutex).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tower::retry::budget::{Budget, TpsBudget};

static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// This thread's shard among `n`.
pub fn this_thread(n: usize) -> usize {
    let index = INDEX.with(|i| match i.get() {
        Some(v) => v,
        None => {
            let v = NEXT.fetch_add(1, Ordering::Relaxed);
            i.set(Some(v));
            v
        }
    });
    index % n.max(1)
}

/// tower's retry budget, one per thread shard; each allows its share of
/// the per-second minimum, and the ratio holds within each.
pub struct ShardedBudget {
    shards: Vec<TpsBudget>,
}

impl ShardedBudget {
    pub fn new(shards: usize, ttl: std::time::Duration, min_per_sec: u32, ratio: f32) -> Self {
        let shards = shards.max(1);
        let min = min_per_sec.div_ceil(shards as u32);
        ShardedBudget {
            shards: (0..shards)
                .map(|_| TpsBudget::new(ttl, min, ratio))
                .collect(),
        }
    }

    fn mine(&self) -> &TpsBudget {
        &self.shards[this_thread(self.shards.len())]
    }

    pub fn deposit(&self) {
        self.mine().deposit();
    }

    pub fn withdraw(&self) -> bool {
        self.mine().withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_shard() {
        let a = this_thread(4);
        assert_eq!(this_thread(4), a);
        let other = std::thread::spawn(|| this_thread(1_000_000))
            .join()
            .unwrap();
        assert_ne!(
            other,
            this_thread(1_000_000),
            "another thread gets another shard"
        );
    }

    #[test]
    fn the_budget_caps_retries() {
        let b = ShardedBudget::new(1, std::time::Duration::from_secs(10), 0, 0.2);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert!((15..=25).contains(&allowed), "about 20% of 100: {allowed}");
    }
}
