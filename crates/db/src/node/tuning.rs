//! How the node tunes openraft: timings derived from the election
//! timeout, snapshots and payload sizes. Every number here was measured
//! against failover time under load on two cores (see the comments).

use std::time::Duration;

use openraft::SnapshotPolicy;

/// openraft's configuration for a node with this election timeout and
/// snapshot threshold.
#[expect(
    clippy::result_large_err,
    reason = "openraft's own error type, made once at start-up"
)]
pub fn raft_config(
    election_timeout: Duration,
    snapshot_threshold: u64,
) -> Result<openraft::Config, openraft::ConfigError> {
    // openraft 0.9 makes a follower that knew a leader wait out a lease of
    // `election_timeout_max` and then its own election timeout (drawn once
    // per process between min and max) before it stands. With min = T/2
    // and max = T that is 1.5-2 T after the last heartbeat: 750-1000 ms at
    // the default T = 500 ms. Measured with `scaleout chaos --faults
    // kill-leader` (debug build, 8 kills): creates back after 0.98-2.3 s,
    // median 1.1 s, against 1.8-3.7 s (median 2.7 s) with min = T and
    // max = 2 T (3-4 T). Tried before that: min = T/2, max = 3T/4, which
    // took 5-7 s in 4 of 10 kills (elections that kept failing: the two
    // followers' timeouts fell too close together). openraft's election
    // timer is now off (`node/stand.rs` calls the elections); these values
    // still set the lease a voter's vote holds (`election_timeout_max`).
    // The follower with the longest log stands at T plus half a heartbeat.
    let election = election_timeout.as_millis() as u64;
    openraft::Config {
        cluster_name: "scaleout".into(),
        // openraft 0.9 gives every AppendEntries (a heartbeat or a payload
        // of entries) the heartbeat interval to complete, and sends the
        // same payload again when it does not: a payload that cannot cross
        // in time is never replicated. A fifth of the election timeout leaves
        // a follower several heartbeats before it may stand, and a
        // payload 100 ms (by default) to be sent, parsed and fsynced (a
        // payload that takes longer goes on: `raft/network.rs`).
        heartbeat_interval: (election / 5).max(20),
        election_timeout_min: election / 2,
        election_timeout_max: election,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_threshold),
        max_in_snapshot_log_to_keep: (snapshot_threshold / 2).min(1000),
        snapshot_max_chunk_size: 1024 * 1024,
        // Small payloads, so that catching up goes in steps that each
        // cross well within the interval above.
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
}
