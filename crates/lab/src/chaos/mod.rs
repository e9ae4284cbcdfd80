//! `scaleout chaos`: stage 4's processes under a seeded schedule of faults
//! while clients create and read links through the load balancer; every
//! operation goes into a history, and a checker reads the history and
//! every database node's final data.
//!
//! Faults, one at a time: SIGKILL of the database leader or of any
//! database node (restarted a little later on the same ports and data),
//! SIGSTOP of a database node (SIGCONT later), SIGKILL of a web server
//! (restarted), and network partitions between database nodes (each node
//! in its own network namespace, links cut by blackhole routes: the
//! leader cut off, any node cut off, one link cut).
//!
//! Beside the link clients, register clients ([`registers`]) check
//! linearizability on the data API, and hostile clients ([`hostile`])
//! send what careless or malicious clients send — transaction control in
//! any spelling, `RAISE` in triggers, non-deterministic functions,
//! runaway queries, `ATTACH` — so faults and hostile SQL are checked
//! together.
//!
//! What the checker proves, from the history and the final data of every
//! node: no acknowledged create is lost; nothing appears that was never
//! requested; nothing appears twice (each create has its own URL, so a
//! replayed write would show as a duplicate); all nodes hold identical
//! data; every read of a client's own acknowledged link, carrying the
//! client's read-your-writes cookie, finds it; every `linearizable` or
//! `strong` count of a client's own links lies between the creates
//! acknowledged before the read was sent and those sent before it
//! completed (linearizability for a grow-only set per client); every
//! hostile client's acknowledged ledger row is on every node and no
//! refused one on any; no file appeared where `ATTACH` pointed. It also
//! measures, per fault, how long creates and reads were unavailable.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use scaleout_wire::data::Results;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::netns::Net;
use crate::procs::Proc;
use crate::{plan, start_topology, Error};
use hostile::Rng;

pub mod hostile;
mod reach;
mod registers;
pub use reach::Reach;

#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Seeds the fault schedule and the clients' choices.
    pub seed: u64,
    pub duration: Duration,
    pub clients: usize,
    /// Register clients (straight on the data API; linearizability).
    pub registers: usize,
    /// Clients sending hostile SQL to the data API (see [`hostile`]).
    pub hostile: usize,
    /// Time between faults.
    pub fault_every: Duration,
    pub data_dir: PathBuf,
    /// Where the history is written (JSON lines).
    pub history: PathBuf,
    /// Fault kinds to inject in this order, cycling; empty: drawn from the
    /// seed. Kinds: `FAULT_KINDS`.
    pub faults: Vec<String>,
    /// Run the database nodes in network namespaces (needed for
    /// partitions; skipped, with a note, where they cannot be made).
    pub netns: bool,
    /// Run against a Compose deployment instead of child processes.
    pub on_compose: Option<OnCompose>,
}

/// `scaleout chaos --on compose`: the deployment and its image.
#[derive(Debug, Clone)]
pub struct OnCompose {
    /// `deploy/compose/compose.yaml`.
    pub file: PathBuf,
    /// The image its services run (`scripts/image.sh` builds it).
    pub image: String,
}

/// How many registers the register clients share.
const REGISTER_KEYS: i64 = 4;

/// The kinds of fault `inject` knows.
pub const FAULT_KINDS: [&str; 7] = [
    "kill-leader",
    "kill-db",
    "pause-db",
    "kill-web",
    "partition-leader",
    "partition-node",
    "partition-link",
];

/// Faults that need the database nodes in network namespaces.
fn is_partition(kind: &str) -> bool {
    kind.starts_with("partition")
}

/// One operation as the history records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Op {
    pub client: usize,
    /// `create` or `read`.
    pub kind: &'static str,
    /// The URL created or the code read.
    pub key: String,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    /// `ok`, `fail` (certainly not done) or `unknown`.
    pub outcome: &'static str,
    pub detail: String,
    /// A `count`: the number of its own links the client's linearizable
    /// read saw, and what linearizability allows — at least the creates
    /// acknowledged before the read was sent, at most those sent before it
    /// completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<Count>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Count {
    pub seen: u64,
    pub at_least: u64,
    pub at_most: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Fault {
    pub kind: String,
    pub target: String,
    pub at_ms: u64,
    pub healed_ms: u64,
    /// The longest time, from the fault until a few seconds after it was
    /// healed, in which no create (read) succeeded; `None`: none succeeded
    /// after the fault was healed.
    pub creates_down_ms: Option<u64>,
    pub reads_down_ms: Option<u64>,
}

/// How long after a fault is healed its effects are still measured.
const AFTERMATH_MS: u64 = 5_000;

/// The availability every fault is held to (the product's failover
/// target: writes back within 2 s of losing the leader, at worst). From
/// the database's default 500 ms election timeout: a follower stands
/// 1.5-2x that after the last heartbeat (openraft waits out a leader
/// lease of the timeout first), then an election and a commit, and the
/// web tier's clients find the new leader within 100 ms.
pub const BOUND_MS: u64 = 2_000;

impl Fault {
    /// Whether creates or reads stayed down longer than `BOUND_MS`.
    pub fn over_bound(&self) -> bool {
        [self.creates_down_ms, self.reads_down_ms]
            .iter()
            .any(|d| d.is_none_or(|ms| ms > BOUND_MS))
    }
}

/// The longest stretch in `[from, to]` without a completion in `done`
/// (sorted), counted from `from`; `None` if nothing completed after
/// `healed`.
fn longest_outage(done: &[u64], from: u64, healed: u64, to: u64) -> Option<u64> {
    let inside: Vec<u64> = done
        .iter()
        .copied()
        .filter(|t| *t > from && *t <= to)
        .collect();
    if !inside.iter().any(|t| *t >= healed) {
        return None;
    }
    std::iter::once(from)
        .chain(inside.iter().copied())
        .zip(inside.iter().copied())
        .map(|(a, b)| b - a)
        .max()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub operations: usize,
    pub creates_ok: usize,
    pub creates_unknown: usize,
    pub reads_ok: usize,
    /// `linearizable`/`strong` counts answered (each checked).
    pub counts_ok: usize,
    /// Register operations, and those the linearizability search placed.
    pub register_ops: usize,
    pub register_checked: usize,
    /// Hostile requests sent, and their ledger rows acknowledged (each
    /// checked on every node).
    pub hostile_ops: usize,
    pub hostile_acknowledged: usize,
    /// What the checker could not decide (not violations).
    pub undecided: Vec<String>,
    pub faults: Vec<Fault>,
    pub violations: Vec<String>,
    pub history: PathBuf,
}

impl Report {
    pub fn print(&self) {
        println!(
            "chaos seed {}: {} operations ({} creates acknowledged, {} unknown, {} reads ok, {} linearizable counts), {} faults, {} violations",
            self.seed,
            self.operations,
            self.creates_ok,
            self.creates_unknown,
            self.reads_ok,
            self.counts_ok,
            self.faults.len(),
            self.violations.len()
        );
        println!(
            "  registers: {} operations, {} checked for linearizability",
            self.register_ops, self.register_checked
        );
        println!(
            "  hostile SQL: {} requests, {} ledger rows acknowledged (each checked on every node)",
            self.hostile_ops, self.hostile_acknowledged
        );
        for f in &self.faults {
            println!(
                "  {:>7} ms {:<16} {:<9} creates down {}, reads down {}{}",
                f.at_ms,
                f.kind,
                f.target,
                f.creates_down_ms.map_or("-".into(), |m| format!("{m} ms")),
                f.reads_down_ms.map_or("-".into(), |m| format!("{m} ms")),
                if f.over_bound() {
                    "  (over the bound)"
                } else {
                    ""
                },
            );
        }
        println!(
            "  bound: creates and reads back within {} ms of any fault (from the database's 500 ms election timeout); {} of {} faults over it",
            BOUND_MS,
            self.faults.iter().filter(|f| f.over_bound()).count(),
            self.faults.len()
        );
        let mut by_kind: BTreeMap<&str, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
        for f in &self.faults {
            let k = by_kind.entry(f.kind.as_str()).or_default();
            k.0.push(f.creates_down_ms.unwrap_or(u64::MAX));
            k.1.push(f.reads_down_ms.unwrap_or(u64::MAX));
        }
        let ms = |v: u64| {
            if v == u64::MAX {
                "never".to_string()
            } else {
                format!("{v} ms")
            }
        };
        for (kind, (mut creates, mut reads)) in by_kind {
            creates.sort_unstable();
            reads.sort_unstable();
            let n = creates.len();
            println!(
                "  worst after {kind} (x{n}): creates down {}, reads down {}; median creates down {}, reads down {}",
                ms(creates[n - 1]),
                ms(reads[n - 1]),
                ms(creates[(n - 1) / 2]),
                ms(reads[(n - 1) / 2])
            );
        }
        for u in &self.undecided {
            println!("  undecided: {u}");
        }
        for v in &self.violations {
            println!("  VIOLATION: {v}");
        }
        println!("  history: {}", self.history.display());
    }
}

/// A free loopback port, for a process that must keep it across restarts.
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or_else(|_| "127.0.0.1:0".into(), |a| a.to_string())
}

type History = Arc<Mutex<Vec<Op>>>;

/// The database's default write budget (`scaleout db --write-budget`).
fn scaleout_db_budget() -> u64 {
    100_000_000
}

/// Runs the schedule, checks, and returns the report (violations inside).
pub async fn run(config: ChaosConfig, shutdown: CancellationToken) -> Result<Report, Error> {
    if let Some(on) = config.on_compose.clone() {
        return run_on_compose(&config, &on, shutdown).await;
    }
    let mut plan = plan(4);
    // The hostile workload's runaway writes hold every write for their
    // budget: a tenth of the default, so that they stay a nuisance and not
    // an outage (the default is about 1 s of a release build's steps).
    plan.db_args = vec![
        "--write-budget".into(),
        (scaleout_db_budget() / 10).to_string(),
    ];
    let dir = config.data_dir.join("chaos");
    let _ = std::fs::remove_dir_all(&dir);
    let site = free_port();
    let mut port = free_port;
    let mut procs = Vec::new();
    let mut net = None;
    if config.netns {
        match Net::create((plan.voters + plan.replicas) as usize) {
            Ok(n) => net = Some(n),
            Err(e) => println!("chaos: partitions skipped: no network namespaces here ({e})"),
        }
    }
    let started = start_topology(&plan, &site, &mut port, &dir, &mut procs, net.as_ref()).await;
    if let Err(e) = started {
        stop_all(procs).await;
        return Err(e);
    }
    let mut servers = Servers::Local { procs, net };
    let outcome = exercise(&config, &mut servers, &site, &Reach::local(), shutdown).await;
    if let Servers::Local { procs, net } = servers {
        stop_all(procs).await;
        drop(net);
    }
    outcome
}

/// The same workloads, faults and checker against stage 5 as Compose
/// services, brought up for the run and taken down after it (containers,
/// networks and volumes).
async fn run_on_compose(
    config: &ChaosConfig,
    on: &OnCompose,
    shutdown: CancellationToken,
) -> Result<Report, Error> {
    let failed = |reason: String| Error::Spawn {
        name: "chaos --on compose".into(),
        reason,
    };
    let program = crate::compose::available().map_err(failed)?;
    let pid = std::process::id();
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port().to_string())
            .map_err(|e| failed(e.to_string()))
    };
    let (lb1, lb2, dns) = (port()?, port()?, port()?);
    let secret: String = (0..4)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect();
    let env = [
        ("SCALEOUT_IMAGE", on.image.clone()),
        ("SCALEOUT_CLUSTER_SECRET", secret),
        // Away from the lab's namespaces (10.200-249).
        ("SCALEOUT_FRONT", format!("10.79.{}", pid % 250 + 1)),
        ("SCALEOUT_PORT_LB1", lb1.clone()),
        ("SCALEOUT_PORT_LB2", lb2),
        ("SCALEOUT_PORT_DNS", dns),
        // Every client of the run comes from this machine.
        ("SCALEOUT_CREATE_RATE", "0".into()),
        // The hostile workload's runaway writes hold every write for
        // their budget: a tenth of the default, as in the local run.
        (
            "SCALEOUT_WRITE_BUDGET",
            (scaleout_db_budget() / 10).to_string(),
        ),
        ("SCALEOUT_LOG", "warn,openraft=off".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let project = crate::compose::Compose::new(
        program,
        &format!("scaleout-chaos-{pid}"),
        on.file.clone(),
        env,
    );
    println!(
        "chaos: bringing up {} as project {}",
        on.file.display(),
        project.project
    );
    let up = {
        let project = project.clone();
        // Two web servers, as in the local run: one killed, the load
        // balancers send to the other.
        tokio::task::spawn_blocking(move || project.up(&["--scale", "web=2"]))
    };
    let _down = TakeDown(project.clone());
    up.await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)?;
    let reach = Reach::compose(project.clone());
    let http = reach.http().map_err(failed)?;
    let site = format!("127.0.0.1:{lb1}");
    // Up: the site answers and all five nodes are members.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let site_up = http
            .get(format!("http://{site}/"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        let members = match http
            .get("http://db-1:4001/nodes?nonvoters&ver=2")
            .send()
            .await
        {
            Ok(r) => r
                .json::<scaleout_wire::data::Nodes>()
                .await
                .map_or(0, |n| n.nodes.iter().filter(|n| n.reachable).count()),
            Err(_) => 0,
        };
        if site_up && members == 5 {
            break;
        }
        if Instant::now() > deadline || shutdown.is_cancelled() {
            return Err(failed(format!(
                "the deployment did not come up within 3 minutes (site answering: {site_up}, {members} of 5 nodes)\n{}",
                project.logs("db-1")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut servers = Servers::Compose(project);
    exercise(config, &mut servers, &site, &reach, shutdown).await
}

/// Takes a Compose project down when dropped (the run ended, or failed).
struct TakeDown(crate::compose::Compose);

impl Drop for TakeDown {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("chaos: taking {} down: {e}", self.0.project);
        }
    }
}

async fn stop_all(procs: Vec<Proc>) {
    for p in procs.into_iter().rev() {
        p.stop().await;
    }
}

async fn exercise(
    config: &ChaosConfig,
    servers: &mut Servers,
    site: &str,
    reach: &Reach,
    shutdown: CancellationToken,
) -> Result<Report, Error> {
    // The workers build their own; one that fails would fail here first.
    reach.http().map_err(|reason| Error::Spawn {
        name: "chaos".into(),
        reason,
    })?;
    let started = Instant::now();
    let lb = format!("http://{site}");
    let history: History = Arc::default();
    let stop = CancellationToken::new();
    let nodes = servers.dbs();
    let dbs: Vec<String> = nodes.iter().map(|(_, url)| url.clone()).collect();
    let mut clients = Vec::new();
    for c in 0..config.clients {
        let (lb, history, stop) = (lb.clone(), history.clone(), stop.clone());
        let seed = config.seed.wrapping_add(c as u64 + 1);
        let dbs = dbs.clone();
        clients.push(tokio::spawn(client(
            c,
            seed,
            lb,
            dbs,
            history,
            stop,
            started,
            reach.clone(),
        )));
    }
    let register_log: registers::Log = Arc::default();
    if config.registers > 0 {
        let failed = |e: scaleout_client::ClientError| Error::Spawn {
            name: "chaos".into(),
            reason: format!("creating the registers: {e}"),
        };
        let db = reach.db(dbs.clone()).map_err(failed)?;
        db.discover(Duration::from_secs(10)).await.map_err(failed)?;
        db.execute(&json!([registers::TABLE]), false)
            .await
            .map_err(failed)?;
    }
    for r in 0..config.registers {
        let id = config.clients + r;
        clients.push(tokio::spawn(registers::client(
            id,
            config.seed.wrapping_add(id as u64 + 1),
            dbs.clone(),
            REGISTER_KEYS,
            register_log.clone(),
            stop.clone(),
            started,
            reach.clone(),
        )));
    }
    let hostile_log: hostile::Log = Arc::default();
    let attach = config.data_dir.join("chaos-attach.sqlite");
    let _ = std::fs::remove_file(&attach);
    if config.hostile > 0 {
        let failed = |e: scaleout_client::ClientError| Error::Spawn {
            name: "chaos".into(),
            reason: format!("creating the hostile workload's tables: {e}"),
        };
        let db = reach.db(dbs.clone()).map_err(failed)?;
        db.discover(Duration::from_secs(10)).await.map_err(failed)?;
        db.execute(&json!(hostile::SCHEMA), false)
            .await
            .map_err(failed)?;
    }
    for h in 0..config.hostile {
        let id = config.clients + config.registers + h;
        clients.push(tokio::spawn(hostile::client(
            id,
            config.seed.wrapping_add(id as u64 + 1),
            dbs.clone(),
            attach.to_string_lossy().into_owned(),
            hostile_log.clone(),
            stop.clone(),
            started,
            reach.clone(),
        )));
    }
    let mut rng = Rng::new(config.seed);
    let mut faults = Vec::new();
    let possible = |k: &&str| servers.can(k);
    let kinds: Vec<&str> = FAULT_KINDS.iter().copied().filter(possible).collect();
    let schedule: Vec<&str> = config
        .faults
        .iter()
        .map(String::as_str)
        .filter(possible)
        .collect();
    let deadline = started + config.duration;
    // A fault lasts up to 3 s, and its aftermath is measured for a while.
    let room = config.fault_every + Duration::from_secs(3) + Duration::from_millis(AFTERMATH_MS);
    while Instant::now() + room < deadline && !shutdown.is_cancelled() {
        tokio::select! {
            () = tokio::time::sleep(config.fault_every) => {}
            () = shutdown.cancelled() => break,
        }
        let kind = match schedule.get(faults.len() % schedule.len().max(1)) {
            Some(k) => k,
            None => kinds[rng.below(kinds.len() as u64) as usize],
        };
        let fault = inject(kind, &mut rng, servers, reach, started).await?;
        faults.push(fault);
    }
    tokio::select! {
        () = tokio::time::sleep(deadline.saturating_duration_since(Instant::now())) => {}
        () = shutdown.cancelled() => {}
    }
    stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    let ops = history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let done = |kind: &str| {
        let mut t: Vec<u64> = ops
            .iter()
            .filter(|o| o.kind == kind && o.outcome == "ok")
            .map(|o| o.complete_ms)
            .collect();
        t.sort_unstable();
        t
    };
    let (creates, reads) = (done("create"), done("read"));
    let end = started.elapsed().as_millis() as u64;
    for f in &mut faults {
        let to = (f.healed_ms + AFTERMATH_MS).min(end);
        f.creates_down_ms = longest_outage(&creates, f.at_ms, f.healed_ms, to);
        f.reads_down_ms = longest_outage(&reads, f.at_ms, f.healed_ms, to);
    }
    let mut file = std::fs::File::create(&config.history).map_err(|e| Error::Spawn {
        name: "chaos".into(),
        reason: format!("history {}: {e}", config.history.display()),
    })?;
    for op in &ops {
        let _ = writeln!(file, "{}", serde_json::to_string(op).unwrap_or_default());
    }
    let register_ops = register_log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    write_tagged(&mut file, "register", &register_ops);
    let hostile_ops = hostile_log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    write_tagged(&mut file, "hostile", &hostile_ops);
    let mut violations = check(&ops, &hostile_ops, &nodes, reach).await;
    if attach.exists() {
        violations.push(format!(
            "hostile SQL made a file on the server: {}",
            attach.display()
        ));
    }
    let findings = registers::check(&register_ops);
    violations.extend(findings.violations);
    Ok(Report {
        seed: config.seed,
        operations: ops.len(),
        creates_ok: ops
            .iter()
            .filter(|o| o.kind == "create" && o.outcome == "ok")
            .count(),
        creates_unknown: ops
            .iter()
            .filter(|o| o.kind == "create" && o.outcome == "unknown")
            .count(),
        reads_ok: ops
            .iter()
            .filter(|o| o.kind == "read" && o.outcome == "ok")
            .count(),
        counts_ok: ops.iter().filter(|o| o.count.is_some()).count(),
        register_ops: register_ops.len(),
        hostile_ops: hostile_ops.len(),
        hostile_acknowledged: hostile_ops
            .iter()
            .filter(|h| h.ledger == hostile::Ledger::Acknowledged)
            .count(),
        register_checked: findings.checked,
        undecided: findings.undecided,
        faults,
        violations,
        history: config.history.clone(),
    })
}

/// Writes each of `ops` to the history as a JSON line with its `kind`.
fn write_tagged<T: serde::Serialize>(file: &mut std::fs::File, kind: &str, ops: &[T]) {
    for op in ops {
        let line = serde_json::to_value(op)
            .map(|mut v| {
                v["kind"] = json!(kind);
                v.to_string()
            })
            .unwrap_or_default();
        let _ = writeln!(file, "{line}");
    }
}

/// The database leader's process name, if one leads.
async fn leader_name(dbs: &[(String, String)], reach: &Reach) -> Option<String> {
    for (_, url) in dbs {
        let Ok(r) = reach
            .http()
            .ok()?
            .get(format!("{url}/leader"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        else {
            continue;
        };
        let Ok(v) = r.json::<scaleout_wire::data::LeaderAnswer>().await else {
            continue;
        };
        return Some(format!("db-{}", v.leader.id));
    }
    None
}

/// One fault, healed before returning.
async fn inject(
    kind: &str,
    rng: &mut Rng,
    servers: &mut Servers,
    reach: &Reach,
    started: Instant,
) -> Result<Fault, Error> {
    let nodes = servers.dbs();
    let dbs: Vec<String> = nodes.iter().map(|(name, _)| name.clone()).collect();
    let any_db = |rng: &mut Rng| dbs[rng.below(dbs.len() as u64) as usize].clone();
    let target = match kind {
        "kill-leader" | "partition-leader" => leader_name(&nodes, reach)
            .await
            .or_else(|| dbs.first().cloned())
            .unwrap_or_default(),
        "kill-web" => servers.web(rng.below(2) as usize),
        "partition-link" => {
            let a = any_db(rng);
            let mut b = any_db(rng);
            while b == a {
                b = any_db(rng);
            }
            format!("{a}|{b}")
        }
        _ => any_db(rng),
    };
    let at_ms = started.elapsed().as_millis() as u64;
    tracing::info!(kind, %target, "fault");
    let outage = Duration::from_millis(1500 + rng.below(1500));
    servers.fault(kind, &target, outage).await?;
    Ok(Fault {
        kind: kind.into(),
        target,
        at_ms,
        healed_ms: started.elapsed().as_millis() as u64,
        creates_down_ms: None,
        reads_down_ms: None,
    })
}

/// Where the run's servers are and how faults are made in them.
pub(crate) enum Servers {
    /// Child processes on this machine, the database nodes in network
    /// namespaces when they could be made.
    Local { procs: Vec<Proc>, net: Option<Net> },
    /// A Compose project's containers: faults through the engine.
    Compose(crate::compose::Compose),
}

impl Servers {
    /// The database nodes: name and API URL.
    fn dbs(&self) -> Vec<(String, String)> {
        match self {
            Servers::Local { procs, .. } => procs
                .iter()
                .filter(|p| p.name.starts_with("db-"))
                .map(|p| (p.name.clone(), p.url().to_string()))
                .collect(),
            Servers::Compose(_) => (1..=5)
                .map(|n| (format!("db-{n}"), format!("http://db-{n}:4001")))
                .collect(),
        }
    }

    /// The `i`th web server (of two).
    fn web(&self, i: usize) -> String {
        match self {
            Servers::Local { .. } => format!("web-{}", i + 1),
            // One of the service's containers, by its id.
            Servers::Compose(project) => project
                .containers("web")
                .ok()
                .and_then(|ids| ids.get(i % ids.len().max(1)).cloned())
                .map_or_else(
                    || "web".into(),
                    |id| format!("web@{}", id.get(..12).unwrap_or(&id)),
                ),
        }
    }

    /// Whether a fault of `kind` can be made here.
    fn can(&self, kind: &str) -> bool {
        match self {
            Servers::Local { net, .. } => net.is_some() || !is_partition(kind),
            // The engine disconnects a container from a network: a node
            // cut off from everyone; one link alone cannot be cut.
            Servers::Compose(_) => kind != "partition-link",
        }
    }

    /// Makes the fault, waits `outage`, heals it.
    async fn fault(&mut self, kind: &str, target: &str, outage: Duration) -> Result<(), Error> {
        let failed = |reason: String| Error::Spawn {
            name: "chaos".into(),
            reason,
        };
        match self {
            Servers::Local { procs, net } => {
                if is_partition(kind) {
                    let net = net
                        .as_mut()
                        .ok_or_else(|| failed(format!("{kind} needs network namespaces")))?;
                    // db-N runs in namespace N-1.
                    let index = |name: &str| {
                        name.trim_start_matches("db-")
                            .parse::<usize>()
                            .map_or(0, |n| n.saturating_sub(1))
                    };
                    let cut = match target.split_once('|') {
                        Some((a, b)) => net.cut(index(a), index(b)),
                        None => net.partition(&[index(target)]),
                    };
                    cut.map_err(failed)?;
                    tokio::time::sleep(outage).await;
                    net.heal().map_err(failed)?;
                    return Ok(());
                }
                let Some(p) = procs.iter_mut().find(|p| p.name == target) else {
                    return Err(Error::Spawn {
                        name: target.into(),
                        reason: "no such process".into(),
                    });
                };
                if kind == "pause-db" {
                    p.signal(Signal::SIGSTOP);
                    tokio::time::sleep(outage).await;
                    p.signal(Signal::SIGCONT);
                } else {
                    p.signal(Signal::SIGKILL);
                    tokio::time::sleep(outage).await;
                    p.restart().await?;
                }
                Ok(())
            }
            Servers::Compose(project) => {
                // `web@ID` is one container of the web service.
                let container = match target.split_once('@') {
                    Some((_, id)) => id.to_string(),
                    None => project.container(target).map_err(failed)?,
                };
                // The fault and its healing, each a blocking engine call.
                let (partition, pause) = (is_partition(kind), kind == "pause-db");
                let call = |heal: bool| {
                    let (project, container, service) =
                        (project.clone(), container.clone(), target.to_string());
                    async move {
                        tokio::task::spawn_blocking(move || match (partition, pause, heal) {
                            (true, _, false) => project.disconnect(&container, "data"),
                            (true, _, true) => project.connect(&container, "data", &service),
                            (false, true, false) => project.pause(&container),
                            (false, true, true) => project.unpause(&container),
                            (false, false, false) => project.kill(&container),
                            (false, false, true) => project.start(&container),
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r)
                    }
                };
                call(false).await.map_err(failed)?;
                tokio::time::sleep(outage).await;
                call(true).await.map_err(failed)?;
                Ok(())
            }
        }
    }
}

/// One client: creates links (each URL its own) and reads its own back,
/// keeping its read-your-writes cookie like a browser; now and then it
/// counts its own links with a `linearizable` or `strong` read on any
/// database node (forwarded to the leader).
#[allow(clippy::too_many_arguments)] // one worker's whole setting
async fn client(
    id: usize,
    seed: u64,
    lb: String,
    dbs: Vec<String>,
    history: History,
    stop: CancellationToken,
    started: Instant,
    reach: Reach,
) {
    let Ok(http) = reach.http() else {
        tracing::error!(client = id, "no HTTP client: this worker sends nothing");
        return;
    };
    let mut rng = Rng::new(seed);
    let mut cookie: Option<String> = None;
    let mut mine: Vec<String> = Vec::new();
    let mut n = 0u64;
    let now = || started.elapsed().as_millis() as u64;
    while !stop.is_cancelled() {
        let dice = rng.below(20);
        let read = !mine.is_empty() && dice < 8;
        let invoke_ms = now();
        let mut count = None;
        let (kind, key, outcome, detail) = if dice >= 18 && !dbs.is_empty() {
            let level = if dice == 18 { "linearizable" } else { "strong" };
            let node = &dbs[rng.below(dbs.len() as u64) as usize];
            let sql =
                format!("SELECT count(*) FROM links WHERE url LIKE 'https://chaos.test/{id}/%'");
            let (at_least, at_most) = (mine.len() as u64, n);
            let answer = http
                .post(format!("{node}/db/query?level={level}&raft_index"))
                .json(&json!([sql]))
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 200 => {
                    let body = r.text().await.unwrap_or_default();
                    let seen = serde_json::from_str::<Results>(&body)
                        .ok()
                        .and_then(|b| first_value(&b).and_then(Value::as_u64));
                    match seen {
                        Some(seen) => {
                            count = Some(Count {
                                seen,
                                at_least,
                                at_most,
                            });
                            ("count", level.to_string(), "ok", node.clone())
                        }
                        None => ("count", level.to_string(), "unknown", body),
                    }
                }
                Ok(r) => (
                    "count",
                    level.to_string(),
                    "unknown",
                    r.status().to_string(),
                ),
                Err(e) => ("count", level.to_string(), "unknown", e.to_string()),
            }
        } else if read {
            let code = mine[rng.below(mine.len() as u64) as usize].clone();
            let mut req = http.get(format!("{lb}/api/links/{code}"));
            if let Some(c) = &cookie {
                req = req.header("cookie", c);
            }
            match req.send().await {
                Ok(r) if r.status() == 200 => ("read", code, "ok", String::new()),
                Ok(r) if r.status() == 404 => {
                    ("read", code, "fail", "404: own link not found".into())
                }
                Ok(r) => ("read", code, "unknown", r.status().to_string()),
                Err(e) => ("read", code, "unknown", e.to_string()),
            }
        } else {
            n += 1;
            let url = format!("https://chaos.test/{id}/{n}");
            let mut req = http
                .post(format!("{lb}/api/links"))
                .json(&json!({ "url": url }));
            if let Some(c) = &cookie {
                req = req.header("cookie", c);
            }
            match req.send().await {
                Ok(r) if r.status() == 201 => {
                    if let Some(set) = r.headers().get("set-cookie").and_then(|v| v.to_str().ok()) {
                        cookie = set.split(';').next().map(String::from);
                    }
                    let body: Value = r.json().await.unwrap_or_default();
                    let code = body["code"].as_str().unwrap_or_default().to_string();
                    mine.push(code.clone());
                    ("create", url, "ok", code)
                }
                Ok(r) if r.status().is_client_error() => {
                    ("create", url, "fail", r.status().to_string())
                }
                Ok(r) => ("create", url, "unknown", r.status().to_string()),
                Err(e) => ("create", url, "unknown", e.to_string()),
            }
        };
        let op = Op {
            client: id,
            kind,
            key,
            invoke_ms,
            complete_ms: now(),
            outcome,
            detail,
            count,
        };
        history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(op);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every node's links (url → count), once all have caught up.
type FinalData = (u64, BTreeMap<String, BTreeMap<String, u64>>);

async fn final_data(dbs: &[(String, String)], reach: &Reach) -> Result<FinalData, String> {
    let http = reach.http()?;
    // The index every node must reach: a write made now, through the leader.
    let mut target = None;
    for _ in 0..100 {
        for (_, url) in dbs {
            let sent = http
                .post(format!("{url}/db/execute?raft_index"))
                .json(&json!(["CREATE TABLE IF NOT EXISTS _chaos_probe (x)"]))
                .send()
                .await;
            if let Ok(r) = sent {
                if r.status() == 200 {
                    target = r
                        .json::<scaleout_wire::data::Results<Value>>()
                        .await
                        .ok()
                        .map(|v| v.raft_index);
                    break;
                }
            }
        }
        if target.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = target.ok_or("no leader took the final probe write within 20 s")?;
    let mut out = BTreeMap::new();
    for (name, url) in dbs {
        let q = format!(
            "{url}/db/query?level=none&raft_index&min_index={target}&q=SELECT%20url%2C%20count(*)%20AS%20n%20FROM%20links%20GROUP%20BY%20url"
        );
        let mut rows = None;
        for _ in 0..10 {
            if let Ok(r) = http.get(&q).send().await {
                if r.status() == 200 {
                    rows = Some(
                        r.json::<Results>()
                            .await
                            .map_err(|e| format!("{name}: links: {e}"))?,
                    );
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rows = rows.ok_or_else(|| format!("{name} never caught up to index {target}"))?;
        let table = rows
            .results
            .first()
            .ok_or_else(|| format!("{name}: links: no result"))?
            .table()
            .map_err(|e| format!("{name}: links: {e}"))?;
        let mut counts = BTreeMap::new();
        for row in table {
            let url = row.text("url").map_err(|e| format!("{name}: links: {e}"))?;
            let n = row.int("n").map_err(|e| format!("{name}: links: {e}"))?;
            counts.insert(url.to_string(), n as u64);
        }
        out.insert(name.clone(), counts);
    }
    Ok((target, out))
}

/// Each node's hostile ledger rows once it has applied `target`.
async fn hostile_ledgers(
    dbs: &[(String, String)],
    target: u64,
    reach: &Reach,
) -> Result<BTreeMap<String, BTreeSet<(u64, u64)>>, String> {
    let http = reach.http()?;
    let mut out = BTreeMap::new();
    for (name, url) in dbs {
        let q = format!(
            "{url}/db/query?level=none&raft_index&min_index={target}&q=SELECT%20client%2C%20seq%20FROM%20hostile_ledger"
        );
        let fail = |e: &dyn std::fmt::Display| format!("{name}: the hostile ledger: {e}");
        let answer = match http.get(&q).send().await {
            Ok(r) if r.status() == 200 => r.json::<Results>().await.map_err(|e| fail(&e))?,
            Ok(r) => return Err(fail(&r.status())),
            Err(e) => return Err(fail(&e)),
        };
        let table = answer
            .results
            .first()
            .ok_or_else(|| fail(&"no result"))?
            .table()
            .map_err(|e| fail(&e))?;
        let rows = table
            .iter()
            .map(|r| Ok((r.int("client")? as u64, r.int("seq")? as u64)))
            .collect::<Result<BTreeSet<(u64, u64)>, scaleout_wire::data::ShapeError>>()
            .map_err(|e| fail(&e))?;
        out.insert(name.clone(), rows);
    }
    Ok(out)
}

/// The first value of the first row of the first result.
fn first_value(results: &Results) -> Option<&Value> {
    results.results.first()?.values.as_ref()?.first()?.first()
}

/// The checker: the history against every node's final data.
pub async fn check(
    ops: &[Op],
    hostile_ops: &[hostile::Op],
    dbs: &[(String, String)],
    reach: &Reach,
) -> Vec<String> {
    let (target, data) = match final_data(dbs, reach).await {
        Ok(d) => d,
        Err(e) => return vec![e],
    };
    let mut violations = check_history(ops, &data);
    if !hostile_ops.is_empty() {
        match hostile_ledgers(dbs, target, reach).await {
            Ok(ledgers) => violations.extend(hostile::check(hostile_ops, &ledgers)),
            Err(e) => violations.push(e),
        }
    }
    // Every table, row by row: each node's SQL dump (all have caught up
    // with the final write, and nothing writes any more).
    let http = match reach.http() {
        Ok(http) => http,
        Err(e) => {
            violations.push(e);
            return violations;
        }
    };
    let mut sums = BTreeMap::new();
    for (name, url) in dbs {
        let sent = http
            .get(format!("{url}/db/backup?fmt=sql&noleader"))
            .send()
            .await;
        let text = match sent {
            Ok(r) if r.status() == 200 => r.text().await.ok(),
            _ => None,
        };
        let dump = match text {
            Some(dump) => dump,
            None => {
                violations.push(format!("{name}: no SQL dump for the table checksums"));
                continue;
            }
        };
        sums.insert(name.clone(), table_checksums(&dump));
    }
    violations.extend(diverging_tables(&sums));
    violations
}

/// Per table of a SQL dump: its row count and a checksum (FNV-1a) of its
/// rows in order.
pub fn table_checksums(dump: &str) -> BTreeMap<String, (u64, u64)> {
    let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in dump.lines() {
        let Some(rest) = line.strip_prefix("INSERT INTO ") else {
            continue;
        };
        let table = rest.split(" VALUES").next().unwrap_or("").trim_matches('"');
        let (rows, hash) = sums
            .entry(table.to_string())
            .or_insert((0, 0xcbf2_9ce4_8422_2325));
        *rows += 1;
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            *hash = (*hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    sums
}

/// The tables whose checksums differ between nodes.
pub fn diverging_tables(sums: &BTreeMap<String, BTreeMap<String, (u64, u64)>>) -> Vec<String> {
    let tables: BTreeSet<&String> = sums.values().flat_map(|t| t.keys()).collect();
    tables
        .into_iter()
        .filter_map(|table| {
            let per_node: Vec<(&String, Option<&(u64, u64)>)> =
                sums.iter().map(|(node, t)| (node, t.get(table))).collect();
            let mut distinct: Vec<_> = per_node.iter().map(|(_, s)| *s).collect();
            distinct.sort_unstable();
            distinct.dedup();
            (distinct.len() > 1).then(|| {
                let detail: Vec<String> = per_node
                    .iter()
                    .map(|(node, s)| match s {
                        Some((rows, hash)) => format!("{node} {rows} rows #{:016x}", hash),
                        None => format!("{node} no rows"),
                    })
                    .collect();
                format!("table {table} differs between nodes: {}", detail.join(", "))
            })
        })
        .collect()
}

/// The pure part of the checker (unit-tested).
pub fn check_history(ops: &[Op], data: &BTreeMap<String, BTreeMap<String, u64>>) -> Vec<String> {
    let mut violations = Vec::new();
    let requested: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.kind == "create")
        .map(|o| o.key.as_str())
        .collect();
    let acked: BTreeMap<&str, &Op> = ops
        .iter()
        .filter(|o| o.kind == "create" && o.outcome == "ok")
        .map(|o| (o.key.as_str(), o))
        .collect();
    for (node, counts) in data {
        let chaos: BTreeMap<&str, u64> = counts
            .iter()
            .filter(|(url, _)| url.starts_with("https://chaos.test/"))
            .map(|(u, n)| (u.as_str(), *n))
            .collect();
        for (url, op) in &acked {
            if !chaos.contains_key(url) {
                violations.push(format!(
                    "{node}: acknowledged create {url} is lost (client {}, sent at {} ms, acknowledged at {} ms)",
                    op.client, op.invoke_ms, op.complete_ms
                ));
            }
        }
        for (url, n) in &chaos {
            if *n > 1 {
                violations.push(format!(
                    "{node}: {url} appears {n} times (a duplicated write)"
                ));
            }
            if !requested.contains(url) {
                violations.push(format!("{node}: {url} was never requested"));
            }
        }
    }
    let mut distinct = data.values().collect::<Vec<_>>();
    distinct.dedup();
    if distinct.len() > 1 {
        violations.push(format!(
            "nodes diverge: {}",
            data.iter()
                .map(|(n, c)| format!("{n} has {} links", c.len()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for op in ops.iter().filter(|o| o.outcome == "ok") {
        if let Some(c) = op.count {
            if c.seen < c.at_least || c.seen > c.at_most {
                violations.push(format!(
                    "client {} at {} ms: a {} read counted {} of its links; linearizability allows {} to {}",
                    op.client, op.complete_ms, op.key, c.seen, c.at_least, c.at_most
                ));
            }
        }
    }
    for op in ops
        .iter()
        .filter(|o| o.kind == "read" && o.outcome == "fail")
    {
        violations.push(format!(
            "client {} at {} ms: read-your-writes broken for {} ({})",
            op.client, op.complete_ms, op.key, op.detail
        ));
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: &'static str, key: &str, outcome: &'static str) -> Op {
        Op {
            client: 0,
            kind,
            key: key.into(),
            invoke_ms: 0,
            complete_ms: 1,
            outcome,
            detail: String::new(),
            count: None,
        }
    }

    fn node(urls: &[(&str, u64)]) -> BTreeMap<String, u64> {
        urls.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    #[test]
    fn the_checker_finds_each_kind_of_violation() {
        let a = "https://chaos.test/0/1";
        let b = "https://chaos.test/0/2";
        let c = "https://chaos.test/0/3";
        let ops = vec![
            op("create", a, "ok"),
            op("create", b, "unknown"),
            op("create", c, "ok"),
            op("read", "abc", "ok"),
        ];
        // Healthy: the unknown create may or may not be there.
        let data = BTreeMap::from([
            ("db-1".to_string(), node(&[(a, 1), (c, 1)])),
            ("db-2".to_string(), node(&[(a, 1), (c, 1)])),
        ]);
        assert_eq!(check_history(&ops, &data), Vec::<String>::new());
        // Lost, duplicated, phantom, diverged, read-your-writes broken.
        let bad = BTreeMap::from([
            (
                "db-1".to_string(),
                node(&[(a, 2), ("https://chaos.test/9/9", 1)]),
            ),
            ("db-2".to_string(), node(&[(a, 1), (c, 1)])),
        ]);
        let mut ops = ops;
        ops.push(op("read", "zzz", "fail"));
        let mut stale = op("count", "linearizable", "ok");
        stale.count = Some(Count {
            seen: 1,
            at_least: 2,
            at_most: 3,
        });
        ops.push(stale);
        let found = check_history(&ops, &bad).join("\n");
        for says in [
            "is lost",
            "appears 2 times",
            "never requested",
            "diverge",
            "read-your-writes",
            "linearizability allows 2 to 3",
        ] {
            assert!(found.contains(says), "{says}: {found}");
        }
    }

    #[test]
    fn tables_that_differ_between_nodes_are_named() {
        let a = "CREATE TABLE t (x);\nINSERT INTO \"t\" VALUES(1);\nINSERT INTO \"u\" VALUES(2);\n";
        let b = "CREATE TABLE t (x);\nINSERT INTO \"t\" VALUES(1);\nINSERT INTO \"u\" VALUES(3);\n";
        let c = "CREATE TABLE t (x);\nINSERT INTO \"t\" VALUES(1);\n";
        let sums = |dumps: &[(&str, &str)]| {
            dumps
                .iter()
                .map(|(n, d)| (n.to_string(), table_checksums(d)))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(table_checksums(a)["t"].0, 1);
        assert!(diverging_tables(&sums(&[("db-1", a), ("db-2", a)])).is_empty());
        let found = diverging_tables(&sums(&[("db-1", a), ("db-2", b), ("db-3", c)]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("table u differs"), "{found:?}");
        assert!(found[0].contains("db-3 no rows"), "{found:?}");
    }

    #[test]
    fn an_outage_is_the_longest_stretch_without_success() {
        // Fault at 100, healed at 300: successes at 110, 900, 950.
        assert_eq!(
            longest_outage(&[50, 110, 900, 950], 100, 300, 2000),
            Some(790)
        );
        // Nothing came back after the heal.
        assert_eq!(longest_outage(&[50, 110, 200], 100, 300, 2000), None);
        // Measured from the fault when the first success comes late.
        assert_eq!(longest_outage(&[1600, 1610], 100, 300, 2000), Some(1500));
    }

    #[test]
    fn a_seed_gives_the_same_schedule() {
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..8).map(|_| r.below(4)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
