"""The guest image for the QEMU end-to-end tests: kernel + initramfs, and the overlay.

Standard library only. Pieces:

* ``build_guest()``: builds (or finds cached) ``vmlinuz`` + ``initramfs.cpio.gz``
  with ``scripts/build-guest.sh``.
* ``make_initramfs()``: the base initramfs plus an appended gzip'd newc cpio
  carrying ``/test.sh`` (the kernel unpacks concatenated archives in order);
  ``newc_archive()`` is the newc cpio writer.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# The e2e modules import each other top-level: conftest.py puts tests/e2e on sys.path.
from procs import tail

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"


def default_guest_dir() -> Path:
    return Path(os.environ.get("VHOSTD_GUEST_DIR") or "/var/cache/vhostd/guest")


# --------------------------------------------------------------------------- #
# guest image


@dataclass
class GuestImage:
    directory: Path
    vmlinuz: Path
    initramfs: Path
    stamp: str = ""


def build_guest(outdir: str | os.PathLike | None = None, timeout: float = 1200) -> GuestImage:
    """Build or locate the guest kernel + base initramfs (cached by the script)."""
    out = Path(outdir) if outdir else default_guest_dir()
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed (rc={r.returncode}):\n"
                           f"{tail(r.stdout, 20)}\n{tail(r.stderr, 40)}")
    img = GuestImage(out, out / "vmlinuz", out / "initramfs.cpio.gz")
    if not img.vmlinuz.is_file() or not img.initramfs.is_file():
        raise RuntimeError(f"{BUILD_SCRIPT} did not produce the guest in {out}")
    with contextlib.suppress(OSError):
        img.stamp = (out / "guest.stamp").read_text().splitlines()[0]
    return img


# --------------------------------------------------------------------------- #
# initramfs overlay (newc cpio writer)


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0,
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    nameb = name.encode() + b"\0"
    fields = [
        ino, mode, 0, 0, 1, int(time.time()), len(data),  # ino mode uid gid nlink mtime size
        0, 0, rdev[0], rdev[1],                             # devmajor devminor rdevmajor rdevminor
        len(nameb), 0,                                      # namesize check
    ]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = hdr + nameb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(files: dict[str, str | bytes], mode: int = 0o755) -> bytes:
    """An uncompressed newc cpio archive with ``files`` (path -> content).
    Parent directories are added; ``mode`` applies to all regular files."""
    buf = io.BytesIO()
    ino = 0x5600
    dirs: set[str] = set()
    for path in sorted(files):
        rel = path.lstrip("/")
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                ino += 1
                buf.write(_newc_entry(d, stat.S_IFDIR | 0o755, ino=ino))
        data = files[path]
        if isinstance(data, str):
            data = data.encode()
        ino += 1
        buf.write(_newc_entry(rel, stat.S_IFREG | mode, data, ino=ino))
    buf.write(_newc_entry("TRAILER!!!", 0))
    out = buf.getvalue()
    return out + b"\0" * (-len(out) % 512)


def make_initramfs(base: str | os.PathLike, out: str | os.PathLike,
                   test_script: str | None = None,
                   extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``out`` = base initramfs + a gzip'd newc archive carrying /test.sh."""
    files: dict[str, str | bytes] = dict(extra_files or {})
    if test_script is not None:
        if not test_script.startswith("#!"):
            test_script = "#!/bin/sh\n" + test_script
        files["test.sh"] = test_script
    data = Path(base).read_bytes()
    data += b"\0" * (-len(data) % 4)
    if files:
        data += gzip.compress(newc_archive(files), compresslevel=1)
    out = Path(out)
    out.write_bytes(data)
    return out
