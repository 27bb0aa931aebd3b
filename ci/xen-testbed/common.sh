# shellcheck shell=sh
# Shared by the dom0 and domU init scripts (busybox ash). Needs KVER from /etc/testbed.conf.

# Seconds since boot, 10 ms resolution (busybox date has no %N).
up() { cut -d' ' -f1 /proc/uptime; }
# B - A, two decimals.
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# A + B; the larger of A and B; S / N, two decimals (0 for N = 0). For the backend scripts'
# kill-cycle figures.
add() { awk -v a="$1" -v b="$2" 'BEGIN { print a + b }'; }
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > a ? b : a) }'; }
mean() { awk -v s="$1" -v n="$2" 'BEGIN { printf "%.2f", n ? s / n : 0 }'; }
# A result line the host parses: MARK|TIME|INFO|OBSERVE|PASS|FAIL ...
say() { echo "TESTBED $*"; }

# Loads modules in the order the host computed from modules.dep (/etc/modload/NAME).
modload() {
  for name in "$@"; do
    [ -f "/etc/modload/$name" ] || { echo "modload: no /etc/modload/$name"; return 1; }
    while read -r p; do
      m=$(basename "$p" .ko | tr - _)
      [ -d "/sys/module/$m" ] && continue
      insmod "/lib/modules/$KVER/$p" || { echo "modload: insmod $p failed"; return 1; }
    done <"/etc/modload/$name"
  done
}

# wait_for SECONDS CMD...: polls CMD every 0.1 s; 1 on timeout.
wait_for() {
  n=$(($1 * 10)); shift
  while ! "$@" 2>/dev/null; do
    n=$((n - 1)); [ "$n" -gt 0 ] || return 1
    usleep 100000
  done
}
