#!/usr/bin/env bash
# Build a small bootable disk image for the failover tests:
#   tests/guest/mkboot.sh OUT.img [SIZE_MIB]
# One ext2 filesystem on the whole disk ("superfloppy": extlinux's boot
# sector is the filesystem's first sector, which SeaBIOS boots), holding a
# Debian cloud kernel and a busybox initramfs (tests/guest/lib.sh) in
# /boot. At boot the initramfs mounts the disk itself (/dev/vda), prints
# "FERRY-MARKER <name>" for each /marker-* file on it, writes /booted (a
# change the test must not find in the replica afterwards) and powers off.
# Files are added to the image afterwards with debugfs -w (no mount).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1 size=${2:-64}
source tests/guest/lib.sh
k=${FERRY_KERNELS%% *}
prepare_kernel "$k" >&2
work=$(mktemp -d /tmp/ferry-mkboot.XXXXXX)
mnt=
cleanup() { [ -n "$mnt" ] && umount "$mnt" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/payload"
cat > "$work/payload/test.sh" <<'T'
mkdir -p /mnt/disk
if mount -t ext4 /dev/vda /mnt/disk; then
  for f in /mnt/disk/marker-*; do [ -e "$f" ] && echo "FERRY-MARKER $(basename "$f") $(cat "$f")"; done
  echo "written at boot" > /mnt/disk/booted
  sync; umount /mnt/disk
  echo "FERRY-BOOTED"
else
  echo "FERRY-BOOT-FAILED cannot mount /dev/vda"
fi
T
GUEST_PROGRAMS=()
make_initramfs "$k" "$work/initrd.gz" "$work/payload"
rm -f "$out"
truncate -s "${size}M" "$out"
mkfs.ext2 -q -F -L ferryboot "$out"
mnt="$work/mnt"; mkdir -p "$mnt"
mount -o loop "$out" "$mnt"
mkdir -p "$mnt/boot"
cp "$KCACHE/$k/boot/vmlinuz-$k" "$mnt/boot/vmlinuz"
cp "$work/initrd.gz" "$mnt/boot/initrd.gz"
printf 'DEFAULT ferry\nPROMPT 0\nTIMEOUT 1\nLABEL ferry\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.gz\n  APPEND console=ttyS0 panic=-1 quiet loglevel=4\n' > "$mnt/boot/extlinux.conf"
extlinux --install "$mnt/boot" >/dev/null 2>&1
umount "$mnt"; mnt=
