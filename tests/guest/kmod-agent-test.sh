#!/bin/busybox sh
# Runs in the guest: `ferry agent --tracker kmod` on the guest kernel's
# second virtio disk ($KMOD_DISK, zeroed, 64 MiB), shipping to the master
# target on the host, under the versioned-block workload (one write at a
# time, each logged). Midway the memory cap is cut to nothing and the agent
# is stopped until the ring overflows into the bitmap; it must catch up and
# return to data mode. The host then recovers every point the master
# target lists and checks each against the log (scripts/test-kmod), so the
# log is printed as "FERRY-WLOG <block>" lines.
# Prints one "FERRY-TEST kmod-agent-<test> PASS|FAIL" line per test.
. /payload/env
K=$(uname -r)
DISK=${KMOD_DISK:-/dev/vdb}
BLOCKS=4096
res() { echo "FERRY-TEST kmod-agent-$1 $2"; }
pick() { if [ -e "/payload/$K/$1" ]; then echo "/payload/$K/$1"; else echo "/payload/$1"; fi; }
PROBE=$(command -v kmod-probe || echo /payload/kmod-probe)
lines() { if [ -e "$1" ]; then wc -l < "$1"; else echo 0; fi; }
wait_lines() { # wait_lines FILE N SECONDS
  i=0; while [ "$(lines "$1")" -lt "$2" ] && [ $i -lt $(( $3 * 10 )) ]; do sleep 0.1; i=$((i + 1)); done
}

mkdir -p /tmp/kstate
insmod "$(pick ferry_cbt.ko)" state_dir=/tmp/kstate || { res insmod FAIL; exit 0; }
AGENT="ferry agent --disk $DISK --name $NAME-kmod --target 10.0.2.2:$PORT --tracker kmod --state /tmp/kst --connect-timeout 60"
# A ring of 1024 records and a 4 MiB data area: small enough to overflow on
# purpose while the agent is stopped.
$AGENT --point-every 0.2 --ring-capacity 1024 --kmod-data-mib 4 2>/tmp/agent.log &
apid=$!
streaming() { ferry status --state /tmp/kst --json 2>/dev/null | grep -q '"mode":"streaming"'; }
i=0; until streaming || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
streaming && res initial-sync PASS || { res initial-sync FAIL; tail -5 /tmp/agent.log; }

# 3000 writes, 2 ms apart: points fall between them.
ferry-mkimage workload "$DISK" $BLOCKS 4242 /tmp/kw.log 3000 2000 &
wpid=$!
wait_lines /tmp/kw.log 800 120
# Cut the memory cap: writes lose their payloads (metadata mode). Stop the
# agent: the ring fills and changes go to the bitmap.
"$PROBE" setcap "$DISK" 0
kill -STOP $apid
wait_lines /tmp/kw.log 2000 120
kill -CONT $apid
sleep 1
"$PROBE" setcap "$DISK" 4194304
wait $wpid
echo "# workload: $(lines /tmp/kw.log) writes"
# Let the agent reach a point after the last write, then stop it.
sleep 3
kill $apid; wait $apid
# And once more from its saved state: finds the attachment, ships what is
# left and cuts a final point, app-consistent this time (--freeze-cmd: the
# point is a TAG record placed in the stream by the module).
if $AGENT --once --json --freeze-cmd sync > /tmp/once.json 2>>/tmp/agent.log && grep -q '"resync":false' /tmp/once.json &&
   grep -q '"point_kind":"app"' /tmp/once.json; then
  res restart-no-resync PASS
else
  res restart-no-resync FAIL; cat /tmp/once.json; tail -5 /tmp/agent.log
fi
# Stopped in the middle of a catch-up from the module's bitmap: what the
# module handed over is saved in the state folder, so the next agent ships
# it again instead of resyncing the disk. 8192 direct 4 KiB writes to the
# upper half (outside the workload's blocks) while the agent is stopped
# and the memory cap is nothing: the 1024-record ring fills and the module
# falls to its bitmap; the agent is stopped (SIGTERM, then SIGKILL if it
# has not ended) as soon as it logs the catch-up.
$AGENT --point-every 0.2 --ring-capacity 1024 --kmod-data-mib 4 2>>/tmp/agent.log &
apid=$!
i=0; until streaming || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
"$PROBE" setcap "$DISK" 0
kill -STOP $apid
before=$(grep -c "kmod tracker: catching up" /tmp/agent.log)
dd if=/dev/urandom of="$DISK" bs=4096 seek=8192 count=8192 oflag=direct 2>/dev/null
"$PROBE" setcap "$DISK" 4194304
kill -CONT $apid
i=0; while [ "$(grep -c "kmod tracker: catching up" /tmp/agent.log)" -le "$before" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
kill $apid; sleep 2; kill -9 $apid 2>/dev/null; wait $apid
if $AGENT --once --json > /tmp/once3.json 2>>/tmp/agent.log && grep -q '"resync":false' /tmp/once3.json; then
  res interrupted-catchup-no-resync PASS
else
  res interrupted-catchup-no-resync FAIL; cat /tmp/once3.json; tail -5 /tmp/agent.log
fi
grep -q "saved range(s) again" /tmp/agent.log && echo "# the catch-up was interrupted and shipped again from the state folder" ||
  echo "# the catch-up finished before the agent stopped"
# Unload and load again with tracking active (clean): changes made while no
# agent runs are in the ring at unload; the module saves them in its bitmap
# and the load restores it. No resync.
dd if=/dev/urandom of="$DISK" bs=4096 seek=8192 count=256 conv=fsync 2>/dev/null
dev=$(cat /sys/block/${DISK#/dev/}/dev)
from=$(( $(dmesg | wc -l) + 1 ))
if rmmod ferry_cbt && dmesg | tail -n +$from | grep -q "saved the state of $dev" &&
   insmod "$(pick ferry_cbt.ko)" state_dir=/tmp/kstate disks=$dev &&
   dmesg | tail -n +$from | grep -q "restored from a clean stop" &&
   $AGENT --once --json > /tmp/once2.json 2>>/tmp/agent.log && grep -q '"resync":false' /tmp/once2.json &&
   grep -q "again from a clean stop" /tmp/agent.log; then
  res clean-reload-no-resync PASS
else
  res clean-reload-no-resync FAIL; cat /tmp/once2.json; tail -5 /tmp/agent.log; dmesg | tail -n +$from | tail -5
fi
grep -q "kmod tracker: bitmap mode" /tmp/agent.log && res fell-to-bitmap PASS || res fell-to-bitmap FAIL
grep -q "kmod tracker: catching up" /tmp/agent.log && res caught-up PASS || res caught-up FAIL
# Data mode again after the catch-up (the log line after the bitmap one).
sed -n '/kmod tracker: bitmap mode/,$p' /tmp/agent.log | grep -q "kmod tracker: data mode" && res back-to-data-mode PASS || res back-to-data-mode FAIL
grep -q "resync required" /tmp/agent.log && { res no-resync FAIL; grep "resync required" /tmp/agent.log | head -3; } || res no-resync PASS
grep -E "kmod tracker|WARN|ERROR" /tmp/agent.log | head -20 | sed 's/^/# /'
ferry unprotect --state /tmp/kst >/dev/null 2>&1
rmmod ferry_cbt 2>/dev/null
sed 's/^/FERRY-WLOG /' /tmp/kw.log
