//! The read-consistency decisions, as pure functions of what a node
//! knows: which level a read gets, what must happen before it is served,
//! and whether a `min_index` is waited for or refused. [`super::DbNode`]
//! gathers the facts (Raft's metrics, the last contact with the leader)
//! and carries the decisions out.

use std::time::Duration;

use crate::http::Level;

/// What a node knows when a read arrives.
#[derive(Debug, Clone, Copy, Default)]
pub struct View {
    /// It leads and a quorum acknowledged it within the lease.
    pub is_leader: bool,
    /// How long since it last heard from its leader (`None`: never).
    pub contact_age: Option<Duration>,
    /// The last log index applied here.
    pub applied: Option<u64>,
    /// The last log index in its own log.
    pub last_log: Option<u64>,
}

/// The level a read is served at: `auto` is `none` on a read replica and
/// `weak` on a voter.
pub fn effective_level(asked: Level, read_only: bool) -> Level {
    match asked {
        Level::Auto if read_only => Level::None,
        Level::Auto => Level::Weak,
        level => level,
    }
}

/// What must happen before a read is served from local data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Serve it now.
    Serve,
    /// Refuse: another node leads (or none does).
    NotLeader,
    /// Refuse: this node's data is older than the read's `freshness`.
    Stale,
    /// Serve once a quorum has confirmed this node still leads.
    ConfirmLeadership,
    /// Serve once a no-op has gone through the log.
    Barrier,
}

/// The read's level decides: `none` serves any node's data, unless
/// `freshness` bounds how long ago a follower last heard its leader (and
/// `freshness_strict` wants all of its log applied too); `weak` serves
/// only on a leader; `linearizable` asks a quorum; `strong` goes through
/// the log.
pub fn before_read(
    level: Level,
    freshness: Option<Duration>,
    freshness_strict: bool,
    view: &View,
) -> Before {
    match level {
        Level::None => match freshness.filter(|_| !view.is_leader) {
            None => Before::Serve,
            Some(limit) => {
                // Out of touch with the leader for too long, or (strict)
                // behind its own log.
                if view.contact_age.is_none_or(|age| age > limit)
                    || (freshness_strict && view.applied < view.last_log)
                {
                    Before::Stale
                } else {
                    Before::Serve
                }
            }
        },
        Level::Weak | Level::Auto if view.is_leader => Before::Serve,
        Level::Weak | Level::Auto => Before::NotLeader,
        Level::Linearizable => Before::ConfirmLeadership,
        Level::Strong if view.is_leader => Before::Barrier,
        Level::Strong => Before::NotLeader,
    }
}

/// Whether a leader still holds its quorum: one acknowledged it within
/// the lease (a leader that never needed one, alone, holds it).
pub fn holds_quorum(millis_since_quorum_ack: Option<u64>, lease: Duration) -> bool {
    millis_since_quorum_ack.is_none_or(|ms| u128::from(ms) <= lease.as_millis())
}

/// What to do with a read's `min_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinIndex {
    /// Wait for it to be applied here (it is in the log, or nobody here
    /// can tell that it never will be).
    Wait,
    /// Refuse at once: the cluster's log ends before it.
    Refuse { committed: u64 },
    /// Ask the leader where its log ends, then decide.
    AskLeader,
}

/// What a node knows about a `min_index` beyond its own log.
#[derive(Debug, Clone, Copy)]
pub struct LogView {
    /// Where this node's own log ends.
    pub own_end: u64,
    /// It leads, and a quorum acknowledged it within the lease (a leader
    /// that just restarted may still call itself the leader of its old
    /// term; it is not confirmed).
    pub confirmed_leader: bool,
    /// It believes it leads.
    pub is_leader: bool,
    /// It heard from a leader within the lease, and that leader is
    /// another node.
    pub hears_another_leader: bool,
}

/// An index within this node's log is waited for. A confirmed leader
/// knows the whole log, so it refuses one beyond it; a follower that
/// hears its leader asks it; any other node cannot tell and waits (the
/// wait is bounded by the read timeout).
pub fn min_index(index: u64, view: &LogView) -> MinIndex {
    if index <= view.own_end {
        MinIndex::Wait
    } else if view.confirmed_leader {
        MinIndex::Refuse {
            committed: view.own_end,
        }
    } else if view.is_leader || !view.hears_another_leader {
        MinIndex::Wait
    } else {
        MinIndex::AskLeader
    }
}

/// The leader's answer decides: beyond the end it gave, refuse; within it,
/// wait; no answer, wait.
pub fn after_asking(index: u64, leader_end: Option<u64>) -> MinIndex {
    match leader_end {
        Some(end) if index > end => MinIndex::Refuse { committed: end },
        _ => MinIndex::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn leader() -> View {
        View {
            is_leader: true,
            contact_age: None,
            applied: Some(10),
            last_log: Some(10),
        }
    }

    fn follower(heard: Duration, applied: u64, last_log: u64) -> View {
        View {
            is_leader: false,
            contact_age: Some(heard),
            applied: Some(applied),
            last_log: Some(last_log),
        }
    }

    #[test]
    fn auto_is_none_on_a_replica_and_weak_on_a_voter() {
        assert_eq!(effective_level(Level::Auto, true), Level::None);
        assert_eq!(effective_level(Level::Auto, false), Level::Weak);
        assert_eq!(effective_level(Level::Strong, true), Level::Strong);
    }

    #[test]
    fn none_serves_anywhere_unless_freshness_says_the_node_is_behind() {
        let lost = View::default();
        assert_eq!(before_read(Level::None, None, false, &lost), Before::Serve);
        assert_eq!(
            before_read(Level::None, Some(S), false, &lost),
            Before::Stale,
            "a node that never heard a leader has no freshness"
        );
        let recent = follower(S / 2, 8, 10);
        assert_eq!(
            before_read(Level::None, Some(S), false, &recent),
            Before::Serve
        );
        assert_eq!(
            before_read(Level::None, Some(S), true, &recent),
            Before::Stale,
            "strict: entries in its log not yet applied"
        );
        assert_eq!(
            before_read(Level::None, Some(S), true, &follower(S / 2, 10, 10)),
            Before::Serve
        );
        assert_eq!(
            before_read(Level::None, Some(S), false, &follower(2 * S, 10, 10)),
            Before::Stale
        );
        assert_eq!(
            before_read(Level::None, Some(Duration::ZERO), true, &leader()),
            Before::Serve,
            "the leader is as fresh as it gets"
        );
    }

    #[test]
    fn weak_and_strong_need_the_leader_and_linearizable_asks_a_quorum() {
        let f = follower(Duration::ZERO, 10, 10);
        assert_eq!(
            before_read(Level::Weak, None, false, &leader()),
            Before::Serve
        );
        assert_eq!(before_read(Level::Weak, None, false, &f), Before::NotLeader);
        assert_eq!(
            before_read(Level::Strong, None, false, &leader()),
            Before::Barrier
        );
        assert_eq!(
            before_read(Level::Strong, None, false, &f),
            Before::NotLeader
        );
        assert_eq!(
            before_read(Level::Linearizable, None, false, &f),
            Before::ConfirmLeadership
        );
        assert_eq!(
            before_read(Level::Linearizable, None, false, &leader()),
            Before::ConfirmLeadership,
            "even a leader confirms: it may have been deposed"
        );
    }

    #[test]
    fn a_leader_holds_its_quorum_only_within_the_lease() {
        assert!(holds_quorum(None, S));
        assert!(holds_quorum(Some(1000), S));
        assert!(!holds_quorum(Some(1001), S));
    }

    #[test]
    fn min_index_is_refused_only_by_who_knows_the_log() {
        let view = |own_end, confirmed_leader, is_leader, hears_another_leader| LogView {
            own_end,
            confirmed_leader,
            is_leader,
            hears_another_leader,
        };
        assert_eq!(min_index(5, &view(5, false, false, false)), MinIndex::Wait);
        assert_eq!(
            min_index(6, &view(5, true, true, false)),
            MinIndex::Refuse { committed: 5 }
        );
        assert_eq!(
            min_index(6, &view(5, false, true, false)),
            MinIndex::Wait,
            "a leader without a fresh quorum cannot tell"
        );
        assert_eq!(
            min_index(6, &view(5, false, false, true)),
            MinIndex::AskLeader
        );
        assert_eq!(
            min_index(6, &view(5, false, false, false)),
            MinIndex::Wait,
            "cut off from the leader: wait (bounded), do not refuse"
        );
        assert_eq!(after_asking(6, Some(9)), MinIndex::Wait);
        assert_eq!(after_asking(10, Some(9)), MinIndex::Refuse { committed: 9 });
        assert_eq!(after_asking(10, None), MinIndex::Wait);
    }
}
