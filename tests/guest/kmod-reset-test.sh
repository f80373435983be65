#!/bin/busybox sh
# Runs in the guest, over two boots of the same kernel with the same disks:
# a partitioned disk ($KMOD_DISK, default /dev/vdd) protected by the kernel
# module tracker, and /persist (the harness mounts /dev/vdc there) holding
# the module's state files and the agent's state.
#   phase 1: protect; a filesystem on the first partition gets marker
#     files; a point is cut ("FERRY-FSPOINT <id>": the host recovers it and
#     checks the filesystem); more writes; then a reset without any clean
#     stop (sysrq b; QEMU exits, the host boots the guest again).
#   phase 2: the module loads with the disk in `disks`, finds its state
#     file unclean and flags the loss; the agent must resync.
# Prints one "FERRY-TEST kmod-reset-<test> PASS|FAIL" line per test.
. /payload/env
K=$(uname -r)
DISK=${KMOD_DISK:-/dev/vdd}
res() { echo "FERRY-TEST kmod-reset-$1 $2"; }
pick() { if [ -e "/payload/$K/$1" ]; then echo "/payload/$K/$1"; else echo "/payload/$1"; fi; }
dev=$(cat /sys/block/${DISK#/dev/}/dev)
AGENT="ferry agent --disk $DISK --name $NAME-reset --target 10.0.2.2:$PORT --tracker kmod --state /persist/kst --connect-timeout 60 --once --json"
if [ "$1" = 1 ]; then
  mkdir -p /persist/kstate
  insmod "$(pick ferry_cbt.ko)" state_dir=/persist/kstate || { res insmod FAIL; exit 0; }
  $AGENT > /tmp/r1.json 2>/tmp/r1.log && res protect PASS || { res protect FAIL; tail -5 /tmp/r1.log; }
  mke2fs -q "${DISK}1" && mkdir -p /mnt/fs && mount -t ext4 "${DISK}1" /mnt/fs 2>/dev/null || mount "${DISK}1" /mnt/fs
  i=0; while [ $i -lt 40 ]; do echo "ferry marker $i" > /mnt/fs/marker-$i.txt; i=$((i + 1)); done
  dd if=/dev/urandom of=/mnt/fs/blob bs=65536 count=64 2>/dev/null
  md5sum /mnt/fs/blob | awk '{print "FERRY-FSBLOB " $1}'
  umount /mnt/fs
  if $AGENT > /tmp/r2.json 2>>/tmp/r1.log && grep -q '"resync":false' /tmp/r2.json; then
    res fs-point PASS
    sed -n 's/.*"point_id":\([0-9]*\).*/FERRY-FSPOINT \1/p' /tmp/r2.json
  else
    res fs-point FAIL; cat /tmp/r2.json; tail -5 /tmp/r1.log
  fi
  # Changes the agent has not shipped, then a reset: the module's state file
  # still says "tracking active".
  dd if=/dev/urandom of="$DISK" bs=4096 seek=16 count=64 conv=fsync 2>/dev/null
  touch /persist/phase1-done
  sync
  dmesg | grep -E "WARNING:|BUG:|Oops|lockdep|general protection" | sed 's/^/FERRY-GUEST-KERNEL-PROBLEM /'
  echo "FERRY-RESET-PHASE1"
  echo "FERRY-GUEST-DONE"
  echo b > /proc/sysrq-trigger
  sleep 10
else
  from=$(( $(dmesg | wc -l) + 1 ))
  if insmod "$(pick ferry_cbt.ko)" state_dir=/persist/kstate disks=$dev &&
     dmesg | tail -n +$from | grep -q "after an unclean stop"; then
    res unclean-stop-flagged PASS
  else
    res unclean-stop-flagged FAIL; dmesg | tail -n +$from | tail -5
  fi
  if $AGENT > /tmp/r3.json 2>/tmp/r3.log && grep -q '"resync":true' /tmp/r3.json; then
    res resync-after-reset PASS
  else
    res resync-after-reset FAIL; cat /tmp/r3.json; tail -5 /tmp/r3.log
  fi
  grep -E "WARN|unclean" /tmp/r3.log | head -3 | sed 's/^/# /'
  ferry unprotect --state /persist/kst >/dev/null 2>&1
  rm -f /persist/phase1-done
  rmmod ferry_cbt
fi
