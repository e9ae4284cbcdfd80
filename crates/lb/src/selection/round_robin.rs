use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{BackendSelection, Pick};
use crate::backend::Backend;

/// Each backend in turn. A backend that may not be used is skipped, and the
/// turn passes to the next usable one.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl BackendSelection for RoundRobin {
    fn select<'b>(
        &self,
        backends: &'b [Arc<Backend>],
        pick: &Pick<'_>,
    ) -> Option<&'b Arc<Backend>> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &backends[(start + i) % n])
            .find(|b| (pick.usable)(b))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn spreads_evenly_and_skips_unusable() {
        let pool = pool(&[1, 1, 1]);
        assert_eq!(
            spread(&RoundRobin::default(), &pool, 300, &any),
            vec![100, 100, 100]
        );
        let counts = spread(&RoundRobin::default(), &pool, 300, &|b| b.id != 1);
        assert_eq!(counts[1], 0);
        assert_eq!(counts[0] + counts[2], 300);
        assert!(RoundRobin::default()
            .select(
                &pool,
                &Pick {
                    usable: &|_| false,
                    key: None,
                    now: std::time::Instant::now()
                }
            )
            .is_none());
    }
}
