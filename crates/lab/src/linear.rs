//! A linearizability checker for a register: the Wing–Gong search with
//! Lowe's memoization (the algorithm behind Knossos and Porcupine).
//!
//! A history is linearizable when every acknowledged operation can be put
//! at one instant between its invocation and its completion so that, in
//! that order, each does what a single register would: a read returns the
//! last value written, a compare-and-set applies exactly when the register
//! held its expected value. An operation whose outcome is unknown (the
//! connection broke) may have taken effect at any instant after its
//! invocation, or never. Keys are independent registers, so each key's
//! operations are checked on their own.

use std::collections::HashSet;

/// What an operation did to one register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "f", rename_all = "lowercase")]
pub enum RegisterOp {
    Write {
        value: i64,
    },
    /// `None`: the register had no value yet.
    Read {
        value: Option<i64>,
    },
    /// Compare-and-set; `applied` says whether it did (known outcomes).
    Cas {
        from: i64,
        to: i64,
        applied: bool,
    },
}

/// One operation on one register, with its times in microseconds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub client: usize,
    pub op: RegisterOp,
    pub invoke_us: u64,
    /// `None`: the outcome is unknown (it may take effect at any time
    /// after `invoke_us`, or never).
    pub complete_us: Option<u64>,
}

/// What the search concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order works. `stuck` is the operation the deepest attempt could
    /// not place, `state` the register's value there, and `window` the
    /// stretch of history that shows it: the operations (indexes into the
    /// input) that overlap the time from the write that set `state` (or
    /// the first operation still open there) to the end of the shortest
    /// prefix of the history that is already not linearizable.
    Violation {
        stuck: usize,
        state: Option<i64>,
        window: Vec<usize>,
    },
    /// The search gave up after this many steps.
    Undecided {
        steps: u64,
    },
}

/// Applies `op` to `state`: the new state, or `None` when the op cannot
/// happen in this state. Unknown outcomes are handled by the caller.
fn step(state: Option<i64>, op: &RegisterOp, known: bool) -> Option<Option<i64>> {
    match *op {
        RegisterOp::Write { value } => Some(Some(value)),
        RegisterOp::Read { value } => (state == value).then_some(state),
        // An unknown CAS that did not apply is the same as one that never
        // happened, which the search allows anyway: place only the applied
        // case.
        RegisterOp::Cas { from, to, applied } if applied || !known => {
            (state == Some(from)).then_some(Some(to))
        }
        RegisterOp::Cas { from, .. } => (state != Some(from)).then_some(state),
    }
}

const NIL: usize = usize::MAX;

/// The search's entry list: a call and a return per operation, in time
/// order, doubly linked so that placed operations can be lifted out and
/// put back.
struct Entries {
    /// The operation an entry belongs to, and whether it is its call.
    op: Vec<(usize, bool)>,
    /// For a call, its return's position.
    ret_of: Vec<usize>,
    /// A return at the end of time (unknown outcome).
    open: Vec<bool>,
    prev: Vec<usize>,
    next: Vec<usize>,
    head: usize,
}

impl Entries {
    fn new(events: &[Event]) -> Self {
        // (time, returns after calls at the same instant, op, is_call)
        let mut order: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(events.len() * 2);
        for (i, e) in events.iter().enumerate() {
            order.push((e.invoke_us, 0, i, true));
            order.push((e.complete_us.unwrap_or(u64::MAX), 1, i, false));
        }
        order.sort_unstable();
        let n = order.len();
        let mut ret_pos = vec![0; events.len()];
        for (pos, (_, _, i, call)) in order.iter().enumerate() {
            if !call {
                ret_pos[*i] = pos;
            }
        }
        Entries {
            op: order.iter().map(|(_, _, i, c)| (*i, *c)).collect(),
            ret_of: order
                .iter()
                .map(|(_, _, i, c)| if *c { ret_pos[*i] } else { NIL })
                .collect(),
            open: order.iter().map(|(t, ..)| *t == u64::MAX).collect(),
            prev: (0..n).map(|p| if p == 0 { NIL } else { p - 1 }).collect(),
            next: (0..n)
                .map(|p| if p + 1 == n { NIL } else { p + 1 })
                .collect(),
            head: if n == 0 { NIL } else { 0 },
        }
    }

    fn unlink(&mut self, p: usize) {
        let (a, b) = (self.prev[p], self.next[p]);
        if a == NIL {
            self.head = b;
        } else {
            self.next[a] = b;
        }
        if b != NIL {
            self.prev[b] = a;
        }
    }

    fn relink(&mut self, p: usize) {
        let (a, b) = (self.prev[p], self.next[p]);
        if a == NIL {
            self.head = p;
        } else {
            self.next[a] = p;
        }
        if b != NIL {
            self.prev[b] = p;
        }
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.ret_of[call]);
    }

    /// Puts them back (the reverse order of `lift`).
    fn unlift(&mut self, call: usize) {
        self.relink(self.ret_of[call]);
        self.relink(call);
    }
}

/// How a search ended.
enum Search {
    Ok,
    Stuck {
        stuck: usize,
        state: Option<i64>,
        /// Operations still open (called, not placed) at the stuck point,
        /// and the placed one that last set the register's value there.
        open: Vec<usize>,
    },
    GaveUp(u64),
}

/// A well-mixed 128-bit key for operation `i` (splitmix64, twice).
fn zobrist(i: u64) -> u128 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (u128::from(mix(2 * i)) << 64) | u128::from(mix(2 * i + 1))
}

fn search(events: &[Event], initial: Option<i64>, max_steps: u64) -> Search {
    let mut entries = Entries::new(events);
    // The set of placed operations, as a Zobrist hash: each operation has
    // a random 128-bit key and the set is the XOR of its members' keys, so
    // placing or lifting one is O(1) and a memo entry is 24 bytes however
    // long the history (a collision needs ~2^64 entries).
    let keys: Vec<u128> = (0..events.len() as u64).map(zobrist).collect();
    let mut placed: u128 = 0;
    let mut seen: HashSet<(u128, Option<i64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<i64>)> = Vec::new();
    let mut state = initial;
    let mut deepest: Option<(usize, usize, Option<i64>, Vec<usize>)> = None;
    let mut entry = entries.head;
    let mut steps = 0u64;
    while entry != NIL {
        steps += 1;
        if steps > max_steps {
            return Search::GaveUp(steps);
        }
        let (i, is_call) = entries.op[entry];
        if entries.open[entry] && !is_call {
            // Every acknowledged operation is placed; what is left are
            // operations that may never have happened.
            return Search::Ok;
        }
        if is_call {
            let known = events[i].complete_us.is_some();
            if let Some(next_state) = step(state, &events[i].op, known) {
                placed ^= keys[i];
                if seen.insert((placed, next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    entries.lift(entry);
                    entry = entries.head;
                    continue;
                }
                placed ^= keys[i];
            }
            entry = entries.next[entry];
            continue;
        }
        // The return of an operation not placed yet: back up.
        if deepest.as_ref().is_none_or(|d| stack.len() > d.0) {
            let mut open = Vec::new();
            let mut p = entries.head;
            while p != NIL && p != entry {
                if entries.op[p].1 {
                    open.push(entries.op[p].0);
                }
                p = entries.next[p];
            }
            let setter = stack
                .iter()
                .rev()
                .map(|(call, _)| entries.op[*call].0)
                .find(|&j| {
                    !matches!(
                        events[j].op,
                        RegisterOp::Read { .. } | RegisterOp::Cas { applied: false, .. }
                    ) || events[j].complete_us.is_none()
                });
            open.extend(setter);
            deepest = Some((stack.len(), i, state, open));
        }
        let Some((call, before)) = stack.pop() else {
            let (_, stuck, state, open) = deepest.unwrap_or((0, i, state, Vec::new()));
            return Search::Stuck { stuck, state, open };
        };
        let j = entries.op[call].0;
        placed ^= keys[j];
        state = before;
        entries.unlift(call);
        entry = entries.next[call];
    }
    Search::Ok
}

/// Checks one register's history; `initial` is its value before the first
/// operation.
pub fn check(events: &[Event], initial: Option<i64>, max_steps: u64) -> Verdict {
    let (stuck, state, open) = match search(events, initial, max_steps) {
        Search::Ok => return Verdict::Linearizable,
        Search::GaveUp(steps) => return Verdict::Undecided { steps },
        Search::Stuck { stuck, state, open } => (stuck, state, open),
    };
    // The shortest failing prefix: cut the history at a time T (operations
    // invoked later dropped, those completing later made unknown) and
    // bisect T. A prefix of a linearizable history is linearizable, so
    // the first failing cut is where the violation is complete.
    let mut times: Vec<u64> = events.iter().filter_map(|e| e.complete_us).collect();
    times.sort_unstable();
    times.dedup();
    let fails = |cut: u64| {
        let prefix: Vec<Event> = events
            .iter()
            .filter(|e| e.invoke_us <= cut)
            .map(|e| Event {
                complete_us: e.complete_us.filter(|c| *c <= cut),
                ..e.clone()
            })
            .collect();
        matches!(search(&prefix, initial, max_steps), Search::Stuck { .. })
    };
    let (mut lo, mut hi) = (0, times.len().saturating_sub(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails(times[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let end = times.get(lo).copied().unwrap_or(u64::MAX);
    let start = open
        .iter()
        .chain(std::iter::once(&stuck))
        .map(|&i| events[i].invoke_us)
        .min()
        .unwrap_or(0)
        .min(end);
    let window = (0..events.len())
        .filter(|&i| {
            let e = &events[i];
            e.invoke_us <= end && e.complete_us.is_none_or(|c| c >= start)
        })
        .collect();
    Verdict::Violation {
        stuck,
        state,
        window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: usize, op: RegisterOp, invoke: u64, complete: Option<u64>) -> Event {
        Event {
            client,
            op,
            invoke_us: invoke,
            complete_us: complete,
        }
    }
    fn w(v: i64) -> RegisterOp {
        RegisterOp::Write { value: v }
    }
    fn r(v: Option<i64>) -> RegisterOp {
        RegisterOp::Read { value: v }
    }
    fn cas(from: i64, to: i64, applied: bool) -> RegisterOp {
        RegisterOp::Cas { from, to, applied }
    }

    #[test]
    fn sequential_and_concurrent_histories_that_are_linearizable() {
        // Sequential.
        let h = vec![
            ev(0, r(None), 0, Some(1)),
            ev(0, w(1), 2, Some(3)),
            ev(1, r(Some(1)), 4, Some(5)),
            ev(1, cas(1, 2, true), 6, Some(7)),
            ev(0, cas(1, 3, false), 8, Some(9)),
            ev(0, r(Some(2)), 10, Some(11)),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
        // Concurrent: the read may see the write or not, either order.
        for seen in [None, Some(7)] {
            let h = vec![ev(0, w(7), 0, Some(10)), ev(1, r(seen), 1, Some(9))];
            assert_eq!(check(&h, None, 100_000), Verdict::Linearizable, "{seen:?}");
        }
        // Two concurrent writes, then reads agreeing on the later one.
        let h = vec![
            ev(0, w(1), 0, Some(10)),
            ev(1, w(2), 0, Some(10)),
            ev(2, r(Some(1)), 11, Some(12)),
            ev(3, r(Some(1)), 13, Some(14)),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn unknown_outcomes_may_take_effect_late_or_never() {
        // An unknown write seen long after it was sent.
        let h = vec![
            ev(0, w(1), 0, Some(1)),
            ev(1, w(2), 2, None),
            ev(0, r(Some(1)), 10, Some(11)),
            ev(0, r(Some(2)), 20, Some(21)),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
        // ...or never seen at all.
        let h = vec![ev(1, w(2), 0, None), ev(0, r(None), 10, Some(11))];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
        // An unknown CAS that applied.
        let h = vec![
            ev(0, w(1), 0, Some(1)),
            ev(1, cas(1, 5, false), 2, None),
            ev(0, r(Some(5)), 10, Some(11)),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn stale_reads_and_lost_writes_are_violations() {
        // A stale read: after 2 is acknowledged, a later read sees 1.
        let h = vec![
            ev(0, w(1), 0, Some(1)),
            ev(0, w(2), 2, Some(3)),
            ev(1, r(Some(2)), 4, Some(5)),
            ev(2, r(Some(1)), 6, Some(7)),
            ev(1, w(9), 100, Some(101)),
        ];
        match check(&h, None, 100_000) {
            Verdict::Violation {
                stuck,
                window,
                state,
            } => {
                assert_eq!(stuck, 3, "the stale read is the one that cannot be placed");
                assert_eq!(state, Some(2));
                assert!(window.contains(&3), "{window:?}");
                assert!(
                    window.contains(&1),
                    "the write of what it should have seen: {window:?}"
                );
                assert!(
                    !window.contains(&4),
                    "the window ends at the violation: {window:?}"
                );
            }
            v => panic!("{v:?}"),
        }
        // A value nobody wrote.
        let h = vec![ev(0, w(1), 0, Some(1)), ev(1, r(Some(3)), 2, Some(3))];
        assert!(matches!(
            check(&h, None, 100_000),
            Verdict::Violation { .. }
        ));
        // A CAS that says it applied when the register held another value.
        let h = vec![ev(0, w(1), 0, Some(1)), ev(1, cas(2, 3, true), 2, Some(3))];
        assert!(matches!(
            check(&h, None, 100_000),
            Verdict::Violation { .. }
        ));
        // A CAS that says it did not apply when it should have.
        let h = vec![ev(0, w(1), 0, Some(1)), ev(1, cas(1, 3, false), 2, Some(3))];
        assert!(matches!(
            check(&h, None, 100_000),
            Verdict::Violation { .. }
        ));
        // Two reads that disagree on the order of two writes.
        let h = vec![
            ev(0, w(1), 0, Some(10)),
            ev(1, w(2), 0, Some(10)),
            ev(2, r(Some(1)), 11, Some(12)),
            ev(3, r(Some(2)), 13, Some(14)),
        ];
        assert!(matches!(
            check(&h, None, 100_000),
            Verdict::Violation { .. }
        ));
    }

    #[test]
    fn a_long_concurrent_history_is_checked_quickly() {
        // Four clients, 2,000 operations, overlapping in pairs: written as
        // it would happen on a real register, so it must pass.
        let mut h = Vec::new();
        let mut value = None;
        let mut t = 0;
        for n in 0..500i64 {
            let v = n + 1;
            h.push(ev(0, w(v), t, Some(t + 10)));
            h.push(ev(1, r(value), t + 1, Some(t + 2)));
            value = Some(v);
            h.push(ev(2, r(value), t + 11, Some(t + 12)));
            h.push(ev(3, cas(v, v, true), t + 13, Some(t + 14)));
            t += 20;
        }
        assert_eq!(check(&h, None, 1_000_000), Verdict::Linearizable);
    }
}
