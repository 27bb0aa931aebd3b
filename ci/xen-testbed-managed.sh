#!/usr/bin/env bash
# The emulated Xen testbed with the device manager in dom0 (issue 6): `iddctl xen serve` reads a
# TOML policy naming the domU, writes its vbd/vif XenStore nodes, starts our xen-blkback and
# xen-netback (release), holds what outlives them and restarts them through 20 kills while the
# guest verifies its disk and pings (dom0/backend-managed.sh; docs/xen.md). iddctl is the debug
# build the suite already has (stripped into dom0; it only supervises). Xen's kernel backends
# serve a second disk and NIC in the same run, for the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p device-manager --bin iddctl
cargo build --release --quiet -p xen-platform --bin xen-blkback --bin xen-netback
tests=$(cargo test -p xen-platform --lib --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*xen_platform-[^"]*\)".*/\1/p' | tail -1)
[ -x "$tests" ] || { echo "ci/xen-testbed-managed.sh: xen-platform's test binary not found" >&2; exit 1; }
BACKEND=managed IDD_BINARIES="target/debug/iddctl target/release/xen-blkback target/release/xen-netback $tests" \
  exec bash ci/xen-testbed.sh "$@"
