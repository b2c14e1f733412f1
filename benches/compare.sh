#!/usr/bin/env bash
# Side-by-side: the same 1:1 scenario (scenarios/compare.toml, a sweep of rates) against
# Switchboard and against Mosquitto (MQTT 3.1.1, QoS 1: each user subscribes to u/<user>, a send is
# a QoS 1 publish to the peer's topic), both on this machine, loopback only. Installs Mosquitto from
# Debian (apt-get) if it is missing. Writes OUT (default benches/results/compare-latest):
#   switchboard/report.*  mosquitto/report.*  compare.md  mosquitto.conf  *.log
# What each side guarantees is stated in compare.md: Switchboard acks after fdatasync; Mosquitto
# (persistence off, its default) acks from memory and never fsyncs per message. HALT_POLL_NS sets
# guest halt polling for the run (KVM guests; tuning/halt-poll.sh), as in run.sh. SWEEP_REPEAT=N
# (default 1) runs each rate N times on both sides (`--sweep-repeat`; compare.md then uses the
# medians): N times the run time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benches/results/compare-latest}"
CORES="${CORES:-2}"
SWEEP_REPEAT="${SWEEP_REPEAT:-1}"
# With SWEEP_REPEAT > 1 a rate stops repeating once it can no longer pass p95 < the knee limit.
# compare.md reads throughput at e2e p99 bounds up to 1 s, so the limit is that widest bound (a
# run with p95 >= 1 s has p99 >= 1 s too): every median compare.md uses covers all N runs unless
# a run failed a check. Each side's report.md calls the highest rate under it its "knee".
KNEE_P95_MS=1000
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

echo "== build"
cargo build --release -q -p switchboard -p switchboard-loadgen
SB=target/release/switchboard
LG=target/release/switchboard-loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MPORT="$(free_port)"
cat > "$OUT/mosquitto.conf" <<CONF
# Mosquitto for the comparison: loopback only, no auth, no persistence (its default: QoS 1
# messages live in memory), no limit on in-flight or queued messages (the load generator bounds
# the run), and TCP_NODELAY like Switchboard (without it small publishes wait for delayed ACKs).
listener $MPORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 0
max_queued_messages 0
set_tcp_nodelay true
CONF

DATA="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-compare.XXXXXX")"
# Lift the per-user message and per-connection frame rate limits (made for people, not for a
# load generator); Mosquitto has none either.
cat > "$OUT/switchboard.toml" <<'TOML'
messages_per_user_burst = 1000000
messages_per_user_refill_per_s = 1000
frames_per_conn_burst = 1000000
frames_per_conn_refill_per_s = 1000
TOML
# HALT_POLL_NS: guest halt polling for both sides' runs (KVM guests), put back on exit.
. benches/halt-poll-env.sh
halt_poll_begin
"$SB" serve --config "$OUT/switchboard.toml" --listen 127.0.0.1:0 --data-dir "$DATA" --cores "$CORES" > "$OUT/switchboard.log" 2>&1 &
SPID=$!
"$MOSQ" -c "$OUT/mosquitto.conf" > "$OUT/mosquitto.log" 2>&1 &
MPID=$!
cleanup() {
  kill "$SPID" "$MPID" 2>/dev/null || true
  wait "$SPID" "$MPID" 2>/dev/null || true
  rm -rf "$DATA"
  halt_poll_restore
}
trap cleanup EXIT
ADDR=
for _ in $(seq 1 100); do
  ADDR="$(grep -o 'listening on [0-9.:]*' "$OUT/switchboard.log" | awk '{print $3}' || true)"
  [ -n "$ADDR" ] && break
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "switchboard did not start"; cat "$OUT/switchboard.log"; exit 1; }
sleep 0.5
kill -0 "$MPID" || { echo "mosquitto did not start"; cat "$OUT/mosquitto.log"; exit 1; }
echo "== switchboard $ADDR (pid $SPID), mosquitto 127.0.0.1:$MPORT (pid $MPID, $("$MOSQ" -h | head -1))"
benches/machine.sh "$DATA" "$CORES" > "$OUT/machine.md"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/load.txt"

echo "== switchboard"
"$LG" run --scenario benches/scenarios/compare.toml --sweep-all --sweep-repeat "$SWEEP_REPEAT" --knee-p95-ms "$KNEE_P95_MS" --target "ws://$ADDR" --data-dir "$DATA" \
  --server-pid "$SPID" --report "$OUT/switchboard" > "$OUT/switchboard.stdout" 2> "$OUT/switchboard.progress" || true
grep '^==' "$OUT/switchboard.progress" || true
echo "load average after switchboard: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
sleep 3
echo "== mosquitto"
"$LG" run --scenario benches/scenarios/compare.toml --sweep-all --sweep-repeat "$SWEEP_REPEAT" --knee-p95-ms "$KNEE_P95_MS" --target "mqtt://127.0.0.1:$MPORT" \
  --server-pid "$MPID" --report "$OUT/mosquitto" > "$OUT/mosquitto.stdout" 2> "$OUT/mosquitto.progress" || true
grep '^==' "$OUT/mosquitto.progress" || true
echo "load average after mosquitto: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"

python3 "$(dirname "$0")/compare_report.py" "$OUT"
echo "== done: $OUT"
