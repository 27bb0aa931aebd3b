#!/usr/bin/env bash
# Runs every libFuzzer target in devchan/fuzz for FUZZ_SECONDS each (default 15): the parsers of
# bytes that come from another domain (ring entries, netif/blkif messages, XenStore messages and
# operation sequences). Needs the nightly toolchain (for the sanitizer flags) and cargo-fuzz,
# which it installs from crates.io when missing. Skips, saying so, when nightly is unavailable.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-15}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "ci/fuzz.sh: SKIPPED: no nightly toolchain (cargo fuzz needs it)"
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "ci/fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

cd devchan
targets=$(cargo +nightly fuzz list)
for t in $targets; do
  echo "ci/fuzz.sh: fuzzing $t for ${secs}s"
  mkdir -p "fuzz/corpus/$t"
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
done
echo "ci/fuzz.sh: every target ran ${secs}s without a crash"
