# shellcheck shell=sh
# The toolstack part: XenStore nodes for a guest's vbd and vif, written by hand (no libxl
# device handling). Backend-independent; the backend scripts pass the state the backend
# directory starts in and any extra backend keys (KEY VALUE ...).
#
# Backend state: Xen's kernel backends are only probed for a new directory whose state is
# 1 (Initialising) and then move to 2 (InitWait) themselves; a userspace backend that is
# already running writes 2 directly.

vbd_fe() { echo "/local/domain/$1/device/vbd/$2"; }
vbd_be() { echo "/local/domain/0/backend/vbd/$1/$2"; }
vif_fe() { echo "/local/domain/$1/device/vif/$2"; }
vif_be() { echo "/local/domain/0/backend/vif/$1/$2"; }

# New nodes inherit their parent's permissions (when dom0 creates them). Give the parents the
# device's permissions first, so that a running guest that probes the moment the directory
# appears can already read both sides (chmod -r afterwards only closes a window otherwise).
xs_parents() {
  d=$1 fe=$2 be=$3
  xenstore-exists "${fe%/*}" || xenstore-write "${fe%/*}" ""
  xenstore-exists "${be%/*}" || xenstore-write "${be%/*}" ""
  xenstore-chmod "${fe%/*}" "n$d" r0 && xenstore-chmod "${be%/*}" n0 "r$d"
}

# xs_vbd DOMID VDEV BACKEND_STATE [KEY VALUE]...   (keys below the backend directory)
xs_vbd() {
  d=$1 v=$2 s=$3; shift 3
  fe=$(vbd_fe "$d" "$v") be=$(vbd_be "$d" "$v")
  extra=""
  while [ $# -ge 2 ]; do extra="$extra $be/$1 $2"; shift 2; done
  xs_parents "$d" "$fe" "$be" || return 1
  # One xenstore-write is one transaction: the backend sees the whole directory at once.
  # shellcheck disable=SC2086
  xenstore-write \
    "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/state" 1 \
    "$fe/virtual-device" "$v" "$fe/device-type" disk \
    "$be/frontend" "$fe" "$be/frontend-id" "$d" "$be/online" 1 "$be/state" "$s" \
    "$be/mode" w "$be/type" phy "$be/dev" "$v" $extra || return 1
  # Recursively: without -r the children keep n0 and the guest cannot read backend/state.
  xenstore-chmod -r "$fe" "n$d" r0 && xenstore-chmod -r "$be" n0 "r$d"
}

# xs_vif DOMID HANDLE MAC BACKEND_STATE [KEY VALUE]...
xs_vif() {
  d=$1 h=$2 mac=$3 s=$4; shift 4
  fe=$(vif_fe "$d" "$h") be=$(vif_be "$d" "$h")
  extra=""
  while [ $# -ge 2 ]; do extra="$extra $be/$1 $2"; shift 2; done
  xs_parents "$d" "$fe" "$be" || return 1
  # shellcheck disable=SC2086
  xenstore-write \
    "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/state" 1 "$fe/handle" "$h" "$fe/mac" "$mac" \
    "$be/frontend" "$fe" "$be/frontend-id" "$d" "$be/online" 1 "$be/state" "$s" \
    "$be/handle" "$h" "$be/mac" "$mac" $extra || return 1
  xenstore-chmod -r "$fe" "n$d" r0 && xenstore-chmod -r "$be" n0 "r$d"
}

# "fe/be" states of a device, e.g. "4/4" ("-" when the node is missing).
xs_states() {
  f=$(xenstore-read "$1/state" 2>/dev/null || echo -)
  b=$(xenstore-read "$2/state" 2>/dev/null || echo -)
  echo "$f/$b"
}

# watch_states SECONDS LABEL: prints every change of the vbd/vif front/back states of $DOMID
# for SECONDS of dom0 uptime (each sample takes a few xenstore-read round trips under TCG).
watch_states() {
  label=$2 last="" t0=$(up)
  end=$(awk -v a="$t0" -v s="$1" 'BEGIN { print a + s }')
  while awk -v a="$(up)" -v e="$end" 'BEGIN { exit !(a < e) }'; do
    s="vbd=$(xs_states "$(vbd_fe "$DOMID" 51712)" "$(vbd_be "$DOMID" 51712)") vif=$(xs_states "$(vif_fe "$DOMID" 0)" "$(vif_be "$DOMID" 0)")"
    if [ "$s" != "$last" ]; then
      say "OBSERVE $label +$(dt "$t0" "$(up)")s states(fe/be) $s"
      last=$s
    fi
    usleep 200000
  done
}
