#!/usr/bin/env bash
# The README's first command: build everything (release) and run `iddctl demo` on the embedded
# process-domain hypervisor. No root, no KVM, no Xen needed. Extra arguments go to the demo
# (`--crashes N`, `--no-wait`, `--listen ADDR`, `--dir DIR`); `bash ci/demo.sh channel [ARGS]`
# runs the smaller device-channel demo (`channel-demo`) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
echo "ci/demo.sh: building (release; the first build takes a few minutes)"
cargo build --release --quiet --workspace --bins
if [ "${1:-}" = channel ]; then
  shift
  exec target/release/channel-demo "$@"
fi
exec target/release/iddctl demo "$@"
