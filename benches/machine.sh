#!/usr/bin/env bash
# Prints a Markdown description of this machine for a results directory:
#   benches/machine.sh DATA_DIR CORES
set -euo pipefail
data="${1:?data dir}"
cores="${2:?server cores}"
echo "# Machine"
echo
echo '```text'
echo "date:        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "git:         $(git rev-parse --short HEAD 2>/dev/null || echo n/a)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
echo "kernel:      $(uname -sr)"
echo "cpu:         $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "memory:      $(free -g | awk '/Mem:/{print $2 " GiB"}')"
echo "data dir fs: $(df -T "$data" | awk 'NR==2{print $2 " on " $1}')"
echo "open files:  soft $(ulimit -Sn), hard $(ulimit -Hn)"
echo "port range:  $(sysctl -n net.ipv4.ip_local_port_range | xargs)"
echo "somaxconn:   $(sysctl -n net.core.somaxconn)"
echo "cpuidle:     $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo n/a)$( [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ] && echo ", guest_halt_poll_ns $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns) (tuning/halt-poll.sh)")"
echo "rustc:       $(rustc --version)"
pinning="pinned"
if printf '%s\n' "${SB_CONFIG:-}" | grep -Eq '^[[:space:]]*pin_cores[[:space:]]*=[[:space:]]*false'; then pinning="not pinned"; fi
echo "server:      switchboard serve --cores $cores ($pinning), embedded store, fdatasync per group commit"
if [ -n "${SB_CONFIG:-}" ]; then echo "config:      ${SB_CONFIG//$'\n'/; } (SB_CONFIG, on top of the defaults)"; fi
echo "loadgen:     on the same machine, sharing the same $(nproc) CPUs"
echo "load avg:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) at the start; other processes then:"
ps -eo pcpu,comm --sort=-pcpu | awk 'NR>1 && $1>5 {print "               " $1 "% " $2}' | head -8
echo '```'
