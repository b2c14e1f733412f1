#!/usr/bin/env python3
"""Writes compare.md from OUT/switchboard/report.json and OUT/mosquitto/report.json (both sweeps
made by benches/compare.sh). Usage: benches/compare_report.py OUT"""
import json, sys
out = sys.argv[1]
sides = {}
for name in ("switchboard", "mosquitto"):
    with open(f"{out}/{name}/report.json") as f:
        sides[name] = json.load(f)
def median(s):
    # SWEEP_REPEAT > 1: each rate ran several times; use the medians over its runs (for an even
    # count the worse middle value) instead of the one detailed run's figures.
    if s.get("repeats", 1) == 1:
        return s
    m = s["median"]
    e2e = dict(s["latency_ms"]["e2e"], p50=m["e2e_p50_ms"], p95=m["e2e_p95_ms"], p99=m["e2e_p99_ms"])
    return dict(s, throughput_msgs_per_s=m["throughput_msgs_per_s"], latency_ms=dict(s["latency_ms"], e2e=e2e))
def steps(r):
    return {s["rate"]: median(s) for s in r["sweep"]["steps"]}
sb, mq = steps(sides["switchboard"]), steps(sides["mosquitto"])
def stopped(s):
    # A rate that could no longer pass stopped before its last run: its medians are over fewer runs.
    k, n = len(s.get("runs", [])), s.get("repeats", 1)
    return f" ({k} of {n} runs)" if 0 < k < n else ""
def lat(s, p):
    v = s["latency_ms"]["e2e"][p]
    return "–" if v is None else f"{v:.2f}"
def cpu(s):
    v = s.get("server_cpu_s")
    return "n/a" if v is None else f"{v:.1f}"
lines = ["# Switchboard vs Mosquitto, same 1:1 scenario", "",
         f"Scenario: `benches/scenarios/compare.toml` ({sides['switchboard']['connections_target']} connections, "
         "100-byte payloads, Poisson arrivals, open loop, 10 s measured per rate, receipts off on both sides). "
         "Same load generator, same machine ([machine.md](machine.md)), loopback; latency from the scheduled send time.", "",
         "## What each side guarantees", "",
         "- **Switchboard**: a `SendAck` means the message is on disk: appended to the shard's log and "
         "`fdatasync`ed (group commit) before the ack and before delivery. A crash after the ack loses nothing.",
         "- **Mosquitto** (2.0, `persistence false`, its default): a `PUBACK` means the broker has the message "
         "in memory. Nothing is written to disk per message; with `persistence true` it would only save its "
         "in-memory state every `autosave_interval` (default 30 min) or at shutdown. A crash loses every "
         "queued message.", "",
         "## Per rate", "",
         *([f"Each rate ran {sides['switchboard']['sweep'].get('repeats', 1)} times (`SWEEP_REPEAT`): achieved msgs/s and "
            "latencies below are medians over the runs (for an even count the worse middle value); "
            "a rate fails its checks if any run did. A rate stops repeating early only once a run failed a check "
            f"or half its runs had e2e p95 >= {sides['switchboard']['sweep'].get('knee_p95_ms', 100):.0f} ms "
            "(\"(k of N runs)\" below).", ""]
           if sides["switchboard"]["sweep"].get("repeats", 1) > 1 else []),
         "| offered msgs/s | Switchboard achieved | e2e p50 | e2e p99 | server CPU s | Mosquitto achieved | e2e p50 | e2e p99 | server CPU s |",
         "|---|---|---|---|---|---|---|---|---|"]
for rate in sorted(set(sb) | set(mq)):
    a, b = sb.get(rate), mq.get(rate)
    cell = lambda s: [f"{s['throughput_msgs_per_s']:.0f}" + ("" if s["ok"] else " (failed checks)") + stopped(s), lat(s, "p50"), lat(s, "p99"), cpu(s)] if s else ["–"] * 4
    lines.append("| " + " | ".join([f"{rate:.0f}"] + cell(a) + cell(b)) + " |")
lines += ["", "## Throughput at equal p99", "",
          "Highest achieved msgs/s among the rates whose run passed every check and whose e2e p99 was at most the bound:", "",
          "| e2e p99 bound | Switchboard | Mosquitto | ratio |", "|---|---|---|---|"]
def best(st, bound):
    ok = [s["throughput_msgs_per_s"] for s in st.values()
          if s["ok"] and s["latency_ms"]["e2e"]["p99"] is not None and s["latency_ms"]["e2e"]["p99"] <= bound]
    return max(ok) if ok else 0.0
for bound in (10, 50, 100, 250, 500, 1000):
    x, y = best(sb, bound), best(mq, bound)
    ratio = f"{x / y:.2f}×" if y > 0 else "–"
    lines.append(f"| {bound} ms | {x:.0f} | {y:.0f} | {ratio} |")
def mem(name):
    r = sides[name]
    first = r["sweep"]["steps"][0]
    end = r.get("server_rss_bytes_end")
    end = "n/a" if end is None else f"{end / 2**20:.1f} MiB"
    after = first.get("server_rss_bytes")
    after = "n/a" if after is None else f"{after / 2**20:.1f} MiB"
    return (f"- {name}: RSS {after} once the first step's {r['connections_target']} connections were open "
            f"({first.get('bytes_per_connection')} B per connection over the fresh process), {end} at the end")
lines += ["", "## Memory", "", mem("switchboard"), mem("mosquitto"), "",
          "Per-connection figures from a fresh process only: later steps reuse memory the earlier ones left.", "",
          "Full reports: [switchboard/report.md](switchboard/report.md), [mosquitto/report.md](mosquitto/report.md) "
          "(HTML with the throughput-vs-latency curves next to them). Load average during the runs: [load.txt](load.txt).", ""]
with open(f"{out}/compare.md", "w") as f:
    f.write("\n".join(lines))
print("\n".join(lines))
