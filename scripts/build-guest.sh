#!/usr/bin/env bash
# Build the minimal test guest used by the vhostd end-to-end tests and the demo:
#   OUTDIR/vmlinuz            Debian's cloud kernel (virtio_net is a module there)
#   OUTDIR/initramfs.cpio.gz  busybox + virtio-net (and virtio-mem) modules + /init
#   OUTDIR/guest.stamp        what was built (kernel package, version, recipe hash)
#
# Usage: scripts/build-guest.sh [OUTDIR]
#   OUTDIR defaults to ${VHOSTD_GUEST_DIR:-/var/cache/vhostd/guest}.
#   VHOSTD_KERNEL_PKG=linux-image-X-cloud-amd64 pins the kernel package
#   (default: whatever linux-image-cloud-amd64 depends on).
#   VHOSTD_GUEST_REBUILD=1 forces a rebuild.
#
# The build is cached: when OUTDIR already holds a guest built from the same
# kernel package version by the same version of this script, nothing is done.
# Must run as root (apt-get install of missing tools, device nodes in the cpio).
#
# /init inside the guest:
#   mounts proc/sys/dev, loads the virtio-net modules, brings up lo, configures
#   the NIC from the kernel command line, runs /test.sh when present, prints
#   "VHOSTD-TEST-EXIT=<rc>" on the console and powers off (poweroff -f).
#   Command line parameters understood by /init:
#     vhostd.ip=ADDR/PREFIX   address of the NIC (no address when absent)
#     vhostd.if=NAME          NIC name (default eth0)
#     vhostd.gw=ADDR          default route via ADDR
#     vhostd.mtu=N            NIC MTU
#     vhostd.shell=1          without /test.sh: start a shell on the console
#   Suggested kernel command line: console=ttyS0 quiet panic=-1 (with QEMU -no-reboot).
set -euo pipefail

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

OUTDIR=${1:-${VHOSTD_GUEST_DIR:-/var/cache/vhostd/guest}}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net virtio_mem)

[ "$(id -u)" = 0 ] || die "must run as root"
export DEBIAN_FRONTEND=noninteractive

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2 || log "warning: apt-get update failed"
        APT_UPDATED=1
    fi
}

# ensure_pkg BINARY PACKAGE: install PACKAGE when BINARY is missing.
ensure_pkg() {
    local bin=$1 pkg=$2
    if [ -x "$bin" ] || command -v "$bin" >/dev/null 2>&1; then return 0; fi
    log "installing $pkg"
    if ! apt-get install -y -qq --no-install-recommends "$pkg" >&2; then
        apt_update_once
        apt-get install -y -qq --no-install-recommends "$pkg" >&2 || die "cannot install $pkg"
    fi
}

mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")

# One build at a time per OUTDIR (tests and the demo may start together).
exec 9>"$OUTDIR/.lock"
flock 9

# --- which kernel -------------------------------------------------------------
resolve_kernel_pkg() {
    if [ -n "${VHOSTD_KERNEL_PKG:-}" ]; then
        echo "$VHOSTD_KERNEL_PKG"
        return 0
    fi
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
pkg_version() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n1
}

KPKG=$(resolve_kernel_pkg || true)
KPKG_VER=""
[ -n "$KPKG" ] && KPKG_VER=$(pkg_version "$KPKG" || true)
if [ -z "$KPKG" ] || [ -z "$KPKG_VER" ] || [ "$KPKG_VER" = "(none)" ]; then
    apt_update_once
    KPKG=$(resolve_kernel_pkg || true)
    [ -n "$KPKG" ] && KPKG_VER=$(pkg_version "$KPKG" || true)
fi

RECIPE=$(sha256sum "$SELF" | cut -c1-16)
STAMP_FILE="$OUTDIR/guest.stamp"
built_ok() { [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initramfs.cpio.gz" ] && [ -s "$STAMP_FILE" ]; }

if [ -z "$KPKG" ] || [ -z "$KPKG_VER" ] || [ "$KPKG_VER" = "(none)" ]; then
    if built_ok; then
        log "warning: cannot resolve the cloud kernel package; reusing the existing guest"
        echo "build-guest: guest already built in $OUTDIR ($(head -n1 "$STAMP_FILE")), cached"
        exit 0
    fi
    die "cannot find the linux-image-*-cloud-amd64 package (apt sources?)"
fi

STAMP="$KPKG $KPKG_VER recipe=$RECIPE"
if [ "${VHOSTD_GUEST_REBUILD:-0}" != 1 ] && built_ok && [ "$(head -n1 "$STAMP_FILE")" = "$STAMP" ]; then
    echo "build-guest: guest for $KPKG $KPKG_VER already built in $OUTDIR, cached"
    exit 0
fi

# --- tools ------------------------------------------------------------------------
T0=$(date +%s%N)
ensure_pkg /bin/busybox busybox-static
ensure_pkg cpio cpio
ensure_pkg gzip gzip
ensure_pkg xz xz-utils
ensure_pkg zstd zstd
# busybox must be static: it is the only userland in the initramfs.
if ldd /bin/busybox >/dev/null 2>&1; then
    log "installing busybox-static (/bin/busybox is dynamic)"
    apt-get install -y -qq busybox-static >&2 || { apt_update_once; apt-get install -y -qq busybox-static >&2; }
    ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is still not static"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhostd-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel package --------------------------------------------------------------
log "downloading $KPKG $KPKG_VER"
chmod 755 "$WORK"
download() { (cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG=$KPKG_VER" >&2); }
if ! download; then
    apt_update_once
    KPKG_VER=$(pkg_version "$KPKG")
    STAMP="$KPKG $KPKG_VER recipe=$RECIPE"
    download || die "apt-get download $KPKG failed"
fi
DEB=$(ls "$WORK"/*.deb | head -n1)
dpkg-deb -x "$DEB" "$WORK/kpkg"
VMLINUZ=$(ls "$WORK"/kpkg/boot/vmlinuz-* | head -n1)
[ -f "$VMLINUZ" ] || die "no vmlinuz in $DEB"
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/kpkg/lib/modules/$KVER"
[ -d "$MODDIR" ] || die "no /lib/modules/$KVER in $DEB"

# --- initramfs tree --------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,lib/modules}
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3
chmod 1777 "$ROOT/tmp"

LOAD_LIST=()
for m in "${MODULES[@]}"; do
    f=$(find "$MODDIR" -type f \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)
    if [ -z "$f" ]; then
        if grep -qE "/$m\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $m is built in"
            continue
        fi
        die "module $m not found in $KPKG"
    fi
    # busybox insmod is not guaranteed to decompress: store plain .ko files.
    case "$f" in
        *.ko.xz)  xz -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.gz)  gzip -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *)        cp "$f" "$ROOT/lib/modules/$m.ko" ;;
    esac
    LOAD_LIST+=("$m")
done
printf '%s\n' "${LOAD_LIST[@]}" >"$ROOT/lib/modules/load.order"

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
EOF
echo "127.0.0.1 localhost" >"$ROOT/etc/hosts"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# vhostd test guest init (generated by scripts/build-guest.sh)
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mount -t tmpfs -o size=64m tmpfs /tmp 2>/dev/null
hostname vhostd-guest

finish() {
    sync
    poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 5
}

for m in $(cat /lib/modules/load.order); do
    insmod /lib/modules/$m.ko || echo "VHOSTD-INIT: insmod $m failed"
done

IP= GW= MTU= IFACE=eth0 SHELL_ON=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vhostd.ip=*)    IP=${arg#vhostd.ip=} ;;
        vhostd.gw=*)    GW=${arg#vhostd.gw=} ;;
        vhostd.mtu=*)   MTU=${arg#vhostd.mtu=} ;;
        vhostd.if=*)    IFACE=${arg#vhostd.if=} ;;
        vhostd.shell=*) SHELL_ON=${arg#vhostd.shell=} ;;
    esac
done

ip link set lo up
ip addr add 127.0.0.1/8 dev lo 2>/dev/null

i=0
while [ ! -e /sys/class/net/$IFACE ] && [ $i -lt 50 ]; do usleep 100000; i=$((i+1)); done
if [ -e /sys/class/net/$IFACE ]; then
    [ -n "$MTU" ] && ip link set dev $IFACE mtu $MTU
    [ -n "$IP" ] && ip addr add $IP dev $IFACE
    ip link set dev $IFACE up
    [ -n "$GW" ] && ip route add default via $GW
    echo "VHOSTD-INIT: $IFACE up ${IP:-(no address)} mac $(cat /sys/class/net/$IFACE/address)"
else
    echo "VHOSTD-INIT: no interface $IFACE"
fi

if [ -f /test.sh ]; then
    echo "VHOSTD-INIT: running /test.sh"
    sh /test.sh </dev/null
    rc=$?
    echo
    echo "VHOSTD-TEST-EXIT=$rc"
elif [ "$SHELL_ON" = 1 ]; then
    setsid cttyhack sh
else
    echo "VHOSTD-INIT: no /test.sh"
fi
finish
EOF
chmod 755 "$ROOT/init"

# --- pack -----------------------------------------------------------------------------
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    | gzip -6 >"$WORK/initramfs.cpio.gz"

cp "$VMLINUZ" "$WORK/vmlinuz"
echo "$STAMP" >"$WORK/guest.stamp"
echo "kernel=$KVER" >>"$WORK/guest.stamp"
echo "modules=${LOAD_LIST[*]}" >>"$WORK/guest.stamp"
# Replace the outputs only once everything is built.
rm -f "$STAMP_FILE"
for f in vmlinuz initramfs.cpio.gz; do
    mv -f "$WORK/$f" "$OUTDIR/$f.tmp"
    mv -f "$OUTDIR/$f.tmp" "$OUTDIR/$f"
done
mv -f "$WORK/guest.stamp" "$STAMP_FILE"

MS=$(( ($(date +%s%N) - T0) / 1000000 ))
echo "build-guest: built guest for $KPKG $KPKG_VER (kernel $KVER) in $OUTDIR in $((MS / 1000)).$(( (MS % 1000) / 100 ))s"
