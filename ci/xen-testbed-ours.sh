#!/usr/bin/env bash
# The emulated Xen testbed with the project's own block and network backends in dom0 (issue 6):
# builds xen-blkback and xen-netback (release) and xen-platform's unit tests (they run against
# /dev/xen in dom0),
# then `BACKEND=ours ci/xen-testbed.sh`. See docs/xen-testbed.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p xen-platform --bin xen-blkback --bin xen-netback
tests=$(cargo test -p xen-platform --lib --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*xen_platform-[^"]*\)".*/\1/p' | tail -1)
[ -x "$tests" ] || { echo "ci/xen-testbed-ours.sh: xen-platform's test binary not found" >&2; exit 1; }
BACKEND=ours IDD_BINARIES="target/release/xen-blkback target/release/xen-netback $tests" exec bash ci/xen-testbed.sh "$@"
