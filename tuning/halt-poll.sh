#!/usr/bin/env bash
# Guest halt polling for a Switchboard box that is a KVM virtual machine (cpuidle driver
# `haltpoll`). An idle vCPU then polls for up to NS nanoseconds before it halts, so a wake-up
# (a packet for a reactor parked in io_uring, a load generator thread in epoll) needs no IPI and
# no VM exit on either side. On the development VM a 100-byte TCP round trip between two threads
# took 64-71 us with polling off (the VM's boot line sets 0) and 14-21 us with 50-1000 us of
# polling; tuning/README.md has the load-generator numbers.
# Cost: an idle vCPU keeps its host CPU busy for up to NS after each idle entry (the guest counts
# that time as idle, the host does not). Right for a dedicated VM; on an overcommitted host it
# takes CPU from the neighbours. Bare metal and other hypervisors: nothing to do, the script says
# so and exits 0.
#
#   sudo tuning/halt-poll.sh            set guest_halt_poll_ns = 200000 (the kernel's own default)
#   sudo tuning/halt-poll.sh NS         set it to NS (0 turns polling off)
#   tuning/halt-poll.sh --check         print the current value, change nothing (no root needed)
# Not persistent: the value is a module parameter; for every boot put
# `haltpoll.guest_halt_poll_ns=200000` on the kernel command line (or drop a `=0` override there).
set -euo pipefail
param=/sys/module/haltpoll/parameters/guest_halt_poll_ns
driver=/sys/devices/system/cpu/cpuidle/current_driver
want=200000
mode=apply
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
  *[!0-9]*) echo "halt-poll.sh: expected nanoseconds or --check, got $1 (try --help)" >&2; exit 2 ;;
  *) want="$1" ;;
esac

if [ ! -r "$param" ]; then
  echo "halt-poll.sh: no haltpoll cpuidle driver here (cpuidle driver: $(cat "$driver" 2>/dev/null || echo none)); not a KVM guest with haltpoll, nothing to do"
  exit 0
fi
if [ "$(cat "$driver" 2>/dev/null)" != haltpoll ]; then
  echo "halt-poll.sh: note: the active cpuidle driver is $(cat "$driver" 2>/dev/null || echo none), not haltpoll; the parameter has no effect until it is (boot with cpuidle_haltpoll.force=1)"
fi
before="$(cat "$param")"
if [ "$mode" = check ]; then
  echo "guest_halt_poll_ns = $before (200000 recommended for a dedicated VM; 0 = polling off)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "halt-poll.sh: must run as root to change $param (try --check)" >&2
  exit 1
fi
if [ "$before" = "$want" ]; then
  echo "guest_halt_poll_ns = $before already; nothing changed"
  exit 0
fi
echo "$want" > "$param"
echo "guest_halt_poll_ns: $before -> $(cat "$param") (undo: $0 $before)"
