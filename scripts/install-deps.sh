#!/usr/bin/env bash
# Installs what vhostd's demo and tests need on a fresh Debian 12 machine (as root):
# Debian packages (QEMU, busybox for the guest, DPDK as a reference peer, compilers:
# gcc for the extension and its ASan/UBSan build, clang 14 and its libFuzzer
# runtime for fuzz/fuzz_rings.c) and a virtualenv at .venv with vhostd built and
# installed into it (the test extra brings atheris for fuzz/fuzz_messages.py).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 busybox-static dpdk-dev iproute2 iputils-ping procps util-linux systemd libseccomp2 groff-base
      gcc python3-dev python3-venv cpio xz-utils zstd kmod clang-14 libclang-rt-14-dev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Rebuild the extension whenever C or build inputs changed since the last install.
stamp=.venv/.vhostd-build-stamp
want=$(cat pyproject.toml setup.py vhostd/_build_ffi.py csrc/*.[ch] | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi
# A dev build (python vhostd/_build_ffi.py) is named _native.cpython-3XX-*.so and
# would shadow pip's _native.abi3.so: keep only the newest of them.
newest=$(ls -t vhostd/_native*.so 2>/dev/null | head -1)
for so in vhostd/_native*.so; do
    if [ -e "$so" ] && [ "$so" != "$newest" ]; then rm -f "$so"; fi
done
