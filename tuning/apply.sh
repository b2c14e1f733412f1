#!/usr/bin/env bash
# Applies tuning/sysctl.conf to the running kernel: prints each key's value before and after,
# changes only what differs (running it twice changes nothing the second time), and saves the
# previous values so they can be put back. Refuses to run without root. Single-number limits
# (file-max, somaxconn, backlogs, conntrack_max, …) are minimums: a box already set higher is left
# alone; the other keys (port range, buffers, tw_reuse, fin_timeout) are set exactly.
#
#   sudo tuning/apply.sh              apply, save the old values to /var/tmp/switchboard-sysctl.before.<time>
#   sudo tuning/apply.sh --persist    also install the file as /etc/sysctl.d/60-switchboard.conf (survives reboots)
#   tuning/apply.sh --check           print current vs wanted, change nothing (no root needed)
#   sudo tuning/apply.sh --restore F  put back the values saved in F
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
conf="$here/sysctl.conf"
mode=apply
restore_file=
case "${1:-}" in
  "") ;;
  --persist) mode=persist ;;
  --check) mode=check ;;
  --restore) mode=restore; restore_file="${2:?--restore needs the file written by an earlier run}" ;;
  -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
  *) echo "apply.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

if [ "$mode" != check ] && [ "$(id -u)" -ne 0 ]; then
  echo "apply.sh: must run as root to change kernel settings (try --check to only compare)" >&2
  exit 1
fi

# "key = value" lines without comments; values normalised to single spaces.
entries() {
  sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$1" | while IFS='=' read -r k v; do
    k="$(echo "$k" | xargs)"; v="$(echo "$v" | xargs)"
    printf '%s\t%s\n' "$k" "$v"
  done
}
current() { sysctl -n "$1" 2>/dev/null | tr -s ' \t' ' ' | xargs; }
exact_keys=" net.ipv4.ip_local_port_range net.ipv4.ip_local_reserved_ports net.ipv4.tcp_tw_reuse net.ipv4.tcp_fin_timeout net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem "
# Whether `before` already satisfies `want` for `key`.
satisfied() {
  local key="$1" before="$2" want="$3"
  [ "$before" = "$want" ] && return 0
  if [ "$mode" != restore ] && [[ "$exact_keys" != *" $key "* ]] \
     && [[ "$before" =~ ^[0-9]+$ ]] && [[ "$want" =~ ^[0-9]+$ ]] && [ "$before" -ge "$want" ]; then
    return 0
  fi
  return 1
}

if [ "$mode" = restore ]; then
  [ -f "$restore_file" ] || { echo "apply.sh: no such file $restore_file" >&2; exit 2; }
  src="$restore_file"
else
  src="$conf"
fi

backup=
if [ "$mode" = apply ] || [ "$mode" = persist ]; then
  backup="/var/tmp/switchboard-sysctl.before.$(date +%Y%m%d-%H%M%S)"
  : > "$backup"
fi

changed=0
printf '%-40s %-28s %-28s %s\n' key before wanted after
while IFS=$'\t' read -r key want; do
  if ! sysctl -n "$key" >/dev/null 2>&1; then
    printf '%-40s %-28s %-28s %s\n' "$key" "(absent)" "$want" "skipped: not in this kernel (module not loaded?)"
    continue
  fi
  before="$(current "$key")"
  [ -n "$backup" ] && printf '%s = %s\n' "$key" "$before" >> "$backup"
  after="$before"
  if [ "$mode" != check ] && ! satisfied "$key" "$before" "$want"; then
    sysctl -q -w "$key=$want" >/dev/null
    after="$(current "$key")"
    changed=$((changed + 1))
  fi
  note=""
  if [ "$mode" = check ]; then
    if satisfied "$key" "$before" "$want"; then after="ok"; else after="differs"; fi
  elif ! satisfied "$key" "$after" "$want"; then
    note="  (kernel kept a different value)"
  fi
  printf '%-40s %-28s %-28s %s%s\n' "$key" "$before" "$want" "$after" "$note"
done < <(entries "$src")

case "$mode" in
  check) echo "check only: nothing changed" ;;
  restore) echo "restored $changed value(s) from $restore_file" ;;
  *)
    echo "changed $changed value(s); previous values saved in $backup (undo: $0 --restore $backup)"
    if [ "$mode" = persist ]; then
      install -m 0644 "$conf" /etc/sysctl.d/60-switchboard.conf
      echo "installed /etc/sysctl.d/60-switchboard.conf (applied at every boot)"
    fi
    ;;
esac
