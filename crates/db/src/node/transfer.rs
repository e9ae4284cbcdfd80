//! Leadership transfer (rqlite's `POST /leader`, `{"id": N}`): the leader
//! hands its role to a voter that has its whole log.
//!
//! openraft 0.9 has no transfer (no TimeoutNow message), and a follower
//! refuses to vote while its leader's lease (`election_timeout_max` since
//! the last heartbeat) runs. So the leader does it in the open:
//!
//! 1. holds every write back (the proposer's slots), so the log stands
//!    still;
//! 2. waits until the target has matched the whole log;
//! 3. stops its heartbeats and waits out their lease;
//! 4. asks the target to stand (`/raft/elect`, in this term: a request
//!    that reaches it late, after a pause, is refused). The target's log
//!    is as long as anyone's, and no one else stands while the leader
//!    answers them (`node/stand.rs`), so it wins.
//!
//! Writes are held for about one election timeout; those held are then
//! refused by the old leader and forwarded to the new one. Heartbeats
//! come back on whatever happens, and a transfer that did not land
//! leaves ordinary Raft to settle the leadership.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use openraft::ServerState;

use super::DbNode;
use crate::raft::network;

/// Why a transfer was refused or did not land.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub why: String,
}

fn refused(status: StatusCode, why: impl Into<String>) -> Refused {
    Refused {
        status,
        why: why.into(),
    }
}

/// A transfer the leader has checked and may start.
pub struct Transfer {
    target: u64,
}

impl Transfer {
    pub fn target(&self) -> u64 {
        self.target
    }
}

/// Turns the leader's heartbeats back on when dropped.
struct Heartbeats<'a>(&'a DbNode);

impl Drop for Heartbeats<'_> {
    fn drop(&mut self) {
        self.0.raft.runtime_config().heartbeat(true);
    }
}

impl DbNode {
    /// Checks a transfer to `to` (any up-to-date voter when `None`) on the
    /// leader.
    pub(super) fn plan_transfer(&self, to: Option<u64>) -> Result<Transfer, Refused> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node is no longer the leader; retry",
            ));
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let name = |id: u64| {
            membership
                .get_node(&id)
                .map_or_else(|| id.to_string(), |n| n.name_of(id))
        };
        let target = match to {
            Some(id) if id == self.id => {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "cannot step down to the current leader",
                ))
            }
            Some(id) if membership.get_node(&id).is_none() => {
                return Err(refused(
                    StatusCode::NOT_FOUND,
                    "that node is not in the cluster",
                ))
            }
            Some(id) if !voters.contains(&id) => {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    format!("node {} is a read replica: only a voter can lead", name(id)),
                ))
            }
            Some(id) => id,
            None => {
                // The voter furthest along, so the wait for it is short.
                let matched = m.replication.clone().unwrap_or_default();
                voters
                    .iter()
                    .copied()
                    .filter(|id| *id != self.id)
                    .max_by_key(|id| matched.get(id).copied().flatten().map(|l| l.index))
                    .ok_or_else(|| {
                        refused(
                            StatusCode::BAD_REQUEST,
                            "this node is the only voter: there is no one to hand over to",
                        )
                    })?
            }
        };
        Ok(Transfer { target })
    }

    /// Carries out `transfer`; resolves once the target leads.
    pub(super) async fn transfer(&self, transfer: Transfer) -> Result<(), Refused> {
        let _one_at_a_time = self.membership_change.lock().await;
        let target = transfer.target;
        let Some(member) = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&target)
            .cloned()
        else {
            return Err(refused(StatusCode::NOT_FOUND, "that node left the cluster"));
        };
        let config = self.raft.config().clone();
        let election = Duration::from_millis(config.election_timeout_max);
        let heartbeat = Duration::from_millis(config.heartbeat_interval);
        let started = Instant::now();

        let Some(_writes_held) = self.proposer.hold().await else {
            return Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "the node is shutting down",
            ));
        };
        self.caught_up(target, 4 * election).await?;

        self.raft.runtime_config().heartbeat(false);
        let _heartbeats = Heartbeats(self);
        // The last heartbeat went out at most one interval ago; its lease
        // runs `election` from when the follower took it.
        tokio::time::sleep(election + heartbeat).await;
        let term = self.raft.metrics().borrow().current_term;
        if let Err(e) = network::ask_to_stand(
            &self.client,
            self.cluster_secret.as_ref(),
            &member,
            term,
            election,
        )
        .await
        {
            return Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the target could not be asked to stand: {e}"),
            ));
        }
        let leader = self.next_leader(4 * election).await;
        match leader {
            Some(id) if id == target => {
                tracing::info!(
                    to = %member.name_of(target),
                    ms = started.elapsed().as_millis() as u64,
                    "leadership handed over"
                );
                Ok(())
            }
            Some(other) => Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("node {other} was elected instead; retry"),
            )),
            None => Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "no new leader was elected in time; this node stays the leader",
            )),
        }
    }

    /// Waits until `target` has matched the leader's whole log.
    async fn caught_up(&self, target: u64, within: Duration) -> Result<(), Refused> {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return Err(refused(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this node lost the leadership; retry",
                    ));
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target).copied().flatten())
                    .map(|l| l.index);
                if matched.is_some() && matched >= m.last_log_index {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .map_or(true, |changed| changed.is_err())
            {
                return Err(refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the target has not caught up with the log in time",
                ));
            }
        }
    }

    /// Waits for a leader other than this node; `None` if none in time.
    async fn next_leader(&self, within: Duration) -> Option<u64> {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let m = metrics.borrow_and_update();
                if let Some(id) = m.current_leader.filter(|id| *id != self.id) {
                    return Some(id);
                }
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .map_or(true, |changed| changed.is_err())
            {
                return None;
            }
        }
    }
}
