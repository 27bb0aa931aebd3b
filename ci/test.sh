#!/usr/bin/env bash
# The whole test suite (what CI runs): installs what it needs, checks lints, fuzzes every
# parser of another domain's bytes briefly, then runs every test in the workspace and closes
# with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh

cargo build --workspace --all-targets
cargo clippy --workspace --all-targets --quiet -- -D warnings
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash ci/fuzz.sh
# Real Xen under QEMU (a few minutes each; says SKIPPED where qemu-system-x86 cannot be had).
# XEN_TESTBED=0 leaves it out of a quick local run. First with Xen's own kernel backends (and
# today's behaviour when they are torn down and recreated under the guest; XEN_TESTBED_TEARDOWN=0
# skips that, ~110 s), then with ours supervised by the device manager (`iddctl xen serve` in dom0 from a TOML policy:
# xen-blkback and xen-netback killed 20 times under a verifying, pinging guest;
# XEN_TESTBED_MANAGED=0 skips it). XEN_TESTBED_OURS=1 adds the run with the plain shell
# supervisor (ci/xen-testbed-ours.sh), the same backends without the manager.
if [ "${XEN_TESTBED:-1}" != 0 ]; then
  bash ci/xen-testbed.sh
  if [ "${XEN_TESTBED_MANAGED:-1}" != 0 ]; then
    bash ci/xen-testbed-managed.sh
  fi
  if [ "${XEN_TESTBED_OURS:-0}" != 0 ]; then
    bash ci/xen-testbed-ours.sh
  fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# One line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
