#!/usr/bin/env bash
# The README's first command: build the demo (release) and run it on the embedded
# process-domain hypervisor. No root, no KVM, no Xen needed. Extra arguments go to
# channel-demo (e.g. `bash ci/demo.sh --stay`, `--requests 100000`, `--no-crash`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p idd-examples --bins
exec target/release/channel-demo "$@"
