#!/bin/busybox sh
# Runs in the guest: the eBPF tracker on the guest kernel's virtio disk.
# Prints one "FERRY-TEST <test> PASS|FAIL" line per test.
. /payload/env
# Check every discard request's bios (as on NVMe), so that this kernel's
# verifier loads that path too.
export FERRY_BPF_TEST_DISCARD_MULTI=1
res() { echo "FERRY-TEST $1 $2"; }
A="ferry agent --disk /dev/vda --name $NAME --target 10.0.2.2:$PORT --tracker bpf --state /tmp/st --once --json --connect-timeout 30"
if $A > /tmp/s1 2>/tmp/e1 && grep -q '"tracker":"bpf"' /tmp/s1; then res bpf-attach-and-initial-sync PASS; else res bpf-attach-and-initial-sync FAIL; cat /tmp/e1; fi
ferry-mkimage workload /dev/vda 8192 7 /tmp/w.log 1500
if $A > /tmp/s2 2>/tmp/e2 && grep -q '"resync":false' /tmp/s2 && grep -q '"initial_sync":false' /tmp/s2; then
  res bpf-tracked-changes-shipped PASS
else
  res bpf-tracked-changes-shipped FAIL; cat /tmp/e2
fi
cat /tmp/s2
ferry status --state /tmp/st
ls /sys/fs/bpf/ferry | grep -q . && ferry unprotect --state /tmp/st && [ -z "$(ls /sys/fs/bpf/ferry)" ] && res bpf-unprotect PASS || res bpf-unprotect FAIL
