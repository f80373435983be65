#!/usr/bin/env bash
# A whole Debian 12 guest with an SSH server, for tests that install and run
# ferry as an administrator would (push install, .deb packages, systemd
# units). Booted with qemu-system-x86_64 -accel tcg (KVM hangs on these
# machines), like the guest kernels of tests/guest/lib.sh.
#
#   source tests/guest/debian-vm.sh
#   build_image                      # once; cached (see below)
#   boot_vm NAME [DISK...]           # a clean guest: VM_SSH_PORT, VM_KEY, VM_PID, VM_DIR
#   vm_ssh 'systemctl is-system-running --wait'
#   vm_scp_to FILE... /root/         # vm_scp_from REMOTE LOCAL
#   stop_vm                          # power off (qemu killed after a deadline)
#
# or run: tests/guest/debian-vm.sh build | shell | ssh-cmd
#
# The image is built once with debootstrap (minbase bookworm from
# deb.debian.org: systemd, openssh-server, udev, kmod, iproute2,
# ca-certificates, systemd-networkd, the cloud kernel) and cached beside the
# guest kernels, in $FERRY_KERNEL_CACHE (default /var/cache/ferry-kernels)
# as debian-vm-<key>/: root.qcow2 (ext4 on the whole disk, /dev/vda), the
# image's own vmlinuz and initrd.img (booted directly: no boot loader), and
# the ed25519 key pair authorized for root. The key is VM_IMAGE_VERSION
# plus a hash of the build function, so any change to the build rebuilds.
# Every boot runs on a throwaway qcow2 overlay, so every test starts from
# the same clean image; names are unique, so tests can run side by side.
#
# The guest: 10.0.2.15, reaches the host's 127.0.0.1:P as 10.0.2.2:P (QEMU
# user network, DNS 10.0.2.3); its port 22 is forwarded to 127.0.0.1:VM_SSH_PORT.
# apt sources list bookworm, bookworm-updates and bookworm-security; the
# apt timers are masked, so nothing holds the dpkg lock behind a test.

VM_IMAGE_VERSION=1
_VM_SELF=$(readlink -f "${BASH_SOURCE[0]}")
VM_CACHE=${FERRY_VM_CACHE:-${FERRY_KERNEL_CACHE:-/var/cache/ferry-kernels}}
VM_MIRROR=${FERRY_VM_MIRROR:-http://deb.debian.org/debian}
VM_PACKAGES=systemd-sysv,systemd,udev,kmod,iproute2,openssh-server,openssh-sftp-server,ca-certificates,dbus,procps,linux-image-cloud-amd64,initramfs-tools,zstd
# The VMs this shell booted: name -> directory (for stop_vm and vm_cleanup_all).
declare -gA FERRY_VMS=()

vm_log() { echo "debian-vm: $*" >&2; }

# Unmount whatever is mounted at or under $1 (innermost first); never
# follow a removal into a mounted /proc or /dev.
_vm_umount_under() {
  local d
  d=$(readlink -f "$1") || return 0
  awk -v p="$d" '$2 == p || index($2, p "/") == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
_vm_remove_tree() {
  [ -e "$1" ] || return 0
  _vm_umount_under "$1"
  rm -rf --one-file-system "$1"
}

# Build the image into directory $1 (empty). Everything that decides what
# the image holds is in this function: its text is part of the cache key.
_vm_build_into() {
  local out=$1 root="$1/rootfs"
  mkdir -p "$root"
  # 1. The base system. minbase plus the list; Depends only (no Recommends).
  debootstrap --variant=minbase --include="$VM_PACKAGES" bookworm "$root" "$VM_MIRROR" >>"$out/build.log" 2>&1 || {
    tail -30 "$out/build.log" >&2
    [ -e "$root/debootstrap/debootstrap.log" ] && tail -30 "$root/debootstrap/debootstrap.log" >&2
    return 1
  }
  # 2. Configuration (files only, no daemons run in the chroot).
  echo ferry-vm > "$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 ferry-vm\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
  printf '/dev/vda / ext4 defaults,errors=remount-ro 0 0\n' > "$root/etc/fstab"
  printf 'nameserver 10.0.2.3\n' > "$root/etc/resolv.conf"
  cat > "$root/etc/apt/sources.list" <<EOF
deb $VM_MIRROR bookworm main
deb $VM_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # Static address on the QEMU user network: no DHCP wait at boot.
  mkdir -p "$root/etc/systemd/network"
  printf '[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' \
    > "$root/etc/systemd/network/10-qemu.network"
  systemctl --root="$root" enable systemd-networkd.service >>"$out/build.log" 2>&1
  # What delays a boot under TCG, or would take the dpkg lock under a test.
  local u
  for u in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer apt-daily.service \
           apt-daily-upgrade.service dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
           systemd-firstboot.service getty@tty1.service systemd-hwdb-update.service man-db.timer; do
    ln -sfn /dev/null "$root/etc/systemd/system/$u"
  done
  mkdir -p "$root/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/ferry-vm.conf"
  # sshd: root by key only; the host's LANG/LC_* are not taken (no locales here).
  sed -i '/^AcceptEnv/d' "$root/etc/ssh/sshd_config"
  printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' > "$root/etc/ssh/sshd_config.d/ferry-vm.conf"
  # Root's key (the client side stays in the cache, beside the image).
  ssh-keygen -q -t ed25519 -N '' -C ferry-vm -f "$out/id_ed25519"
  install -d -m 0700 "$root/root/.ssh"
  install -m 0600 "$out/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
  # 3. A small initramfs: only what mounts /dev/vda (direct kernel boot).
  printf 'MODULES=list\nCOMPRESS=zstd\n' > "$root/etc/initramfs-tools/conf.d/ferry-vm.conf"
  printf 'virtio_pci\nvirtio_blk\next4\n' >> "$root/etc/initramfs-tools/modules"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  mount -t sysfs sys "$root/sys"
  local rc=0
  chroot "$root" update-initramfs -u -k all >>"$out/build.log" 2>&1 || rc=$?
  chroot "$root" apt-get clean >>"$out/build.log" 2>&1 || rc=$?
  _vm_umount_under "$root/proc"; _vm_umount_under "$root/dev"; _vm_umount_under "$root/sys"
  [ "$rc" = 0 ] || { tail -30 "$out/build.log" >&2; return 1; }
  cp "$(ls -v "$root"/boot/vmlinuz-* | tail -1)" "$out/vmlinuz"
  cp "$(ls -v "$root"/boot/initrd.img-* | tail -1)" "$out/initrd.img"
  rm -rf "$root/var/lib/apt/lists"/*_Packages "$root/var/cache/apt"/*.bin "$root/debootstrap" 2>/dev/null || true
  # 4. The disk: ext4 made straight from the tree (no loop mount), 8 GiB
  # sparse, then qcow2 (the overlays' backing file).
  truncate -s 8G "$out/root.raw"
  mkfs.ext4 -q -F -L ferry-vm -d "$root" "$out/root.raw" >>"$out/build.log" 2>&1
  qemu-img convert -O qcow2 "$out/root.raw" "$out/root.qcow2"
  rm -f "$out/root.raw"
  _vm_remove_tree "$root"
  echo "$VM_IMAGE_VERSION" > "$out/version"
}

# The cache key of the image: the version and a hash of the build's text.
vm_image_key() {
  printf '%s\n%s\n%s\n' "$VM_IMAGE_VERSION" "$VM_PACKAGES" "$(declare -f _vm_build_into)" | sha256sum | cut -c1-12
}

# Build the image unless it is cached. Reentrant: one build at a time (a
# lock in the cache); a build goes into a temporary directory renamed when
# complete, so a failed or killed build leaves nothing that looks ready.
# Sets VM_IMAGE_DIR.
build_image() {
  local key tmp fd start rc
  key=$(vm_image_key)
  VM_IMAGE_DIR="$VM_CACHE/debian-vm-$VM_IMAGE_VERSION-$key"
  [ -e "$VM_IMAGE_DIR/ready" ] && return 0
  [ "$(id -u)" = 0 ] || { vm_log "building the image needs root"; return 1; }
  local t
  for t in debootstrap qemu-img qemu-system-x86_64 ssh scp ssh-keygen mkfs.ext4 flock; do
    command -v "$t" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null 2>&1 ||
      { vm_log "$t is missing (scripts/install-deps installs it)"; return 1; }
  done
  mkdir -p "$VM_CACHE"
  exec {fd}>"$VM_CACHE/debian-vm.lock"
  if ! flock -w "${FERRY_VM_BUILD_WAIT:-3600}" "$fd"; then
    exec {fd}>&-; vm_log "timed out waiting for another build of the image"; return 1
  fi
  if [ -e "$VM_IMAGE_DIR/ready" ]; then exec {fd}>&-; return 0; fi
  # Leftovers of builds that were killed (we hold the lock: none is running).
  for t in "$VM_CACHE"/.debian-vm-*.tmp.*; do [ -e "$t" ] && _vm_remove_tree "$t"; done
  tmp="$VM_CACHE/.debian-vm-$VM_IMAGE_VERSION-$key.tmp.$$"
  mkdir -p "$tmp"
  vm_log "building the Debian 12 guest image in $VM_IMAGE_DIR (debootstrap; several minutes, once)"
  start=$(date +%s)
  rc=0
  # A separate bash, so that an error anywhere stops the build (set -e
  # holds there whatever the caller's context) and the cleanup below always
  # runs; the temporary tree goes on any failure.
  bash -c 'set -euo pipefail; source "$1"; trap "_vm_umount_under \"$2\"" EXIT; _vm_build_into "$2"' \
    _ "$_VM_SELF" "$tmp" || rc=$?
  if [ "$rc" = 0 ]; then
    echo "$(( $(date +%s) - start ))" > "$tmp/build-seconds"
    touch "$tmp/ready"
    _vm_remove_tree "$VM_IMAGE_DIR"
    mv "$tmp" "$VM_IMAGE_DIR"
    vm_log "image built in $(cat "$VM_IMAGE_DIR/build-seconds")s"
  else
    vm_log "image build failed (rc $rc); log kept at /tmp/ferry-debian-vm-build.log"
    cp "$tmp/build.log" /tmp/ferry-debian-vm-build.log 2>/dev/null || true
    _vm_remove_tree "$tmp"
  fi
  exec {fd}>&-
  return "$rc"
}

_vm_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The ssh and scp options for the VM booted last (or VM_SSH_PORT/VM_KEY as set).
_vm_ssh_opts() {
  VM_SSH_OPTS=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes
    -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=6 -o IdentitiesOnly=yes
    -o GSSAPIAuthentication=no -i "$VM_KEY")
}
vm_ssh() { _vm_ssh_opts; ssh "${VM_SSH_OPTS[@]}" -p "$VM_SSH_PORT" root@127.0.0.1 "$@"; }
# vm_scp_to LOCAL... REMOTE_PATH
vm_scp_to() {
  _vm_ssh_opts
  local dst=${*: -1}
  scp -q "${VM_SSH_OPTS[@]}" -P "$VM_SSH_PORT" "${@:1:$#-1}" "root@127.0.0.1:$dst"
}
# vm_scp_from REMOTE_PATH LOCAL
vm_scp_from() { _vm_ssh_opts; scp -q "${VM_SSH_OPTS[@]}" -P "$VM_SSH_PORT" "root@127.0.0.1:$1" "$2"; }

# boot_vm NAME [DISK...]: boot a clean guest on a throwaway overlay of the
# image; DISKs (raw, or qcow2 by their .qcow2 name) are /dev/vdb, /dev/vdc...
# Waits for ssh (FERRY_VM_BOOT_TIMEOUT seconds, default 300); on timeout the
# serial log's tail is printed and the VM stopped. Exports VM_NAME,
# VM_SSH_PORT, VM_KEY, VM_PID, VM_DIR (overlay, serial.log) and VM_SERIAL.
# Several VMs may run at once: use vm_use NAME to switch between them.
# An EXIT trap (vm_cleanup_all, chained before any trap already set) stops
# them all, and a watcher kills qemu if this shell dies without it.
boot_vm() {
  local name=$1; shift
  build_image || return 1
  local dir d fmt tries port start limit=${FERRY_VM_BOOT_TIMEOUT:-300}
  dir=$(mktemp -d "/tmp/ferry-vm-${name//[^A-Za-z0-9_.-]/-}.XXXXXX")
  qemu-img create -q -f qcow2 -F qcow2 -b "$VM_IMAGE_DIR/root.qcow2" "$dir/root.qcow2"
  local extra=()
  for d in "$@"; do
    case "$d" in *.qcow2) fmt=qcow2 ;; *) fmt=raw ;; esac
    extra+=(-drive "file=$d,if=virtio,format=$fmt")
  done
  _vm_install_trap
  start=$(date +%s)
  for tries in 1 2 3 4 5; do
    port=$(_vm_free_port)
    : > "$dir/serial.log"
    qemu-system-x86_64 -name "ferry-vm-$name" -accel tcg -cpu max -m "${FERRY_VM_MEM:-1024}" -smp "${FERRY_VM_SMP:-1}" \
      -display none -monitor none -no-reboot -serial "file:$dir/serial.log" \
      -kernel "$VM_IMAGE_DIR/vmlinuz" -initrd "$VM_IMAGE_DIR/initrd.img" \
      -append "root=/dev/vda rw console=ttyS0 fsck.mode=skip panic=-1 quiet loglevel=4 systemd.show_status=true" \
      -drive "file=$dir/root.qcow2,if=virtio,format=qcow2,cache=unsafe" "${extra[@]}" \
      -nic "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:$port-:22" \
      -device virtio-rng-pci </dev/null >"$dir/qemu.log" 2>&1 &
    VM_PID=$!
    sleep 1
    # Another process may have taken the port between the pick and qemu's bind.
    if ! kill -0 "$VM_PID" 2>/dev/null && grep -q "hostfwd\|host forwarding" "$dir/qemu.log"; then
      wait "$VM_PID" 2>/dev/null || true
      continue
    fi
    break
  done
  echo "$VM_PID" > "$dir/pid"; echo "$port" > "$dir/port"
  FERRY_VMS[$name]=$dir
  # Kills qemu when this shell is gone (even by SIGKILL, when no trap runs).
  ( set +e; exec >/dev/null 2>&1 </dev/null
    while kill -0 $$ 2>/dev/null && kill -0 "$VM_PID" 2>/dev/null; do sleep 2; done
    kill -0 $$ 2>/dev/null && exit 0
    kill "$VM_PID"; sleep 5; kill -9 "$VM_PID"; rm -rf "$dir" ) &
  echo $! > "$dir/watcher"
  vm_use "$name"
  # Wait for sshd to answer with our key.
  while :; do
    if ! kill -0 "$VM_PID" 2>/dev/null; then
      vm_log "$name: qemu exited before ssh came up"; sed 's/^/  qemu: /' "$dir/qemu.log" >&2
      tail -40 "$dir/serial.log" | sed 's/^/  serial: /' >&2; stop_vm "$name" kill; return 1
    fi
    if vm_ssh -o ConnectTimeout=5 true 2>/dev/null; then break; fi
    if (( $(date +%s) - start > limit )); then
      vm_log "$name: no ssh after ${limit}s; serial log tail:"
      tail -40 "$dir/serial.log" | sed 's/^/  serial: /' >&2; stop_vm "$name" kill; return 1
    fi
    sleep 1
  done
  VM_BOOT_SECONDS=$(( $(date +%s) - start ))
  echo "$VM_BOOT_SECONDS" > "$dir/boot-seconds"
  vm_log "$name: ssh on 127.0.0.1:$VM_SSH_PORT after ${VM_BOOT_SECONDS}s (qemu pid $VM_PID, $dir)"
}

# Make NAME the VM that vm_ssh, vm_scp_* and stop_vm (without a name) use.
vm_use() {
  local dir=${FERRY_VMS[$1]:?no VM named $1}
  export VM_NAME=$1 VM_DIR=$dir VM_SERIAL=$dir/serial.log VM_KEY=$VM_IMAGE_DIR/id_ed25519
  export VM_PID VM_SSH_PORT
  VM_PID=$(cat "$dir/pid"); VM_SSH_PORT=$(cat "$dir/port")
}

# stop_vm [NAME [kill]]: power the guest off (ssh poweroff), kill qemu if
# it is still there after FERRY_VM_STOP_TIMEOUT seconds (default 60; at once
# with "kill"), remove the overlay. The serial log is kept as
# /tmp/ferry-vm-NAME-serial.log.
stop_vm() {
  local name=${1:-${VM_NAME:-}} how=${2:-poweroff}
  [ -n "$name" ] && [ -n "${FERRY_VMS[$name]:-}" ] || return 0
  local dir=${FERRY_VMS[$name]} pid port i
  pid=$(cat "$dir/pid" 2>/dev/null || true); port=$(cat "$dir/port" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$how" = kill ]; then
    kill "$pid" 2>/dev/null; sleep 1; kill -9 "$pid" 2>/dev/null || true
  fi
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    _vm_ssh_opts
    timeout 20 ssh "${VM_SSH_OPTS[@]}" -o ConnectTimeout=5 -i "$VM_IMAGE_DIR/id_ed25519" -p "$port" root@127.0.0.1 \
      'systemctl poweroff --no-block' >/dev/null 2>&1 || true
    for ((i = 0; i < ${FERRY_VM_STOP_TIMEOUT:-60}; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      vm_log "$name: no poweroff after ${FERRY_VM_STOP_TIMEOUT:-60}s; killing qemu"
      kill "$pid" 2>/dev/null; sleep 2; kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  fi
  if [ -e "$dir/watcher" ]; then kill "$(cat "$dir/watcher")" 2>/dev/null || true; fi
  cp "$dir/serial.log" "/tmp/ferry-vm-$name-serial.log" 2>/dev/null || true
  rm -rf "$dir"
  unset "FERRY_VMS[$name]"
  if [ "${VM_NAME:-}" = "$name" ]; then unset VM_NAME VM_DIR VM_SERIAL VM_PID VM_SSH_PORT; fi
}

vm_cleanup_all() {
  local n
  for n in "${!FERRY_VMS[@]}"; do stop_vm "$n" || true; done
}

# Chain vm_cleanup_all before the EXIT trap the caller has (unless it is
# already there). A caller that sets its EXIT trap after boot_vm must call
# vm_cleanup_all in it.
_vm_install_trap() {
  local cur
  cur=$(trap -p EXIT)
  [[ "$cur" == *vm_cleanup_all* ]] && return 0
  set --
  [ -n "$cur" ] && eval "set -- $cur"
  # shellcheck disable=SC2064
  trap "vm_cleanup_all; ${3:-}" EXIT
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    build) build_image; echo "$VM_IMAGE_DIR" ;;
    # A guest to look at by hand: an ssh session, then power off.
    shell) boot_vm "shell-$$" "${@:2}"; vm_ssh -t || true ;;
    # Boot, run one command over ssh, power off: debian-vm.sh run 'CMD'
    run) boot_vm "run-$$"; vm_ssh "$2" ;;
    *) echo "usage: $0 build | shell [DISK...] | run 'COMMAND'" >&2; exit 2 ;;
  esac
fi
