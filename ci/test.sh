#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
