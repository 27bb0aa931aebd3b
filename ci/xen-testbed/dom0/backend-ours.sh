# shellcheck shell=sh
# BACKEND=ours: the project's userspace block backend (xen-blkback: idd-blk's blkback on the
# xen-platform crate), copied by the host into /opt/idd/bin (IDD_BINARIES). Same interface as
# backend-kernel.sh. The network stays on Xen's kernel netback until idd-net runs on Xen.
#
# This script is the supervisor: it keeps what must outlive a backend process —
#  * fd 9, an open /dev/xen/evtchn: the event channel the backend binds stays bound across
#    its restarts (each process gets it as --evtchn-fd 9);
#  * /run/idd/xvda.mem (tmpfs): the backend's journal of in-flight requests;
# and restarts the backend after each kill. The guest's ring and grants are the guest's.

IMG=/srv/xvda.img
PEER_IMG=/srv/xvdb.img
DISK_MB=64
MAC=00:16:3e:00:00:02
LOGD=/var/log/idd
BLK_OUT=$LOGD/xen-blkback.out
BLK_ERR=$LOGD/xen-blkback.err
KILLS=${KILLS:-20}
BLK_PID=

backend_prepare() {
  # Xen's kernel backends serve the network and the peer disk xvdb (the same-run comparison).
  modload xen-netback loop xen-blkback || return 1
  mount -t tmpfs -o size=256m tmpfs /srv || return 1
  dd if=/dev/zero of="$IMG" bs=1M count="$DISK_MB" 2>/dev/null || return 1
  dd if=/dev/zero of="$PEER_IMG" bs=1M count=32 2>/dev/null || return 1
  PEER_LOOP=$(losetup -f) && losetup "$PEER_LOOP" "$PEER_IMG" || return 1
  PEER_PHYS="$(stat -c %t "$PEER_LOOP"):$(stat -c %T "$PEER_LOOP")"
  [ -x /opt/idd/bin/xen-blkback ] || { say "INFO no /opt/idd/bin/xen-blkback"; return 1; }
  say "INFO our backends: $(ls /opt/idd/bin | tr '\n' ' ')"
  mkdir -p "$LOGD" /run/idd || return 1
  # xen-platform's unit tests that need /dev/xen (they print SKIP elsewhere), if the host
  # passed the test binary (target/debug/deps/xen_platform-*) in IDD_BINARIES.
  for t in /opt/idd/bin/xen_platform-*; do
    [ -x "$t" ] || continue
    if "$t" on_xen --test-threads=1 --nocapture >/tmp/xp-unit.out 2>&1 && ! grep -q SKIP /tmp/xp-unit.out; then
      say "PASS dom0-xen-platform-unit-tests $(grep -c '\.\.\. ok' /tmp/xp-unit.out) on_xen tests passed against /dev/xen"
    else
      say "FAIL dom0-xen-platform-unit-tests"
      tail -n 20 /tmp/xp-unit.out | sed 's/^/TESTBED INFO unit: /'
    fi
  done
  exec 9<>/dev/xen/evtchn || return 1
}

backend_disk_image() { echo "$IMG"; }

# Lines in the backend's stdout starting with $1.
count_lines() { grep -c "^$1" "$BLK_OUT" 2>/dev/null || echo 0; }
more_lines() { [ "$(count_lines "$1")" -gt "$2" ]; }

start_blkback() {
  /opt/idd/bin/xen-blkback --frontend "$1" --image "$IMG" --memory /run/idd/xvda.mem \
    --evtchn-fd 9 --create >>"$BLK_OUT" 2>>"$BLK_ERR" &
  BLK_PID=$!
}

show_blkback_log() {
  tail -n "${1:-15}" "$BLK_ERR" 2>/dev/null | sed 's/^/TESTBED INFO xen-blkback stderr: /'
  tail -n "${1:-15}" "$BLK_OUT" 2>/dev/null | sed 's/^/TESTBED INFO xen-blkback stdout: /'
}

# netback creates vif<D>.<handle>; give it the dom0 peer address (what vif-route would do).
vif_address() {
  (
    if wait_for 120 test -d "/sys/class/net/vif$1.0"; then
      ip addr add 10.0.0.1/24 dev "vif$1.0" 2>/dev/null
      ip link set "vif$1.0" up && say "INFO dom0 vif$1.0 up at $(up)"
    else
      say "INFO dom0 vif$1.0 did not appear within 120 s"
    fi
  ) &
}

backend_attach() {
  d=$1
  # Our backend is also the toolstack for its disk (--create): it writes both directories,
  # its own in state 2 (the kernel's blkback, loaded for xvdb, probes directories in state 1),
  # then its features, then 4 once the frontend's ring is attached. Wait for the directory
  # before the guest is unpaused.
  start_blkback "$d"
  wait_for 60 xenstore-read "$(vbd_fe "$d" 51712)/state" >/dev/null ||
    { say "FAIL xen-blkback did not create the vbd directories"; show_blkback_log; return 1; }
  xs_vbd "$d" 51728 1 physical-device "$PEER_PHYS" params "$PEER_LOOP" || return 1
  xs_vif "$d" 0 "$MAC" 1 script /bin/true hotplug-status connected type vif || return 1
  vif_address "$d"
  # Report when the backend connected (in the background: the guest is still paused).
  (
    if wait_for 200 more_lines ready 0; then
      say "INFO xen-blkback $(grep '^ready' "$BLK_OUT" | head -1) at $(up)"
    else
      say "FAIL xen-blkback did not connect within 200 s"
      show_blkback_log
    fi
  ) &
}

# KILLS times: SIGKILL the backend while the guest runs verified I/O, start a new process
# at once, and measure kill -> ready (re-attached, journal replayed) and kill -> the first
# response the new process published (the guest-visible outage, an upper bound: it includes
# the guest's own time to issue its next request).
backend_teardown_cycle() {
  d=$DOMID
  fe=$(vbd_fe "$d" 51712) be=$(vbd_be "$d" 51712)
  say "OBSERVE ours: before the kills states(fe/be) $(xs_states "$fe" "$be"), backend pid $BLK_PID"
  i=1 bad=0 sum_ready=0 sum_out=0 max_out=0 n_out=0 replays=0
  # Kill only while the guest's window (GUEST_WINDOW s from TWIN) has 15 s left: a restart
  # after it would measure nothing guest-visible.
  wend=$(awk -v a="$TWIN" -v w="${GUEST_WINDOW:-110}" 'BEGIN { print a + w - 15 }')
  while [ "$i" -le "$KILLS" ] && awk -v a="$(up)" -v e="$wend" 'BEGIN { exit !(a < e) }'; do
    r0=$(count_lines ready) a0=$(count_lines first-answer)
    t=$(up)
    kill -9 "$BLK_PID" 2>/dev/null
    wait "$BLK_PID" 2>/dev/null
    start_blkback "$d"
    if ! wait_for 30 more_lines ready "$r0"; then
      say "FAIL ours-restart $i: the new backend was not ready within 30 s"
      show_blkback_log
      bad=1
      break
    fi
    tr=$(up)
    line=$(grep '^ready' "$BLK_OUT" | tail -1)
    case $line in *journaled=0*) ;; *) replays=$((replays + 1)) ;; esac
    if wait_for 6 more_lines first-answer "$a0"; then
      ta=$(up)
      out=$(dt "$t" "$ta")
      n_out=$((n_out + 1))
      sum_out=$(awk -v a="$sum_out" -v b="$out" 'BEGIN { print a + b }')
      max_out=$(awk -v a="$max_out" -v b="$out" 'BEGIN { print (b > a ? b : a) }')
    else
      out="none (no guest request within 6 s)"
    fi
    sum_ready=$(awk -v a="$sum_ready" -v b="$(dt "$t" "$tr")" 'BEGIN { print a + b }')
    st=$(xs_states "$fe" "$be")
    [ "$st" = 4/4 ] || bad=1
    say "TIME ours-restart $i kill-to-ready $(dt "$t" "$tr") s, kill-to-first-response $out s, states(fe/be) $st ($line; $(grep '^first-answer' "$BLK_OUT" | tail -1))"
    sleep 1
    i=$((i + 1))
  done
  n=$((i - 1))
  say "TIME ours-restarts $n kills: mean kill-to-ready $(awk -v s="$sum_ready" -v n="$n" 'BEGIN { printf "%.2f", n ? s / n : 0 }') s, mean kill-to-first-response $(awk -v s="$sum_out" -v n="$n_out" 'BEGIN { printf "%.2f", n ? s / n : 0 }') s, max $max_out s; $replays restarts found requests in flight in the journal"
  if [ "$bad" = 0 ] && [ "$n" -ge 1 ]; then
    say "PASS ours-restarts $n of $KILLS backend kills within the guest's window, re-attached every time, frontend and backend stayed Connected (4/4)"
  else
    say "FAIL ours-restarts $n of $KILLS restarts, states or readiness wrong (see above)"
  fi
  show_blkback_log 6
}
