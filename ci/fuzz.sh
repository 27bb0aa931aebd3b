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

for crate in */fuzz/Cargo.toml; do
  dir=${crate%/fuzz/Cargo.toml}
  for t in $(cd "$dir" && cargo +nightly fuzz list); do
    echo "ci/fuzz.sh: fuzzing $dir/$t for ${secs}s"
    mkdir -p "$dir/fuzz/corpus/$t"
    log="$dir/fuzz/last-run-$t.log"
    if ! (cd "$dir" && cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048) >"$log" 2>&1; then
      tail -n 60 "$log"
      echo "ci/fuzz.sh: $dir/$t FAILED (full log: $log; the crashing input is in $dir/fuzz/artifacts/$t)"
      exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log" || true
  done
done
echo "ci/fuzz.sh: every target ran ${secs}s without a crash"
