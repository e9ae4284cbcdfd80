//! The lab's control room: what `scaleout up` serves beside the topology
//! it runs (issue 16, first part).
//!
//! - A watcher polls every process every half second: has it exited, is
//!   it paused; each database node's `/status` (leader, follower, voter
//!   or read replica, applied index). What changed becomes an [`Event`]
//!   on the timeline (a process exited, was paused, resumed, restarted;
//!   the leader was lost; a leader was elected), each with its time.
//! - An HTTP API on `--dashboard` (loopback by default):
//!   `GET /api/state` (every process: name, role, pid, URL, state, and
//!   for database nodes their Raft role and applied index),
//!   `GET /api/events` (server-sent events: `state` snapshots and
//!   timeline `event`s as they happen), and
//!   `POST /api/procs/{name}/{kill|stop|pause|resume|restart}`.
//! - The dashboard page itself (`GET /`), embedded in the binary: the
//!   seed's diagram drawn from the state, the timeline, and the buttons.
//!
//! Controls are POSTs with a JSON body and must name this listener in
//! `Host`: a web page elsewhere cannot make a browser send them (a
//! cross-site form cannot set the content type without a preflight this
//! server never answers; a rebound DNS name fails the `Host` check).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::procs::Proc;

/// How often the watcher looks.
const EVERY: Duration = Duration::from_millis(500);
/// Events the timeline keeps.
const TIMELINE: usize = 500;
/// Connections the dashboard serves at once.
const MAX_CONNECTIONS: usize = 64;

/// What a process is doing, as the lab saw it last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Running {
    Up,
    Paused,
    Exited,
}

/// One process, as `/api/state` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcState {
    pub name: String,
    /// `db`, `web`, `lb` or `dns`.
    pub role: String,
    pub pid: Option<u32>,
    pub url: String,
    pub state: Running,
    /// How it exited, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// A database node's view of itself, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db: Option<DbView>,
    /// Requests it has served (queries for DNS), from its `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Requests per second over the last looks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rps: Option<f64>,
    /// Requests it answered with an error (5xx; a database node's
    /// error answers), since it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<u64>,
    /// Its latency over the last look, in milliseconds (from its
    /// histogram's buckets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// A web server: the load balancers that send it nothing (they
    /// ejected it, its health checks fail, it drains, or they do not
    /// know it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ejected_by: Vec<String>,
    /// A load balancer: whether DNS answers with its address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_dns: Option<bool>,
}

/// The counter of served requests each role's `/metrics` has.
fn request_counter(role: &str) -> Option<&'static str> {
    Some(match role {
        "db" => "scaleout_db_requests_total",
        "web" => "scaleout_web_http_requests_total",
        "lb" => "scaleout_lb_responses_total",
        "dns" => "scaleout_dns_queries_total",
        _ => return None,
    })
}

use crate::figures;
pub use crate::figures::counter_sum;

/// What one look read off a process's `/metrics`.
struct Figures {
    requests: Option<u64>,
    errors: Option<u64>,
    latency: Option<figures::Buckets>,
    /// A load balancer: each backend and whether it takes requests. DNS:
    /// each address and whether it is answered.
    routes: Vec<(String, f64)>,
}

/// What the last looks saw of where traffic may go, to tell changes.
#[derive(Default)]
struct Routing {
    /// (load balancer, web server) → the load balancer sends it requests.
    backends: std::collections::HashMap<(String, String), bool>,
    /// Load balancer → DNS answers with its address.
    answered: std::collections::HashMap<String, bool>,
}

/// Stage 5's site by its name, resolved through the lab's DNS as a
/// visitor's machine would.
struct ByName {
    /// `http://www.scaleout.test:PORT`.
    url: String,
    resolver: Arc<crate::resolve::ViaDns>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbView {
    /// `leader`, `voter` or `replica` (a voter that does not lead).
    pub kind: String,
    pub applied_index: u64,
    pub term: u64,
    /// Entries behind the node that has applied the most.
    pub lag: u64,
}

/// The load the dashboard runs against the site: what it has seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadView {
    pub running: bool,
    /// Answers in 2xx or 3xx, and the rest (with requests that got no
    /// answer), since the load started.
    pub ok: u64,
    pub errors: u64,
    /// Requests per second over the last look.
    pub rps: f64,
    /// The load's own latency over the last look, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    pub shape: LoadShape,
    /// When the first and the last error happened (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_ms: Option<u64>,
}

/// The load's counters, shared by its workers.
#[derive(Default)]
struct LoadCounts {
    ok: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    first_error_ms: std::sync::atomic::AtomicU64,
    last_error_ms: std::sync::atomic::AtomicU64,
    /// When a create was last acknowledged.
    last_write_ok_ms: std::sync::atomic::AtomicU64,
    /// Where each acknowledged create can be read back (its `Location`),
    /// the first [`KEPT_WRITES`] of them.
    created: std::sync::Mutex<Vec<String>>,
    /// Latencies since the last look (microseconds, coordinated omission
    /// corrected when the load runs at a fixed rate).
    latency: std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// How it was started.
    shape: LoadShape,
}

impl crate::bench::Observe for LoadCounts {
    fn seen(&self, o: &crate::bench::Outcome<'_>) {
        use std::sync::atomic::Ordering::Relaxed;
        let ok = o.status.is_some_and(|s| (200..400).contains(&s));
        if ok {
            self.ok.fetch_add(1, Relaxed);
            if o.write {
                self.last_write_ok_ms.store(now_ms(), Relaxed);
                if let Some(at) = o.location {
                    let mut created = self
                        .created
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if created.len() < KEPT_WRITES {
                        created.push(at.to_string());
                    }
                }
            }
        } else {
            self.errors.fetch_add(1, Relaxed);
            let at = now_ms();
            let _ = self
                .first_error_ms
                .compare_exchange(0, at, Relaxed, Relaxed);
            self.last_error_ms.store(at, Relaxed);
        }
        let mut latency = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = latency.as_mut() {
            h.saturating_record(o.latency_us);
        }
    }
}

/// How the dashboard's load runs: `scaleout bench`'s links mix.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadShape {
    /// Clients at once.
    pub connections: usize,
    /// Requests per second in all (latencies from when each was due);
    /// `None`: each client sends its next request when answered.
    pub rate: Option<f64>,
    /// One create in every this many requests; the rest read the home
    /// page.
    pub write_every: u64,
}

impl Default for LoadShape {
    fn default() -> Self {
        LoadShape {
            connections: LOAD_WORKERS,
            rate: None,
            write_every: LOAD_WRITE_EVERY,
        }
    }
}

impl LoadShape {
    fn check(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.connections) {
            return Err("connections: 1 to 256".into());
        }
        if self.rate.is_some_and(|r| !(1.0..=100_000.0).contains(&r)) {
            return Err("rate: 1 to 100000 requests per second".into());
        }
        if self
            .rate
            .is_some_and(|r| self.connections as f64 / r > 10.0)
        {
            return Err(
                "rate: at least one request every 10 s per client (raise rate or lower connections)"
                    .into(),
            );
        }
        if !(1..=1000).contains(&self.write_every) {
            return Err("write_every: 1 to 1000".into());
        }
        Ok(())
    }
}

/// Acknowledged creates a load remembers, to look for after a scenario.
const KEPT_WRITES: usize = 20_000;

/// What a scenario measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub done: bool,
    /// Why it could not run, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process killed, or the one added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<String>,
    /// The database node cut off from the others, and when the cut was
    /// healed (ms from the cut).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_off: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healed_ms: Option<u64>,
    pub new_leader: Option<String>,
    /// Milliseconds from the kill until the lab saw no leader (or
    /// another), until another was elected, and until a create was
    /// acknowledged again.
    pub detected_ms: Option<u64>,
    pub elected_ms: Option<u64>,
    pub writes_resumed_ms: Option<u64>,
    /// Milliseconds from the fault until traffic had moved: for a kill,
    /// until the load's last error (0: it saw none, the load balancer or
    /// the database client moved it at once); for an addition, until the
    /// new process served its first request.
    pub traffic_moved_ms: Option<u64>,
    /// Errors the load saw from the kill on, and the answers it got.
    pub errors: u64,
    pub served: u64,
    /// Creates the load saw acknowledged, and how many of them could not
    /// be read back afterwards through the site (lost).
    pub acknowledged_writes: u64,
    pub lost_writes: u64,
    /// Acknowledged creates the site did not answer for when they were
    /// looked for (neither found nor said to be missing).
    pub unverified_writes: u64,
}

/// What looking for an acknowledged create found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadBack {
    Found,
    Lost,
    NoAnswer,
}

/// How long looking for a scenario's acknowledged creates may take.
const READ_BACK_PATIENCE: Duration = Duration::from_secs(60);

impl ScenarioReport {
    /// One line for the timeline.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("could not run: {e}");
        }
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
        let mut line = match (&self.killed, &self.added, &self.cut_off) {
            (Some(k), _, _) => format!("killed {k}, seen after {}", ms(self.detected_ms)),
            (_, Some(a), _) => format!("added {a}, up after {}", ms(self.detected_ms)),
            (_, _, Some(c)) => format!("cut off {c}, seen after {}", ms(self.detected_ms)),
            _ => String::new(),
        };
        if self.elected_ms.is_some() {
            line += &format!(
                ", elected after {}, writes back after {}",
                ms(self.elected_ms),
                ms(self.writes_resumed_ms)
            );
        }
        if self.traffic_moved_ms.is_some() {
            line += &format!(", traffic moved after {}", ms(self.traffic_moved_ms));
        }
        line + &format!(
            ", {} errors, {} answered, {} of {} acknowledged writes lost",
            self.errors, self.served, self.lost_writes, self.acknowledged_writes
        )
    }
}

/// Entries behind the most applied node beyond which a database node is
/// catching up, and within which it is level again.
const BEHIND: u64 = 100;
const LEVEL: u64 = 5;

/// The TTL of the lab's DNS answers (`scaleout dns`'s default).
const DNS_TTL: Duration = Duration::from_secs(5);

/// Workers of the dashboard's load, and one write in this many requests.
const LOAD_WORKERS: usize = 4;
const LOAD_WRITE_EVERY: u64 = 4;

/// The whole lab.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabState {
    pub stage: u8,
    pub title: String,
    /// Where the site is.
    pub site: String,
    /// The site by its name (stage 5), which the lab's load resolves
    /// through the lab's DNS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_name: Option<String>,
    /// The database nodes run in namespaces: partitions can be cut.
    pub partitions: bool,
    pub procs: Vec<ProcState>,
    /// The database node that leads, when one does.
    pub leader: Option<String>,
    /// The load the dashboard runs, if it ever started one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadView>,
    /// The last scenario run, as far as it has got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<ScenarioReport>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub at_ms: u64,
    /// `exited`, `paused`, `resumed`, `restarted`, `leader_lost`,
    /// `leader_elected`, `caught_up`, `ejected`, `restored`, `dns` (a load
    /// balancer left, entered or came back into the site's answer),
    /// `partition`, `healed`, `added`, `draining`, `removed`, `scenario`,
    /// `control`.
    pub kind: String,
    pub name: String,
    pub detail: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A process and what the lab knows of it.
struct Member {
    proc: Proc,
    paused: bool,
    exit: Option<String>,
    /// A restart is under way (the lock is not held while it starts).
    restarting: bool,
}

/// The lab's processes, its state and timeline, shared by the watcher
/// and the API.
pub struct Lab {
    members: Mutex<Vec<Member>>,
    stage: u8,
    title: String,
    site: String,
    state: watch::Sender<LabState>,
    events: broadcast::Sender<Event>,
    timeline: std::sync::Mutex<VecDeque<Event>>,
    http: reqwest::Client,
    /// Admin listeners (URLs, or `host:port`) of the load balancers and
    /// DNS, where their `/metrics` are.
    admin: std::collections::HashMap<String, String>,
    /// Per process: its last request count, when, and its smoothed rate.
    rates: std::sync::Mutex<std::collections::HashMap<String, (u64, std::time::Instant, f64)>>,
    /// Each process's latency buckets at the last look.
    latencies: std::sync::Mutex<std::collections::HashMap<String, figures::Buckets>>,
    /// The stage's directory (new database nodes keep their data there,
    /// the load balancers' admin token is there).
    dir: std::path::PathBuf,
    /// One scale-out at a time.
    adding: Mutex<()>,
    /// The load the dashboard runs: its counters and its stop.
    load: std::sync::Mutex<Option<(Arc<LoadCounts>, CancellationToken)>>,
    /// The load's count at the last look, for its rate.
    load_seen: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
    /// The last scenario's report.
    scenario: std::sync::Mutex<Option<ScenarioReport>>,
    by_name: Option<ByName>,
    routing: std::sync::Mutex<Routing>,
    /// Every name a process of this lab has had.
    used_names: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Per database node: its pid, and whether it is catching up.
    catching: std::sync::Mutex<std::collections::HashMap<String, (Option<u32>, bool)>>,
    /// The database nodes' namespaces (`up --netns`), where partitions
    /// are cut.
    net: std::sync::Mutex<Option<crate::netns::Net>>,
}

/// What `add` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Add {
    /// A web server, registered with every load balancer at once.
    Web,
    /// A read replica (a non-voting database node) that joins, catches
    /// up and takes reads.
    Replica,
    /// A load balancer on the next loopback address, sending to the web
    /// servers running, entered into the DNS answer (stage 5).
    Lb,
}

impl std::str::FromStr for Add {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "web" => Ok(Add::Web),
            "replica" => Ok(Add::Replica),
            "lb" => Ok(Add::Lb),
            other => Err(format!("{other:?}: add web, replica or lb")),
        }
    }
}

/// The scenarios: each a claim of the seed, shown under the lab's load
/// and ended with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// C13: the leader dies; another is elected, writes resume.
    KillLeader,
    /// C7: a web server dies; the load balancers send its share elsewhere.
    KillWeb,
    /// C12: a read replica dies; reads go to the others.
    KillReplica,
    /// C4: a web server is added and takes its share of the traffic.
    AddWeb,
    /// C11: a read replica is added, catches up and takes reads.
    AddReplica,
    /// C2, C3: a load balancer dies; DNS leaves it out of the site's
    /// answer and visitors reach the other one (stage 5).
    KillLb,
    /// C13: the leader is cut off from the other database nodes (`up
    /// --netns`); they elect another, writes resume, and once healed the
    /// old one follows.
    PartitionLeader,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::KillLeader,
        Scenario::PartitionLeader,
        Scenario::KillWeb,
        Scenario::KillReplica,
        Scenario::KillLb,
        Scenario::AddWeb,
        Scenario::AddReplica,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillLeader => "kill-leader",
            Scenario::KillWeb => "kill-web",
            Scenario::KillReplica => "kill-replica",
            Scenario::AddWeb => "add-web",
            Scenario::AddReplica => "add-replica",
            Scenario::KillLb => "kill-lb",
            Scenario::PartitionLeader => "partition-leader",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|c| c.name()).collect();
                format!("{s:?}: the scenarios are: {}", names.join(", "))
            })
    }
}

/// `args` with the value after `flag` replaced (or `flag value` added).
fn with_arg(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(at) if at + 1 < args.len() => args[at + 1] = value.to_string(),
        _ => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

fn arg_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// `host:0` on the host of `addr` (`host:port`).
fn any_port(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    format!("{host}:0")
}

/// A control a caller may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGKILL.
    Kill,
    /// SIGTERM: the process drains and exits.
    Stop,
    /// SIGSTOP.
    Pause,
    /// SIGCONT.
    Resume,
    /// Started again with the same arguments (after it exited, or after a
    /// SIGKILL first).
    Restart,
}

impl std::str::FromStr for Control {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "kill" => Control::Kill,
            "stop" => Control::Stop,
            "pause" => Control::Pause,
            "resume" => Control::Resume,
            "restart" => Control::Restart,
            other => {
                return Err(format!(
                    "{other:?}: the controls are kill, stop, pause, resume and restart"
                ))
            }
        })
    }
}

/// Why a control could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no process named {0:?} in this lab")]
    NoSuchProcess(String),
    #[error("{0}")]
    Refused(String),
    #[error("{name} did not start again: {reason}")]
    Restart { name: String, reason: String },
}

impl Lab {
    pub fn new(
        stage: u8,
        title: &str,
        site: &str,
        procs: Vec<Proc>,
        dir: &std::path::Path,
        net: Option<crate::netns::Net>,
    ) -> Result<Arc<Lab>, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(400))
            .build()?;
        let admin = procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.ready.admin.clone()?)))
            .collect();
        // With a DNS server the site has a name; the load asks for it.
        let by_name = procs
            .iter()
            .find(|p| p.ready.role == "dns")
            .and_then(|dns| dns.url().parse::<std::net::SocketAddr>().ok())
            .map(|dns| {
                let (scheme, rest) = site.split_once("://").unwrap_or(("http", site));
                let port = rest.rsplit(':').next().unwrap_or("80");
                ByName {
                    url: format!("{scheme}://{}:{port}", crate::SITE_NAME),
                    resolver: Arc::new(crate::resolve::ViaDns::new(dns)),
                }
            });
        let names = procs.iter().map(|p| p.name.clone()).collect();
        let members: Vec<Member> = procs
            .into_iter()
            .map(|proc| Member {
                proc,
                paused: false,
                exit: None,
                restarting: false,
            })
            .collect();
        let first = LabState {
            stage,
            title: title.into(),
            site: site.into(),
            site_name: None,
            partitions: false,
            procs: Vec::new(),
            leader: None,
            load: None,
            scenario: None,
            at_ms: now_ms(),
        };
        let first = LabState {
            site_name: by_name.as_ref().map(|b| b.url.clone()),
            partitions: net.is_some(),
            ..first
        };
        let (state, _) = watch::channel(first);
        let (events, _) = broadcast::channel(256);
        Ok(Arc::new(Lab {
            members: Mutex::new(members),
            stage,
            title: title.into(),
            site: site.into(),
            state,
            events,
            timeline: std::sync::Mutex::new(VecDeque::new()),
            http,
            admin,
            rates: Default::default(),
            latencies: Default::default(),
            dir: dir.to_path_buf(),
            adding: Mutex::new(()),
            load: std::sync::Mutex::new(None),
            load_seen: std::sync::Mutex::new((0, None)),
            scenario: std::sync::Mutex::new(None),
            by_name,
            routing: Default::default(),
            net: std::sync::Mutex::new(net),
            catching: Default::default(),
            used_names: std::sync::Mutex::new(names),
        }))
    }

    fn record(&self, kind: &str, name: &str, detail: String) {
        let event = Event {
            at_ms: now_ms(),
            kind: kind.into(),
            name: name.into(),
            detail,
        };
        {
            let mut t = self
                .timeline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if t.len() == TIMELINE {
                t.pop_front();
            }
            t.push_back(event.clone());
        }
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    /// The namespaces, for dropping once every process has stopped.
    pub fn take_net(&self) -> Option<crate::netns::Net> {
        self.net
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Cuts database node `name` off from the other database nodes (the
    /// web tier still reaches it), or heals every cut (`None`).
    fn partition(&self, name: Option<&str>) -> Result<(), String> {
        let mut net = self
            .net
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let net = net.as_mut().ok_or(
            "a partition needs the database nodes in network namespaces: run `scaleout up --netns` (as root)",
        )?;
        match name {
            Some(name) => {
                let index = name
                    .strip_prefix("db-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|n| n.checked_sub(1))
                    .ok_or_else(|| format!("{name} is not a database node of the lab's plan"))?;
                net.partition(&[index])
            }
            None => net.heal(),
        }
    }

    /// The timeline so far.
    pub fn timeline(&self) -> Vec<Event> {
        self.timeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub fn state(&self) -> LabState {
        self.state.borrow().clone()
    }

    /// One look at every process; records what changed.
    async fn look(&self) {
        let mut seen = Vec::new();
        // Where each load balancer's and DNS's `/metrics` are.
        let mut admins = std::collections::HashMap::new();
        {
            let mut members = self.members.lock().await;
            for m in members.iter_mut() {
                if let Some(admin) = &m.proc.ready.admin {
                    admins.insert(m.proc.name.clone(), admin.clone());
                }
                if m.exit.is_none() {
                    if let Some(status) = m.proc.exited() {
                        m.exit = Some(status.to_string());
                        self.record("exited", &m.proc.name, status.to_string());
                    }
                }
                let running = match (&m.exit, m.paused) {
                    (Some(_), _) => Running::Exited,
                    (None, true) => Running::Paused,
                    (None, false) => Running::Up,
                };
                seen.push(ProcState {
                    name: m.proc.name.clone(),
                    role: m.proc.ready.role.clone(),
                    pid: m.proc.pid(),
                    url: m.proc.url().to_string(),
                    state: running,
                    exit: m.exit.clone(),
                    db: None,
                    requests: None,
                    rps: None,
                    errors: None,
                    p50_ms: None,
                    p99_ms: None,
                    ejected_by: Vec::new(),
                    in_dns: None,
                });
            }
        }
        // Database nodes, asked at once (a paused or dead one times out).
        let asks = seen
            .iter()
            .enumerate()
            .filter(|(_, p)| p.role == "db" && p.state == Running::Up)
            .map(|(i, p)| {
                let http = self.http.clone();
                let url = format!("{}/status", p.url);
                async move {
                    let status: Option<scaleout_wire::data::Status> =
                        match http.get(url).send().await {
                            Ok(r) => r.json().await.ok(),
                            Err(_) => None,
                        };
                    (i, status)
                }
            })
            .collect::<Vec<_>>();
        for (i, status) in futures_util::future::join_all(asks).await {
            if let Some(s) = status {
                let raft = &s.store.raft;
                let kind = if raft.state == "Leader" {
                    "leader"
                } else if raft.voter {
                    "voter"
                } else {
                    "replica"
                };
                seen[i].db = Some(DbView {
                    kind: kind.into(),
                    applied_index: raft.applied_index,
                    term: raft.term,
                    lag: 0,
                });
            }
        }
        let most_applied = seen
            .iter()
            .filter_map(|p| p.db.as_ref().map(|d| d.applied_index))
            .max()
            .unwrap_or(0);
        for db in seen.iter_mut().filter_map(|p| p.db.as_mut()) {
            db.lag = most_applied - db.applied_index;
        }
        self.catching_up(&seen);
        // Every process's request counter, asked at once (the load
        // balancers' and DNS's with the lab's token).
        let token = self.lb_token();
        let counts = seen
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == Running::Up)
            .filter_map(|(i, p)| {
                let counter = request_counter(&p.role)?;
                let base = match p.role.as_str() {
                    "lb" | "dns" => admin_base(admins.get(&p.name)?),
                    _ => p.url.clone(),
                };
                let http = self.http.clone();
                let role = p.role.clone();
                let token = token.clone();
                Some(async move {
                    let text = match http
                        .get(format!("{base}/metrics"))
                        .bearer_auth(token)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => r.text().await.ok(),
                        _ => None,
                    };
                    let figures = text.map(|t| Figures {
                        requests: counter_sum(&t, counter),
                        errors: figures::errors(&role, &t),
                        latency: figures::latency_histogram(&role)
                            .map(|h| figures::Buckets::read(&t, h)),
                        routes: match role.as_str() {
                            "lb" => {
                                figures::gauge_by(&t, "scaleout_lb_backend_available", "backend")
                            }
                            "dns" => figures::gauge_by(&t, "scaleout_dns_address_up", "address"),
                            _ => Vec::new(),
                        },
                    });
                    (i, figures)
                })
            })
            .collect::<Vec<_>>();
        let counts = futures_util::future::join_all(counts).await;
        let mut routes = Vec::new();
        let now = std::time::Instant::now();
        {
            let mut rates = self
                .rates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut latencies = self
                .latencies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (i, figures) in counts {
                let Some(figures) = figures else { continue };
                if !figures.routes.is_empty() || seen[i].role == "lb" {
                    routes.push((i, figures.routes.clone()));
                }
                let p = &mut seen[i];
                p.errors = figures.errors;
                if let Some(now) = figures.latency {
                    if let Some(before) = latencies.get(&p.name) {
                        let delta = now.since(before);
                        let round = |v: f64| (v * 100.0).round() / 100.0;
                        p.p50_ms = delta.quantile_ms(0.5).map(round);
                        p.p99_ms = delta.quantile_ms(0.99).map(round);
                    }
                    latencies.insert(p.name.clone(), now);
                }
                let Some(count) = figures.requests else {
                    continue;
                };
                p.requests = Some(count);
                let entry = rates.entry(p.name.clone()).or_insert((count, now, 0.0));
                let dt = now.duration_since(entry.1).as_secs_f64();
                if dt > 0.0 {
                    // A restart starts the counter again from 0.
                    let rate = count.saturating_sub(entry.0) as f64 / dt;
                    // Smoothed over about two seconds of looks.
                    entry.2 = if entry.2 == 0.0 {
                        rate
                    } else {
                        0.6 * entry.2 + 0.4 * rate
                    };
                }
                *entry = (count, now, entry.2);
                p.rps = Some((entry.2 * 10.0).round() / 10.0);
            }
        }
        self.routing_seen(&mut seen, &routes);
        // A leader cut off from the others may still think it leads until
        // its lease runs out: the one of the highest term does.
        let leader = seen
            .iter()
            .filter(|p| p.db.as_ref().is_some_and(|d| d.kind == "leader"))
            .max_by_key(|p| p.db.as_ref().map_or(0, |d| d.term))
            .map(|p| p.name.clone());
        let before = self.state.borrow().leader.clone();
        let had_dbs = seen.iter().any(|p| p.role == "db");
        if had_dbs && leader != before {
            match (&before, &leader) {
                (Some(old), None) => {
                    self.record("leader_lost", old, "no database node leads".into())
                }
                (_, Some(new)) => {
                    let term = seen
                        .iter()
                        .find(|p| &p.name == new)
                        .and_then(|p| p.db.as_ref())
                        .map_or(0, |d| d.term);
                    self.record("leader_elected", new, format!("term {term}"));
                }
                (None, None) => {}
            }
        }
        let load = self.load_view();
        self.state.send_replace(LabState {
            stage: self.stage,
            title: self.title.clone(),
            site: self.site.clone(),
            site_name: self.by_name.as_ref().map(|b| b.url.clone()),
            partitions: self
                .net
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some(),
            procs: seen,
            leader,
            load,
            scenario: self.scenario_report(),
            at_ms: now_ms(),
        });
    }

    /// Records a database node catching up: one new since the first look
    /// (added, or restarted: a new pid) or one that fell more than
    /// [`BEHIND`] entries behind, once it is level (within [`LEVEL`]) with
    /// the most applied.
    fn catching_up(&self, seen: &[ProcState]) {
        let mut catching = self
            .catching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first_look = catching.is_empty();
        for p in seen {
            let Some(db) = &p.db else { continue };
            let entry = catching
                .entry(p.name.clone())
                .or_insert((p.pid, !first_look));
            if entry.0 != p.pid {
                *entry = (p.pid, true);
            }
            if db.lag > BEHIND {
                entry.1 = true;
            } else if entry.1 && db.lag <= LEVEL {
                entry.1 = false;
                self.record(
                    "caught_up",
                    &p.name,
                    format!(
                        "{} applied {}, level with the most applied",
                        db.kind, db.applied_index
                    ),
                );
            }
        }
    }

    /// Where traffic may go, from the load balancers' and DNS's answers
    /// (`routes`: a process's index and what its `/metrics` said): marks
    /// web servers no load balancer sends to and load balancers DNS
    /// leaves out, and records each change on the timeline.
    fn routing_seen(&self, seen: &mut [ProcState], routes: &[(usize, Vec<(String, f64)>)]) {
        let mut routing = self
            .routing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let webs: Vec<String> = seen
            .iter()
            .filter(|p| p.role == "web")
            .map(|p| p.name.clone())
            .collect();
        let mut ejected: Vec<(String, String)> = Vec::new();
        for (i, list) in routes {
            let from = seen[*i].name.clone();
            match seen[*i].role.as_str() {
                "lb" => {
                    for web in &webs {
                        let takes = list.iter().any(|(b, v)| b == web && *v > 0.0);
                        if !takes {
                            ejected.push((web.clone(), from.clone()));
                        }
                        let before = routing.backends.insert((from.clone(), web.clone()), takes);
                        match before {
                            Some(true) if !takes => {
                                self.record("ejected", web, format!("{from} sends it nothing"))
                            }
                            Some(false) if takes => self.record(
                                "restored",
                                web,
                                format!("{from} sends it requests again"),
                            ),
                            _ => {}
                        }
                    }
                }
                "dns" => {
                    let name = crate::SITE_NAME;
                    let looked_before = !routing.answered.is_empty();
                    for p in seen.iter_mut().filter(|p| p.role == "lb") {
                        let host = url_host(&p.url).unwrap_or_default();
                        let answered = list.iter().any(|(a, v)| *a == host && *v > 0.0);
                        p.in_dns = Some(answered);
                        let before = routing.answered.insert(p.name.clone(), answered);
                        let change = match (before, answered) {
                            (Some(true), false) => Some(format!("left out of {name}'s answer")),
                            (Some(false), true) => Some(format!("back in {name}'s answer")),
                            (None, true) if looked_before => {
                                Some(format!("entered {name}'s answer"))
                            }
                            _ => None,
                        };
                        if let Some(detail) = change {
                            self.record("dns", &p.name, detail);
                        }
                    }
                }
                _ => {}
            }
        }
        for p in seen.iter_mut() {
            p.ejected_by = ejected
                .iter()
                .filter(|(web, _)| *web == p.name)
                .map(|(_, lb)| lb.clone())
                .collect();
        }
    }

    /// An HTTP client for the site as visitors reach it (by name through
    /// the lab's DNS in stage 5), and the site's URL for it.
    fn site_client(&self, timeout: Duration) -> Result<(String, reqwest::Client), ControlError> {
        let mut builder = reqwest::Client::builder().timeout(timeout);
        let mut url = self.site.clone();
        if let Some(by_name) = &self.by_name {
            builder = builder.dns_resolver(by_name.resolver.clone());
            url = by_name.url.clone();
        }
        let http = builder
            .build()
            .map_err(|e| ControlError::Refused(format!("an HTTP client: {e}")))?;
        Ok((url, http))
    }

    /// Watches until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            self.look().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    /// Does `control` to process `name`.
    pub async fn control(&self, name: &str, control: Control) -> Result<(), ControlError> {
        if control == Control::Restart {
            return self.restart(name).await;
        }
        let mut members = self.members.lock().await;
        let m = members
            .iter_mut()
            .find(|m| m.proc.name == name)
            .ok_or_else(|| ControlError::NoSuchProcess(name.into()))?;
        if m.restarting {
            return Err(ControlError::Refused(format!("{name} is restarting")));
        }
        // An exit the watcher has not seen yet counts now.
        if m.exit.is_none() {
            if let Some(status) = m.proc.exited() {
                m.exit = Some(status.to_string());
                self.record("exited", name, status.to_string());
            }
        }
        let exited = m.exit.is_some();
        match control {
            Control::Kill | Control::Stop | Control::Pause | Control::Resume if exited => {
                return Err(ControlError::Refused(format!(
                    "{name} has exited; restart it"
                )))
            }
            Control::Kill => m.proc.signal(Signal::SIGKILL),
            Control::Stop => m.proc.signal(Signal::SIGTERM),
            Control::Pause => {
                m.proc.signal(Signal::SIGSTOP);
                m.paused = true;
            }
            Control::Resume => {
                m.proc.signal(Signal::SIGCONT);
                m.paused = false;
            }
            // Done by `Lab::restart`, which `control` hands it to first.
            Control::Restart => return self.restart_error(name),
        }
        let (kind, detail) = match control {
            Control::Kill => ("control", "SIGKILL sent".to_string()),
            Control::Stop => ("control", "SIGTERM sent".to_string()),
            Control::Pause => ("paused", "SIGSTOP sent".to_string()),
            Control::Resume => ("resumed", "SIGCONT sent".to_string()),
            Control::Restart => ("restarted", String::new()),
        };
        self.record(kind, name, detail);
        Ok(())
    }

    /// The token the load balancers' admin APIs take.
    fn lb_token(&self) -> String {
        std::fs::read_to_string(crate::lb_token_file(&self.dir))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Scale in: a web server is drained on every load balancer (no new
    /// requests; those under way finish, up to 10 s), taken out of them,
    /// and stopped with SIGTERM; a read replica is taken out of the
    /// cluster through the leader, then stopped. It leaves the lab (and
    /// the page). Voters, load balancers and DNS are not removed here.
    pub async fn remove(&self, name: &str) -> Result<(), ControlError> {
        let _one = self.adding.lock().await;
        let refuse = |why: String| ControlError::Refused(why);
        let state = self.state();
        // The processes as they are now (the state is the last look's):
        // what another removal just took out counts at once.
        let (admins, live) = {
            let members = self.members.lock().await;
            if !members.iter().any(|m| m.proc.name == name) {
                return Err(ControlError::NoSuchProcess(name.into()));
            }
            let live: Vec<(String, String)> = members
                .iter()
                .filter(|m| m.exit.is_none() && !m.paused && !m.restarting)
                .map(|m| (m.proc.name.clone(), m.proc.ready.role.clone()))
                .collect();
            (lb_admins(&members), live)
        };
        let proc = state
            .procs
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| refuse(format!("{name} has not been seen yet; try again")))?
            .clone();
        match (
            proc.role.as_str(),
            proc.db.as_ref().map(|d| d.kind.as_str()),
        ) {
            ("web", _) => {
                let others = live
                    .iter()
                    .filter(|(n, role)| role == "web" && n != name)
                    .count();
                if others == 0 {
                    return Err(refuse(format!(
                        "{name} is the last web server running: the site would go down"
                    )));
                }
                let token = self.lb_token();
                let token = token.as_str();
                // Drained everywhere first; one load balancer refusing
                // puts it back in rotation on the others.
                let mut drained = Vec::new();
                for admin in &admins {
                    let backend = format!("{admin}/backends/{name}");
                    let answer = self
                        .http
                        .post(format!("{backend}/drain"))
                        .bearer_auth(token)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status().is_success() => drained.push(backend),
                        // That load balancer does not know it.
                        Ok(r) if r.status() == StatusCode::NOT_FOUND => {}
                        _ => {
                            for backend in &drained {
                                let _ = self
                                    .http
                                    .post(format!("{backend}/undrain"))
                                    .bearer_auth(token)
                                    .timeout(Duration::from_secs(5))
                                    .send()
                                    .await;
                            }
                            return Err(refuse(format!(
                                "{admin} did not drain {name}: it stays in rotation everywhere"
                            )));
                        }
                    }
                }
                self.record(
                    "draining",
                    name,
                    format!("on {} load balancers", drained.len()),
                );
                for backend in &drained {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while tokio::time::Instant::now() < deadline {
                        let view: Option<serde_json::Value> =
                            match self.http.get(backend).bearer_auth(token).send().await {
                                Ok(r) => r.json().await.ok(),
                                Err(_) => None,
                            };
                        if view.is_none_or(|v| v["in_flight"].as_u64() == Some(0)) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                for backend in &drained {
                    let _ = self
                        .http
                        .delete(backend)
                        .bearer_auth(token)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                }
            }
            ("db", Some("replica")) => {
                let leader = state
                    .leader
                    .as_ref()
                    .and_then(|l| state.procs.iter().find(|p| &p.name == l))
                    .ok_or_else(|| refuse("no leader to take the replica out".into()))?;
                let id = name.trim_start_matches("db-");
                let removed = self
                    .http
                    .delete(format!("{}/remove", leader.url))
                    .json(&serde_json::json!({ "id": id }))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match removed {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        return Err(refuse(format!("the leader refused: {status} {text}")));
                    }
                    Err(e) => return Err(refuse(format!("the leader did not answer: {e}"))),
                }
            }
            ("lb", _) => {
                let (admin, host) = self.dns_admin_and_host(&proc)?;
                let others = state
                    .procs
                    .iter()
                    .filter(|p| p.role == "lb" && p.name != name && p.in_dns == Some(true))
                    .filter(|p| live.iter().any(|(n, _)| *n == p.name))
                    .count();
                if others == 0 {
                    return Err(refuse(format!(
                        "{name} is the last load balancer in the DNS answer: the site would go down"
                    )));
                }
                let removed = self
                    .http
                    .delete(format!("{admin}/hosts/www/{host}"))
                    .bearer_auth(self.lb_token())
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match removed {
                    Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        return Err(refuse(format!("DNS refused: {status} {text}")));
                    }
                    Err(e) => return Err(refuse(format!("DNS did not answer: {e}"))),
                }
                // Resolvers keep the old answer for its TTL; after that no
                // new visitor comes, and SIGTERM drains who is left.
                self.record(
                    "draining",
                    name,
                    format!("out of DNS; stopping after the answers' TTL ({} s)", DNS_TTL.as_secs()),
                );
                tokio::time::sleep(DNS_TTL + Duration::from_secs(1)).await;
            }
            (role, kind) => {
                return Err(refuse(format!(
                    "{name} is a {}: only web servers, read replicas and load balancers are removed here",
                    kind.unwrap_or(role)
                )))
            }
        }
        let mut members = self.members.lock().await;
        if let Some(i) = members.iter().position(|m| m.proc.name == name) {
            let m = members.remove(i);
            drop(members);
            m.proc.stop().await;
        }
        self.record("removed", name, "drained and stopped".into());
        Ok(())
    }

    /// Makes the DNS answer for the site hold exactly the lab's load
    /// balancers (after the DNS server restarted from its configured
    /// zone).
    async fn resync_dns(&self) -> Result<(), String> {
        let admin = self.dns_admin().ok_or("no DNS")?;
        let wanted: Vec<String> = self
            .members
            .lock()
            .await
            .iter()
            .filter(|m| m.proc.ready.role == "lb")
            .filter_map(|m| url_host(m.proc.url()))
            .collect();
        let token = self.lb_token();
        let hosts: serde_json::Value = self
            .http
            .get(format!("{admin}/hosts"))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let fqdn = format!("{}.", crate::SITE_NAME);
        let answered: Vec<String> = hosts["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["name"] == fqdn.as_str())
            .flat_map(|h| h["addrs"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["addr"].as_str().map(str::to_string))
            .collect();
        for addr in wanted.iter().filter(|a| !answered.contains(a)) {
            self.http
                .post(format!("{admin}/hosts/www"))
                .bearer_auth(&token)
                .json(&serde_json::json!({ "addr": addr }))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| e.to_string())?;
        }
        for addr in answered.iter().filter(|a| !wanted.contains(a)) {
            let _ = self
                .http
                .delete(format!("{admin}/hosts/www/{addr}"))
                .bearer_auth(&token)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
        }
        Ok(())
    }

    /// The DNS server's HTTP listener (records API, `/metrics`), when the
    /// stage has one.
    fn dns_admin(&self) -> Option<String> {
        self.admin.get("dns").map(|a| admin_base(a))
    }

    /// The DNS server's records API and the address `lb` is answered as.
    fn dns_admin_and_host(&self, lb: &ProcState) -> Result<(String, String), ControlError> {
        let admin = self.dns_admin().ok_or_else(|| {
            ControlError::Refused(
                "this stage has no DNS: load balancers come and go in stage 5".into(),
            )
        })?;
        let host = url_host(&lb.url).ok_or_else(|| {
            ControlError::Refused(format!("{}: no address in {}", lb.name, lb.url))
        })?;
        Ok((admin, host))
    }

    /// Scale out: starts a new web server (registered with every load
    /// balancer), read replica, or load balancer (entered into the DNS
    /// answer), like the ones running; its name.
    pub async fn add(&self, what: Add) -> Result<String, ControlError> {
        let _one = self.adding.lock().await;
        let refuse = |why: String| ControlError::Refused(why);
        let (template, names, first_db, lbs) = {
            let members = self.members.lock().await;
            let role = match what {
                Add::Web => "web",
                Add::Replica => "db",
                Add::Lb => "lb",
            };
            let template = members
                .iter()
                .rev()
                .find(|m| m.proc.ready.role == role)
                .map(|m| m.proc.spec())
                .ok_or_else(|| refuse(format!("this stage has no {role} to copy")))?;
            let names: Vec<String> = members.iter().map(|m| m.proc.name.clone()).collect();
            // Joined through the leader when one is known.
            let leader = self.state.borrow().leader.clone();
            let first_db = members
                .iter()
                .filter(|m| m.proc.ready.role == "db" && m.exit.is_none())
                .max_by_key(|m| Some(&m.proc.name) == leader.as_ref())
                .map(|m| m.proc.url().to_string());
            (template, names, first_db, lb_admins(&members))
        };
        // A load balancer sends to the web servers running now.
        let webs: Vec<(String, String)> = self
            .state()
            .procs
            .iter()
            .filter(|p| p.role == "web" && p.state != Running::Exited)
            .map(|p| (p.name.clone(), p.url.clone()))
            .collect();
        let (netns, _, args) = template;
        // A name is never given twice (the timeline would mix two
        // processes), nor one whose data directory is left from another.
        let used = self
            .used_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let next = |prefix: &str| {
            (1..)
                .map(|n| format!("{prefix}-{n}"))
                .find(|n| !names.contains(n) && !used.contains(n) && !self.dir.join(n).exists())
                .unwrap_or_default()
        };
        let (name, args) = match what {
            Add::Web => {
                if netns.is_some() {
                    return Err(refuse("web servers run in the lab's namespace only".into()));
                }
                let name = next("web");
                let listen = any_port(arg_of(&args, "--listen").unwrap_or("127.0.0.1:0"));
                let args = with_arg(with_arg(args, "--listen", &listen), "--name", &name);
                (name, args)
            }
            Add::Replica => {
                if netns.is_some() {
                    return Err(refuse(
                        "database nodes in namespaces get their addresses from the lab's plan; add replicas to a lab without partitions".into(),
                    ));
                }
                let name = next("db");
                let id = name.trim_start_matches("db-").to_string();
                let join =
                    first_db.ok_or_else(|| refuse("no database node runs to join".into()))?;
                let mut args = with_arg(args, "--id", &id);
                args = with_arg(
                    args.clone(),
                    "--http",
                    &any_port(arg_of(&args, "--http").unwrap_or("127.0.0.1:0")),
                );
                args = with_arg(
                    args.clone(),
                    "--raft",
                    &any_port(arg_of(&args, "--raft").unwrap_or("127.0.0.1:0")),
                );
                args = with_arg(args, "--data", &self.dir.join(&name).display().to_string());
                args = with_arg(args, "--join", &join);
                if !args.iter().any(|a| a == "--read-only") {
                    args.push("--read-only".into());
                }
                (name, args)
            }
            Add::Lb => {
                if !self.admin.contains_key("dns") {
                    return Err(refuse(
                        "this stage has no DNS to put a load balancer in: add one in stage 5"
                            .into(),
                    ));
                }
                if args.iter().any(|a| a == "--tls-cert") {
                    return Err(refuse(
                        "a new load balancer would need a certificate for its address: add load balancers to a lab without --tls".into(),
                    ));
                }
                let name = next("lb");
                // The next loopback address, on the port the others share
                // (DNS answers carry addresses, not ports).
                let listen = arg_of(&args, "--listen").unwrap_or("127.0.0.2:0");
                let port = listen.rsplit(':').next().unwrap_or("0").to_string();
                let used: Vec<String> = self
                    .state
                    .borrow()
                    .procs
                    .iter()
                    .filter(|p| p.role == "lb")
                    .filter_map(|p| url_host(&p.url))
                    .collect();
                let ip = (2..=254)
                    .map(|n| format!("127.0.0.{n}"))
                    .find(|ip| !used.contains(ip))
                    .ok_or_else(|| refuse("no loopback address left".into()))?;
                // The template's flags but its listeners and backends.
                let mut kept = Vec::new();
                let mut it = args.into_iter();
                while let Some(a) = it.next() {
                    if a == "--backend" {
                        it.next();
                    } else {
                        kept.push(a);
                    }
                }
                let mut args = with_arg(kept, "--listen", &format!("{ip}:{port}"));
                args = with_arg(
                    args.clone(),
                    "--admin",
                    &any_port(arg_of(&args, "--admin").unwrap_or("127.0.0.1:0")),
                );
                for (web, url) in &webs {
                    args.extend(["--backend".to_string(), format!("{url},name={web}")]);
                }
                (name, args)
            }
        };
        self.used_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone());
        let fresh = Proc::start(&name, &args)
            .await
            .map_err(|e| ControlError::Restart {
                name: name.clone(),
                reason: e.to_string(),
            })?;
        let url = fresh.url().to_string();
        self.members.lock().await.push(Member {
            proc: fresh,
            paused: false,
            exit: None,
            restarting: false,
        });
        if what == Add::Lb {
            let state = ProcState {
                name: name.clone(),
                role: "lb".into(),
                pid: None,
                url: url.clone(),
                state: Running::Up,
                exit: None,
                db: None,
                requests: None,
                rps: None,
                errors: None,
                p50_ms: None,
                p99_ms: None,
                ejected_by: Vec::new(),
                in_dns: None,
            };
            let entered = async {
                let (admin, host) = self.dns_admin_and_host(&state)?;
                let r = self
                    .http
                    .post(format!("{admin}/hosts/www"))
                    .bearer_auth(self.lb_token())
                    .json(&serde_json::json!({ "addr": host }))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .map_err(|e| ControlError::Refused(format!("DNS did not answer: {e}")))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    Err(ControlError::Refused(format!(
                        "DNS refused it: {status} {text}"
                    )))
                }
            };
            if let Err(e) = entered.await {
                // Not in the answer, it would take no visitor: undone.
                let mut members = self.members.lock().await;
                if let Some(i) = members.iter().position(|m| m.proc.name == name) {
                    let m = members.remove(i);
                    drop(members);
                    m.proc.stop().await;
                }
                self.record("control", &name, format!("not added: {e}"));
                return Err(e);
            }
        }
        if what == Add::Web {
            let token = self.lb_token();
            for admin in lbs {
                let added = self
                    .http
                    .post(format!("{admin}/backends"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "url": url, "name": name }))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match added {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        self.record(
                            "control",
                            &name,
                            format!("{admin} did not take it: {status} {text}"),
                        );
                    }
                    Err(e) => self.record("control", &name, format!("{admin} did not answer: {e}")),
                }
            }
        }
        self.record("added", &name, url);
        Ok(name)
    }

    /// Starts the dashboard's load on the site: `scaleout bench`'s links
    /// mix (clients that each create a link now and then and otherwise
    /// read the home page, which reads from the replicas), through the
    /// site's name in stage 5, until `stop_load` (or an hour).
    pub fn start_load(&self, shape: LoadShape) -> Result<(), ControlError> {
        shape.check().map_err(ControlError::Refused)?;
        let mut load = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if load.as_ref().is_some_and(|(_, stop)| !stop.is_cancelled()) {
            return Err(ControlError::Refused("the load is running already".into()));
        }
        let counts = Arc::new(LoadCounts {
            latency: std::sync::Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
            ),
            shape,
            ..Default::default()
        });
        let stop = CancellationToken::new();
        let (site, http) = self.site_client(Duration::from_secs(15))?;
        let config = crate::bench::BenchConfig {
            url: site.clone(),
            method: reqwest::Method::GET,
            body: None,
            headers: Vec::new(),
            connections: shape.connections,
            rate: shape.rate,
            duration: Duration::from_secs(3600),
            requests: None,
            timeout: Duration::from_secs(15),
            mix: Some(crate::bench::LinksMix {
                write_every: shape.write_every,
            }),
            client: Some(http),
        };
        let observer: Arc<dyn crate::bench::Observe> = counts.clone();
        let progress = Arc::new(crate::bench::Progress::default());
        tokio::spawn(crate::bench::run_observed(
            config,
            progress,
            stop.clone(),
            Some(observer),
        ));
        *load = Some((counts, stop));
        let pace = match shape.rate {
            Some(r) => format!("{r}/s over {} clients", shape.connections),
            None => format!("{} clients", shape.connections),
        };
        self.record(
            "control",
            "load",
            format!(
                "{pace} on {site}: reads, and a create in every {}",
                shape.write_every
            ),
        );
        Ok(())
    }

    fn scenario_report(&self) -> Option<ScenarioReport> {
        self.scenario
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_scenario(&self, report: &ScenarioReport) {
        *self
            .scenario
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report.clone());
    }

    /// A scenario under the dashboard's load (started for it if none
    /// runs): a baseline, then the fault or the addition; how long until
    /// the lab saw it, until traffic had moved (and, for the leader, until
    /// another was elected and creates were acknowledged again); the
    /// errors the load saw; and every create acknowledged during the run
    /// looked for afterwards through the site (none may be lost).
    pub async fn run_scenario(self: Arc<Self>, scenario: Scenario) {
        use std::sync::atomic::Ordering::Relaxed;
        let name = scenario.name();
        let mut report = ScenarioReport {
            name: name.into(),
            ..Default::default()
        };
        let started_load = self.start_load(LoadShape::default()).is_ok();
        let counts = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(c, _)| c.clone());
        let finish = |lab: &Lab, mut report: ScenarioReport, error: Option<String>| {
            report.error = error;
            report.done = true;
            lab.set_scenario(&report);
            lab.record("scenario", name, report.summary());
            if started_load {
                let _ = lab.stop_load();
            }
        };
        let Some(counts) = counts else {
            return finish(&self, report, Some("no load".into()));
        };
        // A baseline under load first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = self.state();
        let old_leader = before.leader.clone();
        let victim = |role: &str, kind: Option<&str>| {
            before
                .procs
                .iter()
                .filter(|p| p.role == role && p.state == Running::Up)
                .find(|p| kind.is_none_or(|k| p.db.as_ref().is_some_and(|d| d.kind == k)))
                .map(|p| p.name.clone())
        };
        let target = match scenario {
            Scenario::KillLeader | Scenario::PartitionLeader => old_leader.clone(),
            Scenario::KillWeb => victim("web", None),
            Scenario::KillReplica => victim("db", Some("replica")),
            Scenario::KillLb => {
                if self.by_name.is_none() {
                    return finish(
                        &self,
                        report,
                        Some("killing a load balancer shows in stage 5, where DNS moves visitors to another; here the site would just go down".into()),
                    );
                }
                let serving: Vec<&ProcState> = before
                    .procs
                    .iter()
                    .filter(|p| p.role == "lb" && p.state == Running::Up && p.in_dns == Some(true))
                    .collect();
                if serving.len() < 2 {
                    return finish(
                        &self,
                        report,
                        Some("killing a load balancer needs another one up and in the DNS answer to take its visitors".into()),
                    );
                }
                serving.first().map(|p| p.name.clone())
            }
            Scenario::AddWeb | Scenario::AddReplica => None,
        };
        let errors_before = counts.errors.load(Relaxed);
        let served_before = counts.ok.load(Relaxed);
        let t0 = now_ms();
        let target = match (scenario, target) {
            (Scenario::AddWeb | Scenario::AddReplica, _) => {
                let what = if scenario == Scenario::AddWeb {
                    Add::Web
                } else {
                    Add::Replica
                };
                match self.add(what).await {
                    Ok(added) => {
                        report.added = Some(added.clone());
                        added
                    }
                    Err(e) => return finish(&self, report, Some(e.to_string())),
                }
            }
            (_, None) => {
                return finish(
                    &self,
                    report,
                    Some("this stage has nothing of that kind to kill".into()),
                )
            }
            (Scenario::PartitionLeader, Some(target)) => {
                if let Err(e) = self.partition(Some(&target)) {
                    return finish(&self, report, Some(e));
                }
                self.record(
                    "partition",
                    &target,
                    "cut off from the other database nodes (the web tier still reaches it)".into(),
                );
                report.cut_off = Some(target.clone());
                target
            }
            (_, Some(target)) => {
                if let Err(e) = self.control(&target, Control::Kill).await {
                    return finish(&self, report, Some(e.to_string()));
                }
                report.killed = Some(target.clone());
                target
            }
        };
        let mut states = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let since = |at: u64| at.saturating_sub(t0);
        loop {
            let state = states.borrow_and_update().clone();
            let proc = state.procs.iter().find(|p| p.name == target);
            match scenario {
                Scenario::KillLeader | Scenario::PartitionLeader => {
                    if report.detected_ms.is_none() && state.leader != old_leader {
                        report.detected_ms = Some(since(now_ms()));
                    }
                    if let Some(new) = state
                        .leader
                        .clone()
                        .filter(|l| Some(l) != old_leader.as_ref())
                    {
                        if report.elected_ms.is_none() {
                            report.elected_ms = Some(since(now_ms()));
                            report.new_leader = Some(new);
                        }
                        let last_write = counts.last_write_ok_ms.load(Relaxed);
                        if last_write > t0 + report.elected_ms.unwrap_or(0) {
                            report.writes_resumed_ms = Some(last_write - t0);
                        }
                    }
                }
                Scenario::KillWeb | Scenario::KillReplica => {
                    if report.detected_ms.is_none() && proc.is_none_or(|p| p.state != Running::Up) {
                        report.detected_ms = Some(since(now_ms()));
                    }
                }
                // Seen when DNS leaves it out of the answer.
                Scenario::KillLb => {
                    if report.detected_ms.is_none() && proc.is_none_or(|p| p.in_dns == Some(false))
                    {
                        report.detected_ms = Some(since(now_ms()));
                    }
                }
                Scenario::AddWeb | Scenario::AddReplica => {
                    if report.detected_ms.is_none() && proc.is_some_and(|p| p.state == Running::Up)
                    {
                        report.detected_ms = Some(since(now_ms()));
                    }
                    // A replica counts the requests it serves; the joining
                    // node's own requests do not show there.
                    if report.traffic_moved_ms.is_none()
                        && proc.and_then(|p| p.requests).is_some_and(|n| n > 0)
                    {
                        report.traffic_moved_ms = Some(since(now_ms()));
                    }
                }
            }
            let ended = match scenario {
                Scenario::KillLeader | Scenario::PartitionLeader => {
                    report.writes_resumed_ms.is_some()
                }
                // Errors, if any, have had time to stop.
                Scenario::KillWeb | Scenario::KillReplica | Scenario::KillLb => report
                    .detected_ms
                    .is_some_and(|d| since(now_ms()) > d + 4_000),
                Scenario::AddWeb | Scenario::AddReplica => report.traffic_moved_ms.is_some(),
            };
            self.set_scenario(&report);
            if ended || tokio::time::Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), states.changed()).await;
        }
        // The load goes on a little after, then stops (if it was ours).
        tokio::time::sleep(Duration::from_secs(2)).await;
        if scenario == Scenario::PartitionLeader {
            // Healed under load: the old leader must follow, not disturb.
            match self.partition(None) {
                Ok(()) => {
                    report.healed_ms = Some(since(now_ms()));
                    self.record("healed", &target, "the partition is healed".into());
                }
                Err(e) => self.record("control", &target, format!("healing failed: {e}")),
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        report.errors = counts.errors.load(Relaxed) - errors_before;
        report.served = counts.ok.load(Relaxed) - served_before;
        if matches!(
            scenario,
            Scenario::KillWeb | Scenario::KillReplica | Scenario::KillLb
        ) {
            let last_error = counts.last_error_ms.load(Relaxed);
            report.traffic_moved_ms = Some(last_error.saturating_sub(t0));
        }
        if started_load {
            let _ = self.stop_load();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let created = counts
            .created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        report.acknowledged_writes = created.len() as u64;
        let (site, http) = match self.site_client(Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => return finish(&self, report, Some(e.to_string())),
        };
        // Read back, 16 at a time, within a minute in all: a link the site
        // says it does not have (404) is lost; one it did not answer for
        // is unverified, not lost.
        use futures_util::StreamExt;
        // A replica a moment behind may not have it yet: a 404 is asked
        // again once, a second later.
        let urls: Vec<String> = created.iter().map(|at| format!("{site}{at}")).collect();
        let looks = futures_util::stream::iter(urls)
            .map(|url| {
                let http = http.clone();
                async move {
                    for attempt in 0..2 {
                        let answer = http.get(&url).timeout(Duration::from_secs(5)).send().await;
                        match answer {
                            Ok(r) if r.status().is_success() => return ReadBack::Found,
                            Ok(r) if r.status() == StatusCode::NOT_FOUND && attempt == 0 => {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            Ok(r) if r.status() == StatusCode::NOT_FOUND => return ReadBack::Lost,
                            _ => return ReadBack::NoAnswer,
                        }
                    }
                    ReadBack::NoAnswer
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<ReadBack>>();
        let looks = tokio::time::timeout(READ_BACK_PATIENCE, looks)
            .await
            .unwrap_or_default();
        report.lost_writes = looks.iter().filter(|l| **l == ReadBack::Lost).count() as u64;
        let found = looks.iter().filter(|l| **l == ReadBack::Found).count() as u64;
        report.unverified_writes = report.acknowledged_writes - found - report.lost_writes;
        let error = match scenario {
            Scenario::KillLeader | Scenario::PartitionLeader => report
                .writes_resumed_ms
                .is_none()
                .then(|| "writes did not resume within 30 s".to_string()),
            Scenario::KillWeb | Scenario::KillReplica => report
                .detected_ms
                .is_none()
                .then(|| format!("the lab did not see {target} go within 30 s")),
            Scenario::KillLb => report
                .detected_ms
                .is_none()
                .then(|| format!("DNS did not leave {target} out within 30 s")),
            Scenario::AddWeb | Scenario::AddReplica => report
                .traffic_moved_ms
                .is_none()
                .then(|| format!("{target} served no request within 30 s")),
        }
        .or_else(|| {
            (report.unverified_writes > 0).then(|| {
                format!(
                    "{} acknowledged writes could not be read back: the site did not answer",
                    report.unverified_writes
                )
            })
        });
        finish(&self, report, error);
    }

    /// Stops the dashboard's load (its figures stay on the page).
    pub fn stop_load(&self) -> Result<(), ControlError> {
        let load = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match load.as_ref() {
            Some((_, stop)) if !stop.is_cancelled() => {
                stop.cancel();
                self.record("control", "load", "stopped".into());
                Ok(())
            }
            _ => Err(ControlError::Refused("no load is running".into())),
        }
    }

    fn load_view(&self) -> Option<LoadView> {
        use std::sync::atomic::Ordering::Relaxed;
        let load = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (counts, stop) = load.as_ref()?;
        let ok = counts.ok.load(Relaxed);
        let errors = counts.errors.load(Relaxed);
        let mut seen = self
            .load_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let rps = match seen.1 {
            Some(at) if now > at => {
                (ok + errors).saturating_sub(seen.0) as f64 / (now - at).as_secs_f64()
            }
            _ => 0.0,
        };
        *seen = (ok + errors, Some(now));
        let ms = |v: u64| (v > 0).then_some(v);
        let (p50_ms, p99_ms) = {
            let mut latency = counts
                .latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match latency.as_mut() {
                Some(h) if !h.is_empty() => {
                    let at = |q: f64| (h.value_at_quantile(q) as f64 / 10.0).round() / 100.0;
                    let figures = (Some(at(0.5)), Some(at(0.99)));
                    h.reset();
                    figures
                }
                _ => (None, None),
            }
        };
        Some(LoadView {
            running: !stop.is_cancelled(),
            ok,
            errors,
            rps: (rps * 10.0).round() / 10.0,
            p50_ms,
            p99_ms,
            shape: counts.shape,
            first_error_ms: ms(counts.first_error_ms.load(Relaxed)),
            last_error_ms: ms(counts.last_error_ms.load(Relaxed)),
        })
    }

    /// Restarts are not done under the processes' lock.
    fn restart_error(&self, name: &str) -> Result<(), ControlError> {
        Err(ControlError::Refused(format!(
            "{name}: a restart goes through Lab::restart"
        )))
    }

    /// Kills `name` if it runs and starts it again with the same
    /// arguments. The processes' lock is not held while the new one
    /// starts (up to a minute): the watcher and other controls go on.
    async fn restart(&self, name: &str) -> Result<(), ControlError> {
        let (netns, proc_name, args) = {
            let mut members = self.members.lock().await;
            let m = members
                .iter_mut()
                .find(|m| m.proc.name == name)
                .ok_or_else(|| ControlError::NoSuchProcess(name.into()))?;
            if m.restarting {
                return Err(ControlError::Refused(format!("{name} is restarting")));
            }
            m.restarting = true;
            if m.paused {
                m.proc.signal(Signal::SIGCONT);
            }
            m.proc.kill_now().await;
            m.proc.spec()
        };
        let started = Proc::start_in(netns.as_deref(), &proc_name, &args).await;
        let mut members = self.members.lock().await;
        let m = members
            .iter_mut()
            .find(|m| m.proc.name == name)
            .ok_or_else(|| ControlError::NoSuchProcess(name.into()))?;
        m.restarting = false;
        match started {
            Ok(fresh) => {
                m.proc = fresh;
                m.paused = false;
                m.exit = None;
                let pid = m.proc.pid().map_or("?".into(), |p| p.to_string());
                self.record("restarted", name, format!("pid {pid}"));
                let role = m.proc.ready.role.clone();
                drop(members);
                if role == "dns" {
                    // It starts again from its configured zone: the load
                    // balancers added or removed since are put right.
                    if let Err(e) = self.resync_dns().await {
                        self.record(
                            "control",
                            name,
                            format!("could not restore the answer: {e}"),
                        );
                    }
                }
                Ok(())
            }
            Err(e) => Err(ControlError::Restart {
                name: name.into(),
                reason: e.to_string(),
            }),
        }
    }

    /// Stops every process, last started first (and the load first).
    pub async fn stop_all(&self) {
        let _ = self.stop_load();
        let members = std::mem::take(&mut *self.members.lock().await);
        for m in members.into_iter().rev() {
            if m.paused {
                m.proc.signal(Signal::SIGCONT);
            }
            m.proc.stop().await;
        }
    }
}

/// The dashboard and its API on `listener` until `shutdown`.
pub async fn serve(
    lab: Arc<Lab>,
    listener: TcpListener,
    token: String,
    shutdown: CancellationToken,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let host = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let hosts = vec![
        host.clone(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
    ];
    let api = Api {
        lab,
        host,
        hosts: Arc::new(hosts),
        token: Arc::new(token),
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/api/state", get(api_state))
        .route("/api/timeline", get(api_timeline))
        .route("/api/events", get(api_events))
        .route("/api/procs/{name}/{control}", post(api_control))
        .route("/api/add/{what}", post(api_add))
        .route("/api/load/{what}", post(api_load))
        .route("/api/scenario/{name}", post(api_scenario))
        .route("/api/remove/{name}", post(api_remove))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such page".into()) })
        .method_not_allowed_fallback(|| async {
            refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
        })
        .layer(axum::middleware::from_fn_with_state(api.clone(), admit))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn(errors_as_json))
        .with_state(api);
    // Bounded like every server here: a head timeout, a connection cap
    // (each open page holds one for its events), and a short drain, since
    // an events stream never ends by itself.
    let limits = scaleout_serve::Limits {
        header_timeout: Duration::from_secs(10),
        max_connections: MAX_CONNECTIONS,
        drain: Duration::from_secs(1),
    };
    let served = scaleout_serve::serve(listener, app, limits, Arc::default(), None, shutdown).await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the dashboard stopped");
    }
}

/// Every refusal is JSON, also those axum's extractors write as text (a
/// path that is not UTF-8, a body over the limit).
async fn errors_as_json(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_string()
    } else {
        text
    };
    refuse(status, text)
}

#[derive(Clone)]
struct Api {
    lab: Arc<Lab>,
    /// This listener's `host:port`.
    host: String,
    /// The `Host` values a request may carry: this listener's own names
    /// (a rebound DNS name is refused).
    hosts: Arc<Vec<String>>,
    /// The lab's token: in the URL `scaleout up` prints (and in
    /// `DATA/lab-url`, mode 0600), then in a cookie.
    token: Arc<String>,
    shutdown: CancellationToken,
}

const PAGE: &str = include_str!("dashboard.html");

/// The cookie a browser keeps the lab's token in.
const COOKIE: &str = "scaleout_lab";

/// Every request: its `Host` must be this listener's; it must carry the
/// lab's token (`Authorization: Bearer`, or the cookie `GET /?token=`
/// sets and redirects from); every answer forbids framing. Loopback is
/// open to every user of the machine, so the token is what keeps the
/// controls to the person who started the lab.
async fn admit(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host_ok = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|h| api.hosts.iter().any(|ok| ok.eq_ignore_ascii_case(h)));
    let mut answer = if !host_ok {
        refuse(
            StatusCode::FORBIDDEN,
            format!("ask for this lab as http://{}/", api.host),
        )
    } else if let Some(given) = req
        .uri()
        .query()
        .and_then(|q| url_token(q))
        .filter(|_| req.uri().path() == "/")
    {
        if given == api.token.as_str() {
            // The token leaves the address bar for a cookie no other site
            // sends (SameSite=Strict) and no script reads.
            let cookie = format!("{COOKIE}={given}; Path=/; HttpOnly; SameSite=Strict");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, cookie),
                    (header::LOCATION, "/".to_string()),
                ],
            )
                .into_response()
        } else {
            refuse(
                StatusCode::UNAUTHORIZED,
                "that is not this lab's token".into(),
            )
        }
    } else if carries_token(req.headers(), &api.token) {
        next.run(req).await
    } else {
        refuse(
            StatusCode::UNAUTHORIZED,
            "open the dashboard URL `scaleout up` printed (it holds the lab's token), or send Authorization: Bearer TOKEN (from DATA/lab-url)".into(),
        )
    };
    let headers = answer.headers_mut();
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    answer
}

/// `token=...` in a query string.
fn url_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// Whether the request carries `token`, as a bearer token or the cookie
/// (compared in constant time).
fn carries_token(headers: &HeaderMap, token: &str) -> bool {
    let same = |given: &str| {
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim()));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| {
            kv.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_string)
        })
        .any(|t| same(&t));
    bearer || cookie
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn api_state(State(api): State<Api>) -> Json<LabState> {
    Json(api.lab.state())
}

async fn api_timeline(State(api): State<Api>) -> Json<Vec<Event>> {
    Json(api.lab.timeline())
}

fn refuse(status: StatusCode, error: String) -> Response {
    (status, Json(serde_json::json!({ "error": error }))).into_response()
}

async fn api_control(
    State(api): State<Api>,
    Path((name, control)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unless_json(&headers) {
        return refused;
    }
    let control: Control = match control.parse() {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    match api.lab.control(&name, control).await {
        Ok(()) => {
            Json(serde_json::json!({ "done": control_name(control), "name": name })).into_response()
        }
        Err(e @ ControlError::NoSuchProcess(_)) => refuse(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ControlError::Refused(_)) => refuse(StatusCode::CONFLICT, e.to_string()),
        Err(e @ ControlError::Restart { .. }) => {
            refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn api_add(State(api): State<Api>, Path(what): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = unless_json(&headers) {
        return refused;
    }
    let what: Add = match what.parse() {
        Ok(w) => w,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    match api.lab.add(what).await {
        Ok(name) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "added": name })),
        )
            .into_response(),
        Err(e @ ControlError::Refused(_)) => refuse(StatusCode::CONFLICT, e.to_string()),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn api_load(
    State(api): State<Api>,
    Path(what): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = unless_json(&headers) {
        return refused;
    }
    let done = match what.as_str() {
        "start" => match serde_json::from_slice::<LoadShape>(&body) {
            Ok(shape) => match shape.check() {
                Ok(()) => api.lab.start_load(shape),
                Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("the load's shape: {e}")),
            },
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("the load's shape: {e} (give connections, rate, write_every, or {{}})"),
                )
            }
        },
        "stop" => api.lab.stop_load(),
        other => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("{other:?}: load start or stop"),
            )
        }
    };
    match done {
        Ok(()) => Json(serde_json::json!({ "load": what })).into_response(),
        Err(e) => refuse(StatusCode::CONFLICT, e.to_string()),
    }
}

/// The host of `scheme://host:port` (or `host:port`).
fn url_host(url: &str) -> Option<String> {
    url.split("://")
        .last()?
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
}

/// An admin listener's base URL (it is given as a URL or as
/// `host:port`), without a trailing `/`.
fn admin_base(admin: &str) -> String {
    if admin.starts_with("http") {
        admin.trim_end_matches('/').to_string()
    } else {
        format!("http://{admin}")
    }
}

/// The load balancers' admin API base URLs (no trailing `/`).
fn lb_admins(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.proc.ready.role == "lb")
        .filter_map(|m| m.proc.ready.admin.as_deref())
        .map(admin_base)
        .collect()
}

/// Scale in: drains and removes a web server or read replica.
async fn api_remove(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unless_json(&headers) {
        return refused;
    }
    match api.lab.remove(&name).await {
        Ok(()) => Json(serde_json::json!({ "removed": name })).into_response(),
        Err(ControlError::NoSuchProcess(n)) => refuse(
            StatusCode::NOT_FOUND,
            format!("no process named {n:?} in this lab"),
        ),
        Err(e) => refuse(StatusCode::CONFLICT, e.to_string()),
    }
}

/// Runs a scenario (one at a time) in the background; its report grows
/// in the state.
async fn api_scenario(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unless_json(&headers) {
        return refused;
    }
    let scenario: Scenario = match name.parse() {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    {
        // One at a time: looked at and taken under one lock.
        let mut current = api
            .lab
            .scenario
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.as_ref().is_some_and(|r| !r.done) {
            return refuse(StatusCode::CONFLICT, "a scenario is running".into());
        }
        *current = Some(ScenarioReport {
            name: name.clone(),
            ..Default::default()
        });
    }
    tokio::spawn(api.lab.clone().run_scenario(scenario));
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "scenario": name })),
    )
        .into_response()
}

/// Controls are POSTs with a JSON body: a cross-site form cannot send
/// that content type without a preflight this server never answers. The
/// refusal of a control without one.
fn unless_json(headers: &HeaderMap) -> Option<Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    (!json).then(|| {
        refuse(
            StatusCode::FORBIDDEN,
            "controls take Content-Type: application/json (no cross-site forms)".into(),
        )
    })
}

fn control_name(c: Control) -> &'static str {
    match c {
        Control::Kill => "kill",
        Control::Stop => "stop",
        Control::Pause => "pause",
        Control::Resume => "resume",
        Control::Restart => "restart",
    }
}

/// Server-sent events: the state now and whenever it changes (`state`),
/// and each timeline event as it happens (`event`).
async fn api_events(State(api): State<Api>) -> impl IntoResponse {
    let states = api.lab.state.subscribe();
    let events = api.lab.events.subscribe();
    let shutdown = api.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (states, events, true),
        move |(mut states, mut events, first)| {
            let shutdown = shutdown.clone();
            async move {
                if first {
                    let now = states.borrow_and_update().clone();
                    return Some((sse("state", &now), (states, events, false)));
                }
                tokio::select! {
                    // The lab stops: so does every stream.
                    () = shutdown.cancelled() => None,
                    changed = states.changed() => {
                        changed.ok()?;
                        let now = states.borrow_and_update().clone();
                        Some((sse("state", &now), (states, events, false)))
                    }
                    event = events.recv() => match event {
                        Ok(e) => Some((sse("event", &e), (states, events, false))),
                        // A slow reader missed some: the timeline has them.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let now = states.borrow_and_update().clone();
                            Some((sse("state", &now), (states, events, false)))
                        }
                        Err(broadcast::error::RecvError::Closed) => None,
                    },
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn sse<T: Serialize>(name: &str, value: &T) -> Result<SseEvent, std::convert::Infallible> {
    Ok(SseEvent::default().event(name).data(
        serde_json::to_string(value)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_their_labels() {
        let text = "# HELP scaleout_db_requests_total x\n# TYPE scaleout_db_requests_total counter\nscaleout_db_requests_total{kind=\"write\"} 3\nscaleout_db_requests_total{kind=\"read\"} 4.0\nscaleout_db_requests_total_other 99\nscaleout_db_request_errors_total{kind=\"read\"} 1\n";
        assert_eq!(counter_sum(text, "scaleout_db_requests_total"), Some(7));
        assert_eq!(
            counter_sum(text, "scaleout_db_request_errors_total"),
            Some(1)
        );
        assert_eq!(counter_sum("plain 5\n", "plain"), Some(5));
        assert_eq!(counter_sum(text, "absent"), None);
        assert_eq!(counter_sum("x{a=\"}\n", "x"), None);
    }
}
