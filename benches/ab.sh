#!/usr/bin/env bash
# A/B of two server builds (or two server configs) on one scenario, in interleaved pairs, each run
# on a fresh server with a fresh data directory:
#   benches/ab.sh A_BINARY B_BINARY [SCENARIO] [PAIRS] [OUT]
#   defaults: SCENARIO benches/scenarios/probe.toml, PAIRS 3, OUT benches/results/ab-latest
# Build A and B first, e.g. `cargo build --release -p switchboard && cp target/release/switchboard
# /tmp/sb-a`, change, build, copy to /tmp/sb-b. CONFIG_A / CONFIG_B add server settings (TOML
# lines) to one side only, so one binary with two configs also works. Prints one line per run and
# writes OUT/ab.md (the table) and OUT/<side>-<pair>/report.{json,md,html}.
# Per run: achieved msgs/s, e2e p50/p99, commits, and CPU per message — the server's (its threads
# and io_uring workers) and the machine's — from the run's phase_cpu (/proc), which is far more
# repeatable on a shared box than latency: compare the CPU columns; read p99 over many pairs only.
# Every run is bounded by its scenario; each server is stopped after its run.
set -euo pipefail
cd "$(dirname "$0")/.."
A="$(realpath "$1")"; B="$(realpath "$2")"
SC="${3:-benches/scenarios/probe.toml}"; PAIRS="${4:-3}"; OUT="${5:-benches/results/ab-latest}"
[ -x "$A" ] && [ -x "$B" ] || { echo "ab.sh: A and B must be server binaries" >&2; exit 2; }
cargo build --release -q -p switchboard-loadgen
LG=target/release/switchboard-loadgen
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
PID=; DATA=
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  if [ -n "$DATA" ]; then rm -rf "$DATA" "$DATA.toml"; fi
  PID=; DATA=
}
trap cleanup EXIT
one() { # one SIDE BINARY PAIR CONFIG
  local side=$1 bin=$2 pair=$3 extra=$4 tag="$1-$3" addr=
  DATA="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-ab.XXXXXX")"
  printf '%s\n' "messages_per_user_burst = 1000000" "messages_per_user_refill_per_s = 1000" \
    "frames_per_conn_burst = 1000000" "frames_per_conn_refill_per_s = 1000" "$extra" > "$DATA.toml"
  "$bin" serve --config "$DATA.toml" --listen 127.0.0.1:0 --data-dir "$DATA" --cores "${CORES:-2}" \
    > "$OUT/$tag.server.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do
    addr=$(grep -o 'listening on [0-9.:]*' "$OUT/$tag.server.log" | awk '{print $3}' || true)
    [ -n "$addr" ] && break; sleep 0.1
  done
  [ -n "$addr" ] || { echo "ab.sh: server $side did not start (see $OUT/$tag.server.log)" >&2; exit 1; }
  "$LG" run --scenario "$SC" --target "ws://$addr" --data-dir "$DATA" --server-pid "$PID" \
    --report "$OUT/$tag" > /dev/null 2> "$OUT/$tag.progress" || true
  cleanup
  python3 - "$OUT/$tag/report.json" "$side" "$pair" <<'PY' | tee -a "$OUT/ab.rows"
import json, sys
j = json.load(open(sys.argv[1])); e = j["latency_ms"]["e2e"]; pc = j["phase_cpu"]
sent = max(j["messages_sent"], 1)
print("| %s | %s | %.0f | %.2f | %.2f | %d | %.1f | %.1f |" % (sys.argv[2], sys.argv[3],
      j["throughput_msgs_per_s"], e["p50"], e["p99"], j["server_commits"]["commits"],
      pc["server_s"] * 1e6 / sent, pc["machine_s"] * 1e6 / sent))
PY
  sleep 2
}
rm -f "$OUT/ab.rows"
for p in $(seq "$PAIRS"); do
  one A "$A" "$p" "${CONFIG_A:-}"
  one B "$B" "$p" "${CONFIG_B:-}"
done
{
  echo "# A/B: $(basename "$A") vs $(basename "$B"), $(basename "$SC"), $PAIRS interleaved pairs"
  echo
  echo "A = \`$A\`${CONFIG_A:+ with \`$CONFIG_A\`}; B = \`$B\`${CONFIG_B:+ with \`$CONFIG_B\`}. $(date -u +%FT%TZ), $(nproc) CPUs."
  echo
  echo "| side | pair | msgs/s | e2e p50 ms | e2e p99 ms | commits | server µs/msg | machine µs/msg |"
  echo "|---|---|---|---|---|---|---|---|"
  cat "$OUT/ab.rows"
  echo
  python3 - "$OUT/ab.rows" <<'PY'
import statistics, sys
rows = [l.strip().strip("|").split("|") for l in open(sys.argv[1]) if l.startswith("|")]
by = {}
for r in rows:
    by.setdefault(r[0].strip(), []).append((float(r[6]), float(r[7]), float(r[4])))
if "A" in by and "B" in by:
    med = lambda side, i: statistics.median(v[i] for v in by[side])
    sa, sb, ma, mb = med("A", 0), med("B", 0), med("A", 1), med("B", 1)
    pa, pb = med("A", 2), med("B", 2)
    print(f"Medians: server CPU per message A {sa:.1f} µs, B {sb:.1f} µs (B/A {sb/sa:.3f}); "
          f"machine A {ma:.1f} µs, B {mb:.1f} µs (B/A {mb/ma:.3f}); "
          f"e2e p99 A {pa:.2f} ms, B {pb:.2f} ms.")
PY
} > "$OUT/ab.md"
rm -f "$OUT/ab.rows"
cat "$OUT/ab.md" | tail -1
