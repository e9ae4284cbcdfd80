//! `scaleout chaos` in the test suite: a short run with a fixed seed and a
//! fixed list of faults (the leader killed, a node paused, the leader cut
//! off from the other database nodes, one link between two nodes cut),
//! checked by its own checker (whose verdicts are unit-tested in
//! `scaleout-lab`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Proc;

/// Whether this machine lets us make what the runner makes for partitions
/// (a namespace, a bridge, a veth pair between them); the runner skips
/// partitions, and says so, where it cannot.
fn namespaces_work() -> bool {
    let tag = std::process::id();
    let (ns, bridge, veth) = (
        format!("scaleout-probe-{tag}"),
        format!("sopb{tag}"),
        format!("sopv{tag}"),
    );
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let works = ip(&["netns", "add", &ns])
        && ip(&["link", "add", &bridge, "type", "bridge"])
        && ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])
        && ip(&["link", "set", &veth, "master", &bridge]);
    ip(&["netns", "del", &ns]);
    ip(&["link", "del", &bridge]);
    works
}

/// The number in `text` just before `label`, e.g. `12 faults`.
fn number_before(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("{label}: {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("{label}: {text}"))
}

#[test]
fn a_short_fault_schedule_with_a_partition_loses_nothing_and_stays_linearizable() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let mut p = Proc::spawn(&[
        "chaos",
        "--seed",
        "3",
        "--duration",
        "40s",
        "--fault-every",
        "5s",
        "--faults",
        "kill-leader,pause-db,partition-leader,partition-link",
        "--data",
        dir.path().to_str().unwrap(),
        "--history",
        history.to_str().unwrap(),
    ]);
    let summary = p.wait_for_line_within("chaos seed 3:", Duration::from_secs(150));
    let registers = p.wait_for_line("registers:");
    p.wait_for_line("history:");
    let status = p.wait_exit(Duration::from_secs(120));
    let printed = p.stdout.join("\n");
    assert!(status.success(), "{printed}");
    assert!(summary.contains(" 0 violations"), "{printed}");

    let mut kinds = vec!["kill-leader", "pause-db"];
    if namespaces_work() {
        kinds.extend(["partition-leader", "partition-link"]);
    } else {
        assert!(printed.contains("partitions skipped"), "{printed}");
        eprintln!("no network namespaces here: partitions skipped");
    }
    let faults = number_before(&summary, " faults");
    assert!(
        faults >= kinds.len() as u64,
        "each kind at least once: {printed}"
    );
    let fault_lines: Vec<&str> = p
        .stdout
        .iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(fault_lines.len() as u64, faults, "{printed}");
    for (line, kind) in fault_lines.iter().zip(kinds.iter().cycle()) {
        assert!(line.contains(kind), "{kind} injected in order: {line}");
        // Creates and reads succeeded again after each fault.
        assert!(
            line.contains("creates down ") && !line.contains("creates down -"),
            "{line}"
        );
        assert!(!line.contains("reads down -"), "{line}");
    }
    assert!(!printed.contains("never"), "{printed}");

    // Linearizable and strong counts were made and checked, and the
    // register workload ran and was searched for a linearization.
    assert!(
        number_before(&summary, "linearizable counts") > 10,
        "{summary}"
    );
    assert!(number_before(&registers, "operations") > 100, "{registers}");
    assert!(
        number_before(&registers, "checked for") > 100,
        "{registers}"
    );
    let lines = std::fs::read_to_string(&history).unwrap();
    let ops = lines.lines().count();
    assert!(ops > 100, "a real history: {ops} operations");
    assert!(lines.contains("\"outcome\":\"ok\""));
    assert!(lines.contains("\"kind\":\"register\""));
}
