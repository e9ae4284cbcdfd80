#!/usr/bin/env bash
# The load balancer against HAProxy and nginx, side by side in one run:
# builds the release binary and runs scripts/lb-ab.sh with `scaleout lb`
# over the two backends (round robin, health checks on, as shipped).
# The last lines are the medians and the ratios to HAProxy that the
# README quotes (target: rps ≥ 1.2× and p99 ≤ HAProxy's).
# usage: scripts/bench-lb.sh   env: DURATION (s, default 8), CONNS (64),
#   ROUNDS (5). Installs nginx-light, haproxy and wrk when missing (root).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
exec scripts/lb-ab.sh \
  "scaleout=$PWD/target/release/scaleout lb --listen 127.0.0.1:{port} --backend http://{b1} --backend http://{b2}"
