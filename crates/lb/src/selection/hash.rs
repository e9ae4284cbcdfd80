use std::sync::Arc;

use super::{BackendSelection, Pick};
use crate::backend::Backend;

/// Rendezvous (highest random weight) hashing: each backend scores the key,
/// the highest score wins. When a backend leaves, only its keys move; when
/// one joins, it takes only the keys it now wins — the least remapping any
/// scheme can do. Weighted by `-w / ln(u)` (Schindelhauer & Schomaker).
/// Requests without a key go to the first usable backend by score of 0.
pub struct Rendezvous;

/// FNV-1a, stable across processes and releases (the key → backend map must
/// be the same on every load balancer instance).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer: spreads similar inputs over the whole range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn score(key: u64, backend: &Backend) -> f64 {
    let h = mix(key ^ mix(hash_bytes(backend.name.as_bytes())));
    // u in (0, 1): never 0, so ln(u) < 0 and finite.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(backend.weight().max(1)) / u.ln()
}

impl BackendSelection for Rendezvous {
    fn select<'b>(
        &self,
        backends: &'b [Arc<Backend>],
        pick: &Pick<'_>,
    ) -> Option<&'b Arc<Backend>> {
        let key = pick.key.unwrap_or(0);
        let mut best: Option<(&'b Arc<Backend>, f64)> = None;
        for b in backends.iter().filter(|b| (pick.usable)(b)) {
            let s = score(key, b);
            if best.is_none_or(|(_, bs)| s > bs) {
                best = Some((b, s));
            }
        }
        best.map(|(b, _)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use std::time::Instant;

    fn owner(pool: &[Arc<Backend>], key: u64, usable: &dyn Fn(&Backend) -> bool) -> u64 {
        Rendezvous
            .select(
                pool,
                &Pick {
                    usable,
                    key: Some(key),
                    now: Instant::now(),
                },
            )
            .unwrap()
            .id
    }

    #[test]
    fn same_key_same_backend_and_even_spread() {
        let pool = pool(&[1, 1, 1, 1]);
        for k in 0..100 {
            assert_eq!(owner(&pool, k, &any), owner(&pool, k, &any));
        }
        let counts = spread(&Rendezvous, &pool, 8000, &any);
        for c in &counts {
            assert!((1700..2300).contains(c), "{counts:?}");
        }
    }

    #[test]
    fn losing_a_backend_moves_only_its_keys() {
        let pool = pool(&[1, 1, 1, 1]);
        let keys: Vec<u64> = (0..4000u64).map(|i| hash_bytes(&i.to_le_bytes())).collect();
        let before: Vec<u64> = keys.iter().map(|k| owner(&pool, *k, &any)).collect();
        let after: Vec<u64> = keys
            .iter()
            .map(|k| owner(&pool, *k, &|b| b.id != 3))
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(b, a, "a key whose backend stayed did not move");
            } else {
                assert_ne!(*a, 3);
            }
        }
    }

    #[test]
    fn weights_shift_the_share() {
        let pool = pool(&[3, 1]);
        let counts = spread(&Rendezvous, &pool, 8000, &any);
        assert!((5600..6400).contains(&counts[0]), "{counts:?}");
    }
}
