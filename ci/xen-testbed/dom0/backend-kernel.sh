# shellcheck shell=sh
# BACKEND=kernel: Xen's own kernel backends in dom0 (xen-blkback on a file-backed loop device,
# xen-netback with the vif addressed in dom0). The peer the project's backends are compared to.
#
# Interface every backend-*.sh implements (called by dom0's /init, DOMID set after xl create):
#   backend_prepare            load/start what serves the devices, before the domU exists
#   backend_attach DOMID       write the device nodes for the paused domU, start serving
#   backend_teardown_cycle     tear the serving side down and recreate it while the guest runs
#   backend_disk_image         print the path of the disk image (dom0 verifies the guest's data)

IMG=/srv/xvda.img
DISK_MB=64
MAC=00:16:3e:00:00:02

backend_prepare() {
  modload loop xen-blkback xen-netback || return 1
  mount -t tmpfs -o size=256m tmpfs /srv || return 1
  dd if=/dev/zero of="$IMG" bs=1M count="$DISK_MB" 2>/dev/null || return 1
  LOOP=$(losetup -f) && losetup "$LOOP" "$IMG" || return 1
  # blkback waits for physical-device (hex major:minor), normally written by the hotplug script.
  PHYS="$(stat -c %t "$LOOP"):$(stat -c %T "$LOOP")"
  say "INFO kernel-backend disk $IMG on $LOOP ($PHYS), ${DISK_MB} MiB"
}

backend_disk_image() { echo "$IMG"; }

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
  xs_vbd "$d" 51712 1 physical-device "$PHYS" params "$LOOP" || return 1
  # netback's probe fails without a "script" key (it only passes it on in the hotplug uevent;
  # there is no udev here). hotplug-status=connected is what that script would write; netback
  # holds its Connected state back until it sees it.
  xs_vif "$d" 0 "$MAC" 1 script /bin/true hotplug-status connected type vif || return 1
  vif_address "$d"
}

# Three experiments, one after the other, while the guest runs I/O and ping:
#  A) driver unbind/rebind via sysfs (the backend driver instance goes away, the XenStore
#     directory stays): what a backend restart inside the same dom0 kernel looks like.
#  B) the backend directory is removed and written again (what a toolstack detach/attach, or a
#     restarted driver domain re-creating its devices, looks like to the frontend).
#  C) a toolstack detach (online=0, state=5 as `xl block-detach`/`network-detach` write), then
#     a fresh attach with new frontend and backend directories (`xl block-attach`).
backend_teardown_cycle() {
  d=$DOMID
  say "INFO xen-backend devices: $(ls /sys/bus/xen-backend/devices | tr '\n' ' ')"
  t=$(up)
  say "OBSERVE A) unbind vbd-$d-51712 + vif-$d-0 at window +$(dt "$TWIN" "$t")s"
  echo "vbd-$d-51712" >/sys/bus/xen-backend/drivers/vbd/unbind || say "OBSERVE A) vbd unbind failed"
  echo "vif-$d-0" >/sys/bus/xen-backend/drivers/vif/unbind || say "OBSERVE A) vif unbind failed"
  watch_states 3 "A) after unbind"
  say "OBSERVE A) rebind at window +$(dt "$TWIN" "$(up)")s"
  echo "vbd-$d-51712" >/sys/bus/xen-backend/drivers/vbd/bind || say "OBSERVE A) vbd bind failed"
  echo "vif-$d-0" >/sys/bus/xen-backend/drivers/vif/bind || say "OBSERVE A) vif bind failed"
  # netback's remove deleted hotplug-status; the vif hotplug script (udev "online") would
  # write it again. There is no udev here: do what the script does.
  xenstore-write "$(vif_be "$d" 0)/hotplug-status" connected
  vif_address "$d"
  watch_states 8 "A) after rebind"

  t=$(up)
  say "OBSERVE B) remove backend directories at window +$(dt "$TWIN" "$t")s"
  xenstore-rm "$(vbd_be "$d" 51712)" "$(vif_be "$d" 0)"
  watch_states 3 "B) after remove"
  say "OBSERVE B) re-create backend directories at window +$(dt "$TWIN" "$(up)")s"
  be=$(vbd_be "$d" 51712)
  xenstore-write "$be/frontend" "$(vbd_fe "$d" 51712)" "$be/frontend-id" "$d" "$be/online" 1 \
    "$be/state" 1 "$be/mode" w "$be/type" phy "$be/dev" 51712 "$be/physical-device" "$PHYS" \
    "$be/params" "$LOOP" && xenstore-chmod -r "$be" n0 "r$d"
  be=$(vif_be "$d" 0)
  xenstore-write "$be/frontend" "$(vif_fe "$d" 0)" "$be/frontend-id" "$d" "$be/online" 1 \
    "$be/state" 1 "$be/handle" 0 "$be/mac" "$MAC" "$be/script" /bin/true "$be/hotplug-status" connected "$be/type" vif &&
    xenstore-chmod -r "$be" n0 "r$d"
  vif_address "$d"
  watch_states 8 "B) after re-create"

  t=$(up)
  say "OBSERVE C) toolstack detach (backend online=0, state=5 Closing) at window +$(dt "$TWIN" "$t")s"
  for be in "$(vbd_be "$d" 51712)" "$(vif_be "$d" 0)"; do
    xenstore-write "$be/online" 0 "$be/state" 5
  done
  watch_states 6 "C) after detach"
  say "OBSERVE C) attach again (fresh front+back directories) at window +$(dt "$TWIN" "$(up)")s"
  xenstore-rm "$(vbd_be "$d" 51712)" "$(vif_be "$d" 0)" "$(vbd_fe "$d" 51712)" "$(vif_fe "$d" 0)"
  xs_vbd "$d" 51712 1 physical-device "$PHYS" params "$LOOP"
  xs_vif "$d" 0 "$MAC" 1 script /bin/true hotplug-status connected type vif
  vif_address "$d"
  watch_states 10 "C) after attach"
}
