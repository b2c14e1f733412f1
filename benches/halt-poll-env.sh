# Sourced by benches/run.sh and benches/compare.sh: HALT_POLL_NS=<ns> turns on guest halt polling
# (KVM guests, tuning/halt-poll.sh) for the run; halt_poll_restore (call it from the EXIT trap)
# puts the previous value back. Without HALT_POLL_NS, or without the haltpoll driver, nothing
# changes. machine.md records the value in effect.
HALT_POLL_BEFORE=
halt_poll_begin() {
  if [ -n "${HALT_POLL_NS:-}" ] && [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ]; then
    HALT_POLL_BEFORE="$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)"
    tuning/halt-poll.sh "$HALT_POLL_NS"
  fi
}
halt_poll_restore() {
  if [ -n "$HALT_POLL_BEFORE" ]; then tuning/halt-poll.sh "$HALT_POLL_BEFORE"; fi
}
