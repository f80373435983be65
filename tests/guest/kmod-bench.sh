#!/bin/busybox sh
# Runs in the guest: fio 4 KiB random writes (libaio, iodepth 32, O_DIRECT)
# on $KMOD_DISK, untracked, tracked in data mode (payloads copied; a
# consumer releases them as fast as they come) and tracked in bitmap mode,
# alternating, $ROUNDS rounds of $SECS seconds each. Prints
# "FERRY-BENCH <mode> <round> <write IOPS>".
K=$(uname -r)
DISK=${KMOD_DISK:-/dev/vdb}
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
pick() { if [ -e "/payload/$K/$1" ]; then echo "/payload/$K/$1"; else echo "/payload/$1"; fi; }
PROBE=$(command -v kmod-probe || echo /payload/kmod-probe)
insmod "$(pick ferry_cbt.ko)" state_dir= || exit 0
iops() {
  fio --name=b --filename="$DISK" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=32 \
    --size=192M --runtime="$SECS" --time_based --minimal 2>/dev/null | awk -F';' '{print $49}'
}
r=1
while [ $r -le "$ROUNDS" ]; do
  echo "FERRY-BENCH untracked $r $(iops)"
  "$PROBE" hold "$DISK" 65536 67108864 $((SECS + 2)) 1 > /tmp/hold.log & h=$!; sleep 0.5
  echo "FERRY-BENCH data $r $(iops)"; wait $h; sed 's/^/# /' /tmp/hold.log
  "$PROBE" hold "$DISK" 1 0 $((SECS + 2)) 0 > /tmp/hold.log & h=$!; sleep 0.5
  echo "FERRY-BENCH bitmap $r $(iops)"; wait $h; sed 's/^/# /' /tmp/hold.log
  r=$((r + 1))
done
rmmod ferry_cbt
