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
    // `election_timeout_max` and then a random timeout between min and max
    // before it stands: 3-4 T after the last heartbeat. Tried: min = T/2,
    // max = 3T/4 (1.25-1.5 T); failover then took 0.8-1.1 s when it went
    // well, but 5-7 s or more in 4 of 10 leader kills under the chaos load
    // on 2 cores (elections that kept failing), against a steady 1.8-4.2 s
    // with these values.
    let election = election_timeout.as_millis() as u64;
    openraft::Config {
        cluster_name: "scaleout".into(),
        // openraft 0.9 gives every AppendEntries (a heartbeat or a payload
        // of entries) the heartbeat interval to complete, and sends the
        // same payload again when it does not: a payload that cannot cross
        // in time is never replicated. Two fifths of the election timeout
        // leaves a follower two heartbeats before it may stand, and a
        // payload 200 ms (by default) to be sent, parsed and fsynced.
        heartbeat_interval: (election * 2 / 5).max(20),
        election_timeout_min: election,
        election_timeout_max: election * 2,
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
