//! Calling elections: when, and which node goes first.
//!
//! openraft 0.9 lets a follower stand only once the lease of the last
//! heartbeat (`election_timeout_max`) and then its own election timeout
//! (drawn once per process, between min and max) have passed: 1.5-2
//! timeouts of silence. Worse, when the first to stand has the shorter
//! log it is refused, its term collides with the other's attempt, and
//! the election takes two more rounds: about 2 s at the default timeout.
//! And it has no pre-vote: a voter that was paused for a second stands
//! the moment it runs again and deposes a healthy leader.
//!
//! So openraft's own election timer is off, and each voter decides here.
//! When it has heard nothing from a leader for the lease plus half a
//! heartbeat (so the other voters' leases have run out too), it asks the
//! other voters where their logs end (`/raft/log`):
//!
//! - if the leader it knew answers, the leader is alive: no election (a
//!   pre-vote of sorts; its heartbeats are late, not gone);
//! - else the one with the longest log (the lowest id among equals) of
//!   those that answer stands at once; the others give it another lease
//!   before they stand too;
//! - a node that stood and is not leading after a randomized half to one
//!   election timeout stands again (openraft no longer retries);
//! - after four leases of silence anyone stands, even if the leader
//!   answers: alive but not leading (a hung disk, RPCs to this node
//!   failing) is no reason to wait longer;
//! - a node whose own loop ran far too late (it was paused or starved)
//!   first gives the leader a chance to be heard: the silence was its own.
//!
//! Nothing here touches Raft's safety: it only decides when to call the
//! elections openraft runs.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::header;
use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use super::DbNode;
use crate::raft::network::LogEnd;
use crate::raft::Member;

/// Voters by id.
type Voters = Vec<(u64, Member)>;

impl DbNode {
    /// Calls this node's elections until `shutdown`.
    pub(super) async fn stand_when_silent(&self, shutdown: CancellationToken) {
        self.raft.runtime_config().elect(false);
        let config = self.raft.config().clone();
        let lease = Duration::from_millis(config.election_timeout_max);
        let retry = Duration::from_millis(config.election_timeout_min);
        let heartbeat = Duration::from_millis(config.heartbeat_interval);
        let tick = (heartbeat / 4).max(Duration::from_millis(5));
        let mut stood: Option<(Instant, Duration)> = None;
        // The silence also starts again when this node stops leading and
        // when the term moves (it voted for a candidate, or heard of a new
        // leader): a candidate gets its chance to win, a new leader its
        // chance to be heard.
        let mut quiet_since = Instant::now();
        let mut term = self.raft.metrics().borrow().current_term;
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            // A tick that came far too late: this process was paused or
            // starved, and what looks like the leader's silence is its
            // own. The leader gets its chance to be heard first.
            if last_tick.elapsed() > lease / 2 {
                quiet_since = Instant::now();
            }
            last_tick = Instant::now();
            let now_term = self.raft.metrics().borrow().current_term;
            if now_term != term {
                (term, quiet_since) = (now_term, Instant::now());
            }
            let Some((others, leader)) = self.voter_not_leading() else {
                quiet_since = Instant::now();
                continue;
            };
            if stood.is_some_and(|(at, wait)| at.elapsed() < wait) {
                continue;
            }
            let silence = self
                .contact
                .age()
                .unwrap_or_else(|| self.started.elapsed())
                .min(quiet_since.elapsed());
            if !others.is_empty() && silence <= lease + heartbeat / 2 {
                continue;
            }
            let mine = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            let ends: Vec<(u64, u64)> = futures_util::future::join_all(
                others
                    .iter()
                    .map(|(id, m)| self.log_end_of(*id, m, heartbeat)),
            )
            .await
            .into_iter()
            .flatten()
            .collect();
            // Heard from a leader, or of a new term, while asking: no
            // silence after all.
            if self
                .contact
                .age()
                .is_some_and(|a| a < silence.saturating_sub(tick))
                || self.raft.metrics().borrow().current_term != term
            {
                continue;
            }
            let turn = if silence > 4 * lease {
                // A leader that answers but has sent nothing for this long
                // is alive and not leading (its disk hangs, or only its
                // RPCs to this node fail): no longer a reason to wait.
                Turn::Anyone
            } else if silence > 2 * lease + heartbeat {
                Turn::UnlessLeaderAnswers
            } else {
                Turn::LongestLog
            };
            if !should_stand(self.id, mine, leader, &ends, turn) {
                continue;
            }
            self.stats.stood.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                silent_ms = silence.as_millis() as u64,
                last_log_index = mine,
                "no leader answers; standing for election"
            );
            if let Err(e) = self.raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not stand for election");
            }
            stood = Some((Instant::now(), retry + jitter(self.id, retry)));
        }
    }

    /// The other voters and the leader this node knows, if it is a
    /// voter that does not lead.
    fn voter_not_leading(&self) -> Option<(Voters, Option<u64>)> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return None;
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if !voters.contains(&self.id) {
            return None;
        }
        let others = voters
            .into_iter()
            .filter(|id| *id != self.id)
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
            .collect();
        Some((others, m.current_leader.filter(|l| *l != self.id)))
    }

    /// Where `member`'s log ends, if it answers within `within`.
    async fn log_end_of(&self, id: u64, member: &Member, within: Duration) -> Option<(u64, u64)> {
        let mut request = self
            .client
            .get(format!(
                "{}://{}/raft/log",
                crate::peers::scheme(),
                member.raft
            ))
            .timeout(within);
        if let Some(secret) = &self.cluster_secret {
            request = request.header(header::AUTHORIZATION, secret.header());
        }
        let answer: LogEnd = request.send().await.ok()?.json().await.ok()?;
        Some((id, answer.last_log_index))
    }
}

/// Who may stand, as the silence grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The voter with the longest log (the lowest id among equals) of
    /// those that answer, unless the leader answers.
    LongestLog,
    /// Any voter, unless the leader answers.
    UnlessLeaderAnswers,
    /// Any voter.
    Anyone,
}

/// Whether this node (`me`, its log ending at `mine`, following
/// `leader` if it knows one) stands, given the voters that answered
/// (`(id, log end)`) and whose turn it is.
fn should_stand(
    me: u64,
    mine: u64,
    leader: Option<u64>,
    answered: &[(u64, u64)],
    turn: Turn,
) -> bool {
    let leader_answers = leader.is_some_and(|l| answered.iter().any(|(id, _)| *id == l));
    match turn {
        Turn::Anyone => true,
        Turn::UnlessLeaderAnswers => !leader_answers,
        Turn::LongestLog => {
            !leader_answers
                && answered
                    .iter()
                    .all(|&(id, end)| end < mine || (end == mine && me < id))
        }
    }
}

/// A share of `span` that differs between nodes and between calls, so
/// that two nodes that stood together do not stand together again.
fn jitter(id: u64, span: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mixed =
        (nanos ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    span.mul_f64((mixed >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::{jitter, should_stand, Turn};
    use std::time::Duration;

    #[test]
    fn the_longest_log_stands_first_and_the_lowest_id_among_equals() {
        let first = Turn::LongestLog;
        assert!(should_stand(2, 10, None, &[(1, 9), (3, 10)], first));
        assert!(!should_stand(2, 10, None, &[(1, 10), (3, 9)], first));
        assert!(!should_stand(2, 10, None, &[(3, 11)], first));
        assert!(
            should_stand(7, 0, None, &[], first),
            "alone among those that answered"
        );
        // Once the better placed have had their turn, anyone stands.
        assert!(should_stand(
            2,
            10,
            None,
            &[(3, 11)],
            Turn::UnlessLeaderAnswers
        ));
    }

    #[test]
    fn no_one_stands_while_the_leader_answers_until_it_has_been_silent_too_long() {
        // Its log as long as ours and its id lower, or shorter: it is alive.
        assert!(!should_stand(
            2,
            10,
            Some(1),
            &[(1, 10), (3, 9)],
            Turn::LongestLog
        ));
        assert!(!should_stand(1, 10, Some(3), &[(3, 10)], Turn::LongestLog));
        assert!(!should_stand(
            1,
            10,
            Some(3),
            &[(3, 10)],
            Turn::UnlessLeaderAnswers
        ));
        // It does not answer: the others decide.
        assert!(should_stand(1, 10, Some(3), &[(2, 10)], Turn::LongestLog));
        // It answers but has sent nothing for far too long.
        assert!(should_stand(1, 10, Some(3), &[(3, 10)], Turn::Anyone));
    }

    #[test]
    fn jitter_stays_within_its_span() {
        let span = Duration::from_millis(250);
        for id in 1..50 {
            assert!(jitter(id, span) <= span);
        }
    }
}
