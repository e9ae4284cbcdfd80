#!/usr/bin/env bash
# Starts 3 voters and 1 read replica of `scaleout db` (release build) in a
# temporary directory, runs scripts/db-vs-postgres.sh against the
# leader and the replica, and stops the nodes (by PID) on exit.
# usage: scripts/bench-db.sh [path/to/db-vs-postgres.sh]
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${1:-scripts/db-vs-postgres.sh}
cargo build --release -q
B=target/release/scaleout
work=$(mktemp -d /tmp/scaleout-bench-db.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
node() { # id http raft [args...]
  local id=$1 http=$2 raft=$3; shift 3
  SCALEOUT_LOG=warn,openraft=error "$B" db --id "$id" --http "$http" --raft "$raft" --data "$work/n$id" "$@" \
    >"$work/n$id.out" 2>"$work/n$id.err" &
  pids+=($!)
}
# Four nodes share this machine's cores: each voter runs one worker
# thread (`--threads 1`), which saves the wake-ups of tasks passing a
# write between threads (README, "Performance"); the replica, which
# serves the reads, keeps one per core.
node 1 127.0.0.1:24001 127.0.0.1:24002 --threads 1
sleep 1
node 2 127.0.0.1:24011 127.0.0.1:24012 --threads 1 --join http://127.0.0.1:24001
node 3 127.0.0.1:24021 127.0.0.1:24022 --threads 1 --join http://127.0.0.1:24001
node 4 127.0.0.1:24031 127.0.0.1:24032 --join http://127.0.0.1:24001 --read-only
for _ in $(seq 1 100); do
  n=$(curl -sf 'http://127.0.0.1:24001/nodes?nonvoters&ver=2' | grep -o '"reachable":true' | wc -l || true)
  [ "$n" = 4 ] && break
  sleep 0.2
done
"$BENCH" http://127.0.0.1:24001 http://127.0.0.1:24031
