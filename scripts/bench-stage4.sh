#!/usr/bin/env bash
# The whole of stage 4 under load: `scaleout up --stage 4` (release build:
# lb, 2 web servers, 3 database voters, 2 read replicas), then wrk through
# the load balancer: redirects (GET /CODE, mostly from the web servers'
# caches), link lookups (GET /api/links/CODE, each a database read) and
# creates (POST /api/links, each a replicated write); then the share of
# database reads each node served, from the nodes' /metrics.
# usage: scripts/bench-stage4.sh   env: DURATION (s, default 8), CONNS (64)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
CONNS=${CONNS:-64}
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
cargo build --release -q
work=$(mktemp -d /tmp/scaleout-bench-stage4.XXXX)
SCALEOUT_LOG=warn target/release/scaleout up --stage 4 --port-base 0 --data "$work/data" >"$work/up.out" 2>"$work/up.err" &
up=$!
cleanup() { kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 1 300); do grep -q "^open " "$work/up.out" && break; sleep 0.2; done
cat "$work/up.out"
LB=$(awk '$1 == "lb" {print $2}' "$work/up.out")
codes=()
for i in $(seq 1 200); do
  codes+=("$(curl -sf -XPOST "$LB/api/links" -H 'Content-Type: application/json' \
    -d "{\"url\":\"https://example.com/$i\"}" | sed 's/.*"code":"\([^"]*\)".*/\1/')")
done
lua_codes=$(printf '"%s",' "${codes[@]}")
cat >"$work/redirect.lua" <<LUA
codes = {${lua_codes}}
request = function() return wrk.format("GET", "/" .. codes[math.random(#codes)]) end
LUA
cat >"$work/lookup.lua" <<LUA
codes = {${lua_codes}}
request = function() return wrk.format("GET", "/api/links/" .. codes[math.random(#codes)]) end
LUA
cat >"$work/create.lua" <<'LUA'
n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/api/links", {["Content-Type"] = "application/json"},
    '{"url":"https://example.com/bench/' .. n .. '"}')
end
LUA
reads() {
  for name in db-1 db-2 db-3 db-4 db-5; do
    url=$(awk -v n="$name" '$1 == n {print $2}' "$work/up.out")
    curl -sf "$url/metrics" | awk '/^scaleout_db_requests_total\{kind="read"\}/ {print $2}'
  done | paste -sd' '
}
run() { wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$1" "$LB" | awk '/Requests\/sec/ {r=$2} /Non-2xx/ {e=$4} /^ +99%/ {p=$2} END {printf "rps=%.0f p99=%s non2xx=%s\n", r, p, (e == "" ? 0 : e)}'; }
echo "redirects (GET /CODE):          $(run "$work/redirect.lua")"
before=$(reads)
echo "lookups (GET /api/links/CODE):  $(run "$work/lookup.lua")"
after=$(reads)
echo "creates (POST /api/links):      $(run "$work/create.lua")"
echo "database reads during lookups, db-1..db-5 (db-4 and db-5 are the replicas):"
paste <(echo "$before" | tr ' ' '\n') <(echo "$after" | tr ' ' '\n') | awk '{d[NR]=$2-$1; t+=$2-$1} END {for (i=1;i<=NR;i++) printf "  db-%d %d (%.0f%%)\n", i, d[i], (t ? 100*d[i]/t : 0)}'
