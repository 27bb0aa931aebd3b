#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine. Idempotent; quiet when
# everything is already there. Needs root (or sudo) only when a package is missing.
set -euo pipefail

need=()
[ -f /usr/include/xen/grant_table.h ] || need+=(libxen-dev)
command -v xenstore-read >/dev/null 2>&1 || need+=(xenstore-utils)
command -v nbdcopy >/dev/null 2>&1 || need+=(libnbd-bin)
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v cc >/dev/null 2>&1 || need+=(gcc)
[ -f /usr/share/misc/pci.ids ] || need+=(pci.ids)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)

if [ ${#need[@]} -gt 0 ]; then
  echo "ci/setup.sh: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
