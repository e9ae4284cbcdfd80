use std::sync::Arc;

use rand::Rng;

use super::{BackendSelection, Pick};
use crate::backend::Backend;

/// Power of two choices: two usable backends at random, the one with the
/// lower cost = PeakEWMA latency × (in flight + 1) wins. Near least-loaded
/// choices at O(1), and slow backends shed load at once.
pub struct P2cEwma;

fn cost(b: &Backend, pick: &Pick<'_>) -> f64 {
    b.ewma_estimate(pick.now).as_nanos() as f64 * (b.in_flight() as f64 + 1.0)
        / f64::from(b.weight().max(1))
}

impl BackendSelection for P2cEwma {
    fn select<'b>(
        &self,
        backends: &'b [Arc<Backend>],
        pick: &Pick<'_>,
    ) -> Option<&'b Arc<Backend>> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let mut rng = rand::rng();
        let first = rng.random_range(0..n);
        let offset = if n > 1 { rng.random_range(1..n) } else { 0 };
        let a = (0..n)
            .map(|i| &backends[(first + i) % n])
            .find(|b| (pick.usable)(b))?;
        let b = (0..n)
            .map(|i| &backends[(first + offset + i) % n])
            .find(|b| (pick.usable)(b) && b.id != a.id);
        match b {
            Some(b) if cost(b, pick) < cost(a, pick) => Some(b),
            _ => Some(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_slow_backend_gets_little_traffic() {
        let pool = pool(&[1, 1, 1]);
        let now = Instant::now();
        pool[2].observe_latency(Duration::from_millis(200), now);
        let counts = spread(&P2cEwma, &pool, 3000, &any);
        // b2 wins only when it is drawn together with... nobody: never with 3 backends.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > 1000 && counts[1] > 1000, "{counts:?}");
        let only = spread(&P2cEwma, &pool, 10, &|b| b.id == 2);
        assert_eq!(only, vec![0, 0, 10], "a single usable backend is used");
    }
}
