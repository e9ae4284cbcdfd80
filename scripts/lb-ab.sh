#!/usr/bin/env bash
# Interleaved A/B runs of load balancers against two anchors, HAProxy
# (2 threads, round robin, http-reuse always) and nginx (2 workers,
# upstream keepalive), on two nginx backends answering a 2-byte body,
# driven by wrk (1 thread). Each round runs every target once, in an order
# rotated each round, so a slow spell of this shared machine falls on all
# of them rather than on one. After the rounds: each target's median
# requests/s and p99, and their ratios to HAProxy's medians.
# Besides requests/s and latency percentiles it prints the CPU time the
# target's process used per request (from /proc/PID/stat), which varies
# less between rounds than requests/s does.
#
# usage: scripts/lb-ab.sh NAME=COMMAND [NAME=COMMAND ...]
#   COMMAND starts a load balancer in the foreground; {port} is replaced by
#   the port it must listen on, {b1} and {b2} by the backends' addresses.
#   example: scripts/lb-ab.sh \
#     "old=/tmp/scaleout-old lb --listen 127.0.0.1:{port} --backend http://{b1} --backend http://{b2}" \
#     "new=target/release/scaleout lb --listen 127.0.0.1:{port} --backend http://{b1} --backend http://{b2}"
# env: DURATION (s, default 8), CONNS (default 64), ROUNDS (default 5).
set -euo pipefail
DURATION=${DURATION:-8}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-5}
B1=18081 B2=18082 NGX=18083 HAP=18084 FIRST_PORT=18090
if [[ $# -eq 0 ]]; then
  echo "usage: $0 NAME=COMMAND [NAME=COMMAND ...] (see the comment at the top)" >&2
  exit 2
fi
for spec in "$@"; do
  if [[ $spec != *=* || -z ${spec%%=*} ]]; then
    echo "$0: '$spec' is not NAME=COMMAND" >&2
    exit 2
  fi
  if [[ ${spec%%=*} == haproxy || ${spec%%=*} == nginx ]]; then
    echo "$0: the names 'haproxy' and 'nginx' are taken by the anchors; pick another" >&2
    exit 2
  fi
done
need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need haproxy || ! need wrk; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy wrk >/dev/null
fi

work=$(mktemp -d /tmp/scaleout-lb-ab.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cat >"$work/backends.conf" <<EOF
daemon off; worker_processes 1; pid $work/b.pid; error_log $work/b.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:$B2; location / { return 200 "ok"; } } }
EOF
nginx -c "$work/backends.conf" -p "$work" & pids+=($!)

cat >"$work/hap.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAP
  default_backend app
backend app
  balance roundrobin
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
EOF
haproxy -f "$work/hap.cfg" -db >/dev/null 2>&1 & pids+=($!)
declare -A pid_of
pid_of[haproxy]=$!

cat >"$work/ngx.conf" <<EOF
daemon off; worker_processes 2; pid $work/n.pid; error_log $work/n.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 128; }
  server { listen 127.0.0.1:$NGX;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
nginx -c "$work/ngx.conf" -p "$work" & pids+=($!)
pid_of[nginx]=$!
targets=("haproxy:$HAP" "nginx:$NGX")
port=$FIRST_PORT
for spec in "$@"; do
  name=${spec%%=*} cmd=${spec#*=}
  cmd=${cmd//\{port\}/$port}; cmd=${cmd//\{b1\}/127.0.0.1:$B1}; cmd=${cmd//\{b2\}/127.0.0.1:$B2}
  bash -c "exec $cmd" >"$work/$name.log" 2>&1 & pids+=($!)
  pid_of[$name]=$!
  targets+=("$name:$port")
  port=$((port + 1))
done

wait_port() {
  for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
  echo "port $1 never answered" >&2
  return 1
}
for t in "${targets[@]}"; do wait_port "${t#*:}"; done

# A process's CPU ticks and its children's (nginx's workers).
cpu_ticks() {
  local t=0 p
  for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}'; }
percentile() { awk -v p="$1" '$1==p {print $2}' | to_ms; }
ticks_per_s=$(getconf CLK_TCK)
declare -A rps_of p99_of
n=${#targets[@]}
for r in $(seq 1 "$ROUNDS"); do
  for i in $(seq 0 $((n - 1))); do
    t=${targets[$(((i + r) % n))]}
    name=${t%%:*} port=${t#*:}
    c0=$(cpu_ticks "${pid_of[$name]}")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/")
    c1=$(cpu_ticks "${pid_of[$name]}")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    us=$(awk -v c=$((c1 - c0)) -v q="$reqs" -v hz="$ticks_per_s" 'BEGIN {printf "%.1f", c * 1e6 / hz / q}')
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    printf "round %d %-10s rps=%8.0f p50_ms=%s p90_ms=%s p99_ms=%s cpu_us_per_req=%s %s\n" \
      "$r" "$name" "$rps" "$(percentile 50% <<<"$out")" "$(percentile 90% <<<"$out")" \
      "$(percentile 99% <<<"$out")" "$us" "$errs"
    rps_of[$name]+="$rps "
    p99_of[$name]+="$(percentile 99% <<<"$out") "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
h_rps=$(median <<<"${rps_of[haproxy]}") h_p99=$(median <<<"${p99_of[haproxy]}")
for t in "${targets[@]}"; do
  name=${t%%:*}
  m_rps=$(median <<<"${rps_of[$name]}") m_p99=$(median <<<"${p99_of[$name]}")
  awk -v n="$name" -v r="$m_rps" -v p="$m_p99" -v hr="$h_rps" -v hp="$h_p99" 'BEGIN {
    printf "median %-10s rps=%8.0f p99_ms=%s rps_vs_haproxy=%.2f p99_vs_haproxy=%.2f\n", n, r, p, r / hr, p / hp }'
done
