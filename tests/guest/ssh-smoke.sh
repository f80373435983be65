#!/usr/bin/env bash
# Smoke test of the Debian 12 SSH guest (tests/guest/debian-vm.sh): boot a
# clean guest, systemd reaches "running" with nothing failed, a file copied
# in with scp reads back the same, openssh-server is an installed package,
# the guest reaches a service on the host's loopback as 10.0.2.2, a second
# disk is there, and the guest powers off. One "FERRY-TEST debian12-vm
# <test> PASS|FAIL" line each (run by scripts/test-vm).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/guest/debian-vm.sh
fail=0
result() { echo "FERRY-TEST debian12-vm $1 $2"; [ "$2" = PASS ] || fail=1; }
work=$(mktemp -d /tmp/ferry-ssh-smoke.XXXXXX)
srv_pid=
# (set -e holds in an EXIT trap: nothing in it may fail the test.)
trap '{ [ -z "$srv_pid" ] || kill "$srv_pid" 2>/dev/null; } || true; rm -rf "$work" 2>/dev/null || true' EXIT

start=$(date +%s)
if build_image; then result image-build PASS; else result image-build FAIL; exit 1; fi
echo "# image: $VM_IMAGE_DIR (built in $(cat "$VM_IMAGE_DIR/build-seconds")s; $(( $(date +%s) - start ))s here)"

truncate -s 64M "$work/extra.img"
if boot_vm "smoke-$$" "$work/extra.img"; then result boot-to-ssh PASS; else result boot-to-ssh FAIL; exit 1; fi
echo "# boot to ssh: ${VM_BOOT_SECONDS}s"

# systemd: running, no failed unit (degraded would name them).
state=$(vm_ssh 'timeout 120 systemctl is-system-running --wait' 2>&1 || true)
if [ "$state" = running ]; then
  result systemd-running PASS
else
  result systemd-running FAIL; echo "# is-system-running: $state"; vm_ssh 'systemctl --failed --no-legend' || true
fi
echo "# boot to running: $(( $(date +%s) - start ))s since the image was ready"

head -c 1M /dev/urandom > "$work/blob"
if vm_scp_to "$work/blob" /root/blob && [ "$(vm_ssh 'sha256sum /root/blob' | awk '{print $1}')" = "$(sha256sum "$work/blob" | awk '{print $1}')" ] &&
   vm_scp_from /root/blob "$work/blob.back" && cmp -s "$work/blob" "$work/blob.back"; then
  result scp-roundtrip PASS
else
  result scp-roundtrip FAIL
fi

if vm_ssh "dpkg-query -W -f='\${Status}' openssh-server" | grep -q "install ok installed"; then
  result dpkg-openssh-server PASS
else
  result dpkg-openssh-server FAIL
fi

# The host's loopback as 10.0.2.2 (where a test's master target listens).
port=$(_vm_free_port)
python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); c,_=s.accept(); c.sendall(b"ferry-host\n"); c.close()' "$port" &
srv_pid=$!
sleep 0.5
if [ "$(vm_ssh "exec 3<>/dev/tcp/10.0.2.2/$port && head -1 <&3")" = ferry-host ]; then
  result guest-reaches-host-loopback PASS
else
  result guest-reaches-host-loopback FAIL
fi

if [ "$(vm_ssh 'blockdev --getsize64 /dev/vdb')" = $((64 << 20)) ]; then
  result extra-disk PASS
else
  result extra-disk FAIL
fi

pid=$VM_PID
t0=$(date +%s)
stop_vm
if ! kill -0 "$pid" 2>/dev/null && grep -q "reboot: Power down" "/tmp/ferry-vm-smoke-$$-serial.log"; then
  result poweroff PASS
else
  result poweroff FAIL; tail -20 "/tmp/ferry-vm-smoke-$$-serial.log"
fi
echo "# poweroff: $(( $(date +%s) - t0 ))s; whole smoke test: $(( $(date +%s) - start ))s"
rm -f "/tmp/ferry-vm-smoke-$$-serial.log"
exit $fail
