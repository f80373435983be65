#!/usr/bin/env bash
# Guest-kernel harness: Debian kernels booted with qemu-system-x86_64 -accel
# tcg (KVM hangs on these machines), a busybox initramfs holding the
# kernel's virtio modules, the ferry binaries and a test script. The guest
# reaches a master target on the host's 127.0.0.1:PORT as 10.0.2.2:PORT
# (QEMU user networking). Sourced by scripts/test-kmod.
set -euo pipefail

# The newest Debian 6.1 and 6.12 cloud kernels the archive offers (point
# releases replace each other), unless FERRY_KERNELS names them.
newest_kernel() {
  apt-cache search --names-only "^linux-image-$1[0-9.+~a-z-]*-cloud-amd64\$" 2>/dev/null |
    awk '{print $1}' | grep -v -e '-dbg$' -e '-unsigned$' | sed 's/^linux-image-//' | sort -V | tail -1
}
if [ -z "${FERRY_KERNELS:-}" ]; then
  k61=$(newest_kernel '6\.1\.0-'); k612=$(newest_kernel '6\.12\.')
  FERRY_KERNELS="${k61:-6.1.0-56-cloud-amd64} ${k612:-6.12.107+deb12-cloud-amd64}"
fi
KCACHE=${FERRY_KERNEL_CACHE:-/var/cache/ferry-kernels}

# Download and unpack a Debian kernel image package (cached).
prepare_kernel() {
  local k=$1
  mkdir -p "$KCACHE"
  if [ ! -e "$KCACHE/$k/boot/vmlinuz-$k" ]; then
    (cd "$KCACHE" && apt-get download "linux-image-$k" >/dev/null 2>&1) || {
      echo "cannot download linux-image-$k (apt-get update, or set FERRY_KERNELS)" >&2
      return 1
    }
    mkdir -p "$KCACHE/$k"
    dpkg-deb -x "$KCACHE"/linux-image-"$k"_*.deb "$KCACHE/$k"
  fi
}

# Copy a program and the shared libraries it needs into an initramfs root.
add_program() {
  local root=$1 prog=$2
  install -D -m 0755 "$prog" "$root/bin/$(basename "$prog")"
  ldd "$prog" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}' | while read -r lib; do
    install -D -m 0755 "$lib" "$root$lib"
  done
}

# Build an initramfs for kernel $1 into $2, with /payload from directory $3.
make_initramfs() {
  local k=$1 out=$2 payload=$3
  local root
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,lib/modules,payload,etc}
  install -m 0755 /bin/busybox "$root/bin/busybox"
  # Modules in dependency order (depmod/modprobe on the unpacked tree),
  # decompressed for busybox insmod, listed in /lib/modules/order.
  [ -e "$KCACHE/$k/lib/modules/$k/modules.dep" ] || depmod -b "$KCACHE/$k" "$k"
  local m f n
  for m in virtio_pci virtio_blk virtio_net; do
    modprobe -d "$KCACHE/$k" -S "$k" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++' | while read -r f; do
    n=$(basename "$f"); n=${n%%.ko*}
    case "$f" in
      *.xz) xz -dc "$f" > "$root/lib/modules/$n.ko" ;;
      *.zst) zstd -qdc "$f" > "$root/lib/modules/$n.ko" ;;
      *) cp "$f" "$root/lib/modules/$n.ko" ;;
    esac
    echo "$n" >> "$root/lib/modules/order"
  done
  for p in "${GUEST_PROGRAMS[@]}"; do add_program "$root" "$p"; done
  cp -r "$payload"/. "$root/payload/"
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mkdir -p /sys/fs/bpf; mount -t bpf bpf /sys/fs/bpf
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
echo "FERRY-GUEST-KERNEL $(uname -r)"
# 10.0.2.2 is the host's loopback (QEMU user network): plaintext there is a
# test-only allowance (docs/testing.md, "Test-only switches").
export FERRY_TEST_PLAINTEXT_TARGET=10.0.2.2
sh /payload/test.sh 2>&1
echo "FERRY-GUEST-DONE"
dmesg | grep -E "WARNING:|BUG:|Oops|lockdep|general protection" | sed 's/^/FERRY-GUEST-KERNEL-PROBLEM /'
poweroff -f
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
  rm -rf "$root"
}

# Boot kernel $1 with initramfs $2 and raw disk $3 (/dev/vda); serial
# output to $4. Gives up after $5 seconds (default 600). Raw disks $6... if
# given, are /dev/vdb, /dev/vdc, ...
boot_guest() {
  local k=$1 initrd=$2 disk=$3 log=$4 limit=${5:-600}
  shift 5 2>/dev/null || shift $#
  local extra=() d
  for d in "$@"; do extra+=(-drive "file=$d,if=virtio,format=raw"); done
  timeout "$limit" qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp "${FERRY_GUEST_SMP:-1}" -nographic -no-reboot \
    -kernel "$KCACHE/$k/boot/vmlinuz-$k" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4" \
    -drive "file=$disk,if=virtio,format=raw" "${extra[@]}" \
    -nic user,model=virtio-net-pci >"$log" 2>&1 </dev/null || true
}

# Download and unpack the headers of kernel $1 (and the kbuild tools they
# need), cached beside the image; prints the directory to build modules
# against. The packages are unpacked, not installed: the arch directory's
# one-line Makefile, which names the common headers by absolute path, is
# pointed at the unpacked copy.
prepare_headers() {
  local k=$1 root="$KCACHE/$k-headers" p f pkgs
  local dir="$root/usr/src/linux-headers-$k"
  if [ ! -e "$dir/.ferry-ready" ]; then
    pkgs="linux-headers-$k $(apt-cache depends "linux-headers-$k" 2>/dev/null | awk '$1 ~ /Depends:/ && $2 ~ /^linux-(headers|kbuild)-/ {print $2}' | sort -u)"
    (cd "$KCACHE" && apt-get download $pkgs >/dev/null 2>&1) || {
      echo "cannot download the headers of $k ($pkgs)" >&2
      return 1
    }
    rm -rf "$root"; mkdir -p "$root"
    for p in $pkgs; do
      f=$(ls -v "$KCACHE/${p}_"*.deb | tail -1)
      dpkg-deb -x "$f" "$root"
    done
    sed -i "s|^include /usr/src/|include $root/usr/src/|" "$dir/Makefile"
    touch "$dir/.ferry-ready"
  fi
  echo "$dir"
}
