//! `scaleout bench`: an HTTP load generator with latency histograms.
//!
//! Closed loop (`--connections N`): N workers, each sends its next
//! request when the last one is answered. Open loop (`--rate R`): the
//! requests are due at fixed times (R per second over all workers), and
//! each one's latency is counted from when it was due, not from when it
//! left: a server that stalls is charged for every request that waited
//! behind the stall (coordinated omission corrected, as wrk2 does).
//! Latencies go into HDR histograms (microseconds, 3 significant
//! digits), one per worker, merged at the end.
//!
//! Every run is bounded: a duration (at most an hour) and optionally a
//! number of requests; a request that takes longer than `timeout` counts
//! as an error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// A read/write mix against the links app at the URL (its site root):
/// one create (`POST /api/links`, a new link each time) in every
/// `write_every` requests, the home page (`GET /`) otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinksMix {
    pub write_every: u64,
}

/// One request's outcome, for a caller that watches the run (the lab's
/// dashboard counts errors and remembers acknowledged creates).
#[derive(Debug)]
pub struct Outcome<'a> {
    /// A create of the links mix.
    pub write: bool,
    /// The status, when an answer came whole.
    pub status: Option<u16>,
    /// The answer's `Location` (where a create can be read back).
    pub location: Option<&'a str>,
    /// From when it was due (open loop) or sent, in microseconds.
    pub latency_us: u64,
}

/// Sees every request's outcome as it happens.
pub trait Observe: Send + Sync {
    fn seen(&self, outcome: &Outcome<'_>);
}

/// What to send, how hard, for how long.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub url: String,
    pub method: reqwest::Method,
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
    pub connections: usize,
    /// Requests per second over all workers (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Stop after this many requests.
    pub requests: Option<u64>,
    pub timeout: Duration,
    /// The links app's read/write mix instead of one request over and over.
    pub mix: Option<LinksMix>,
    /// The HTTP client to send with (the lab's resolves names through its
    /// DNS); `None`: one made for the run.
    pub client: Option<reqwest::Client>,
}

impl BenchConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("{}: give an http:// or https:// URL", self.url));
        }
        if self.connections == 0 || self.connections > 10_000 {
            return Err("--connections must be 1 to 10000".into());
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            return Err("--duration must be more than 0 and at most 1h".into());
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r <= 1_000_000.0) {
                return Err("--rate must be more than 0 and at most 1000000".into());
            }
            // Each connection sends one request every connections/rate
            // seconds: at least one must fit in the run.
            if self.connections as f64 / r > self.duration.as_secs_f64() {
                return Err(format!(
                    "--rate {r} over {} connections sends each one's first request after the run ends: raise --rate or lower --connections",
                    self.connections
                ));
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(600) {
            return Err("--timeout must be more than 0 and at most 10m".into());
        }
        if let Some(mix) = self.mix {
            if mix.write_every == 0 {
                return Err("--links-mix must be 1 or more (1: every request creates)".into());
            }
            if self.body.is_some() || self.method != reqwest::Method::GET {
                return Err("--links-mix makes its own requests: no --method or --body".into());
            }
        }
        Ok(())
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// A run's result (`--json` prints it as it is).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub connections: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    /// Requests answered (any status).
    pub requests: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests with no answer (refused, reset, timed out), by reason.
    pub errors: BTreeMap<String, u64>,
    pub requests_per_second: f64,
    pub latency_ms: Latency,
}

impl Report {
    /// Answers outside 2xx/3xx, and requests with no answer.
    pub fn failures(&self) -> u64 {
        let bad: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| **s >= 400)
            .map(|(_, n)| n)
            .sum();
        bad + self.errors.values().sum::<u64>()
    }
}

/// Progress as the run goes (for a progress bar): requests so far.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
}

struct Tally {
    latency: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

fn why(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "other".into()
    }
}

/// Runs the load until its duration or request count is reached, or
/// `stop`.
pub async fn run(
    config: BenchConfig,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<Report, String> {
    run_observed(config, progress, stop, None).await
}

/// `run`, telling `observer` of every request's outcome as it happens.
pub async fn run_observed(
    config: BenchConfig,
    progress: Arc<Progress>,
    stop: CancellationToken,
    observer: Option<Arc<dyn Observe>>,
) -> Result<Report, String> {
    config.validate()?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &config.headers {
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header {name:?}: {e}"))?,
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|e| format!("header {name:?}: {e}"))?,
        );
    }
    let client = match &config.client {
        Some(c) if headers.is_empty() => c.clone(),
        Some(_) => return Err("headers go on the client given".into()),
        None => reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(config.connections)
            .default_headers(headers)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?,
    };
    let base = config.url.trim_end_matches('/').to_string();
    let started = Instant::now();
    let end = started + config.duration;
    let all = config.requests.unwrap_or(u64::MAX);
    let budget = Arc::new(AtomicU64::new(all));
    // Each worker's share of the rate: its requests are due every
    // `interval`, the workers' schedules staggered across one interval.
    let interval = config
        .rate
        .map(|r| Duration::try_from_secs_f64(config.connections as f64 / r))
        .transpose()
        .map_err(|_| "--rate is too low for that many connections".to_string())?;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..config.connections {
        let (client, config, budget, progress, stop, observer, base) = (
            client.clone(),
            config.clone(),
            budget.clone(),
            progress.clone(),
            stop.clone(),
            observer.clone(),
            base.clone(),
        );
        workers.spawn(async move {
            let mut tally = Tally {
                latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .map_err(|e| e.to_string())?,
                statuses: BTreeMap::new(),
                errors: BTreeMap::new(),
            };
            let mut due =
                interval.map(|i| started + i.mul_f64(w as f64 / config.connections as f64));
            loop {
                if stop.is_cancelled() || Instant::now() >= end {
                    break;
                }
                // The run's request number (from 1): the mix's writes are
                // one in every `write_every` of the whole run, whichever
                // worker sends them.
                let Ok(left) =
                    budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                else {
                    break;
                };
                let n = all - left + 1;
                let from = match due {
                    Some(at) => {
                        if at >= end {
                            break;
                        }
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                let (request, write) = match config.mix {
                    Some(mix) if n.is_multiple_of(mix.write_every) => (
                        client
                            .post(format!("{base}/api/links"))
                            .json(&serde_json::json!({ "url": format!("https://bench.test/{n}") })),
                        true,
                    ),
                    Some(_) => (client.get(format!("{base}/")), false),
                    None => {
                        let mut request = client.request(config.method.clone(), &config.url);
                        if let Some(body) = &config.body {
                            request = request.body(body.clone());
                        }
                        (request, false)
                    }
                };
                let mut answered = None;
                let mut location = None;
                match request.send().await {
                    Ok(mut answer) => {
                        let status = answer.status().as_u16();
                        if write && observer.is_some() {
                            location = answer
                                .headers()
                                .get(reqwest::header::LOCATION)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                        }
                        // The whole answer counts, read and dropped a
                        // chunk at a time (a large body is never held).
                        let read = loop {
                            match answer.chunk().await {
                                Ok(Some(_)) => {}
                                Ok(None) => break Ok(()),
                                Err(e) => break Err(e),
                            }
                        };
                        match read {
                            Ok(()) => {
                                *tally.statuses.entry(status).or_default() += 1;
                                answered = Some(status);
                            }
                            Err(e) => *tally.errors.entry(why(&e)).or_default() += 1,
                        }
                    }
                    Err(e) => *tally.errors.entry(why(&e)).or_default() += 1,
                }
                let took = from.elapsed().as_micros().max(1) as u64;
                tally.latency.saturating_record(took);
                if let Some(o) = &observer {
                    o.seen(&Outcome {
                        write,
                        status: answered,
                        location: location.as_deref(),
                        latency_us: took,
                    });
                }
                progress.done.fetch_add(1, Ordering::Relaxed);
                if let (Some(at), Some(i)) = (due.as_mut(), interval) {
                    *at += i;
                }
            }
            Ok::<Tally, String>(tally)
        });
    }
    let mut latency: Histogram<u64> =
        Histogram::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?;
    let (mut statuses, mut errors) = (BTreeMap::new(), BTreeMap::new());
    while let Some(done) = workers.join_next().await {
        let tally = done.map_err(|e| e.to_string())??;
        latency.add(&tally.latency).map_err(|e| e.to_string())?;
        for (s, n) in tally.statuses {
            *statuses.entry(s).or_default() += n;
        }
        for (e, n) in tally.errors {
            *errors.entry(e).or_default() += n;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests: u64 = statuses.values().sum();
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Report {
        url: config.url,
        connections: config.connections,
        rate: config.rate,
        seconds,
        requests,
        statuses,
        errors,
        requests_per_second: requests as f64 / seconds.max(1e-9),
        latency_ms: Latency {
            p50: ms(latency.value_at_quantile(0.5)),
            p90: ms(latency.value_at_quantile(0.9)),
            p99: ms(latency.value_at_quantile(0.99)),
            p999: ms(latency.value_at_quantile(0.999)),
            max: ms(latency.max()),
            mean: latency.mean() / 1000.0,
        },
    })
}
