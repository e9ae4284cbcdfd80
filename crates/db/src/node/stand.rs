//! Standing for election as soon as the leader's lease runs out, by the
//! follower best placed to win.
//!
//! openraft 0.9 lets a follower stand only once the lease of the last
//! heartbeat (`election_timeout_max`) and then its own election timeout
//! (drawn once per process, between min and max) have passed: 1.5-2
//! timeouts of silence. Worse, when the first to stand has the shorter
//! log it is refused, its term collides with the other's attempt, and
//! the election takes two more rounds: about 2 s at the default timeout.
//!
//! Each voter follower here watches the silence itself. When it has
//! lasted the lease (plus half a heartbeat, so the others' leases have
//! run out too), it asks the other voters where their logs end
//! (`/raft/log`): the one with the longest log (the lowest id among
//! equals) of those that answer stands at once; the others wait for it,
//! openraft's own timers staying the fallback. A leader that answers is
//! alive and its log is the longest, so a slow leader is left alone.
//! Nothing here touches Raft's safety: it only decides when to call the
//! same election openraft would call later.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::header;
use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use super::DbNode;
use crate::raft::network::LogEnd;
use crate::raft::Member;

impl DbNode {
    /// Watches the leader's silence until `shutdown`.
    pub(super) async fn stand_when_silent(&self, shutdown: CancellationToken) {
        let config = self.raft.config().clone();
        let lease = Duration::from_millis(config.election_timeout_max);
        let heartbeat = Duration::from_millis(config.heartbeat_interval);
        let tick = (heartbeat / 4).max(Duration::from_millis(5));
        // The silence this node last stood in (the age of the last contact
        // is measured from it): stand at most once per silence.
        let mut stood_after: Option<Duration> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let Some(age) = self.contact.age() else {
                continue;
            };
            let silence_began = self.started.elapsed().saturating_sub(age);
            if age <= lease + heartbeat / 2
                || stood_after.is_some_and(|at| at.abs_diff(silence_began) < tick)
            {
                continue;
            }
            let Some(others) = self.silent_voter_follower() else {
                continue;
            };
            let mine = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            let ends = futures_util::future::join_all(
                others
                    .iter()
                    .map(|(id, m)| self.log_end_of(*id, m, heartbeat)),
            )
            .await;
            // Heard from a leader while asking: no silence after all.
            if !first_to_stand(self.id, mine, ends.iter().flatten())
                || self.contact.age().is_none_or(|a| a < age)
            {
                continue;
            }
            stood_after = Some(silence_began);
            self.stats.stood_early.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                silent_ms = age.as_millis() as u64,
                last_log_index = mine,
                "the leader is silent past its lease; standing for election"
            );
            if let Err(e) = self.raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not stand for election");
            }
        }
    }

    /// The other voters, if this node is a voter following a leader.
    fn silent_voter_follower(&self) -> Option<Vec<(u64, Member)>> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Follower {
            return None;
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if !voters.contains(&self.id) {
            return None;
        }
        Some(
            voters
                .into_iter()
                .filter(|id| *id != self.id)
                .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
                .collect(),
        )
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

/// Whether this node (`me`, its log ending at `mine`) goes first among
/// the voters that answered (`(id, log end)`): the longest log, the
/// lowest id among equals.
fn first_to_stand<'a>(
    me: u64,
    mine: u64,
    others: impl IntoIterator<Item = &'a (u64, u64)>,
) -> bool {
    others
        .into_iter()
        .all(|&(id, end)| end < mine || (end == mine && me < id))
}

#[cfg(test)]
mod tests {
    use super::first_to_stand;

    #[test]
    fn the_longest_log_goes_first_and_the_lowest_id_among_equals() {
        assert!(first_to_stand(2, 10, &[(1, 9), (3, 10)]));
        assert!(!first_to_stand(2, 10, &[(1, 10), (3, 9)]));
        assert!(!first_to_stand(2, 10, &[(3, 11)]));
        assert!(first_to_stand(7, 0, &[]), "alone among those that answered");
        // An answering leader has the longest log: no one stands.
        assert!(!first_to_stand(1, 10, &[(3, 12), (2, 10)]));
    }
}
