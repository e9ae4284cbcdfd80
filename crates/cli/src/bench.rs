//! `scaleout bench URL`: flags, a progress bar on a terminal, and the
//! report (text, or `--json`). The load itself is `scaleout_lab::bench`.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use scaleout_lab::bench::{self, BenchConfig, Progress, Report};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to send the requests (http:// or https://).
    url: String,
    /// Concurrent connections (workers).
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Requests per second over all connections (open loop, latencies
    /// counted from when each request was due); without it, each
    /// connection sends its next request when the last is answered.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run (e.g. 10s, 2m; at most 1h).
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// HTTP method.
    #[arg(long, short = 'm', default_value = "GET")]
    method: String,
    /// Request body (with POST, say).
    #[arg(long)]
    body: Option<String>,
    /// A header, `Name: value` (repeat for more).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// A request unanswered this long counts as an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// A read/write mix against the links app at URL (its site root): one
    /// create (POST /api/links) in every N requests, the home page
    /// (GET /) otherwise.
    #[arg(long, value_name = "N", conflicts_with_all = ["method", "body"])]
    links_mix: Option<u64>,
}

pub async fn run(args: BenchArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let method = reqwest::Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| anyhow!("--method {:?} is not an HTTP method", args.method))?;
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| anyhow!("--header {h:?}: write it as `Name: value`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = BenchConfig {
        url: args.url,
        method,
        body: args.body,
        headers,
        connections: args.connections,
        rate: args.rate,
        duration: args.duration,
        requests: args.requests,
        timeout: args.timeout,
        mix: args
            .links_mix
            .map(|write_every| bench::LinksMix { write_every }),
        client: None,
    };
    config.validate().map_err(|e| anyhow!(e))?;
    let progress = Arc::new(Progress::default());
    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        let bar = indicatif::ProgressBar::new(config.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let done = progress.done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                bar.set_position(secs as u64);
                bar.set_message(format!(
                    "{done} requests, {:.0}/s",
                    done as f64 / secs.max(1e-9)
                ));
            }
        })
    });
    let report = bench::run(config, progress, shutdown)
        .await
        .map_err(|e| anyhow!(e))
        .context("scaleout bench")?;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    let how = match r.rate {
        Some(rate) => format!("{rate}/s over {} connections", r.connections),
        None => format!("{} connections", r.connections),
    };
    println!("{} for {:.1} s, {how}", r.url, r.seconds);
    println!("  {} requests, {:.1}/s", r.requests, r.requests_per_second);
    let statuses: Vec<String> = r
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!("  statuses: {}", statuses.join(", "));
    if !r.errors.is_empty() {
        let errors: Vec<String> = r.errors.iter().map(|(e, n)| format!("{e}: {n}")).collect();
        println!("  no answer: {}", errors.join(", "));
    }
    let l = &r.latency_ms;
    println!(
        "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
}
