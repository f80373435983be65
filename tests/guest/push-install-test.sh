#!/usr/bin/env bash
# Push install into a real Debian 12 machine (tests/guest/debian-vm.sh under
# QEMU TCG, sshd, systemd): `ferry push-install` copies and installs the
# package built by scripts/package, enrolls the machine with a join token
# at the host's CA, starts ferry-agent@NAME for its second disk through a
# process server (mutual TLS; the guest reaches the host's loopback as
# 10.0.2.2), and reports the first recovery point; the replica recovered at
# the master target equals the guest's disk; running it again changes
# nothing. One "FERRY-TEST debian12-vm <test> PASS|FAIL" line each.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/guest/debian-vm.sh
fail=0
result() { echo "FERRY-TEST debian12-vm $1 $2"; [ "$2" = PASS ] || fail=1; }
ferry=$PWD/target/release/ferry
work=$(mktemp -d /tmp/ferry-push.XXXXXX)
pids=()
# (set -e holds in an EXIT trap too: nothing here may fail the test.)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  vm_cleanup_all 2>/dev/null || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_log() { # wait_log FILE TEXT SECONDS
  for _ in $(seq $((${3} * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "# $1 never said '$2':"; tail -5 "$1"; return 1
}

build_image >/dev/null || { result push-install-image FAIL; exit 1; }
deb=$(ls target/package/ferry_*_amd64.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ] || [ ! -x "$ferry" ]; then
  scripts/package >/dev/null
  deb=$(ls target/package/ferry_*_amd64.deb | head -1)
fi

# The host: a CA, a master target and a process server, each enrolled.
"$ferry" ca init --dir "$work/ca" >/dev/null
pca=$(free_port); pmt=$(free_port); pps=$(free_port)
RUST_LOG=info "$ferry" ca serve --dir "$work/ca" --listen 127.0.0.1:$pca 2>"$work/ca.log" &
pids+=($!)
wait_log "$work/ca.log" "answering enrollments" 15
token() { "$ferry" token create --ca "$work/ca" --role "$1" --name "$2" | tail -1; }
"$ferry" enroll --server 127.0.0.1:$pca --token "$(token master-target mt)" --identity "$work/id-mt" >/dev/null
"$ferry" enroll --server 127.0.0.1:$pca --token "$(token process-server ps)" --identity "$work/id-ps" >/dev/null
RUST_LOG=info "$ferry" master-target --listen 127.0.0.1:$pmt --data "$work/data" --identity "$work/id-mt" 2>"$work/mt.log" &
pids+=($!)
RUST_LOG=info "$ferry" process-server --listen 127.0.0.1:$pps --spool "$work/spool" --spool-max 1G \
  --upstream 127.0.0.1:$pmt --identity "$work/id-ps" 2>"$work/ps.log" &
pids+=($!)
wait_log "$work/mt.log" "listening on" 15 && wait_log "$work/ps.log" "listening on" 15

# The machine: a second disk with content of its own.
python3 -c "
import os
with open('$work/vdb.img', 'wb') as f:
    for i in range(64):
        f.write(os.urandom(512 << 10) if i % 3 else bytes(512 << 10))
    f.truncate(64 << 20)"
boot_vm "push-$$" "$work/vdb.img" || { result push-install-boot FAIL; exit 1; }
echo "# guest up in ${VM_BOOT_SECONDS}s"
tok=$(token agent guest1)
# A fresh HOME: ssh's known_hosts for this throwaway guest stays here.
push() {
  HOME=$work/home "$ferry" push-install --host 127.0.0.1 --ssh-port "$VM_SSH_PORT" --ssh-user root --ssh-key "$VM_KEY" \
    --token "$tok" --disk /dev/vdb --package "$deb" --ca 10.0.2.2:$pca --target 10.0.2.2:$pps --wait 10m "$@"
}
mkdir -p "$work/home"
t0=$(date +%s)
if push >"$work/push1.out" 2>&1; then
  echo "# push install to a first recovery point: $(( $(date +%s) - t0 ))s"
  result push-install-first-point PASS
else
  result push-install-first-point FAIL
  cat "$work/push1.out"; vm_ssh 'journalctl -u "ferry-agent@*" --no-pager | tail -30' || true
fi
sed 's/^/# /' "$work/push1.out"

# The unit runs, the machine enrolled as agent/guest1, the disk is at the
# master target (through the process server) and equals the guest's disk.
if vm_ssh 'systemctl is-active "ferry-agent@*"' | grep -qx active; then result push-install-unit-active PASS; else result push-install-unit-active FAIL; fi
if grep -q "agent/guest1" "$work/mt.log" "$work/ps.log"; then result push-install-enrolled PASS; else result push-install-enrolled FAIL; fi
name=$(ls "$work/data" | head -1)
vm_ssh 'sync' || true
if [ -n "$name" ] && "$ferry" recover --data "$work/data" --name "$name" --point latest --out "$work/rec.img" >/dev/null 2>&1 &&
   cmp -s "$work/rec.img" "$work/vdb.img"; then
  result push-install-replica-identical PASS
else
  result push-install-replica-identical FAIL; echo "# disk '$name' at the master target"
fi

# Again: nothing changes.
vm_ssh 'stat -c %Y /etc/ferry/agent/*.conf; systemctl show -p InvocationID "ferry-agent@*"' >"$work/before" 2>/dev/null || true
if push >"$work/push2.out" 2>&1 && grep -q "already installed" "$work/push2.out" && grep -q "already enrolled" "$work/push2.out" &&
   grep -q "already protected" "$work/push2.out"; then
  vm_ssh 'stat -c %Y /etc/ferry/agent/*.conf; systemctl show -p InvocationID "ferry-agent@*"' >"$work/after" 2>/dev/null || true
  if cmp -s "$work/before" "$work/after"; then result push-install-again-changes-nothing PASS; else result push-install-again-changes-nothing FAIL; diff "$work/before" "$work/after" || true; fi
else
  result push-install-again-changes-nothing FAIL; cat "$work/push2.out"
fi
stop_vm "push-$$" || true
exit $fail
