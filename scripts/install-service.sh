#!/usr/bin/env bash
# Installs vhostd as a systemd service on Debian 12 (as root):
#   /opt/vhostd                     virtualenv with vhostd built and installed (pip install <this repo>)
#   /usr/local/bin/vhostd, vhostctl symlinks into the virtualenv
#   /etc/systemd/system/vhostd.service, vhostd@.service, vhostd.socket, vhostd@.socket
#   /etc/vhostd/vhostd.toml         from systemd/vhostd.toml.example, only if absent
#   /etc/qemu/vhost-user/50-vhostd.json  QEMU's vhost-user backend descriptor (type net)
#   user vhostd (group kvm)         the units' User=/Group=
# then `systemctl daemon-reload` if systemd is running. It enables and starts nothing.
# Idempotent: a second run changes nothing unless the sources or units changed.
#
# Environment:
#   DESTDIR=/some/dir   prefix for every installed path; no apt, no user, no systemctl
#                       (for tests and inspection: a virtualenv hard-codes its own
#                       path, so the tree works where it is, not moved to /)
#   PYTHON=...          interpreter for the virtualenv (default /usr/bin/python3, Debian's:
#                       the service runs as user vhostd with ProtectHome=yes, so an
#                       interpreter under /root or /home would be out of its reach)
#   VHOSTD_VENV_ARGS    extra `python -m venv` arguments (e.g. --system-site-packages)
#   VHOSTD_PIP_ARGS     extra `pip install` arguments (e.g. --no-index --find-links DIR)
set -euo pipefail
umask 022  # everything installed must be readable by the vhostd user

SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PYTHON=${PYTHON:-/usr/bin/python3}
VENV=/opt/vhostd
say() { echo "install-service: $*"; }
die() { echo "install-service: error: $*" >&2; exit 1; }

if [ -z "$DESTDIR" ]; then
    [ "$(id -u)" -eq 0 ] || die "run as root (or set DESTDIR=... to install into a directory)"
    # Build prerequisites: venv, a compiler and Python headers for the C datapath.
    if command -v dpkg-query >/dev/null; then
        missing=()
        for p in python3-venv python3-dev gcc iproute2; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
        done
        if ((${#missing[@]})); then
            say "apt-get install ${missing[*]}"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        fi
    fi
fi

command -v "$PYTHON" >/dev/null || die "no interpreter $PYTHON (set PYTHON=...)"
base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
case "$base" in
    /root|/root/*|/home|/home/*|/run/user/*)
        msg="$PYTHON lives in $base: the service (User=vhostd, ProtectHome=yes) cannot run it; use PYTHON=/usr/bin/python3"
        if [ -n "$DESTDIR" ]; then say "warning: $msg"; else die "$msg"; fi ;;
esac

# --- the virtualenv -------------------------------------------------------------------
venv=$DESTDIR$VENV
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    # shellcheck disable=SC2086  # VHOSTD_VENV_ARGS is a list of arguments
    "$PYTHON" -m venv ${VHOSTD_VENV_ARGS:-} "$venv"
fi

# pip builds from a copy: building in place would leave build/ and *.egg-info in
# the source tree. Only what the package needs; no objects from in-place builds.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
tar -C "$SRC" --exclude='*.o' --exclude='*.so' --exclude=__pycache__ \
    -cf - pyproject.toml setup.py README.md vhostd csrc | tar -C "$stage" -xf -
stamp=$venv/.vhostd-source
want=$( (cd "$stage" && find . -type f | LC_ALL=C sort | xargs sha256sum; "$venv/bin/python" -V) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x "$venv/bin/vhostd" ]; then
    say "vhostd in $venv is up to date"
else
    say "pip install vhostd into $venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check ${VHOSTD_PIP_ARGS:-} "$stage"
    echo "$want" >"$stamp"
fi

# --- commands -------------------------------------------------------------------------
# Relative links, so that they resolve inside DESTDIR as well as at /.
install -d -m 0755 "$DESTDIR/usr/local/bin"
for cmd in vhostd vhostctl; do
    [ -x "$venv/bin/$cmd" ] || die "$venv/bin/$cmd is missing after pip install"
    ln -sfn "../../..$VENV/bin/$cmd" "$DESTDIR/usr/local/bin/$cmd"
done

# --- units and config -----------------------------------------------------------------
install -d -m 0755 "$DESTDIR/etc/systemd/system"
for unit in vhostd.service vhostd@.service vhostd.socket vhostd@.socket; do
    dst=$DESTDIR/etc/systemd/system/$unit
    if ! cmp -s "$SRC/systemd/$unit" "$dst"; then
        install -m 0644 "$SRC/systemd/$unit" "$dst"
        say "installed $dst"
    fi
done
# QEMU's vhost-user backend descriptor (docs/interop/vhost-user.json), in the
# directory for the system administrator's descriptors (vhostd is not QEMU's package).
install -d -m 0755 "$DESTDIR/etc/qemu/vhost-user"
dst=$DESTDIR/etc/qemu/vhost-user/50-vhostd.json
if ! cmp -s "$SRC/data/vhost-user/50-vhostd.json" "$dst"; then
    install -m 0644 "$SRC/data/vhost-user/50-vhostd.json" "$dst"
    say "installed $dst"
fi
install -d -m 0755 "$DESTDIR/etc/vhostd"
conf=$DESTDIR/etc/vhostd/vhostd.toml
if [ ! -e "$conf" ]; then
    install -m 0644 "$SRC/systemd/vhostd.toml.example" "$conf"
    say "installed $conf (two example ports: edit it)"
else
    say "kept $conf"
fi

# --- user, systemd --------------------------------------------------------------------
if [ -n "$DESTDIR" ]; then
    say "DESTDIR set: not creating user vhostd, not calling systemctl"
    exit 0
fi
# Group kvm: QEMU's group on Debian; the sockets are vhostd:kvm 0660.
getent group kvm >/dev/null || groupadd --system kvm
if ! id -u vhostd >/dev/null 2>&1; then
    useradd --system --gid kvm --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "vhostd vhost-user backend" vhostd
    say "created system user vhostd (group kvm)"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemctl daemon-reload done"
    say "next: edit /etc/vhostd/vhostd.toml, then systemctl enable --now vhostd (or vhostd@NAME)"
else
    say "systemd is not running (no /run/systemd/system): units installed, daemon-reload skipped"
fi
