//! `scaleout lab`: the running lab's controls from a terminal, through the
//! dashboard's API (the same the buttons use).

use std::path::PathBuf;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
    /// The lab's dashboard URL; by default the lab running on `--data`.
    #[arg(long, global = true)]
    lab: Option<String>,
    /// The data directory of the lab to control (`scaleout up --data`).
    #[arg(long, global = true, default_value = "scaleout-data")]
    data: PathBuf,
}

#[derive(clap::Subcommand)]
enum LabCommand {
    /// Every process: role, pid, state, and for database nodes leader,
    /// voter or replica; then the timeline's last events.
    Status {
        /// The state as JSON (`GET /api/state`).
        #[arg(long)]
        json: bool,
    },
    /// SIGKILL a process (the seed's "server 1 fails").
    Kill { name: String },
    /// SIGTERM a process: it drains and exits.
    Stop { name: String },
    /// SIGSTOP a process (it hangs: no answers, no exit).
    Pause { name: String },
    /// SIGCONT a paused process.
    Resume { name: String },
    /// Start a process again with the same arguments.
    Restart { name: String },
    /// Scale out: `web` (a web server the load balancers take at once),
    /// `replica` (a read replica that joins, catches up and takes reads)
    /// or `lb` (a load balancer that enters the DNS answer; stage 5).
    Add { what: String },
    /// Scale in: drain a web server on every load balancer and stop it,
    /// take a read replica out of the cluster and stop it, or take a load
    /// balancer out of the DNS answer and stop it after the answer's TTL.
    Remove { name: String },
    /// Run a scenario under the lab's load and print its report when it
    /// ends: kill-leader, partition-leader (a lab started with --netns),
    /// kill-web, kill-replica, kill-lb, add-web, add-replica.
    Scenario {
        name: String,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: LabArgs) -> anyhow::Result<()> {
    let url = match args.lab {
        Some(url) => url,
        None => {
            let file = scaleout_lab::lab_url_file(&args.data);
            std::fs::read_to_string(&file)
                .with_context(|| {
                    format!(
                        "no lab is running on {} (no {}): start one with `scaleout up`, or give --lab URL",
                        args.data.display(),
                        file.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    // `http://HOST:PORT/?token=T`: the lab's address and its token.
    let (base, token) = match url.split_once("?token=") {
        Some((base, token)) => (base, token.trim()),
        None => bail!(
            "{url}: the lab's URL holds its token (`?token=...`), as `scaleout up` printed it"
        ),
    };
    let url = base.trim_end_matches('/').to_string();
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .context("the lab's token is not a header value")?,
    );
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(90))
        .default_headers(auth)
        .build()
        .context("building an HTTP client")?;
    let (name, control) = match args.command {
        LabCommand::Status { json } => return status(&http, &url, json).await,
        LabCommand::Add { what } => return add(&http, &url, &what).await,
        LabCommand::Scenario { name, json } => return scenario(&http, &url, &name, json).await,
        LabCommand::Remove { name } => (name, "remove"),
        LabCommand::Kill { name } => (name, "kill"),
        LabCommand::Stop { name } => (name, "stop"),
        LabCommand::Pause { name } => (name, "pause"),
        LabCommand::Resume { name } => (name, "resume"),
        LabCommand::Restart { name } => (name, "restart"),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("{name:?}: a process name is letters, digits and dashes (`scaleout lab status` lists them)");
    }
    let path = if control == "remove" {
        format!("/api/remove/{name}")
    } else {
        format!("/api/procs/{name}/{control}")
    };
    post(&http, &url, &path).await?;
    println!("{control}: {name}");
    Ok(())
}

async fn add(http: &reqwest::Client, url: &str, what: &str) -> anyhow::Result<()> {
    if !matches!(what, "web" | "replica" | "lb") {
        bail!("{what:?}: add web, replica or lb");
    }
    let body = post(http, url, &format!("/api/add/{what}")).await?;
    println!("added {}", body["added"].as_str().unwrap_or("?"));
    Ok(())
}

/// Starts a scenario and follows it until its report is done.
async fn scenario(http: &reqwest::Client, url: &str, name: &str, json: bool) -> anyhow::Result<()> {
    let names: Vec<&str> = scaleout_lab::control::Scenario::ALL
        .iter()
        .map(|s| s.name())
        .collect();
    if !names.contains(&name) {
        bail!("{name:?}: the scenarios are {}", names.join(", "));
    }
    post(http, url, &format!("/api/scenario/{name}")).await?;
    if !json {
        eprintln!("{name}: running under load (about 10-40 s)");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let state = lab_state(http, url).await?;
        let report = &state["scenario"];
        if report["name"] == name && report["done"] == true {
            if json {
                println!("{report}");
            } else {
                println!("{}", serde_json::to_string_pretty(report)?);
            }
            if let Some(e) = report["error"].as_str() {
                bail!("{name}: {e}");
            }
            if report["lost_writes"].as_u64().unwrap_or(0) > 0 {
                bail!("{name}: acknowledged writes were lost");
            }
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{name}: no report after 3 minutes");
        }
    }
}

/// A control: a POST with a JSON body; the lab's answer, or its error.
async fn post(http: &reqwest::Client, url: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let answer = http
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .with_context(|| format!("the lab at {url} did not answer"))?;
    let ok = answer.status().is_success();
    let body: serde_json::Value = answer
        .json()
        .await
        .with_context(|| format!("the lab at {url} answered something else than JSON"))?;
    if !ok {
        bail!("{}", body["error"].as_str().unwrap_or("the lab refused"));
    }
    Ok(body)
}

/// `GET /api/state`.
async fn lab_state(http: &reqwest::Client, url: &str) -> anyhow::Result<serde_json::Value> {
    let answer = http
        .get(format!("{url}/api/state"))
        .send()
        .await
        .with_context(|| format!("the lab at {url} did not answer"))?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.context("the lab's state")?;
    if !status.is_success() {
        bail!(
            "the lab refused: {status} {}",
            body["error"].as_str().unwrap_or("")
        );
    }
    Ok(body)
}

async fn status(http: &reqwest::Client, url: &str, json: bool) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let state = lab_state(http, url).await?;
    if json {
        return print_all(&format!("{state}\n"));
    }
    // Written at once, and a reader that goes away (`| head`) is fine.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stage {}: {} (site {})",
        state["stage"],
        state["title"].as_str().unwrap_or(""),
        state["site"].as_str().unwrap_or("")
    );
    for p in state["procs"].as_array().into_iter().flatten() {
        let db = match &p["db"] {
            serde_json::Value::Object(d) => format!(
                "{} applied {}",
                d.get("kind").and_then(|k| k.as_str()).unwrap_or("?"),
                d.get("applied_index")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<6} {:<4} {:<8} pid {:<7} {:<26} {db}",
            p["name"].as_str().unwrap_or("?"),
            p["role"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
            p["url"].as_str().unwrap_or("")
        );
    }
    let events: serde_json::Value = http
        .get(format!("{url}/api/timeline"))
        .send()
        .await?
        .json()
        .await
        .unwrap_or_default();
    let events = events.as_array().cloned().unwrap_or_default();
    for e in events.iter().rev().take(10).rev() {
        let _ = writeln!(
            out,
            "  {} {} {} {}",
            e["at_ms"],
            e["name"].as_str().unwrap_or(""),
            e["kind"].as_str().unwrap_or(""),
            e["detail"].as_str().unwrap_or("")
        );
    }
    print_all(&out)
}

/// Prints `text` to stdout; a closed pipe is not an error.
fn print_all(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
