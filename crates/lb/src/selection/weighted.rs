use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{BackendSelection, Pick};
use crate::backend::Backend;

/// nginx's smooth weighted round-robin: every pick adds each usable
/// backend's weight to its running score, takes the highest, and subtracts
/// the total from the winner. Weights 5:1:1 give a a b a c a a, not a a a a a b c.
#[derive(Default)]
pub struct SmoothWeighted {
    current: Mutex<HashMap<u64, i64>>,
}

impl BackendSelection for SmoothWeighted {
    fn select<'b>(
        &self,
        backends: &'b [Arc<Backend>],
        pick: &Pick<'_>,
    ) -> Option<&'b Arc<Backend>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.len() > backends.len() * 2 + 16 {
            // Forget backends that left the pool.
            current.retain(|id, _| backends.iter().any(|b| b.id == *id));
        }
        let mut total = 0i64;
        let mut best: Option<(&'b Arc<Backend>, i64)> = None;
        for b in backends.iter().filter(|b| (pick.usable)(b)) {
            let w = i64::from(b.weight());
            total += w;
            let score = current.entry(b.id).or_insert(0);
            *score += w;
            if best.is_none_or(|(_, s)| *score > s) {
                best = Some((b, *score));
            }
        }
        let (chosen, _) = best?;
        if let Some(score) = current.get_mut(&chosen.id) {
            *score -= total;
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn follows_weights_smoothly() {
        let pool = pool(&[5, 1, 1]);
        let sel = SmoothWeighted::default();
        let order: Vec<u64> = (0..7)
            .map(|_| {
                sel.select(
                    &pool,
                    &Pick {
                        usable: &any,
                        key: None,
                        now: std::time::Instant::now(),
                    },
                )
                .unwrap()
                .id
            })
            .collect();
        assert_eq!(order, vec![0, 0, 1, 0, 2, 0, 0], "nginx's interleaving");
        assert_eq!(
            spread(&SmoothWeighted::default(), &pool, 700, &any),
            vec![500, 100, 100]
        );
        let two = super::super::testing::pool(&[3, 1]);
        assert_eq!(
            spread(&SmoothWeighted::default(), &two, 400, &any),
            vec![300, 100]
        );
    }
}
