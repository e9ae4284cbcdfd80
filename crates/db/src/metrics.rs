//! A node's Prometheus metrics: request rates and latency by kind (write,
//! read, other), counted by a middleware around the API, and the Raft
//! figures (role, term, log, applied and snapshot indexes, replication
//! lag per follower on the leader) read from openraft's metrics when
//! scraped.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use openraft::{RaftMetrics, ServerState};
pub use scaleout_metrics::Histogram;
use scaleout_metrics::{Label, Labels, Writer};

use crate::raft::proposer::Counts;
use crate::raft::Member;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

struct Kind {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

impl Default for Kind {
    fn default() -> Self {
        Kind {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Histogram::new(&BUCKETS),
        }
    }
}

/// Where a write's time goes on this node, stage by stage.
#[derive(Default)]
pub struct Stages {
    /// Writing a batch of entries to the log file (not the fsync).
    pub log_write: Histogram,
    /// One fsync of the log (several batches may share it).
    pub log_fsync: Histogram,
    /// On the leader: an AppendEntries carrying entries, from sent to
    /// answered (the follower's write and fsync included).
    pub replicate: Histogram,
    /// Before applying: waiting for this node's own fsync of the entries.
    pub durable_wait: Histogram,
    /// Applying entries to SQLite.
    pub apply: Histogram,
    /// The applies (each of one or more entries) that finished on a
    /// blocking thread: an entry outran its time on the async thread or
    /// could not be tried there (the whole apply, timed from its start;
    /// each also counts in `apply`).
    pub apply_moved: Histogram,
    /// Copying SQLite's WAL back into the database file, beside the
    /// applies (`state.rs`, the checkpointer): not part of any one write.
    pub checkpoint: Histogram,
}

impl Stages {
    fn all(&self) -> [(&'static str, &Histogram); 7] {
        [
            ("log_write", &self.log_write),
            ("log_fsync", &self.log_fsync),
            ("replicate", &self.replicate),
            ("durable_wait", &self.durable_wait),
            ("apply", &self.apply),
            ("apply_moved", &self.apply_moved),
            ("checkpoint", &self.checkpoint),
        ]
    }
}

/// Observes the time since it was made when dropped.
pub struct Timed<'a>(pub &'a Histogram, pub Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.0.observe(self.1.elapsed());
    }
}

#[derive(Default)]
pub struct Stats {
    write: Kind,
    read: Kind,
    other: Kind,
    /// Per-stage timings of writes.
    pub stages: std::sync::Arc<Stages>,
    /// Elections this node called (`node/stand.rs`).
    pub stood: AtomicU64,
}

impl Stats {
    /// The middleware: times each request and counts it by kind.
    pub async fn observe(&self, req: Request, next: Next) -> Response {
        let path = req.uri().path();
        let kind = match path {
            "/db/execute" | "/db/load" => &self.write,
            "/db/query" => &self.read,
            "/db/request" => &self.write,
            _ => &self.other,
        };
        let started = Instant::now();
        let response = next.run(req).await;
        kind.requests.fetch_add(1, Ordering::Relaxed);
        if !response.status().is_success() {
            kind.errors.fetch_add(1, Ordering::Relaxed);
        }
        kind.latency.observe(started.elapsed());
        response
    }

    /// The API's counts as JSON, for `/debug/vars` (rqlite's expvar).
    pub fn vars(&self) -> serde_json::Value {
        let kind = |k: &Kind| {
            serde_json::json!({
                "requests": k.requests.load(Ordering::Relaxed),
                "errors": k.errors.load(Ordering::Relaxed),
            })
        };
        serde_json::json!({
            "write": kind(&self.write),
            "read": kind(&self.read),
            "other": kind(&self.other),
        })
    }

    /// The node's figures: its API's, as counted, and Raft's, as
    /// openraft last reported them.
    pub fn write(
        &self,
        w: &mut Writer<'_>,
        m: &RaftMetrics<u64, Member>,
        proposed: &Counts,
    ) -> fmt::Result {
        w.counter(
            "scaleout_db_proposed_entries_total",
            "Log entries this node proposed as leader (one per group commit).",
            proposed.entries.load(Ordering::Relaxed),
        )?;
        w.counter(
            "scaleout_db_proposed_writes_total",
            "Client writes those entries carried.",
            proposed.writes.load(Ordering::Relaxed),
        )?;
        w.counter(
            "scaleout_db_elections_called_total",
            "Elections this node called: no leader answered for the lease, and its log was the longest of the voters that answered (or they had their turn).",
            self.stood.load(Ordering::Relaxed),
        )?;
        let by_kind = |get: fn(&Kind) -> &AtomicU64| {
            self.kinds().map(|(name, kind)| {
                (
                    Labels([Label("kind", name)]),
                    get(kind).load(Ordering::Relaxed),
                )
            })
        };
        w.counters(
            "scaleout_db_requests_total",
            "API requests by kind.",
            by_kind(|k| &k.requests),
        )?;
        w.counters(
            "scaleout_db_request_errors_total",
            "API requests answered with an error status.",
            by_kind(|k| &k.errors),
        )?;
        w.histograms(
            "scaleout_db_write_stage_seconds",
            "Where writes spend their time on this node: log_write and log_fsync (the Raft log), replicate (leader: an AppendEntries with entries, sent to answered), durable_wait (before applying, this node's own fsync), apply (SQLite), apply_moved (applies that finished on a blocking thread, not the async one they were called on), checkpoint (SQLite's WAL copied back into its file, in the background).",
            self.stages
                .all()
                .map(|(stage, h)| (Labels([Label("stage", stage)]), h)),
        )?;
        w.histograms(
            "scaleout_db_request_seconds",
            "API request latency by kind.",
            self.kinds()
                .map(|(name, kind)| (Labels([Label("kind", name)]), &kind.latency)),
        )?;
        w.gauges(
            "scaleout_db_role",
            "This node's Raft role (1 for the current one).",
            [
                ("leader", ServerState::Leader),
                ("follower", ServerState::Follower),
                ("candidate", ServerState::Candidate),
                ("learner", ServerState::Learner),
            ]
            .map(|(role, state)| (Labels([Label("role", role)]), u64::from(m.state == state))),
        )?;
        let gauges = [
            ("scaleout_db_term", "The current Raft term.", m.current_term),
            (
                "scaleout_db_last_log_index",
                "Index of the last entry in this node's log.",
                m.last_log_index.unwrap_or(0),
            ),
            (
                "scaleout_db_applied_index",
                "Index of the last entry applied to the database.",
                m.last_applied.map_or(0, |l| l.index),
            ),
            (
                "scaleout_db_snapshot_index",
                "Index the latest snapshot ends at.",
                m.snapshot.map_or(0, |l| l.index),
            ),
            (
                "scaleout_db_leader_id",
                "The node this one believes leads (0: none).",
                m.current_leader.unwrap_or(0),
            ),
        ];
        for (name, help, value) in gauges {
            w.gauge(name, help, value)?;
        }
        if let Some(replication) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            let ids: Vec<(String, u64)> = replication
                .iter()
                .map(|(id, matched)| {
                    (
                        id.to_string(),
                        last.saturating_sub(matched.map_or(0, |l| l.index)),
                    )
                })
                .collect();
            w.gauges(
                "scaleout_db_replication_lag_entries",
                "Entries the leader has that a follower has not confirmed.",
                ids.iter()
                    .map(|(id, lag)| (Labels([Label("node", id)]), *lag)),
            )?;
        }
        Ok(())
    }

    fn kinds(&self) -> [(&'static str, &Kind); 3] {
        [
            ("write", &self.write),
            ("read", &self.read),
            ("other", &self.other),
        ]
    }
}
