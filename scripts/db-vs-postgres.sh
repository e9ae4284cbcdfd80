#!/usr/bin/env bash
# The replicated database against PostgreSQL, side by side in one run, on
# the same three workloads: a one-row INSERT from 1 client and from 64
# (each acknowledged once durable on a second machine's worth of copies:
# PostgreSQL's synchronous standby, the store's quorum), and a point
# SELECT by primary key from 64 clients on the standby / read replica.
#
# usage: scripts/db-vs-postgres.sh [WRITE_URL [READ_URL]]
#   WRITE_URL  the store's leader (or any voter), e.g. http://127.0.0.1:4001
#   READ_URL   a read replica (default: WRITE_URL)
#   Without a URL only PostgreSQL is measured.
# env: DURATION (s, default 8). Installs postgresql and wrk when missing;
# run as root (PostgreSQL runs as the user postgres).
#
# PostgreSQL: a primary and one synchronous streaming standby
# (synchronous_standby_names, so a commit waits for the standby's flush),
# trust auth on loopback only, driven by pgbench. The store: its
# rqlite-compatible HTTP API (/db/execute, /db/query?level=none), driven
# by wrk with a Lua script that counts answers that are not a clean 200.
set -euo pipefail
DURATION=${DURATION:-8}
WRITE_URL=${1:-}
READ_URL=${2:-$WRITE_URL}
PG_PRIMARY=55432 PG_STANDBY=55433

if ! command -v wrk >/dev/null || ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql wrk >/dev/null
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/scaleout-db-vs-pg.XXXX)
chmod 755 "$work"
chown postgres "$work"
as_postgres() { su postgres -s /bin/bash -c "$*"; }
stop_postgres() {
  for d in standby primary; do
    as_postgres "$pg_bin/pg_ctl -D $work/$d -m immediate stop" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap stop_postgres EXIT

as_postgres "$pg_bin/initdb -D $work/primary -A trust >/dev/null"
cat >>"$work/primary/postgresql.conf" <<CONF
port = $PG_PRIMARY
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
wal_level = replica
max_wal_senders = 4
synchronous_standby_names = 'standby'
CONF
echo "host replication all 127.0.0.1/32 trust" >>"$work/primary/pg_hba.conf"
as_postgres "$pg_bin/pg_ctl -D $work/primary -l $work/primary.log -w start >/dev/null"
as_postgres "$pg_bin/pg_basebackup -h 127.0.0.1 -p $PG_PRIMARY -D $work/standby -R -X stream -w"
cat >>"$work/standby/postgresql.auto.conf" <<CONF
port = $PG_STANDBY
primary_conninfo = 'host=127.0.0.1 port=$PG_PRIMARY user=postgres application_name=standby'
CONF
as_postgres "$pg_bin/pg_ctl -D $work/standby -l $work/standby.log -w start >/dev/null"
sql() { as_postgres "$pg_bin/psql -h 127.0.0.1 -p $PG_PRIMARY -qAt -d postgres -c \"$1\""; }
sql "CREATE TABLE bench_kv(k bigserial PRIMARY KEY, v text)"
sql "INSERT INTO bench_kv(v) SELECT 'hello world' FROM generate_series(1, 1000)"
state=$(sql "SELECT sync_state FROM pg_stat_replication")
if [[ $state != sync ]]; then
  echo "$0: the standby is not synchronous ($state); the comparison would be unfair" >&2
  exit 1
fi
echo "INSERT INTO bench_kv(v) VALUES ('hello world');" >"$work/insert.sql"
printf '\\set id random(1, 1000)\nSELECT v FROM bench_kv WHERE k = :id;\n' >"$work/select.sql"
chown postgres "$work"/*.sql
pgbench() { # port clients script
  as_postgres "$pg_bin/pgbench -h 127.0.0.1 -p $1 -n -c $2 -j 1 -T $DURATION -f $3 postgres" 2>&1 |
    awk '/^tps/ {printf "%.0f", $3}'
}
# Every workload starts on a quiet disk: PostgreSQL's dirty buffers are
# checkpointed (on the standby, a restartpoint) and the page cache is
# flushed, so that no workload pays for the writeback of the one before
# (the store's runs come after PostgreSQL's 64-client INSERTs, whose
# buffers the background writer was still writing out).
quiet_disk() {
  sql "CHECKPOINT"
  as_postgres "$pg_bin/psql -h 127.0.0.1 -p $PG_STANDBY -qAt -d postgres -c CHECKPOINT"
  sync
}
quiet_disk
echo "postgres insert c=1  tps=$(pgbench $PG_PRIMARY 1 "$work/insert.sql")"
quiet_disk
echo "postgres insert c=64 tps=$(pgbench $PG_PRIMARY 64 "$work/insert.sql")"
quiet_disk
echo "postgres select c=64 tps=$(pgbench $PG_STANDBY 64 "$work/select.sql") (on the standby)"
[[ -z $WRITE_URL ]] && exit 0

execute() {
  curl -sf -XPOST -H 'Content-Type: application/json' "$WRITE_URL/db/execute" -d "$1" >/dev/null
}
execute '["DROP TABLE IF EXISTS bench_kv"]'
execute '["CREATE TABLE bench_kv(k INTEGER PRIMARY KEY, v TEXT)"]'
execute '["WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1000) INSERT INTO bench_kv(v) SELECT '"'"'hello world'"'"' FROM n"]'
# The replica's copy, before it is read.
for _ in $(seq 1 50); do
  got=$(curl -sf "$READ_URL/db/query?level=none&q=SELECT%20count(*)%20FROM%20bench_kv" | grep -o '\[\[1000\]\]' || true)
  [[ -n $got ]] && break
  sleep 0.1
done
cat >"$work/insert.lua" <<'LUA'
wrk.method = "POST"
wrk.path = "/db/execute"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '[["INSERT INTO bench_kv(v) VALUES(?)", "hello world"]]'
bad = 0
response = function(status, headers, body)
  if status ~= 200 or string.find(body, '"error"') then bad = bad + 1 end
end
done = function(summary, latency, requests) io.write(string.format("bad_responses=%d\n", bad)) end
LUA
cat >"$work/select.lua" <<'LUA'
bad = 0
request = function()
  local id = math.random(1, 1000)
  return wrk.format("GET", "/db/query?level=none&q=SELECT%20v%20FROM%20bench_kv%20WHERE%20k%3D" .. id)
end
response = function(status, headers, body)
  if status ~= 200 or string.find(body, '"error"') then bad = bad + 1 end
end
done = function(summary, latency, requests) io.write(string.format("bad_responses=%d\n", bad)) end
LUA
drive() { # url clients script
  wrk -t1 -c"$2" -d"${DURATION}s" -s "$3" "$1" |
    awk '/Requests\/sec/ {r = $2} /bad_responses/ {b = $1} END {printf "%.0f %s", r, b}'
}
quiet_disk
echo "scaleout insert c=1  tps=$(drive "$WRITE_URL" 1 "$work/insert.lua")"
quiet_disk
echo "scaleout insert c=64 tps=$(drive "$WRITE_URL" 64 "$work/insert.lua")"
quiet_disk
echo "scaleout select c=64 tps=$(drive "$READ_URL" 64 "$work/select.lua") (on the replica)"
