# shellcheck shell=sh
# BACKEND=ours: the project's userspace backends (crate xen-platform), copied by the host into
# /opt/idd/bin (IDD_BINARIES): xen-blkback (idd-blk's blkback) serves the guest's xvda,
# xen-netback (idd-net's netback, a TAP interface in dom0 as its wire) the guest's vif 0.
# Xen's kernel backends serve xvdb and vif 1 in the same run: the peer the figures compare to.
# Same interface as backend-kernel.sh.
#
# This script is the supervisor: it keeps what must outlive a backend process —
#  * fd 9 (blkback) and fd 8 (netback), each an open /dev/xen/evtchn: the event channel a
#    backend binds stays bound across its restarts (--evtchn-fd). One file per process: two
#    readers of one event-channel file take each other's events;
#  * /run/idd/xvda.mem and /run/idd/vif0.mem (tmpfs): the backends' journals;
#  * the TAP interface xnb0 with dom0's address 10.0.0.1 (xen-netback makes it persistent);
# and restarts both backends after each kill. The guest's rings and grants are the guest's.

IMG=/srv/xvda.img
PEER_IMG=/srv/xvdb.img
DISK_MB=64
MAC=00:16:3e:00:00:02
PEER_MAC=00:16:3e:00:00:03
TAP=xnb0
LOGD=/var/log/idd
BLK_OUT=$LOGD/xen-blkback.out
BLK_ERR=$LOGD/xen-blkback.err
NET_OUT=$LOGD/xen-netback.out
NET_ERR=$LOGD/xen-netback.err
KILLS=${KILLS:-20}
BLK_PID=
NET_PID=
# The HTTP payload the guest downloads through each vif (throughput, ours vs kernel).
BLOB_MIB=8

backend_prepare() {
  # Xen's kernel backends serve the peer vif and disk (the same-run comparison); tun: our TAP.
  modload tun xen-netback loop xen-blkback || return 1
  mount -t tmpfs -o size=256m tmpfs /srv || return 1
  dd if=/dev/zero of="$IMG" bs=1M count="$DISK_MB" 2>/dev/null || return 1
  dd if=/dev/zero of="$PEER_IMG" bs=1M count=32 2>/dev/null || return 1
  PEER_LOOP=$(losetup -f) && losetup "$PEER_LOOP" "$PEER_IMG" || return 1
  PEER_PHYS="$(stat -c %t "$PEER_LOOP"):$(stat -c %T "$PEER_LOOP")"
  [ -x /opt/idd/bin/xen-blkback ] || { say "INFO no /opt/idd/bin/xen-blkback"; return 1; }
  [ -x /opt/idd/bin/xen-netback ] || { say "INFO no /opt/idd/bin/xen-netback"; return 1; }
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
  exec 8<>/dev/xen/evtchn || return 1
  # iospace's TAP wire sets the interface up through a socket bound to 127.0.0.1.
  ip link set lo up || return 1
  # An HTTP server on every dom0 address: the guest times a download through each vif.
  mkdir -p /srv/www && dd if=/dev/zero of=/srv/www/blob bs=1M count="$BLOB_MIB" 2>/dev/null &&
    httpd -p 8080 -h /srv/www || return 1
}

backend_disk_image() { echo "$IMG"; }

# Lines starting with $1 in the blkback's (or, with a third argument, that file's) stdout.
count_lines() { n=$(grep -c "^$1" "${3:-$BLK_OUT}" 2>/dev/null); echo "${n:-0}"; }
net_lines() { count_lines "$1" "" "$NET_OUT"; }
more_net_lines() { more_lines "$1" "$2" "$NET_OUT"; }
more_lines() { [ "$(count_lines "$1" "" "${3:-$BLK_OUT}")" -gt "$2" ]; }

start_blkback() {
  /opt/idd/bin/xen-blkback --frontend "$1" --image "$IMG" --memory /run/idd/xvda.mem \
    --evtchn-fd 9 --create >>"$BLK_OUT" 2>>"$BLK_ERR" &
  BLK_PID=$!
}

start_netback() {
  /opt/idd/bin/xen-netback --frontend "$1" --handle 0 --mac "$MAC" --tap "$TAP" \
    --memory /run/idd/vif0.mem --evtchn-fd 8 --create >>"$NET_OUT" 2>>"$NET_ERR" &
  NET_PID=$!
}

show_netback_log() {
  tail -n "${1:-15}" "$NET_ERR" 2>/dev/null | sed 's/^/TESTBED INFO xen-netback stderr: /'
  tail -n "${1:-15}" "$NET_OUT" 2>/dev/null | sed 's/^/TESTBED INFO xen-netback stdout: /'
}

show_blkback_log() {
  tail -n "${1:-15}" "$BLK_ERR" 2>/dev/null | sed 's/^/TESTBED INFO xen-blkback stderr: /'
  tail -n "${1:-15}" "$BLK_OUT" 2>/dev/null | sed 's/^/TESTBED INFO xen-blkback stdout: /'
}

# The kernel's netback creates vif<D>.1 for the peer vif; give it the dom0 peer address of
# the second subnet (what vif-route would do).
vif_address() {
  (
    if wait_for 120 test -d "/sys/class/net/vif$1.1"; then
      ip addr add 10.0.1.1/24 dev "vif$1.1" 2>/dev/null
      ip link set "vif$1.1" up && say "INFO dom0 vif$1.1 (kernel netback) up at $(up)"
    else
      say "INFO dom0 vif$1.1 did not appear within 120 s"
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
  # Our netback: also the toolstack for vif 0 (its directory in state 2, as for the disk:
  # the kernel's netback, loaded for vif 1, probes directories in state 1). It creates the
  # persistent TAP first; dom0's peer address goes on the TAP and stays across restarts.
  start_netback "$d"
  wait_for 60 xenstore-read "$(vif_fe "$d" 0)/state" >/dev/null ||
    { say "FAIL xen-netback did not create the vif directories"; show_netback_log; return 1; }
  wait_for 30 test -d "/sys/class/net/$TAP" || { say "FAIL no TAP $TAP"; show_netback_log; return 1; }
  ip addr add 10.0.0.1/24 dev "$TAP" && ip link set "$TAP" up || return 1
  say "INFO dom0 $TAP (xen-netback's TAP) up at 10.0.0.1/24"
  xs_vif "$d" 1 "$PEER_MAC" 1 script /bin/true hotplug-status connected type vif || return 1
  vif_address "$d"
  # Report when the backends connected (in the background: the guest is still paused).
  (
    if wait_for 200 more_lines ready 0; then
      say "INFO xen-blkback $(grep '^ready' "$BLK_OUT" | head -1) at $(up)"
    else
      say "FAIL xen-blkback did not connect within 200 s"
      show_blkback_log
    fi
  ) &
  (
    if wait_for 200 more_net_lines ready 0; then
      say "INFO xen-netback $(grep '^ready' "$NET_OUT" | head -1) at $(up)"
      wait_for 100 more_net_lines first-answer 0 &&
        say "INFO xen-netback $(grep '^first-answer' "$NET_OUT" | head -1) at $(up)"
    else
      say "FAIL xen-netback did not connect within 200 s"
      show_netback_log
    fi
  ) &
}

# KILLS times: SIGKILL both backends while the guest runs verified disk I/O and a 5 Hz ping
# through them, start new processes at once, and measure per backend kill -> ready
# (re-attached, journal replayed) and kill -> the first response the new process published
# (the guest-visible outage, an upper bound: it includes the guest's own time to issue its
# next request; xen-netback's from the dom0 uptime it prints in those lines). A 10 Hz ping from dom0 to the guest over the whole cycle measures the
# network outage independently of the backend's own report.
backend_teardown_cycle() {
  d=$DOMID
  fe=$(vbd_fe "$d" 51712) be=$(vbd_be "$d" 51712)
  nfe=$(vif_fe "$d" 0) nbe=$(vif_be "$d" 0)
  say "OBSERVE ours: before the kills states(fe/be) vbd $(xs_states "$fe" "$be") vif $(xs_states "$nfe" "$nbe"), backend pids $BLK_PID $NET_PID"
  i=1 bad=0 sum_ready=0 sum_out=0 max_out=0 n_out=0 replays=0
  nsum_ready=0 nsum_out=0 nmax_out=0 nn_out=0 nreplays=0
  # Kill only while the guest's window (GUEST_WINDOW s from TWIN) has 15 s left: a restart
  # after it would measure nothing guest-visible.
  wend=$(awk -v a="$TWIN" -v w="${GUEST_WINDOW:-110}" 'BEGIN { print a + w - 15 }')
  ping -i 0.1 -w "$(awk -v e="$wend" -v a="$(up)" 'BEGIN { printf "%d", e - a + 5 }')" 10.0.0.2 >/tmp/dom0-ping.out 2>&1 &
  PING_PID=$!
  while [ "$i" -le "$KILLS" ] && awk -v a="$(up)" -v e="$wend" 'BEGIN { exit !(a < e) }'; do
    r0=$(count_lines ready) a0=$(count_lines first-answer)
    nr0=$(net_lines ready) na0=$(net_lines first-answer)
    t=$(up)
    kill -9 "$BLK_PID" "$NET_PID" 2>/dev/null
    wait "$BLK_PID" "$NET_PID" 2>/dev/null
    start_blkback "$d"
    start_netback "$d"
    if ! wait_for 30 more_lines ready "$r0"; then
      say "FAIL ours-restart $i: the new xen-blkback was not ready within 30 s"
      show_blkback_log
      bad=1
      break
    fi
    tr=$(up)
    if ! wait_for 30 more_net_lines ready "$nr0"; then
      say "FAIL ours-restart $i: the new xen-netback was not ready within 30 s"
      show_netback_log
      bad=1
      break
    fi
    line=$(grep '^ready' "$BLK_OUT" | tail -1)
    nline=$(grep '^ready' "$NET_OUT" | tail -1)
    case $line in *journaled=0*) ;; *) replays=$((replays + 1)) ;; esac
    case $nline in *journaled=0*) ;; *) nreplays=$((nreplays + 1)) ;; esac
    if wait_for 6 more_lines first-answer "$a0"; then
      out=$(dt "$t" "$(up)")
      n_out=$((n_out + 1)) sum_out=$(add "$sum_out" "$out") max_out=$(max "$max_out" "$out")
    else
      out="none (no guest request within 6 s)"
    fi
    # xen-netback stamps its lines with dom0's uptime: its figures do not include the time
    # this script spent waiting for the block backend.
    ntr=$(echo "$nline" | sed -n 's/.* up=\([0-9.]*\).*/\1/p')
    if wait_for 6 more_net_lines first-answer "$na0"; then
      nta=$(grep '^first-answer' "$NET_OUT" | tail -1 | sed -n 's/.* up=\([0-9.]*\).*/\1/p')
      nout=$(dt "$t" "${nta:-$(up)}")
      nn_out=$((nn_out + 1)) nsum_out=$(add "$nsum_out" "$nout") nmax_out=$(max "$nmax_out" "$nout")
    else
      nout="none (no packet within 6 s)"
    fi
    sum_ready=$(add "$sum_ready" "$(dt "$t" "$tr")")
    nsum_ready=$(add "$nsum_ready" "$(dt "$t" "${ntr:-$t}")")
    st=$(xs_states "$fe" "$be") nst=$(xs_states "$nfe" "$nbe")
    [ "$st" = 4/4 ] && [ "$nst" = 4/4 ] || bad=1
    say "TIME ours-restart $i blk: kill-to-ready $(dt "$t" "$tr") s, kill-to-first-response $out s, states(fe/be) $st ($line; $(grep '^first-answer' "$BLK_OUT" | tail -1))"
    say "TIME ours-restart $i net: kill-to-ready $(dt "$t" "${ntr:-$t}") s, kill-to-first-answer $nout s, states(fe/be) $nst ($nline; $(grep '^first-answer' "$NET_OUT" | tail -1))"
    sleep 1
    i=$((i + 1))
  done
  n=$((i - 1))
  say "TIME ours-restarts $n kills, blk: mean kill-to-ready $(mean "$sum_ready" "$n") s, mean kill-to-first-response $(mean "$sum_out" "$n_out") s, max $max_out s; $replays restarts found requests in flight in the journal"
  say "TIME ours-restarts $n kills, net: mean kill-to-ready $(mean "$nsum_ready" "$n") s, mean kill-to-first-answer $(mean "$nsum_out" "$nn_out") s, max $nmax_out s; $nreplays restarts found transmits in flight in the journal"
  wait "$PING_PID" 2>/dev/null
  # dom0 -> guest at 10 Hz: every run of missing replies (an outage) and the totals.
  awk '/seq=/ { sub(/.*seq=/, ""); sub(/ .*/, ""); print }' /tmp/dom0-ping.out | awk '
    NR > 1 && $1 - p > 1 { n++; l = ($1 - p - 1) * 0.1; s += l; if (l > m) m = l; g = g sprintf(" %.1f", l) }
    { p = $1; r++ }
    END { printf "TESTBED TIME ours-net-outages dom0 ping to the guest at 10 Hz: %d replies, %d gaps, mean %.2f s, max %.1f s; gaps (s):%s\n", r, n, n ? s / n : 0, m, g }'
  grep -E 'transmitted' /tmp/dom0-ping.out | sed 's/^/TESTBED INFO dom0 ping: /'
  if [ "$bad" = 0 ] && [ "$n" -ge 1 ]; then
    say "PASS ours-restarts $n of $KILLS kills of both backends within the guest's window, re-attached every time, vbd and vif stayed Connected (4/4)"
  else
    say "FAIL ours-restarts $n of $KILLS restarts, states or readiness wrong (see above)"
  fi
  show_blkback_log 6
  show_netback_log 6
}
