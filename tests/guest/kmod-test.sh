#!/bin/busybox sh
# Runs in the guest: the kernel-module tracker (cbt-module/kmod) on the
# guest kernel's virtio disk and on a loop device.
# Prints one "FERRY-TEST kmod-<test> PASS|FAIL" line per test.
#
# Needs, in the guest:
#   ferry_cbt.ko built for this kernel: /payload/<uname -r>/ferry_cbt.ko,
#     else /payload/ferry_cbt.ko
#   loop.ko, decompressed, unless loop is built in or already loaded:
#     /payload/<uname -r>/loop.ko, else /payload/loop.ko
#   kmod-probe (tests/guest/kmod-probe.c, static) on PATH or in /payload
#   a disk at $KMOD_DISK (default /dev/vda) of at least 16 MiB, nothing
#     mounted from it; if it has a first partition (/dev/vda1), writes
#     through it are checked too. Every range the tests change is written
#     back afterwards, so the disk ends as it began.
K=$(uname -r)
DISK=${KMOD_DISK:-/dev/vda}
res() { echo "FERRY-TEST kmod-$1 $2"; }
pick() { if [ -e "/payload/$K/$1" ]; then echo "/payload/$K/$1"; else echo "/payload/$1"; fi; }
PROBE=$(command -v kmod-probe || echo /payload/kmod-probe)
run() { # run FERRY-TEST-NAME PROBE-TEST ARGS...
  name=$1; shift
  echo "# kmod-probe $*"
  if "$PROBE" "$@"; then res "$name" PASS; else res "$name" FAIL; fi
}
log_from=$(( $(dmesg | wc -l) + 1 ))
newlog() { dmesg | tail -n +"$log_from"; }

KO=$(pick ferry_cbt.ko)
if insmod "$KO" && [ -c /dev/ferry-cbt ] && grep -q '^ferry_cbt ' /proc/modules; then
  res insmod PASS
else
  res insmod FAIL; newlog | tail -20; exit 0
fi

LOOP=
if [ -d /sys/module/loop ] || insmod "$(pick loop.ko)"; then
  LOOP=$("$PROBE" mkloop /tmp/kmod-loop.img) || LOOP=
fi
[ -n "$LOOP" ] && res loop-setup PASS || res loop-setup FAIL

run abi abi "$DISK" ${LOOP:+${LOOP}p1}
run records-virtio records "$DISK"
[ -n "$LOOP" ] && run records-loop records "$LOOP"
[ -n "$LOOP" ] && run partition-loop partition "$LOOP" "${LOOP}p1"
[ -b "${DISK}1" ] && run partition-virtio partition "$DISK" "${DISK}1"
run bitmap bitmap "$DISK"
run data data "$DISK"
run tag tag "$DISK"
run seq seq "$DISK"
[ -n "$LOOP" ] && run isolation isolation "$DISK" "$LOOP"
run persist persist "$DISK"
run stress stress "$DISK" $LOOP

# Unload with a disk still attached: the module detaches it itself. Then a
# second load/unload cycle starts clean.
"$PROBE" leave-attached "$DISK"
if rmmod ferry_cbt && [ ! -e /dev/ferry-cbt ] && newlog | grep -q "ferry_cbt: detached .* at unload" &&
   insmod "$KO" && rmmod ferry_cbt && ! grep -q '^ferry_cbt ' /proc/modules; then
  res rmmod-with-attached-disk PASS
else
  res rmmod-with-attached-disk FAIL
fi
[ -n "$LOOP" ] && "$PROBE" rmloop "$LOOP"

# The hook logs once if a partition bio ever reaches block_bio_queue
# before blk_partition_remap(): the partition tests above must not have.
if newlog | grep -q "before its remap"; then res partition-remapped-before-trace FAIL; else res partition-remapped-before-trace PASS; fi
if newlog | grep -E "WARNING:|BUG:|Oops|lockdep|general protection|RCU stall|rcu_sched detected|sleeping function" ; then
  res kernel-log-clean FAIL
else
  res kernel-log-clean PASS
fi
newlog | grep "ferry_cbt" | head -40
