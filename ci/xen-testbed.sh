#!/usr/bin/env bash
# The emulated Xen testbed: Xen 4.17 + a Debian 6.1 PV dom0 + a PV domU, all from Debian
# packages, booted under QEMU TCG. The domU's xen-blkfront/xen-netfront talk to backends in
# dom0 (BACKEND=kernel: Xen's own xen-blkback/xen-netback; BACKEND=ours: the project's
# userspace backends, see docs/xen-testbed.md). Results come back over the serial console.
#
# Usage (Debian 12; as root, or as any user once the host packages are installed):
#   ci/xen-testbed.sh
# Environment:
#   BACKEND=kernel|ours        which backends serve the domU (default kernel)
#   XEN_TESTBED_CACHE=DIR      downloads and builds (default <repo>/target/xen-testbed)
#   XEN_TESTBED_TIMEOUT=SECS   wall-clock limit of the whole run (default 600; 900 with BACKEND=ours)
#   XEN_TESTBED_TEARDOWN=0     skip the backend teardown/recreate experiment
#   XEN_TESTBED_NO_UPDATE=1    do not run apt-get update (offline re-runs from the cache)
#   IDD_BINARIES="a b"         BACKEND=ours: binaries copied into dom0's /opt/idd/bin
#
# Exit status: 0 = PASS (or "SKIPPED: ..." when qemu-system-x86 cannot be installed),
# 1 = a check failed or the run timed out, 2 = usage / setup error (e.g. not root and busybox-static
# missing).
set -euo pipefail

START=$SECONDS
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TB=$HERE/xen-testbed
# shellcheck source=xen-testbed/host-lib.sh
. "$TB/host-lib.sh"

BACKEND=${BACKEND:-kernel}
CACHE=${XEN_TESTBED_CACHE:-$REPO/target/xen-testbed}
# BACKEND=ours adds 60 s of guest window and 20 backend restarts.
TIMEOUT=${XEN_TESTBED_TIMEOUT:-$([ "${BACKEND:-kernel}" = ours ] && echo 900 || echo 600)}
# shellcheck disable=SC2034 # used by host-lib.sh
TEARDOWN=${XEN_TESTBED_TEARDOWN:-1}

case $BACKEND in
  kernel) ;;
  ours)
    if [ -z "${IDD_BINARIES:-}" ]; then
      die 2 "BACKEND=ours needs IDD_BINARIES (the project's Xen backends are not built yet; see docs/xen-testbed.md)"
    fi ;;
  managed) # as ours, with `iddctl xen serve` as toolstack and supervisor (dom0/backend-managed.sh)
    [ -n "${IDD_BINARIES:-}" ] || die 2 "BACKEND=managed needs IDD_BINARIES (iddctl xen-blkback xen-netback)"
    DOM0_BACKEND=managed BACKEND=ours TIMEOUT=${XEN_TESTBED_TIMEOUT:-900} ;;
  *) die 2 "BACKEND must be kernel, ours or managed, not '$BACKEND'" ;;
esac

mkdir -p "$CACHE"
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
LOGDIR=$CACHE/logs
mkdir -p "$LOGDIR"

step "host packages"
install_host_packages   # may exit 0 with SKIPPED
step "Xen + kernel packages"
fetch_packages           # sets EX (extracted root), KVER
step "initramfs (dom0 + domU)"
build_images             # sets XEN_ELF, DOM0_KERNEL, DOM0_INITRD
step "boot (limit: $((TIMEOUT - (SECONDS - START))) s left)"
run_qemu "$LOGDIR/serial-$RUN_ID.log"
ln -sf "serial-$RUN_ID.log" "$LOGDIR/serial-latest.log"
step "results"
check_results "$LOGDIR/serial-$RUN_ID.log"
