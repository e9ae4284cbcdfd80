use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{BackendSelection, Pick};
use crate::backend::Backend;

/// The backend with the fewest requests in flight, relative to its weight;
/// ties go round-robin so idle pools still spread.
#[derive(Default)]
pub struct LeastConn {
    next: AtomicUsize,
}

impl BackendSelection for LeastConn {
    fn select<'b>(
        &self,
        backends: &'b [Arc<Backend>],
        pick: &Pick<'_>,
    ) -> Option<&'b Arc<Backend>> {
        // in_flight / weight, compared without division.
        let load =
            |b: &Backend| u128::from(b.in_flight()) * 1_000_000 / u128::from(b.weight().max(1));
        let usable = || backends.iter().filter(|b| (pick.usable)(b));
        let least = usable().map(|b| load(b)).min()?;
        // Ties take turns, so an idle pool still spreads evenly.
        let ties = usable().filter(|b| load(b) == least).count();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % ties;
        usable()
            .filter(|b| load(b) == least)
            .nth(turn)
            .or_else(|| usable().min_by_key(|b| load(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn prefers_the_least_loaded() {
        let pool = pool(&[1, 1, 1]);
        pool[0].in_flight.store(5, Ordering::Relaxed);
        pool[1].in_flight.store(1, Ordering::Relaxed);
        pool[2].in_flight.store(3, Ordering::Relaxed);
        assert_eq!(
            spread(&LeastConn::default(), &pool, 10, &any),
            vec![0, 10, 0]
        );
        pool[1].in_flight.store(3, Ordering::Relaxed);
        let counts = spread(&LeastConn::default(), &pool, 10, &any);
        assert_eq!(counts, vec![0, 5, 5], "ties are shared");
    }
}
