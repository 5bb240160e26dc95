"""The only importer of the compiled datapath (vhostd._native, built by cffi).

C functions return >= 0 or -errno; `check` turns a negative result into
NativeError here and nowhere else.
"""
from __future__ import annotations

import os

from vhostd.errors import NativeError, SetupError

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


def io_mode_line(qps) -> str:
    """One log line: how the port's queue pairs talk to the TAP, and why."""
    modes = {lib.vr_qp_io_mode(qp.ptr) for qp in qps}
    if modes == {lib.VR_IO_URING}:
        return "TAP I/O: io_uring (one io_uring_enter per TX burst)"
    errs = {lib.vr_qp_io_error(qp.ptr) for qp in qps} - {0}
    why = (f"io_uring unavailable: {', '.join(sorted(os.strerror(e) for e in errs))}" if errs
           else "tap_io = syscall")
    mixed = " for some queue pairs" if lib.VR_IO_URING in modes else ""
    return f"TAP I/O: readv/writev, one syscall per frame{mixed} ({why})"


def configure_workers(qps, busy_poll_us: int, cpus: tuple[int, ...], tx_copy_max: int) -> None:
    """Busy-poll window, TX copy threshold and CPU placement of each queue pair's
    worker (queue pair i on cpus[i % len(cpus)]). Raises SetupError."""
    for qp in qps:
        with qp.paused():
            check(lib.vr_qp_set_busy_poll(qp.ptr, busy_poll_us), f"busy poll {busy_poll_us} us")
            check(lib.vr_qp_set_tx_copy_max(qp.ptr, tx_copy_max), f"tx copy max {tx_copy_max}")
        if cpus:
            cpu = cpus[qp.index % len(cpus)]
            rc = lib.vr_qp_set_cpu(qp.ptr, cpu)
            if rc < 0:
                raise SetupError(f"cannot pin queue pair {qp.index} to CPU {cpu}: {os.strerror(-rc)}")
