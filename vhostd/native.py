"""The only importer of the compiled datapath (vhostd._native, built by cffi).

C functions return >= 0 or -errno; `check` turns a negative result into
NativeError here and nowhere else.
"""
from __future__ import annotations

from vhostd.errors import NativeError

try:
    from vhostd._native import ffi, lib  # noqa: F401  (re-exported)
except ImportError as exc:  # pragma: no cover - a broken install, reported clearly
    raise ImportError(
        "vhostd's C extension is not built: run `pip install .` in the source tree "
        f"(or `python vhostd/_build_ffi.py` for development): {exc}"
    ) from exc

RX = lib.VR_RX
TX = lib.VR_TX

BROKEN_REASONS = {
    lib.VR_BROKEN_NONE: "healthy",
    lib.VR_BROKEN_AVAIL_IDX: "avail idx ran more than the queue size ahead",
    lib.VR_BROKEN_DESC: "invalid descriptor chain",
    lib.VR_BROKEN_ADDR: "buffer outside guest memory",
    lib.VR_BROKEN_INDIRECT: "invalid indirect descriptor table",
    lib.VR_BROKEN_RING_ADDR: "ring not inside guest memory",
    lib.VR_BROKEN_MEMORY: "guest memory became inaccessible (the frontend shrank its memory file)",
    lib.VR_BROKEN_NOTIFY: "a kick or call eventfd blocked the worker (the frontend made it blocking)",
}


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise NativeError(-rc, what)
    return rc
