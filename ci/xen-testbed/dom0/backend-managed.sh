# shellcheck shell=sh
# BACKEND=managed: the same backends as BACKEND=ours (xen-blkback for xvda, xen-netback for
# vif 0; Xen's kernel backends for xvdb and vif 1 as the same-run peer), but the device
# manager is their toolstack and supervisor: `iddctl xen serve` reads a policy with the domU
# as a kind = "xen" guest, finds its domain id by name, writes the vbd/vif XenStore nodes,
# starts one process per device with its own open /dev/xen/evtchn (--evtchn-fd) and memory
# file (/run/idd, tmpfs), and restarts a process when it exits. This script only kills the
# processes (KILLS times) and reads the manager's event lines:
#   started domu/xvda pid=P | ready ... | restarted domu/xvda pid=P exit-to-ready-ms=T ...
#   out domu/xvda pid=P: first-answer ... | exited ... | summary ...
# The host copies iddctl, xen-blkback and xen-netback into /opt/idd/bin (IDD_BINARIES).

IMG=/srv/xvda.img
PEER_IMG=/srv/xvdb.img
MAC=00:16:3e:00:00:02
PEER_MAC=00:16:3e:00:00:03
TAP=xnb0
LOGD=/var/log/idd
MGR_OUT=$LOGD/iddctl.out
MGR_ERR=$LOGD/iddctl.err
POLICY=/etc/idd/policy.toml
KILLS=${KILLS:-20}
MGR_PID=
BLOB_MIB=8

backend_prepare() {
  modload tun xen-netback loop xen-blkback || return 1
  mount -t tmpfs -o size=256m tmpfs /srv || return 1
  dd if=/dev/zero of="$PEER_IMG" bs=1M count=32 2>/dev/null || return 1
  PEER_LOOP=$(losetup -f) && losetup "$PEER_LOOP" "$PEER_IMG" || return 1
  PEER_PHYS="$(stat -c %t "$PEER_LOOP"):$(stat -c %T "$PEER_LOOP")"
  for b in iddctl xen-blkback xen-netback; do
    [ -x "/opt/idd/bin/$b" ] || { say "INFO no /opt/idd/bin/$b"; return 1; }
  done
  say "INFO our backends: $(ls /opt/idd/bin | tr '\n' ' ')"
  mkdir -p "$LOGD" /run/idd /etc/idd || return 1
  # The policy: xvda's image is created by the manager at its size; vif 0's wire is the TAP.
  cat >"$POLICY" <<EOF
[restart]
max_restarts = 100
window = "600s"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "$IMG"
size = "64MiB"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "tap"
ifname = "$TAP"

[[guest]]
name = "domu"
kind = "xen"
disk = [{ device = "disk0" }]
net = [{ device = "net0", mac = "$MAC" }]
EOF
  /opt/idd/bin/iddctl check "$POLICY" >/dev/null 2>&1 ||
    { say "FAIL managed policy"; /opt/idd/bin/iddctl check "$POLICY" 2>&1 | sed 's/^/TESTBED INFO policy: /'; return 1; }
  ip link set lo up || return 1
  mkdir -p /srv/www && dd if=/dev/zero of=/srv/www/blob bs=1M count="$BLOB_MIB" 2>/dev/null &&
    httpd -p 8080 -h /srv/www || return 1
}

backend_disk_image() { echo "$IMG"; }

# Manager lines starting with $1.
mgr_lines() { n=$(grep -c "^$1" "$MGR_OUT" 2>/dev/null); echo "${n:-0}"; }
more_mgr() { [ "$(mgr_lines "$1")" -gt "$2" ]; }
# First answers of backend $1's processes (the manager passes the backends' lines on).
answers() { n=$(grep -c "^out $1 .*: first-answer" "$MGR_OUT" 2>/dev/null); echo "${n:-0}"; }
more_answers() { [ "$(answers "$1")" -gt "$2" ]; }
# The pid of the running process of backend $1 (domu/xvda, domu/vif0).
pid_of() { grep "^started $1 " "$MGR_OUT" | tail -1 | sed -n 's/.* pid=\([0-9]*\).*/\1/p'; }

show_mgr_log() {
  tail -n 15 "$MGR_ERR" 2>/dev/null | sed 's/^/TESTBED INFO iddctl stderr: /'
  tail -n 15 "$MGR_OUT" 2>/dev/null | sed 's/^/TESTBED INFO iddctl: /'
  for f in /run/idd/*.err; do
    tail -n 4 "$f" 2>/dev/null | sed "s|^|TESTBED INFO $(basename "$f"): |"
  done
}

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
  /opt/idd/bin/iddctl xen serve --policy "$POLICY" --bin-dir /opt/idd/bin --run-dir /run/idd \
    >>"$MGR_OUT" 2>>"$MGR_ERR" &
  MGR_PID=$!
  # The manager found domain "domu" by name and wrote both directories of both devices.
  wait_for 60 more_mgr "nodes domu/vif0 " 0 ||
    { say "FAIL iddctl xen serve did not write the nodes"; show_mgr_log; return 1; }
  say "INFO manager: $(grep '^domain ' "$MGR_OUT" | head -1)"
  [ "$(xenstore-read "$(vbd_fe "$d" 51712)/backend")" = "$(vbd_be "$d" 51712)" ] ||
    { say "FAIL vbd nodes"; show_mgr_log; return 1; }
  xs_vbd "$d" 51728 1 physical-device "$PEER_PHYS" params "$PEER_LOOP" || return 1
  # xen-netback creates the persistent TAP; dom0's address on it outlives the processes.
  wait_for 60 test -d "/sys/class/net/$TAP" || { say "FAIL no TAP $TAP"; show_mgr_log; return 1; }
  ip addr add 10.0.0.1/24 dev "$TAP" && ip link set "$TAP" up || return 1
  say "INFO dom0 $TAP (xen-netback's TAP) up at 10.0.0.1/24"
  xs_vif "$d" 1 "$PEER_MAC" 1 script /bin/true hotplug-status connected type vif || return 1
  vif_address "$d"
  (
    if wait_for 200 more_mgr "ready domu/xvda" 0 && wait_for 200 more_mgr "ready domu/vif0" 0; then
      grep '^ready ' "$MGR_OUT" | sed 's/^/TESTBED INFO manager: /'
    else
      say "FAIL the managed backends did not connect within 200 s"
      show_mgr_log
    fi
  ) &
}

# KILLS times: SIGKILL both backend processes while the guest runs verified disk I/O and a
# 5 Hz ping through them; the manager restarts them. Per kill: kill -> both `restarted` lines
# (this script's clock, polling at 0.1 s), the manager's own exit-to-ready, kill -> each new
# process's first answer, and the XenStore states.
backend_teardown_cycle() {
  d=$DOMID
  fe=$(vbd_fe "$d" 51712) be=$(vbd_be "$d" 51712)
  nfe=$(vif_fe "$d" 0) nbe=$(vif_be "$d" 0)
  say "OBSERVE managed: before the kills states(fe/be) vbd $(xs_states "$fe" "$be") vif $(xs_states "$nfe" "$nbe"), backend pids $(pid_of domu/xvda) $(pid_of domu/vif0)"
  i=1 bad=0 sum_ready=0 sum_out=0 max_out=0 n_out=0 nsum_out=0 nn_out=0 nmax_out=0
  wend=$(awk -v a="$TWIN" -v w="${GUEST_WINDOW:-110}" 'BEGIN { print a + w - 15 }')
  while [ "$i" -le "$KILLS" ] && awk -v a="$(up)" -v e="$wend" 'BEGIN { exit !(a < e) }'; do
    r0=$(mgr_lines "restarted domu/xvda") nr0=$(mgr_lines "restarted domu/vif0")
    a0=$(answers domu/xvda) na0=$(answers domu/vif0)
    bp=$(pid_of domu/xvda) np=$(pid_of domu/vif0)
    t=$(up)
    kill -9 "$bp" "$np" 2>/dev/null
    if ! wait_for 30 more_mgr "restarted domu/xvda" "$r0" || ! wait_for 30 more_mgr "restarted domu/vif0" "$nr0"; then
      say "FAIL managed-restart $i: the manager did not restart both backends within 30 s"
      show_mgr_log
      bad=1
      break
    fi
    tr=$(up)
    line=$(grep '^restarted domu/xvda' "$MGR_OUT" | tail -1)
    nline=$(grep '^restarted domu/vif0' "$MGR_OUT" | tail -1)
    if wait_for 6 more_answers domu/xvda "$a0"; then
      out=$(dt "$t" "$(up)")
      n_out=$((n_out + 1)) sum_out=$(add "$sum_out" "$out") max_out=$(max "$max_out" "$out")
    else
      out="none (no guest request within 6 s)"
    fi
    if wait_for 6 more_answers domu/vif0 "$na0"; then
      nout=$(dt "$t" "$(up)")
      nn_out=$((nn_out + 1)) nsum_out=$(add "$nsum_out" "$nout") nmax_out=$(max "$nmax_out" "$nout")
    else
      nout="none (no packet within 6 s)"
    fi
    sum_ready=$(add "$sum_ready" "$(dt "$t" "$tr")")
    st=$(xs_states "$fe" "$be") nst=$(xs_states "$nfe" "$nbe")
    [ "$st" = 4/4 ] && [ "$nst" = 4/4 ] || bad=1
    say "TIME managed-restart $i kill-to-both-restarted $(dt "$t" "$tr") s; blk kill-to-first-response $out s, states $st (${line#restarted }); net kill-to-first-answer $nout s, states $nst (${nline#restarted })"
    sleep 1
    i=$((i + 1))
  done
  n=$((i - 1))
  ms=$(grep '^restarted ' "$MGR_OUT" | sed -n 's/.* exit-to-ready-ms=\([0-9]*\).*/\1/p' | awk '{ s += $1; if ($1 > m) m = $1; n++ } END { printf "%d restarts, mean %.0f ms, max %d ms", n, n ? s / n : 0, m }')
  say "TIME managed-restarts $n kills: mean kill-to-both-restarted $(mean "$sum_ready" "$n") s; blk kill-to-first-response mean $(mean "$sum_out" "$n_out") s max $max_out s; net kill-to-first-answer mean $(mean "$nsum_out" "$nn_out") s max $nmax_out s; the manager's exit-to-ready: $ms"
  if [ "$bad" = 0 ] && [ "$n" -ge 1 ]; then
    say "PASS ours-restarts $n of $KILLS kills of both backends restarted by iddctl xen serve within the guest's window, vbd and vif stayed Connected (4/4)"
  else
    say "FAIL ours-restarts $n of $KILLS managed restarts, states or readiness wrong (see above)"
  fi
  # When the guest is done: SIGTERM the manager, which stops the backends and prints its
  # summary.
  (
    wait_for 200 guest_seen "TESTBED MARK guest-done"
    kill -TERM "$MGR_PID" 2>/dev/null
    wait_for 10 more_mgr "summary domu/vif0" 0
    grep -E '^(summary|gave-up|start-failed)' "$MGR_OUT" | sed 's/^/TESTBED INFO manager: /'
  ) &
}
