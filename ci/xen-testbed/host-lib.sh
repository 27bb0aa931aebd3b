# shellcheck shell=bash
# Host-side helpers of ci/xen-testbed.sh (sourced, bash). They use the caller's variables
# TB, REPO, CACHE, BACKEND, TIMEOUT, TEARDOWN, START.

XEN_PACKAGES=(
  xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxenmisc4.17 libxenstore4 libxengnttab1 libxenevtchn1 libxencall1 libxenforeignmemory1
  libxendevicemodel1 libxentoolcore1 libxentoollog1 libxenhypfs1 libyajl2
)
# Modules loaded in dom0: the Xen device files, then the kernel backends and their disk.
DOM0_MODULES=(xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc loop xen-blkback xen-netback tun)
DOMU_MODULES=(xen-blkfront xen-netfront)
# Xen tools run in dom0 (called directly, not through Debian's xen-utils-wrapper).
XEN_BINS=(xl xenstored xenconsoled xen-init-dom0)
XENSTORE_CMDS=(xenstore-read xenstore-write xenstore-ls xenstore-list xenstore-rm xenstore-chmod
  xenstore-watch xenstore-exists)

die() { local rc=$1; shift; echo "xen-testbed: $*" >&2; exit "$rc"; }
step() { printf '\n== xen-testbed [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
elapsed() { echo $((SECONDS - START)); }

# Root is needed only to install what is missing; without root and without QEMU the testbed
# skips, without root and something else missing it is a setup error.
install_host_packages() {
  if [ "${XEN_TESTBED_NO_UPDATE:-0}" != 1 ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq || echo "xen-testbed: apt-get update failed; trying the cached lists"
  fi
  local need=() p
  for p in qemu-system-x86 busybox-static cpio kmod gzip; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v qemu-system-x86_64 >/dev/null; then
      echo "SKIPPED: qemu-system-x86 is not installed and installing it needs root"
      exit 0
    fi
    die 2 "missing ${need[*]}; run as root to install them"
  fi
  echo "installing ${need[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
      >"$CACHE/apt-install.log" 2>&1; then
    if ! command -v qemu-system-x86_64 >/dev/null; then
      echo "SKIPPED: qemu-system-x86 cannot be installed (see $CACHE/apt-install.log)"
      exit 0
    fi
    tail -20 "$CACHE/apt-install.log" >&2
    die 2 "apt-get install ${need[*]} failed"
  fi
}

# The generic 6.1 kernel package Debian currently points linux-image-amd64 at.
kernel_package() {
  local k
  k=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/ { print $2; exit }')
  if [ -z "$k" ]; then
    k=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' |
      sort -V | tail -1)
  fi
  [ -n "$k" ] || die 2 "no linux-image-6.1.0-*-amd64 package in the apt lists"
  echo "$k"
}

candidate() {
  apt-cache policy "$1" | awk '$1 == "Candidate:" { print $2 }'
}

# Downloads (once per version) and extracts every package into one root, keyed by versions.
# Sets EX (the extracted root) and KVER.
fetch_packages() {
  local pkgs=("${XEN_PACKAGES[@]}" "$(kernel_package)") p v specs=() missing=()
  mkdir -p "$CACHE/debs"
  for p in "${pkgs[@]}"; do
    v=$(candidate "$p")
    [ -n "$v" ] && [ "$v" != "(none)" ] || die 2 "package $p has no candidate version"
    specs+=("$p=$v")
    [ -s "$CACHE/debs/$p=$v.name" ] && [ -f "$CACHE/debs/$(cat "$CACHE/debs/$p=$v.name")" ] ||
      missing+=("$p=$v")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "downloading ${missing[*]}"
    local dl="$CACHE/debs/.dl"
    rm -rf "$dl"; mkdir -p "$dl"
    chown _apt "$dl" 2>/dev/null || true
    (cd "$dl" && apt-get download -q "${missing[@]}" >/dev/null) || die 2 "apt-get download failed"
    for p in "${missing[@]}"; do
      local f
      f=$(cd "$dl" && ls "${p%%=*}"_*.deb | head -1)
      [ -n "$f" ] || die 2 "download of $p produced no .deb"
      mv "$dl/$f" "$CACHE/debs/$f"
      echo "$f" >"$CACHE/debs/$p.name"
    done
    rm -rf "$dl"
  fi
  local key
  key=$(printf '%s\n' "${specs[@]}" | sort | sha256sum | cut -c1-12)
  EX=$CACHE/root-$key
  if [ ! -f "$EX/.done" ]; then
    echo "extracting ${#specs[@]} packages into $EX"
    rm -rf "$EX"; mkdir -p "$EX"
    for p in "${specs[@]}"; do
      dpkg -x "$CACHE/debs/$(cat "$CACHE/debs/$p.name")" "$EX"
    done
    printf '%s\n' "${specs[@]}" >"$EX/.packages"
    KVER=$(ls "$EX/lib/modules")
    depmod -b "$EX" "$KVER"
    touch "$EX/.done"
  fi
  KVER=$(ls "$EX/lib/modules")
  echo "kernel $KVER; xen $(candidate xen-hypervisor-4.17-amd64)"
}

# Load order (dependencies first) of a module, as paths relative to lib/modules/KVER,
# from the package's modules.dep.
module_closure() {
  local name=$1 dep=$EX/lib/modules/$KVER/modules.dep line
  line=$(awk -F: -v n="$name" '{
      f = $1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f)
      a = f; gsub(/_/, "-", a); b = n; gsub(/_/, "-", b)
      if (a == b) { print; exit }
    }' "$dep")
  [ -n "$line" ] || die 2 "module $name not in modules.dep"
  # "path: deps...": modprobe loads the listed dependencies last-first, then the module.
  echo "${line#*:}" | tr ' ' '\n' | sed '/^$/d' | tac
  echo "${line%%:*}"
}

# Copies modules and their dependencies into an initramfs root and writes /etc/modload/NAME
# (the load order) for the init scripts' `modload`.
install_modules() {
  local root=$1 m p; shift
  mkdir -p "$root/etc/modload"
  for m in "$@"; do
    module_closure "$m" >"$root/etc/modload/$m"
    while read -r p; do
      mkdir -p "$root/lib/modules/$KVER/$(dirname "$p")"
      cp "$EX/lib/modules/$KVER/$p" "$root/lib/modules/$KVER/$p"
    done <"$root/etc/modload/$m"
  done
}

# A merged-/usr skeleton with busybox and its applets.
skeleton() {
  local root=$1 a
  rm -rf "$root"; mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64}
  ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"; ln -s usr/lib "$root/lib"
  ln -s usr/lib64 "$root/lib64"
  mkdir -p "$root"/{dev,proc,sys,run,tmp,etc,root,srv,var/lib,var/log}
  ln -s ../run "$root/var/run"
  cp /bin/busybox "$root/usr/bin/busybox"
  for a in $(/bin/busybox --list); do
    [ -e "$root/usr/bin/$a" ] || ln -s busybox "$root/usr/bin/$a"
  done
}

# Copies ELF binaries with every library ldd resolves (package libraries first), plus the
# loader and libgcc_s (dlopen'ed by pthread_cancel; ldd does not list it).
install_elves() {
  local root=$1 dest=$2 b l; shift 2
  mkdir -p "$root/$dest"
  for b in "$@"; do
    cp -L "$b" "$root/$dest/"
    LD_LIBRARY_PATH=$EX/usr/lib/x86_64-linux-gnu ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' |
      while read -r l; do
        cp -L "$l" "$root/usr/lib/x86_64-linux-gnu/$(basename "$l")"
      done
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$root/usr/lib64/"
  l=$(ls /lib/x86_64-linux-gnu/libgcc_s.so.1 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1 2>/dev/null | head -1)
  [ -n "$l" ] || die 2 "libgcc_s.so.1 not found on the host (package libgcc-s1)"
  cp -L "$l" "$root/usr/lib/x86_64-linux-gnu/"
}

pack() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$2"; }

write_conf() {
  cat >"$1" <<EOF
KVER=$KVER
BACKEND=${DOM0_BACKEND:-$BACKEND}
TEARDOWN=$TEARDOWN
GUEST_WINDOW=$([ "$BACKEND" = ours ] && echo 200 || echo 110)
GUEST_VERIFY_DD=$([ "$BACKEND" = ours ] && echo 1 || echo 0)
GUEST_PEER_DISK=$([ "$BACKEND" = ours ] && echo 1 || echo 0)
GUEST_PEER_NET=$([ "$BACKEND" = ours ] && echo 1 || echo 0)
EOF
}

# Sets XEN_ELF, DOM0_KERNEL, DOM0_INITRD.
build_images() {
  local b=$CACHE/build
  mkdir -p "$b"
  XEN_ELF=$b/xen-4.17.elf
  gunzip -c "$EX/boot/xen-4.17-amd64.gz" >"$XEN_ELF"
  DOM0_KERNEL=$EX/boot/vmlinuz-$KVER

  # domU: busybox, the two frontends, the guest workload.
  local u=$b/domu-root
  skeleton "$u"
  install_modules "$u" "${DOMU_MODULES[@]}"
  cp "$TB/guest/init" "$u/init"; chmod 755 "$u/init"
  cp "$TB/common.sh" "$u/etc/testbed-common.sh"
  write_conf "$u/etc/testbed.conf"
  pack "$u" "$b/domu.cpio.gz"

  # dom0: busybox, Xen tools + libraries, modules, the domU images, init and backend scripts.
  local d=$b/dom0-root c
  skeleton "$d"
  install_modules "$d" "${DOM0_MODULES[@]}"
  local bins=()
  for c in "${XEN_BINS[@]}"; do bins+=("$EX/usr/lib/xen-4.17/bin/$c"); done
  install_elves "$d" usr/lib/xen-4.17/bin "${bins[@]}"
  install_elves "$d" usr/bin "$EX/usr/bin/xenstore"
  for c in "${XENSTORE_CMDS[@]}"; do ln -sf xenstore "$d/usr/bin/$c"; done
  mkdir -p "$d/etc/xen" "$d/var/lib/xen" "$d/var/lib/xenstored" "$d/var/log/xen/console" \
    "$d/boot/domu" "$d/etc/testbed"
  cp "$EX/etc/xen/xl.conf" "$d/etc/xen/xl.conf"
  cp "$TB/domu.cfg" "$d/etc/xen/domu.cfg"
  cp "$EX/boot/vmlinuz-$KVER" "$d/boot/domu/vmlinuz"
  cp "$b/domu.cpio.gz" "$d/boot/domu/initrd.gz"
  cp "$TB/dom0/init" "$d/init"; chmod 755 "$d/init"
  cp "$TB/common.sh" "$d/etc/testbed-common.sh"
  cp "$TB"/dom0/backend-*.sh "$TB/dom0/xs-nodes.sh" "$d/etc/testbed/"
  write_conf "$d/etc/testbed.conf"
  if [ "$BACKEND" = ours ]; then
    local bin bs=()
    for bin in $IDD_BINARIES; do
      [ -x "$bin" ] || die 2 "IDD_BINARIES: $bin is not an executable"
      bs+=("$bin")
    done
    install_elves "$d" opt/idd/bin "${bs[@]}"
    # Debug builds carry ~50 MB of debug info each: keep the initramfs small.
    for bin in "${bs[@]}"; do strip "$d/opt/idd/bin/$(basename "$bin")" 2>/dev/null || true; done
  fi
  pack "$d" "$b/dom0.cpio.gz"
  DOM0_INITRD=$b/dom0.cpio.gz
  echo "dom0 initramfs $(du -h "$DOM0_INITRD" | cut -f1), domU initramfs $(du -h "$b/domu.cpio.gz" | cut -f1)"
  case "$XEN_ELF$DOM0_KERNEL$DOM0_INITRD" in
    *,*|*' '*) die 2 "cache path must not contain ',' or ' ' (QEMU's multiboot module list)";;
  esac
}

QEMU_PID=
TAIL_PID=
cleanup_qemu() {
  if [ -n "$TAIL_PID" ]; then kill "$TAIL_PID" 2>/dev/null || true; fi
  if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill "$QEMU_PID" 2>/dev/null; sleep 1; kill -9 "$QEMU_PID" 2>/dev/null || true
  fi
  QEMU_PID=; TAIL_PID=
  return 0
}

# Boots Xen + dom0 under TCG with the serial console in LOG; streams it; bounded by TIMEOUT.
# Records the wall time (since QEMU start) at which milestones first appear in MILESTONES.
run_qemu() {
  LOG=$1
  : >"$LOG"
  trap cleanup_qemu EXIT
  trap 'cleanup_qemu; exit 1' INT TERM
  local left=$((TIMEOUT - (SECONDS - START)))
  [ "$left" -gt 30 ] || die 1 "FAIL: no time left to boot (XEN_TESTBED_TIMEOUT=$TIMEOUT)"
  QSTART=$SECONDS
  qemu-system-x86_64 -accel tcg -cpu Haswell-noTSX -m 2048 -smp 2 \
    -display none -monitor none -no-reboot -net none -serial "file:$LOG" \
    -kernel "$XEN_ELF" -append "console=com1 com1=115200 dom0_mem=768M" \
    -initrd "$DOM0_KERNEL console=hvc0 earlyprintk=xen panic=-1 loglevel=4,$DOM0_INITRD" \
    </dev/null >"$LOG.qemu" 2>&1 &
  QEMU_PID=$!
  tail -n +1 -F --pid="$QEMU_PID" "$LOG" 2>/dev/null | tr -d '\r' | sed -u 's/^/  | /' &
  TAIL_PID=$!
  declare -gA MILESTONES=()
  local m ended=
  while kill -0 "$QEMU_PID" 2>/dev/null; do
    for m in "(XEN) Xen version" "TESTBED MARK dom0-init" "TESTBED MARK domu-unpaused" \
        "TESTBED MARK domu-init" "TESTBED MARK guest-workload-done" "TESTBED-END"; do
      [ -n "${MILESTONES[$m]:-}" ] || ! grep -qF "$m" "$LOG" || MILESTONES[$m]=$((SECONDS - QSTART))
    done
    if [ -n "${MILESTONES[TESTBED-END]:-}" ] && [ -z "$ended" ]; then ended=$SECONDS; fi
    # dom0 reboots after TESTBED-END (QEMU exits, -no-reboot); do not wait long for it.
    if [ -n "$ended" ] && [ $((SECONDS - ended)) -gt 20 ]; then break; fi
    if [ $((SECONDS - START)) -ge "$TIMEOUT" ]; then
      echo "TESTBED FAIL timeout: no result within XEN_TESTBED_TIMEOUT=$TIMEOUT s" >>"$LOG"
      break
    fi
    sleep 1
  done
  sleep 1
  cleanup_qemu
  QEMU_WALL=$((SECONDS - QSTART))
}

# Parses the serial log: every required check must PASS, nothing may FAIL.
check_results() {
  local log=$1 clean fails passes req missing=()
  clean=$(tr -d '\r' <"$log")
  echo "serial log: $log"
  echo "QEMU wall time: ${QEMU_WALL}s"
  if ! grep -qF "(XEN) Xen version" <<<"$clean"; then
    echo "  Xen never started; QEMU said:"; sed 's/^/    /' "$log.qemu" | tail -20
  fi
  for m in "${!MILESTONES[@]}"; do printf '  milestone %4ss after QEMU start: %s\n' "${MILESTONES[$m]}" "$m"; done |
    sort -k2,2n
  grep -E 'TESTBED (TIME|OBSERVE|INFO)' <<<"$clean" | sed 's/^.*TESTBED /  /' || true
  passes=$(grep -E 'TESTBED PASS ' <<<"$clean" | sed 's/^.*TESTBED /  /' || true)
  fails=$(grep -E 'TESTBED FAIL ' <<<"$clean" | sed 's/^.*TESTBED /  /' || true)
  if [ -n "$passes" ]; then echo "$passes"; fi
  if [ -n "$fails" ]; then echo "$fails"; fi
  for req in guest-blk-pattern guest-net-ping dom0-disk-checksum; do
    grep -qE "TESTBED PASS $req( |$)" <<<"$clean" || missing+=("$req")
  done
  if [ "$BACKEND" = ours ]; then
    # xen-netback's vif next to the kernel netback's, same guest, same run.
    for req in guest-net-peer guest-net-download; do
      grep -qE "TESTBED PASS $req( |$)" <<<"$clean" || missing+=("$req")
    done
  fi
  if [ "$TEARDOWN" = 1 ]; then
    grep -qE "TESTBED PASS teardown-experiment( |$)" <<<"$clean" || missing+=(teardown-experiment)
    if [ "$BACKEND" = ours ]; then
      # Our restarts must be invisible: every restart re-attached, and no guest I/O failed.
      grep -qE "TESTBED PASS ours-restarts( |$)" <<<"$clean" || missing+=(ours-restarts)
      grep -qE "TESTBED OBSERVE guest disk: [1-9][0-9]* verified I/Os ok, 0 failed, longest gap between successes [0-9.]+s$" <<<"$clean" ||
        missing+=("guest disk I/O without errors during the restarts")
      grep -qE "TESTBED OBSERVE guest verifying dd: ([1-9][0-9]*) passes, \1 ok, 0 bad" <<<"$clean" ||
        missing+=("every verifying dd pass correct")
      # The network through xen-netback kept working across the kills.
      grep -qE "TESTBED PASS guest-net-through-kills( |$)" <<<"$clean" || missing+=(guest-net-through-kills)
    fi
  fi
  grep -q 'TESTBED-END' <<<"$clean" || missing+=("TESTBED-END (dom0 did not finish)")
  if [ -n "$fails" ] || [ ${#missing[@]} -gt 0 ]; then
    if [ ${#missing[@]} -gt 0 ]; then echo "  missing: ${missing[*]}"; fi
    echo "xen-testbed: FAIL (BACKEND=$BACKEND, total $(elapsed)s)"
    exit 1
  fi
  echo "xen-testbed: PASS (BACKEND=$BACKEND, total $(elapsed)s)"
}
