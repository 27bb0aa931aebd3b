# shellcheck shell=sh
# BACKEND=ours: the project's userspace backends (idd-blk, idd-net as Xen backends), copied by
# the host into /opt/idd/bin (IDD_BINARIES). Same interface as backend-kernel.sh.
#
# Not wired up yet: this is where a later step starts the device manager/backends. They own
# the backend directories, so xen-blkback/xen-netback are NOT loaded, and the directories are
# written with state 2 (InitWait) plus the features the backend offers (see
# docs/xen-testbed.md, "Adding our backends").

IMG=/srv/xvda.img
DISK_MB=64
MAC=00:16:3e:00:00:02

backend_prepare() {
  mount -t tmpfs -o size=256m tmpfs /srv || return 1
  dd if=/dev/zero of="$IMG" bs=1M count="$DISK_MB" 2>/dev/null || return 1
  ls /opt/idd/bin >/dev/null 2>&1 || { say "INFO no /opt/idd/bin"; return 1; }
  say "INFO our backends: $(ls /opt/idd/bin | tr '\n' ' ')"
  # TODO(issue 6): start the device manager / idd-blk / idd-net here (in the background,
  # logging to /var/log/idd/*.log, which dom0 prints at the end).
  say "FAIL backend-ours not implemented yet"
  return 1
}

backend_disk_image() { echo "$IMG"; }

backend_attach() {
  d=$1
  xs_vbd "$d" 51712 2 sectors $((DISK_MB * 2048)) sector-size 512 info 0 || return 1
  xs_vif "$d" 0 "$MAC" 2 feature-rx-copy 1 feature-rx-flip 0 || return 1
}

backend_teardown_cycle() {
  # TODO(issue 6): kill and restart the backend processes N times (transparent restart).
  say "OBSERVE ours: teardown cycle not implemented yet"
}
