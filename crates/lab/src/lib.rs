//! `scaleout-lab`: `scaleout up` — starts the topology of one of the seed's
//! stages and keeps it running until shut down.
//!
//! Every stage starts each server as its own child process (the
//! `scaleout` binary with a role's subcommand, see [`procs`]) on loopback
//! and supervises it, with the dashboard ([`control`]) beside them:
//! - stage 1 (the seed's single server): one `scaleout web` keeping the
//!   links in its own SQLite file, with its read-through cache;
//! - stage 2: one web server and one database node;
//! - stage 3: the load balancer, two web servers, one database node;
//! - stage 4: the load balancer, two web servers, three voting database
//!   nodes and two read replicas (writes to the leader, reads spread over
//!   the replicas);
//! - stage 5 (the default, the seed's final diagram): stage 4 with two load
//!   balancers on 127.0.0.2 and 127.0.0.3 (same port) and `scaleout dns`
//!   answering `www.scaleout.test` with the healthy ones.

pub mod bench;
pub mod chaos;
pub mod compose;
pub mod control;
pub mod figures;
pub mod linear;
pub mod netns;
pub mod procs;
pub mod resolve;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Fatal errors of `scaleout up`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stage 5 puts its load balancers on 127.0.0.2 and 127.0.0.3 and its DNS on 127.0.0.1; run it with the default --host, not {0}")]
    Stage5Host(IpAddr),
    #[error("{name}: {reason}")]
    Spawn { name: String, reason: String },
    #[error("stage must be 1 to 5, not {0}")]
    NoSuchStage(u8),
    #[error("cannot listen on {addr}: {source} (pick another --port-base)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] scaleout_web::StoreError),
    #[error(transparent)]
    Web(#[from] scaleout_web::Error),
}

/// What `scaleout up` should start.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The seed's stage, 1 to 5.
    pub stage: u8,
    /// Where every node keeps its data.
    pub data_dir: PathBuf,
    /// The site listens here; other nodes take the ports after it. 0 lets
    /// the OS pick (tests).
    pub port_base: u16,
    /// Address every node binds.
    pub host: IpAddr,
    /// Every hop over TLS, with a CA made for the lab (`<data>/stageN/tls`).
    pub tls: bool,
    /// Where the dashboard and its API listen; port 0 picks
    /// one. Loopback unless told otherwise.
    pub dashboard: SocketAddr,
    /// Each database node in a network namespace of its own (root and
    /// iproute2), so the lab can partition them.
    pub netns: bool,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            stage: 5,
            data_dir: PathBuf::from("scaleout-data"),
            port_base: 8080,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            tls: false,
            netns: false,
            dashboard: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        }
    }
}

impl UpConfig {
    pub fn validate(&self) -> Result<(), Error> {
        match self.stage {
            1..=4 => Ok(()),
            5 if self.host == IpAddr::V4(Ipv4Addr::LOCALHOST) => Ok(()),
            5 => Err(Error::Stage5Host(self.host)),
            n => Err(Error::NoSuchStage(n)),
        }
    }
}

/// Runs the stage until `shutdown` is cancelled.
pub async fn up(config: UpConfig, shutdown: CancellationToken) -> Result<(), Error> {
    config.validate()?;
    cluster(config, shutdown).await
}

/// The processes of a stage, in the order they start.
pub(crate) struct Plan {
    voters: u64,
    replicas: u64,
    webs: u64,
    lb: bool,
    /// Stage 5: two load balancers on 127.0.0.2 and 127.0.0.3 behind the
    /// site's name, served by `scaleout dns`.
    dns: bool,
    title: &'static str,
    /// Extra flags for every database node.
    db_args: Vec<String>,
    /// Every hop over TLS, with certificates from the lab's CA.
    tls: Option<Arc<tls::LabTls>>,
    /// Stage 1: the web server keeps the links in its own SQLite file.
    embedded: bool,
}

/// The zone and name stage 5 serves.
pub const ZONE: &str = "scaleout.test";
pub const SITE_NAME: &str = "www.scaleout.test";
pub(crate) const LB_ADDRS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

pub(crate) fn plan(stage: u8) -> Plan {
    match stage {
        1 => Plan {
            voters: 0,
            replicas: 0,
            webs: 1,
            lb: false,
            dns: false,
            title: "a single server: the web app, its database (embedded SQLite) and its cache in one process",
            db_args: Vec::new(),
            tls: None,
            embedded: true,
        },
        2 => Plan {
            voters: 1,
            replicas: 0,
            webs: 1,
            lb: false,
            dns: false,
            title: "the web tier and the data tier apart (one web server, one database node)",
            db_args: Vec::new(),
            tls: None,
            embedded: false,
        },
        3 => Plan {
            voters: 1,
            replicas: 0,
            webs: 2,
            lb: true,
            dns: false,
            title: "a load balancer in front of two stateless web servers, one database node",
            db_args: Vec::new(),
            tls: None,
            embedded: false,
        },
        4 => Plan {
            voters: 3,
            replicas: 2,
            webs: 2,
            lb: true,
            dns: false,
            title: "load balancer, two web servers, a replicated database (3 voters + 2 read replicas)",
            db_args: Vec::new(),
            tls: None,
            embedded: false,
        },
        _ => Plan {
            voters: 3,
            replicas: 2,
            webs: 2,
            lb: true,
            dns: true,
            title: "the seed's final diagram: DNS, two load balancers, two web servers, a replicated database (3 voters + 2 read replicas)",
            db_args: Vec::new(),
            tls: None,
            embedded: false,
        },
    }
}

/// Starts a plan's processes in order (databases, web servers, load
/// balancers, DNS), pushing each onto `procs` as it becomes ready, so the
/// caller can stop what started when a later one fails. `port` hands out
/// listen addresses; `site` is where the site listens. With `net`, each
/// database node runs in its own network namespace, on its address there.
pub(crate) async fn start_topology(
    plan: &Plan,
    site: &str,
    port: &mut impl FnMut() -> String,
    dir: &std::path::Path,
    procs: &mut Vec<procs::Proc>,
    net: Option<&netns::Net>,
) -> Result<(), Error> {
    let site = site.to_string();
    let secret = cluster_secret_file(dir)?;
    let mut db_urls = Vec::new();
    for id in 1..=plan.voters + plan.replicas {
        let name = format!("db-{id}");
        let namespace = net.map(|n| n.namespace(id as usize - 1));
        let (http, raft) = match net {
            Some(n) => {
                let addr = n.addr(id as usize - 1);
                (format!("{addr}:4001"), format!("{addr}:4002"))
            }
            None => (port(), port()),
        };
        let mut args: Vec<String> = vec![
            "db".into(),
            "--id".into(),
            id.to_string(),
            "--http".into(),
            http,
            "--raft".into(),
            raft,
            "--data".into(),
            dir.join(&name).to_string_lossy().into_owned(),
        ];
        if let Some(first) = db_urls.first() {
            args.extend(["--join".to_string(), String::clone(first)]);
        }
        if id > plan.voters {
            args.push("--read-only".into());
        }
        args.extend(plan.db_args.iter().cloned());
        // Raft RPCs and joins carry the lab's cluster secret: nobody else
        // on the host takes part in Raft.
        args.extend(["--cluster-secret-file".into(), secret.display().to_string()]);
        if let Some(tls) = &plan.tls {
            let files = tls.issue(&name, tls::Role::DbNode)?;
            args.extend([
                "--tls-cert".into(),
                files.cert,
                "--tls-key".into(),
                files.key,
                "--tls-ca".into(),
                tls.cluster_ca(),
            ]);
        }
        let p = procs::Proc::start_in(namespace.as_deref(), &name, &args).await?;
        db_urls.push(p.url().to_string());
        procs.push(p);
    }
    if let Some(first) = db_urls.first() {
        wait_for_cluster(first, plan.voters + plan.replicas, plan.tls.as_deref()).await?;
    }
    let mut web_urls = Vec::new();
    for i in 1..=plan.webs {
        let name = format!("web-{i}");
        let listen = if plan.lb { port() } else { site.clone() };
        let mut args: Vec<String> = vec![
            "web".into(),
            "--listen".into(),
            listen,
            "--name".into(),
            name.clone(),
            // Every client of a lab comes from this machine: one address.
            "--create-rate".into(),
            "0".into(),
        ];
        if plan.embedded {
            let file = dir.join("links.sqlite");
            args.extend(["--embedded-db".into(), file.display().to_string()]);
        } else {
            args.extend(["--db".into(), db_urls.join(",")]);
        }
        if let Some(tls) = &plan.tls {
            // HTTPS, only to the load balancers (when there are any: in
            // stage 2 the browser is the web server's client).
            let files = tls.issue(&name, tls::Role::WebServer)?;
            args.extend([
                "--tls-cert".into(),
                files.cert,
                "--tls-key".into(),
                files.key,
            ]);
            if !plan.embedded {
                args.extend(["--db-ca".into(), tls.cluster_ca()]);
            }
            if plan.lb {
                args.extend(["--tls-client-ca".into(), tls.ca()]);
            }
        }
        let p = procs::Proc::start(&name, &args).await?;
        web_urls.push(p.url().to_string());
        procs.push(p);
    }
    if plan.dns {
        // Both load balancers on the same port, each on its own
        // loopback address: DNS answers carry addresses, not ports.
        let mut lb_port = site.rsplit(':').next().unwrap_or("0").to_string();
        for (i, ip) in LB_ADDRS.iter().enumerate() {
            let listen = format!("{ip}:{lb_port}");
            let p = procs::Proc::start(
                &format!("lb-{}", i + 1),
                &lb_args(
                    &listen,
                    &port(),
                    &web_urls,
                    dir,
                    plan.tls.as_deref(),
                    &format!("lb-{}", i + 1),
                )?,
            )
            .await?;
            lb_port = p.url().rsplit(':').next().unwrap_or("0").to_string();
            procs.push(p);
        }
        let hosts = format!("www={}", LB_ADDRS.join(","));
        let args: Vec<String> = vec![
            "dns".into(),
            "--listen".into(),
            port(),
            "--zone".into(),
            ZONE.into(),
            "--host".into(),
            hosts,
            "--health-url".into(),
            format!(
                "{}://{{ip}}:{lb_port}/healthz",
                if plan.tls.is_some() { "https" } else { "http" }
            ),
            "--http".into(),
            port(),
            // The lab's token: it reads /metrics and edits the records
            // (a load balancer added or removed) with it.
            "--http-token-file".into(),
            lb_token_file(dir).display().to_string(),
        ];
        let mut args = args;
        if let Some(tls) = &plan.tls {
            args.extend(["--health-ca".into(), tls.ca()]);
        }
        procs.push(procs::Proc::start("dns", &args).await?);
    } else if plan.lb {
        let args = lb_args(&site, &port(), &web_urls, dir, plan.tls.as_deref(), "lb")?;
        procs.push(procs::Proc::start("lb", &args).await?);
    }
    Ok(())
}

/// Waits until the cluster lists all `nodes` members as reachable. A node
/// joins in the background after it prints its line, and a web server
/// that learned the cluster before the replicas joined would read from
/// the voters until its next refresh.
async fn wait_for_cluster(seed: &str, nodes: u64, tls: Option<&tls::LabTls>) -> Result<(), Error> {
    let http = match tls {
        Some(tls) => tls.db_client()?,
        None => reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Spawn {
                name: "lab".into(),
                reason: format!("building an HTTP client: {e}"),
            })?,
    };
    let deadline = tokio::time::Instant::now() + CLUSTER_PATIENCE;
    loop {
        let seen;
        let answer = http
            .get(format!("{seed}/nodes?nonvoters&ver=2"))
            .send()
            .await;
        match answer {
            Ok(r) => match r.json::<scaleout_wire::data::Nodes>().await {
                Ok(body) => {
                    let listed = body.nodes;
                    let reachable = listed.iter().filter(|n| n.reachable).count();
                    if listed.len() as u64 == nodes && reachable as u64 == nodes {
                        return Ok(());
                    }
                    seen = format!("{reachable} of {nodes} nodes are members and reachable");
                }
                Err(e) => seen = e.to_string(),
            },
            Err(e) => seen = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Spawn {
                name: "database cluster".into(),
                reason: format!("not complete after {CLUSTER_PATIENCE:?}: {seen}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a new database cluster may take to have all its members.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(30);

/// The lab's cluster secret (`DIR/cluster-secret`, mode 0600), made
/// when missing and kept, so a node added later can show it.
pub fn cluster_secret_file(dir: &std::path::Path) -> Result<std::path::PathBuf, Error> {
    let path = dir.join("cluster-secret");
    if !path.exists() {
        let fail = |e: std::io::Error| Error::Spawn {
            name: "the cluster secret".into(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        let secret = format!("{:032x}", rand::random::<u128>());
        tls::write_private(&path, &secret).map_err(fail)?;
    }
    Ok(path)
}

/// Where a lab's load balancers keep their admin API token (made, mode
/// 0600, by the first one that starts).
pub fn lb_token_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("lb-admin-token")
}

fn lb_args(
    listen: &str,
    admin: &str,
    web_urls: &[String],
    dir: &std::path::Path,
    tls: Option<&tls::LabTls>,
    name: &str,
) -> Result<Vec<String>, Error> {
    let mut args: Vec<String> = vec![
        "lb".into(),
        "--listen".into(),
        listen.into(),
        "--admin".into(),
        admin.into(),
        // Anyone on the host reaches loopback: the admin API (which can
        // add a backend and take real users' requests) wants a token.
        "--admin-token-file".into(),
        lb_token_file(dir).display().to_string(),
        "--health-path".into(),
        "/healthz".into(),
    ];
    for (i, url) in web_urls.iter().enumerate() {
        args.extend(["--backend".to_string(), format!("{url},name=web-{}", i + 1)]);
    }
    if let Some(tls) = tls {
        // One certificate for both sides: served to browsers, shown to
        // the web servers (which take only the lab's load balancers).
        let files = tls.issue(name, tls::Role::LoadBalancer)?;
        args.extend([
            "--tls-cert".into(),
            files.cert.clone(),
            "--tls-key".into(),
            files.key.clone(),
            "--backend-ca".into(),
            tls.ca(),
            "--backend-cert".into(),
            files.cert,
            "--backend-key".into(),
            files.key,
        ]);
    }
    Ok(args)
}

/// Every stage: each server a child process on loopback.
async fn cluster(config: UpConfig, shutdown: CancellationToken) -> Result<(), Error> {
    let mut plan = plan(config.stage);
    let host = config.host;
    let mut next_port = config.port_base;
    let mut port = || {
        if config.port_base == 0 {
            format!("{host}:0")
        } else {
            next_port += 1;
            format!("{host}:{}", next_port - 1)
        }
    };
    // The site's port (the web server in stage 2, the load balancer after).
    let site = port();
    let dir = config.data_dir.join(format!("stage{}", config.stage));
    if config.tls {
        plan.tls = Some(Arc::new(tls::LabTls::new(&dir.join("tls"), host)?));
    }
    let mut procs: Vec<procs::Proc> = Vec::new();
    let net = match config.netns {
        true if plan.voters + plan.replicas == 0 => {
            return Err(Error::Spawn {
                name: "netns".into(),
                reason: "stage 1 has no database nodes to put in namespaces".into(),
            })
        }
        true => Some(
            netns::Net::create((plan.voters + plan.replicas) as usize).map_err(|reason| {
                Error::Spawn {
                    name: "netns".into(),
                    reason: format!("{reason} (--netns needs root and iproute2)"),
                }
            })?,
        ),
        false => None,
    };
    let result = start_topology(&plan, &site, &mut port, &dir, &mut procs, net.as_ref()).await;
    if let Err(e) = result {
        for p in procs.into_iter().rev() {
            p.stop().await;
        }
        return Err(e);
    }
    println!("scaleout stage {}: {}", config.stage, plan.title);
    for p in &procs {
        if p.name == "dns" {
            println!(
                "  {:<6} {:<24} pid {:<7} DNS for {ZONE} (udp+tcp), metrics {}",
                p.name,
                p.url(),
                p.pid().unwrap_or(0),
                p.ready.admin.as_deref().unwrap_or("?")
            );
            continue;
        }
        let role = match p.name.as_str() {
            n if n.starts_with("lb") => {
                let admin = p.ready.admin.as_deref().unwrap_or("?");
                format!("load balancer, admin API {admin}")
            }
            n if n.starts_with("web") && plan.embedded => format!(
                "the single server: links app, cache, SQLite in {} (fsync on commit)",
                dir.join("links.sqlite").display()
            ),
            n if n.starts_with("web") => "web server (links app)".to_string(),
            n => {
                let id: u64 = n.trim_start_matches("db-").parse().unwrap_or(0);
                if id > plan.voters {
                    "database read replica".to_string()
                } else if id == 1 {
                    "database voter (first leader)".to_string()
                } else {
                    "database voter".to_string()
                }
            }
        };
        println!(
            "  {:<6} {:<24} pid {:<7} {}",
            p.name,
            p.url(),
            p.pid().unwrap_or(0),
            role
        );
    }
    println!("  data in {}", dir.display());
    if plan.lb {
        println!(
            "  the load balancers' admin API wants Authorization: Bearer $(cat {})",
            lb_token_file(&dir).display()
        );
    }
    if let Some(tls) = &plan.tls {
        println!(
            "  every hop is TLS; the lab's CA is {} (curl --cacert it)",
            tls.ca()
        );
    }
    println!();
    let scheme = if plan.tls.is_some() { "https" } else { "http" };
    if plan.dns {
        let dns_addr = procs
            .iter()
            .find(|p| p.name == "dns")
            .map(|p| p.url())
            .unwrap_or("?:?")
            .to_string();
        let lb1 = procs
            .iter()
            .find(|p| p.name == "lb-1")
            .map(|p| p.url().to_string())
            .unwrap_or_default();
        let port = lb1.rsplit(':').next().unwrap_or("?").to_string();
        let (dns_ip, dns_port) = dns_addr.rsplit_once(':').unwrap_or(("?", "?"));
        println!(
            "the site is {scheme}://{SITE_NAME}:{port}/ and its name is served by scaleout dns:"
        );
        println!("  dig @{dns_ip} -p {dns_port} {SITE_NAME} +short");
        println!(
            "  curl --resolve {SITE_NAME}:{port}:{} {scheme}://{SITE_NAME}:{port}/",
            LB_ADDRS[0]
        );
        println!("open {lb1}/ in a browser; Ctrl-C stops everything");
    } else {
        let site_url = procs.last().map(procs::Proc::url).unwrap_or_default();
        println!("open {site_url}/ in a browser; Ctrl-C stops everything");
    }
    let site_url = match procs.iter().find(|p| p.name.starts_with("lb")) {
        Some(lb) => lb.url().to_string(),
        None => procs
            .last()
            .map(procs::Proc::url)
            .unwrap_or_default()
            .to_string(),
    };
    let listener = match TcpListener::bind(config.dashboard).await {
        Ok(l) => l,
        Err(source) => {
            for p in procs.into_iter().rev() {
                p.stop().await;
            }
            return Err(Error::Bind {
                addr: config.dashboard,
                source,
            });
        }
    };
    let dashboard = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.dashboard,
        source,
    })?;
    let lab =
        control::Lab::new(config.stage, plan.title, &site_url, procs, &dir, net).map_err(|e| {
            Error::Spawn {
                name: "lab".into(),
                reason: format!("building an HTTP client: {e}"),
            }
        })?;
    // Loopback is open to every user of the machine: the controls want
    // the lab's token, which only the URL printed here and the file below
    // (this user's alone) hold.
    let token = format!("{:032x}", rand::random::<u128>());
    let url = format!("http://{dashboard}/?token={token}");
    if !dashboard.ip().is_loopback() {
        println!("warning: the dashboard listens on {dashboard}, beyond this machine; its token is all that guards the controls");
    }
    // `scaleout lab` finds the running lab of this data directory here.
    if let Err(e) = write_lab_url(&config.data_dir, &url) {
        tracing::warn!(error = %e, "could not note the dashboard's URL for `scaleout lab`");
    }
    println!("dashboard: {url}");
    // Supervise: the watcher records what happens (kill one to watch
    // failover), the dashboard shows it and takes controls.
    let watcher = tokio::spawn(lab.clone().watch(shutdown.clone()));
    let server = tokio::spawn(control::serve(
        lab.clone(),
        listener,
        token,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    let _ = watcher.await;
    let _ = server.await;
    lab.stop_all().await;
    // The namespaces go once their processes have.
    drop(lab.take_net());
    let _ = std::fs::remove_file(lab_url_file(&config.data_dir));
    Ok(())
}

/// Where a running lab notes its dashboard's URL, token included
/// (`DATA/lab-url`, mode 0600).
pub fn lab_url_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("lab-url")
}

/// Writes the lab's URL as a new file of this user's alone: a file (or a
/// symbolic link) someone left there is removed, never written through.
fn write_lab_url(data_dir: &std::path::Path, url: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = lab_url_file(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(url.as_bytes())
}
