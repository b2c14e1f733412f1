#!/usr/bin/env bash
# Builds the release binaries, starts a Switchboard server on a free loopback port with a fresh
# data directory, and measures: idle memory per connection (`idle`, 19K connections), the default
# scenario (scenarios/default.toml), a 1:1 sweep (scenarios/sweep.toml) and a 100-member group
# sweep (scenarios/groups.toml), then a capacity plan from the 1:1 sweep. Writes everything under
# OUT (default benches/results/latest):
#   machine.md load.txt idle.txt idle.json  {default,sweep,groups}/report.{json,md,html}
#   plan.md  server.log  README.md (summary)
# SB_CONFIG adds server settings (TOML lines) for A/B runs; machine.md records them. HALT_POLL_NS
# sets guest halt polling for the run (tuning/halt-poll.sh; KVM guests only, restored on exit).
# SWEEP_REPEAT=N (default 1) runs each sweep rate N times (`--sweep-repeat`; knee on the median
# p95, every run must pass its checks): the sweeps take N times as long.
# Every load-generator run is bounded by its scenario (≤ ~60 s each); the server is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benches/results/latest}"
CORES="${CORES:-2}"
SWEEP_REPEAT="${SWEEP_REPEAT:-1}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

echo "== build"
cargo build --release -q -p switchboard -p switchboard-loadgen
SB=target/release/switchboard
LG=target/release/switchboard-loadgen

DATA="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-bench.XXXXXX")"
# The load generator's simulated users send far faster than the per-user message limit (60 burst,
# 1/s) a real person needs; lift it (and the per-connection frame limit) for throughput runs.
cat > "$DATA.toml" <<'TOML'
messages_per_user_burst = 1000000
messages_per_user_refill_per_s = 1000
frames_per_conn_burst = 1000000
frames_per_conn_refill_per_s = 1000
TOML
# SB_CONFIG: more server settings for an A/B run, e.g. SB_CONFIG='commit_delay_us = 0'.
if [ -n "${SB_CONFIG:-}" ]; then printf '%s\n' "$SB_CONFIG" >> "$DATA.toml"; fi
# HALT_POLL_NS: guest halt polling for this run (KVM guests, tuning/halt-poll.sh), put back on exit.
. benches/halt-poll-env.sh
halt_poll_begin
"$SB" serve --config "$DATA.toml" --listen 127.0.0.1:0 --data-dir "$DATA" --cores "$CORES" > "$OUT/server.log" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA" "$DATA.toml"
  halt_poll_restore
}
trap cleanup EXIT
ADDR=
for _ in $(seq 1 100); do
  ADDR="$(grep -o 'listening on [0-9.:]*' "$OUT/server.log" | awk '{print $3}' || true)"
  [ -n "$ADDR" ] && break
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "server did not start:"; cat "$OUT/server.log"; exit 1; }
echo "== server $ADDR (pid $PID, data $DATA)"

echo "== machine"
benches/machine.sh "$DATA" "$CORES" > "$OUT/machine.md"
load() { echo "$1: load average $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"; }
: > "$OUT/load.txt"
cat "$OUT/machine.md"

status=0
load "before idle"
echo "== idle: memory per connection (19,000 connections)"
"$LG" idle --target "$ADDR" --secret-file "$DATA/token.secret" --connections 19000 --hold 10s \
  --json "$OUT/idle.json" > "$OUT/idle.txt" 2>&1 || status=1
cat "$OUT/idle.txt"
sleep 3

load "before default"
echo "== default scenario"
"$LG" run --scenario benches/scenarios/default.toml --target "ws://$ADDR" --data-dir "$DATA" \
  --server-pid "$PID" --report "$OUT/default" > "$OUT/default.stdout" 2> "$OUT/default.progress" || status=1
tail -n 25 "$OUT/default.progress"
sleep 3

load "before sweep"
echo "== sweep ($SWEEP_REPEAT run(s) per rate)"
"$LG" run --scenario benches/scenarios/sweep.toml --sweep-repeat "$SWEEP_REPEAT" --target "ws://$ADDR" --data-dir "$DATA" \
  --server-pid "$PID" --report "$OUT/sweep" > "$OUT/sweep.stdout" 2> "$OUT/sweep.progress" || true
grep '^==' "$OUT/sweep.progress" || true

load "before groups"
echo "== groups sweep (100 members, $SWEEP_REPEAT run(s) per rate)"
"$LG" run --scenario benches/scenarios/groups.toml --sweep-repeat "$SWEEP_REPEAT" --target "ws://$ADDR" --data-dir "$DATA" \
  --server-pid "$PID" --report "$OUT/groups" > "$OUT/groups.stdout" 2> "$OUT/groups.progress" || true
grep '^==' "$OUT/groups.progress" || true

load "after groups"
echo "== plan"
# Memory per connection from the idle run (19K connections on a fresh server), not from the
# sweep's report: its 2K connections open on a server that already held 19K, so RSS hardly moves.
BPC="$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["server_rss_bytes_per_connection"]))' "$OUT/idle.json" 2>/dev/null || true)"
"$LG" plan --report "$OUT/sweep/report.json" --users 10000000 --msgs-per-user-day 40 \
  --peak-factor 3 --devices-per-user 1.5 --online-share 0.5 ${BPC:+--bytes-per-connection "$BPC"} \
  > "$OUT/plan.md" || status=1
cat "$OUT/plan.md"

{
  echo "# Benchmark results"
  echo
  echo "Made by \`benches/run.sh\`. Machine: [machine.md](machine.md)."
  echo
  echo "- Idle memory: [idle.txt](idle.txt)"
  echo "- Default scenario: [default/report.md](default/report.md) ([html](default/report.html), [json](default/report.json))"
  echo "- Sweep: [sweep/report.md](sweep/report.md) ([html](sweep/report.html), [json](sweep/report.json))"
  echo "- 100-member groups sweep: [groups/report.md](groups/report.md) ([html](groups/report.html), [json](groups/report.json))"
  echo "- Capacity plan from the sweep: [plan.md](plan.md)"
  echo
  grep -E 'server RSS per connection|opened ' "$OUT/idle.txt" | sed 's/^/    /'
  echo
  grep -E '^\*\*|^Started|throughput|send → |^Knee' "$OUT/default/report.md" | sed 's/^/    /' || true
  echo
  echo "Sweeps: $SWEEP_REPEAT run(s) per rate (SWEEP_REPEAT)."
  echo
  echo "1:1 sweep (2K connections, receipts):"
  grep -E '^Knee|^At half the knee' "$OUT/sweep/report.md" || true
  echo
  echo "100-member groups (2K connections, aggregated receipts):"
  grep -E '^Knee' "$OUT/groups/report.md" || true
  grep -E '^\| deliveries' "$OUT/groups/report.md" | sed 's/^/    /' || true
  echo
  echo "Load average during the runs (2 CPUs, shared with other work on the machine):"
  echo
  sed 's/^/    /' "$OUT/load.txt"
} > "$OUT/README.md"
echo "== done: $OUT (status $status)"
exit "$status"
