//! A node's Prometheus metrics: request rates and latency by kind (write,
//! read, other), counted by a middleware around the API, and the Raft
//! figures (role, term, log, applied and snapshot indexes, replication
//! lag per follower on the leader) read from openraft's metrics when
//! scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use openraft::{RaftMetrics, ServerState};

use crate::raft::proposer::Counts;
use crate::raft::Member;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

#[derive(Default)]
struct Kind {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

#[derive(Default)]
pub struct Stats {
    write: Kind,
    read: Kind,
    other: Kind,
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
        kind.latency.observe(started.elapsed().as_secs_f64());
        response
    }

    pub fn render(&self, m: &RaftMetrics<u64, Member>, proposed: &Counts) -> String {
        let mut out = String::new();
        out.push_str("# HELP scaleout_db_proposed_entries_total Log entries this node proposed as leader (one per group commit).\n# TYPE scaleout_db_proposed_entries_total counter\n");
        let _ = writeln!(
            out,
            "scaleout_db_proposed_entries_total {}",
            proposed.entries.load(Ordering::Relaxed)
        );
        out.push_str("# HELP scaleout_db_proposed_writes_total Client writes those entries carried.\n# TYPE scaleout_db_proposed_writes_total counter\n");
        let _ = writeln!(
            out,
            "scaleout_db_proposed_writes_total {}",
            proposed.writes.load(Ordering::Relaxed)
        );
        out.push_str("# HELP scaleout_db_requests_total API requests by kind.\n# TYPE scaleout_db_requests_total counter\n");
        for (name, kind) in self.kinds() {
            let _ = writeln!(
                out,
                "scaleout_db_requests_total{{kind=\"{name}\"}} {}",
                kind.requests.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP scaleout_db_request_errors_total API requests answered with an error status.\n# TYPE scaleout_db_request_errors_total counter\n");
        for (name, kind) in self.kinds() {
            let _ = writeln!(
                out,
                "scaleout_db_request_errors_total{{kind=\"{name}\"}} {}",
                kind.errors.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP scaleout_db_request_seconds API request latency by kind.\n# TYPE scaleout_db_request_seconds histogram\n");
        for (name, kind) in self.kinds() {
            kind.latency.render(
                &mut out,
                "scaleout_db_request_seconds",
                &format!("kind=\"{name}\""),
            );
        }
        out.push_str("# HELP scaleout_db_role This node's Raft role (1 for the current one).\n# TYPE scaleout_db_role gauge\n");
        for (role, state) in [
            ("leader", ServerState::Leader),
            ("follower", ServerState::Follower),
            ("candidate", ServerState::Candidate),
            ("learner", ServerState::Learner),
        ] {
            let _ = writeln!(
                out,
                "scaleout_db_role{{role=\"{role}\"}} {}",
                u8::from(m.state == state)
            );
        }
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
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        if let Some(replication) = &m.replication {
            out.push_str("# HELP scaleout_db_replication_lag_entries Entries the leader has that a follower has not confirmed.\n# TYPE scaleout_db_replication_lag_entries gauge\n");
            let last = m.last_log_index.unwrap_or(0);
            for (id, matched) in replication {
                let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
                let _ = writeln!(
                    out,
                    "scaleout_db_replication_lag_entries{{node=\"{id}\"}} {lag}"
                );
            }
        }
        out
    }

    fn kinds(&self) -> [(&'static str, &Kind); 3] {
        [
            ("write", &self.write),
            ("read", &self.read),
            ("other", &self.other),
        ]
    }
}
