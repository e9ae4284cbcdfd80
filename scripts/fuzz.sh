#!/usr/bin/env bash
# Fuzzes scaleout's parsers with cargo-fuzz (libFuzzer), each target for a
# bounded time, and prints what was tried and found:
#   lb_request   the load balancer's request-head parser and chunked body
#   lb_chunked   chunked encoding round trip (decoding a few bytes at a time)
#   db_request   the data API's query parameters and statement bodies
#   dns_answer   the DNS zone's answers to any name, type and health
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60, all)
# Needs a nightly toolchain; installs cargo-fuzz when missing. A crash is
# saved under fuzz/artifacts/TARGET/: copy it to fuzz/regressions/TARGET/,
# where `cargo test` replays every file (crates' fuzz_regressions tests).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(lb_request lb_chunked db_request dns_answer)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo +nightly --version >/dev/null 2>&1 || {
  echo "scripts/fuzz.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
}

status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  cp -n fuzz/regressions/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  log="fuzz/last-$t.log"
  echo "== $t: ${seconds}s" >&2
  if cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=8192 >"$log" 2>&1; then
    result="no crash"
  else
    result="CRASH (see $log and fuzz/artifacts/$t/)"
    status=1
  fi
  runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  printf '%-11s %12s inputs tried, corpus %6s, %s\n' "$t" "${runs:-0}" "$corpus" "$result"
done
exit $status
