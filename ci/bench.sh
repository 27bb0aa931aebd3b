#!/usr/bin/env bash
# Benchmarks (programs, not tests): each prints a table with a baseline measured in the same run
# and writes JSON under target/bench/. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
cargo bench -p hypervisor --bench channel
cargo bench -p device-manager --bench block
cargo bench -p device-manager --bench net
echo "ci/bench.sh: JSON in target/bench/"
