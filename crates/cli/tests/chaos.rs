//! `scaleout chaos` in the test suite: a short run with fixed seeds and a
//! fixed list of faults (the leader killed, a node paused, a node killed),
//! checked by its own checker (whose verdicts are unit-tested in
//! `scaleout-lab`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Proc;

#[test]
fn a_short_fault_schedule_loses_duplicates_and_invents_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let mut p = Proc::spawn(&[
        "chaos",
        "--seed",
        "3",
        "--duration",
        "21s",
        "--fault-every",
        "5s",
        "--faults",
        "kill-leader,pause-db,kill-db",
        "--data",
        dir.path().to_str().unwrap(),
        "--history",
        history.to_str().unwrap(),
    ]);
    let summary = p.wait_for_line("chaos seed 3:");
    p.wait_for_line("history:");
    let status = p.wait_exit(Duration::from_secs(120));
    let printed = p.stdout.join("\n");
    assert!(status.success(), "{printed}");
    assert!(summary.contains("3 faults, 0 violations"), "{printed}");
    for kind in ["kill-leader", "pause-db", "kill-db"] {
        assert!(printed.contains(kind), "{kind} injected: {printed}");
    }
    // Every fault was followed by successful creates (availability came back).
    let fault_lines: Vec<&str> = p
        .stdout
        .iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(fault_lines.len(), 3, "{printed}");
    for line in fault_lines {
        assert!(
            line.contains("creates back after ") && !line.contains("creates back after -"),
            "{line}"
        );
    }
    assert!(!printed.contains("never"), "{printed}");
    // Linearizable and strong counts were made (and checked).
    let counts: u64 = summary
        .split(", ")
        .find(|part| part.ends_with("linearizable counts)"))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(counts > 10, "{summary}");
    let lines = std::fs::read_to_string(&history).unwrap();
    let ops = lines.lines().count();
    assert!(ops > 100, "a real history: {ops} operations");
    assert!(lines.contains("\"outcome\":\"ok\""));
}
