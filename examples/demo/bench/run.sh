#!/usr/bin/env bash
# The demo's gateway side by side with nginx `proxy_pass` (writes) and the bare user-service (cached reads), with
# wrk on this machine, and the Redis commands per request from INFO commandstats. Needs wrk, nginx and redis-server
# on PATH and a release build (`cargo build --release -p demo`). Prints a table; see BENCHMARKS.md.
#
#   examples/demo/bench/run.sh [seconds per run, default 10]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
secs="${1:-10}"
work="$(mktemp -d)"
redis_port=6390
trap 'kill $(cat "$work"/demo.pid) 2>/dev/null; nginx -c "$work/nginx.conf" -s stop 2>/dev/null; redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1; rm -rf "$work"' EXIT

redis-server --port $redis_port --save '' --appendonly no --daemonize yes --logfile "$work/redis.log"
until redis-cli -p $redis_port ping >/dev/null 2>&1; do sleep 0.1; done
REDIS_URL=redis://127.0.0.1:$redis_port RATE_LIMIT_WRITES=100000000/1s RUST_LOG=warn \
  "$root/target/release/demo" >"$work/demo.log" 2>&1 &
echo $! >"$work/demo.pid"
until curl -sf http://127.0.0.1:3003/health >/dev/null 2>&1; do sleep 0.2; done
sed "s#@DIR@#$work#g" "$here/nginx.conf.in" >"$work/nginx.conf"
nginx -c "$work/nginx.conf"
id="$(curl -sf -XPOST -H 'content-type: application/json' -d '{"name":"bench","email":"bench@example.com"}' \
  http://127.0.0.1:3003/users | sed 's/.*"id":"\([^"]*\)".*/\1/')"
curl -sf "http://127.0.0.1:3003/users/$id" >/dev/null

rate() { wrk -t2 -c32 -d"${secs}s" ${2:+-s "$2"} "$1" | awk '/Requests\/sec/ {printf "%.0f", $2}'; }
# Commands per request during one gateway run (background heartbeats and polls included).
counted() {
  redis-cli -p $redis_port config resetstat >/dev/null
  local out; out="$(wrk -t2 -c32 -d"${secs}s" ${2:+-s "$2"} "$1")"
  local total; total="$(awk '/requests in/ {print $1}' <<<"$out")"
  local r; r="$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
  local per; per="$(redis-cli -p $redis_port info commandstats | tr -d '\r' | grep '^cmdstat_' |
    grep -v 'config|resetstat' | sed 's/cmdstat_\([^:]*\):calls=\([0-9]*\).*/\1 \2/' |
    awk -v n="$total" '{ if ($2 / n >= 0.01) printf "%s %.2f, ", toupper($1), $2 / n }')"
  echo "$r|${per%, }"
}
row() { # name, gateway url, peer url, script
  wrk -t2 -c32 -d3s ${4:+-s "$4"} "$2" >/dev/null
  wrk -t2 -c32 -d3s ${4:+-s "$4"} "$3" >/dev/null
  local g1 p1 p2 g2
  g1="$(counted "$2" "${4:-}")"; p1="$(rate "$3" "${4:-}")"; p2="$(rate "$3" "${4:-}")"; g2="$(counted "$2" "${4:-}")"
  echo "| $1 | ${g1%%|*} / ${g2%%|*} | $p1 / $p2 | $(awk -v a="${g1%%|*}" -v b="${g2%%|*}" -v c="$p1" -v d="$p2" \
    'BEGIN { lo = (a < b ? a : b) / (c > d ? c : d); hi = (a > b ? a : b) / (c < d ? c : d); printf "%.2f–%.2f", lo, hi }') | ${g1#*|} |"
}
echo "commit $(git -C "$root" rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'), ${secs}s per run"
echo "| path | gateway (runs 1 / 4) | peer (runs 2 / 3) | gateway ÷ peer | Redis commands per request (gateway, run 1) |"
echo "|---|---:|---:|---:|---|"
row 'POST /users ÷ nginx' http://127.0.0.1:3003/users http://127.0.0.1:8088/users "$here/post.lua"
row 'PUT /users/{id} ÷ nginx' "http://127.0.0.1:3003/users/$id" "http://127.0.0.1:8088/users/$id" "$here/put.lua"
curl -sf "http://127.0.0.1:3003/users/$id" >/dev/null
row 'GET /users/{id} cached ÷ bare user-service' "http://127.0.0.1:3003/users/$id" "http://127.0.0.1:3001/users/$id"
