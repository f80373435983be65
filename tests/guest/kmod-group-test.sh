#!/bin/busybox sh
# Runs in the guest: a consistency group of two virtio disks ($GROUP_A,
# $GROUP_B, zeroed), each protected by `ferry agent --tracker kmod`, under
# the two-disk versioned workload (each write to one of them, one at a
# time, logged). `ferry group-tag` cuts shared points meanwhile; the host
# recovers every group point of both disks and checks them together
# against the log (scripts/test-kmod), printed as "FERRY-GLOG <disk> <block>".
# Prints one "FERRY-TEST kmod-group-<test> PASS|FAIL" line per test.
. /payload/env
K=$(uname -r)
A=${GROUP_A:-/dev/vde}
B=${GROUP_B:-/dev/vdf}
res() { echo "FERRY-TEST kmod-group-$1 $2"; }
pick() { if [ -e "/payload/$K/$1" ]; then echo "/payload/$K/$1"; else echo "/payload/$1"; fi; }
insmod "$(pick ferry_cbt.ko)" state_dir= || { res insmod FAIL; exit 0; }
agent() { # agent DISK NAME STATE
  ferry agent --disk "$1" --name "$2" --target 10.0.2.2:$PORT --tracker kmod --state "$3" --connect-timeout 60 \
    --point-every 3600 --kmod-data-mib 4 2>>"$3.log" &
}
agent "$A" "$NAME-ga" /tmp/ga; pa=$!
agent "$B" "$NAME-gb" /tmp/gb; pb=$!
streaming() { ferry status --state "$1" --json 2>/dev/null | grep -q '"mode":"streaming"'; }
i=0; until { streaming /tmp/ga && streaming /tmp/gb; } || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
streaming /tmp/ga && streaming /tmp/gb && res protect PASS || { res protect FAIL; tail -3 /tmp/ga.log /tmp/gb.log; }
ferry-mkimage workload2 "$A" "$B" 1024 77 /tmp/gw.log 1500 2000 &
pw=$!
n=0
while kill -0 $pw 2>/dev/null; do
  ferry group-tag --disk "$A" --disk "$B" >> /tmp/gt.log 2>>/tmp/gt.err && n=$((n + 1))
  sleep 0.2
done
wait $pw
ferry group-tag --disk "$A" --disk "$B" >> /tmp/gt.log 2>>/tmp/gt.err && n=$((n + 1))
sleep 3
kill $pa $pb; wait $pa $pb 2>/dev/null
echo "# group: $n cuts, $(wc -l < /tmp/gw.log) writes"
[ "$n" -ge 10 ] && res group-tags PASS || { res group-tags FAIL; tail -3 /tmp/gt.err; }
grep -c "group point" /tmp/ga.log /tmp/gb.log | sed 's/^/# /'
grep -E "WARN|ERROR" /tmp/ga.log /tmp/gb.log | head -5 | sed 's/^/# /'
ferry unprotect --state /tmp/ga >/dev/null 2>&1
ferry unprotect --state /tmp/gb >/dev/null 2>&1
rmmod ferry_cbt
sed 's/^/FERRY-GLOG /' /tmp/gw.log
