//! `scaleout chaos`: stage 4 under a seeded schedule of faults, checked.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Seeds the fault schedule and the clients (the same seed, the same schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long the clients run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: Duration,
    /// Concurrent clients creating and reading links through the load balancer.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Concurrent clients writing, compare-and-setting and reading registers
    /// on the data API (checked for linearizability and monotonic reads).
    #[arg(long, default_value_t = 3)]
    registers: usize,
    /// Concurrent clients sending hostile SQL to the data API (rollback in
    /// any spelling, RAISE in triggers, non-deterministic functions,
    /// runaway queries, ATTACH, ...), each checked: its acknowledged
    /// ledger rows on every node, its refused ones on none.
    #[arg(long, default_value_t = 1)]
    hostile: usize,
    /// Time between faults.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "6s")]
    fault_every: Duration,
    /// Directory for the nodes' data (emptied first).
    #[arg(long, default_value = "scaleout-data")]
    data: PathBuf,
    /// Where the history of operations goes (JSON lines).
    #[arg(long, default_value = "chaos-history.jsonl")]
    history: PathBuf,
    /// Fault kinds in order, cycling (default: drawn from the seed):
    /// kill-leader, kill-db, pause-db, kill-web, partition-leader (the
    /// leader cut off from the other database nodes), partition-node (any
    /// one cut off), partition-link (one link between two cut).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Keep the database nodes in the lab's network namespace (no partitions).
    #[arg(long)]
    no_netns: bool,
    /// Where to run: `local` (child processes, stage 4) or `compose`
    /// (stage 5 as Compose services, --compose-file, brought up for the
    /// run and taken down after it; faults through the engine: docker
    /// kill and start, pause, network disconnect).
    #[arg(long, default_value = "local", value_parser = ["local", "compose"])]
    on: String,
    /// The Compose file of `--on compose`.
    #[arg(long, default_value = "deploy/compose/compose.yaml")]
    compose_file: PathBuf,
    /// The image `--on compose` runs (scripts/image.sh builds it).
    #[arg(long, default_value = "scaleout:latest")]
    image: String,
}

pub async fn run(args: ChaosArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.clients == 0 {
        anyhow::bail!("--clients must be at least 1");
    }
    if args.fault_every < Duration::from_secs(3) {
        anyhow::bail!("--fault-every must be at least 3s (each fault lasts up to 3 s)");
    }
    for f in &args.faults {
        if !scaleout_lab::chaos::FAULT_KINDS.contains(&f.as_str()) {
            anyhow::bail!(
                "--faults {f}: use {}",
                scaleout_lab::chaos::FAULT_KINDS.join(", ")
            );
        }
    }
    let config = scaleout_lab::chaos::ChaosConfig {
        seed: args.seed,
        duration: args.duration,
        clients: args.clients,
        registers: args.registers,
        hostile: args.hostile,
        fault_every: args.fault_every,
        data_dir: args.data,
        history: args.history,
        faults: args.faults,
        netns: !args.no_netns,
        on_compose: (args.on == "compose").then(|| scaleout_lab::chaos::OnCompose {
            file: args.compose_file.clone(),
            image: args.image.clone(),
        }),
    };
    if args.on == "compose" && !args.compose_file.is_file() {
        anyhow::bail!(
            "--compose-file {}: no such file (run from the repository, or give its path)",
            args.compose_file.display()
        );
    }
    let report = scaleout_lab::chaos::run(config, shutdown.clone())
        .await
        .context("chaos")?;
    report.print();
    if shutdown.is_cancelled() {
        anyhow::bail!(
            "interrupted: the checks above ran on the history so far (seed {})",
            report.seed
        );
    }
    if !report.violations.is_empty() {
        anyhow::bail!(
            "{} violations with seed {} (history in {})",
            report.violations.len(),
            report.seed,
            report.history.display()
        );
    }
    Ok(())
}
