#!/usr/bin/env bash
# vhostd demo: a QEMU guest's virtio-net card served by vhostd, forwarding to a TAP.
#
# As root on a fresh Debian 12 machine:  scripts/demo.sh
#   1. installs the Debian packages it needs (QEMU, busybox, iproute2, Python venv, gcc)
#   2. creates .venv in the repo and installs vhostd into it (scripts/install-deps.sh)
#   3. builds the test guest (scripts/build-guest.sh: Debian cloud kernel + busybox)
#   4. creates a network namespace and starts vhostd with its defaults: a vhost-user
#      socket, a TAP inside the namespace (198.18.0.1/24), an HTTP server behind it
#   5. boots the guest (198.18.0.2/24), which pings 198.18.0.1 and downloads a 20 MB
#      random file through vhostd, checking its sha256
#   6. prints the daemon's counters (vhostctl stats)
# Everything is torn down on exit; the demo can be run again. No traffic leaves the
# namespace. Environment: VHOSTD_ACCEL (default tcg), VHOSTD_GUEST_DIR (guest
# cache), VHOSTD_DEMO_SIZE (bytes to download), VHOSTD_BIN / VHOSTCTL_BIN (use these
# binaries, skip the venv install), PYTHON (interpreter for the venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

if [ -t 1 ]; then B=$'\033[1m'; N=$'\033[0m'; else B=; N=; fi
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
die() { echo "demo: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, TAP devices, apt-get)"

ACCEL=${VHOSTD_ACCEL:-tcg}
SIZE=${VHOSTD_DEMO_SIZE:-20971520}
HOST_IP=198.18.0.1
GUEST_IP=198.18.0.2
TAP=vhd0
PORT=8080

# --- cleanup (installed first, so a failure anywhere tears down what exists) -------
NS="" TMP="" VHOSTD_PID="" HTTP_PID="" QEMU_PIDFILE=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$QEMU_PIDFILE" ] && [ -s "$QEMU_PIDFILE" ]; then
        kill -KILL "$(cat "$QEMU_PIDFILE")" 2>/dev/null
    fi
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    if [ -n "$VHOSTD_PID" ] && kill -0 "$VHOSTD_PID" 2>/dev/null; then
        kill -TERM "$VHOSTD_PID"
        for _ in $(seq 50); do kill -0 "$VHOSTD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$VHOSTD_PID" 2>/dev/null
    fi
    wait 2>/dev/null
    if [ -n "$NS" ] && [ -e "/run/netns/$NS" ]; then
        for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
        ip netns del "$NS" 2>/dev/null
    fi
    [ -n "$TMP" ] && rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1-2. Debian packages, vhostd in .venv (shared with scripts/test.sh) -------------
VHOSTD=${VHOSTD_BIN:-}
VHOSTCTL=${VHOSTCTL_BIN:-}
VENV=$REPO/.venv
if [ -z "$VHOSTD" ]; then
    step "Debian packages and vhostd in $VENV (scripts/install-deps.sh)"
    "$REPO/scripts/install-deps.sh"
    VHOSTD=$VENV/bin/vhostd
    VHOSTCTL=$VENV/bin/vhostctl
fi
[ -n "$VHOSTCTL" ] || VHOSTCTL=$(dirname "$VHOSTD")/vhostctl
PYBIN=$VENV/bin/python
[ -x "$PYBIN" ] || PYBIN=$(command -v python3)

# --- 3. guest ------------------------------------------------------------------------
step "guest kernel + initramfs"
GUEST_DIR=${VHOSTD_GUEST_DIR:-/var/cache/vhostd/guest}
"$REPO/scripts/build-guest.sh" "$GUEST_DIR"

# --- 4. namespace, vhostd, TAP, HTTP server ------------------------------------------
TMP=$(mktemp -d /tmp/vhd-demo.XXXXXX)
NS=vhd-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
SOCK=$TMP/vhostd.sock
CTL=$TMP/vhostd.ctl
step "network namespace $NS, vhostd"
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

echo "\$ vhostd --socket $SOCK --tap $TAP --netns $NS --control $CTL"
"$VHOSTD" --socket "$SOCK" --tap "$TAP" --netns "$NS" --control "$CTL" 2>"$TMP/vhostd.log" &
VHOSTD_PID=$!
for i in $(seq 300); do
    [ -S "$SOCK" ] && ip netns exec "$NS" ip link show "$TAP" >/dev/null 2>&1 && break
    kill -0 "$VHOSTD_PID" 2>/dev/null || { cat "$TMP/vhostd.log" >&2; die "vhostd exited"; }
    [ "$i" = 300 ] && { cat "$TMP/vhostd.log" >&2; die "vhostd did not create $SOCK and $TAP"; }
    sleep 0.1
done
ip netns exec "$NS" ip addr add "$HOST_IP/24" dev "$TAP"
ip netns exec "$NS" ip link set "$TAP" up
echo "TAP $TAP in $NS: $HOST_IP/24"

mkdir -p "$TMP/www"
head -c "$SIZE" /dev/urandom >"$TMP/www/payload.bin"
SHA=$(sha256sum "$TMP/www/payload.bin" | cut -d' ' -f1)
ip netns exec "$NS" "$PYBIN" -m http.server "$PORT" --bind "$HOST_IP" \
    --directory "$TMP/www" >"$TMP/http.log" 2>&1 &
HTTP_PID=$!
for i in $(seq 100); do
    ip netns exec "$NS" "$PYBIN" -c "import socket; socket.create_connection(('$HOST_IP', $PORT), 1).close()" \
        2>/dev/null && break
    [ "$i" = 100 ] && { cat "$TMP/http.log" >&2; die "HTTP server did not start"; }
    sleep 0.1
done
echo "HTTP: http://$HOST_IP:$PORT/payload.bin ($SIZE bytes, sha256 $SHA)"

# --- 5. the guest ------------------------------------------------------------------------
mkdir -p "$TMP/overlay"
cat >"$TMP/overlay/test.sh" <<EOF
#!/bin/sh
up() { cut -d' ' -f1 /proc/uptime; }
i=0
until ping -c 1 -W 1 $HOST_IP >/dev/null 2>&1; do
    i=\$((i+1)); [ \$i -lt 30 ] || { echo "no reply from $HOST_IP"; exit 10; }
done
ping -c 3 -i 0.2 $HOST_IP || exit 11
echo "guest: wget http://$HOST_IP:$PORT/payload.bin"
t0=\$(up)
wget -q -O /tmp/payload http://$HOST_IP:$PORT/payload.bin || exit 12
t1=\$(up)
bytes=\$(wc -c </tmp/payload)
awk "BEGIN { d = \$t1 - \$t0; if (d <= 0) d = 0.01; printf \"guest: %d bytes in %.2f s = %.1f Mbit/s\\n\", \$bytes, d, \$bytes * 8 / d / 1000000 }"
sum=\$(sha256sum /tmp/payload | cut -d' ' -f1)
echo "guest: sha256 \$sum"
[ "\$sum" = "$SHA" ] || { echo "guest: sha256 MISMATCH (expected $SHA)"; exit 14; }
echo "guest: sha256 matches"
EOF
chmod 755 "$TMP/overlay/test.sh"
# per-run initramfs: the base archive + an appended cpio carrying /test.sh
(cd "$TMP/overlay" && echo test.sh | cpio --quiet -o -H newc -R 0:0 | gzip -1) >"$TMP/overlay.cpio.gz"
cat "$GUEST_DIR/initramfs.cpio.gz" "$TMP/overlay.cpio.gz" >"$TMP/initrd.gz"

step "QEMU guest ($ACCEL): ping $HOST_IP, download $SIZE bytes through vhostd"
QEMU_CMD=(qemu-system-x86_64 -name vhostd-demo -nodefaults -no-user-config
    -display none -monitor none -accel "$ACCEL" -m 256M
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem
    -kernel "$GUEST_DIR/vmlinuz" -initrd "$TMP/initrd.gz"
    -append "console=ttyS0 quiet panic=-1 vhostd.ip=$GUEST_IP/24"
    -chardev "socket,id=c0,path=$SOCK"
    -netdev vhost-user,id=n0,chardev=c0
    -device virtio-net-pci,netdev=n0,vectors=0,romfile=
    -serial stdio -no-reboot)
[ "$ACCEL" = kvm ] && QEMU_CMD+=(-cpu host)
# TCG: a second (absent) CPU slot, else QEMU 7.2 drops the guest's memory
# barriers and a kick or interrupt can be lost (README, "With QEMU")
[ "$ACCEL" = tcg ] && QEMU_CMD+=(-smp 1,maxcpus=2)
T0=$(date +%s%N)
QEMU_PIDFILE=$TMP/qemu.pid
# in the background + wait, so that a signal reaches the cleanup trap at once
timeout -s KILL 180 "${QEMU_CMD[@]}" -pidfile "$QEMU_PIDFILE" </dev/null 2>"$TMP/qemu.err" \
    | tee "$TMP/console.log" &
wait $! || true
MS=$(( ($(date +%s%N) - T0) / 1000000 ))
RC=$(sed -n 's/^VHOSTD-TEST-EXIT=\([0-9]*\).*/\1/p' "$TMP/console.log" | tail -n1)
[ -s "$TMP/qemu.err" ] && sed 's/^/qemu: /' "$TMP/qemu.err"
echo "(guest ran for $((MS / 1000)).$(( (MS % 1000) / 100 )) s)"

# --- 6. counters -------------------------------------------------------------------------
step "vhostctl --control $CTL stats"
"$VHOSTCTL" --control "$CTL" stats || echo "(vhostctl stats failed: rc=$?)"

if kill -0 "$VHOSTD_PID" 2>/dev/null; then
    echo "vhostd still running (pid $VHOSTD_PID), waiting for the next frontend"
else
    echo "vhostd exited:"; tail -n 20 "$TMP/vhostd.log"
fi

if [ "$RC" = 0 ]; then
    step "demo PASSED: ping + $SIZE-byte download through vhostd, sha256 verified"
else
    echo "--- vhostd log (last 30 lines) ---"; tail -n 30 "$TMP/vhostd.log"
    step "demo FAILED: guest test exit code ${RC:-none}"
    exit 1
fi
