"""The virtio-net device behind one port: queue pairs and their C workers, the TAP
queues, guest memory, MTU and counters; what a stuck worker leaves behind.

virtio 1.2 §5.1.2: virtqueue 2n is receiveq n, 2n+1 transmitq n. Each queue pair
is served by one C worker (csrc/worker.c) bound to one TAP queue fd. The
control plane pauses a pair's worker around every change of its rings, and
every pair of the device around a change of the memory table or the features.
A worker that does not park within the pause timeout raises WorkerStuck: its
port fails, and what the worker may still touch is kept until it comes back
(reap_stuck). Feature policy lives in virtio_net.py; this module applies it.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from vhostd import tap as taplib
from vhostd.dirty_log import MappedLog
from vhostd.errors import SetupError, WorkerStuck
from vhostd.fds import OwnedFd, close_all
from vhostd.memory import GuestMemory, MappedRegion
from vhostd.native import BROKEN_REASONS, RX, TX, check, ffi, lib
from vhostd.protocol import VringAddr
from vhostd.saved_rings import RingIdentity, SavedRings
from vhostd.stats import VQ_COUNTERS, vq_counters
from vhostd.virtio_net import OFFERED_PROTOCOL_FEATURES, offered_features, tap_offloads, vnet_hdr_len
from vhostd.vring import Vring

log = logging.getLogger(__name__)


def pause(qp: "QueuePair") -> None:
    """Parks qp's worker (csrc vr_qp_pause). A worker that does not park within the
    pause timeout is stuck: WorkerStuck, and its port must fail."""
    rc = lib.vr_qp_pause(qp.ptr)
    if rc == -errno.ETIMEDOUT:
        raise WorkerStuck(f"queue pair {qp.index}: the worker did not stop when asked (stuck)")
    check(rc, f"pause queue pair {qp.index}")


class QueuePair:
    """One C worker and its two vrings' datapath state."""

    def __init__(self, index: int, mem: GuestMemory, tap_fd: int, io_mode: int):
        self.index = index
        ptr = lib.vr_qp_new(mem.table, tap_fd, io_mode)
        if ptr == ffi.NULL:
            raise SetupError(f"queue pair {index}: cannot start worker: {os.strerror(ffi.errno)}")
        self.ptr = ptr
        self.event_fd = lib.vr_qp_event_fd(ptr)
        # Totals of earlier frontends: counters and the burst histogram alike stay
        # monotonic for the life of the port (Prometheus counters never go down).
        self._carried = {w: {**dict.fromkeys(VQ_COUNTERS, 0), "batch_hist": {}, "batch_sum": 0} for w in (RX, TX)}
        self.reported_broken = {RX: 0, TX: 0}

    @contextmanager
    def paused(self):
        pause(self)
        try:
            yield
        finally:
            check(lib.vr_qp_resume(self.ptr), f"resume queue pair {self.index}")

    def push(self, vring: Vring) -> None:
        """Hands the vring's configuration to C. Caller holds `paused()`."""
        w, what = vring.which, f"vring {vring.index}"
        if vring.num:
            check(lib.vr_qp_set_num(self.ptr, w, vring.num), f"{what} size {vring.num:#x}")
        if vring.addr is not None:
            a = vring.addr
            check(lib.vr_qp_set_addr(self.ptr, w, a.desc, a.avail, a.used), what)
        for attr, setter in (("kick", lib.vr_qp_set_kick), ("call", lib.vr_qp_set_call), ("err", lib.vr_qp_set_err)):
            f = getattr(vring, attr)
            check(setter(self.ptr, w, f.fd if f is not None else -1), f"{what} {attr} fd")
        if vring.addr is not None:
            # VHOST_VRING_F_LOG: the used ring's writes are logged at log_guest_addr.
            a = vring.addr
            check(lib.vr_qp_set_log_addr(self.ptr, w, int(bool(a.flags & VringAddr.F_LOG)), a.log),
                  f"{what} log address")
        check(lib.vr_qp_set_enabled(self.ptr, w, int(vring.enabled)), what)
        check(lib.vr_qp_set_started(self.ptr, w, int(vring.started)), what)

    def map(self) -> bool:
        """(Re)translates ring addresses; False if a configured ring is outside memory."""
        return lib.vr_qp_map(self.ptr) >= 0

    def counters(self, which: int) -> dict:
        live = vq_counters(lib.vr_qp_stats(self.ptr, which))
        carried = self._carried[which]
        out = {k: (v + carried[k] if k in VQ_COUNTERS or k == "batch_sum" else v) for k, v in live.items()}
        out["batch_hist"] = {b: n + carried["batch_hist"].get(b, 0) for b, n in live["batch_hist"].items()}
        return out

    def reset_vq(self, which: int) -> None:
        """Clears ring state for a new frontend; counters carry over. Caller holds `paused()`."""
        self._carried[which] = {k: v for k, v in self.counters(which).items()
                                if k in VQ_COUNTERS or k in ("batch_hist", "batch_sum")}
        check(lib.vr_qp_reset_vq(self.ptr, which), f"reset queue pair {self.index}")
        self.reported_broken[which] = 0

    def free(self) -> bool:
        """Stops the worker and frees the queue pair; False (nothing freed) while a
        stuck worker has not come back."""
        if self.ptr is not None:
            if lib.vr_qp_free(self.ptr) < 0:
                return False
            self.ptr = None
        return True


@dataclass
class _Stuck:
    """What a device with a stuck worker leaves behind: the worker may still touch
    the memory, the TAP fds and the vring eventfds, so none of them is unmapped or
    closed (an fd number reused meanwhile could receive its writes) until every
    stuck queue pair has parked and been freed."""

    port: str
    qps: list
    mem: GuestMemory
    tap: object
    fds: list = field(default_factory=list)
    log: MappedLog | None = None    # the dirty log it may still mark


_stuck: list[_Stuck] = []


def reap_stuck() -> list[str]:
    """Frees the devices whose stuck workers have come back; one log line each."""
    lines = []
    for s in list(_stuck):
        s.qps = [qp for qp in s.qps if not qp.free()]
        if not s.qps:
            _stuck.remove(s)
            s.mem.clear()
            if s.log is not None:
                s.log.release()
            close_all(s.fds)
            s.tap.close()
            lines.append(f"port {s.port}: the stuck worker came back; its memory, fds and TAP are released")
    return lines


def stuck_count() -> int:
    """Devices still held by a stuck worker."""
    return len(_stuck)


class NetDevice:
    """A port's virtio-net device: lives as long as the port, across frontends."""

    def __init__(self, port: str, tap: taplib.Tap, queue_pairs: int, mtu: int, mtu_configured: bool = False,
                 tap_io: str = "auto", saved_path: str | None = None):
        self.port = port
        # packed rings' positions for a daemon restarted after a crash (saved_rings)
        self.saved: SavedRings | None = None
        if saved_path:
            try:
                self.saved = SavedRings(saved_path, 2 * queue_pairs)
            except OSError as exc:
                log.warning("port %s: no packed-ring restart state (%s: %s): a packed ring will not "
                            "resume by itself after a crash", port, saved_path, exc.strerror)
        self.tap = tap
        self.queue_pairs = queue_pairs
        self.mtu = mtu
        uso = taplib.supports_offload(tap.fds[0], taplib.TUN_F_CSUM | taplib.TUN_F_USO4 | taplib.TUN_F_USO6)
        self.features = offered_features(queue_pairs, mtu=mtu_configured, uso=uso)
        self.protocol_features = OFFERED_PROTOCOL_FEATURES
        self.mem = GuestMemory()
        self.log: MappedLog | None = None   # the dirty log of a live migration (SET_LOG_BASE)
        self.hdr_len = 10                   # vnet header length the TAP expects (set_features)
        self.qps: list[QueuePair] = []
        self._attached = [True] * queue_pairs
        self._held: list[OwnedFd] = []   # vring fds a stuck worker may still use
        try:
            io_mode = lib.VR_IO_SYSCALL if tap_io == "syscall" else lib.VR_IO_URING
            for i in range(queue_pairs):
                self.qps.append(QueuePair(i, self.mem, tap.fds[i].fd, io_mode))
            self.set_mtu(mtu)
        except BaseException:
            self.close()
            raise

    def configure_workers(self, busy_poll_us: int, cpus: tuple[int, ...], tx_copy_max: int) -> None:
        """Busy-poll window, TX copy threshold and CPU placement of each queue pair's
        worker (queue pair i on cpus[i % len(cpus)]). Raises SetupError or NativeError."""
        for qp in self.qps:
            with qp.paused():
                check(lib.vr_qp_set_busy_poll(qp.ptr, busy_poll_us), f"busy poll {busy_poll_us} us")
                check(lib.vr_qp_set_tx_copy_max(qp.ptr, tx_copy_max), f"tx copy max {tx_copy_max}")
            if cpus:
                cpu = cpus[qp.index % len(cpus)]
                rc = lib.vr_qp_set_cpu(qp.ptr, cpu)
                if rc < 0:
                    raise SetupError(f"cannot pin queue pair {qp.index} to CPU {cpu}: {os.strerror(-rc)}")

    def qp_of(self, vring: Vring) -> QueuePair:
        return self.qps[vring.qp]

    @contextmanager
    def all_paused(self):
        paused = []
        try:
            for qp in self.qps:
                pause(qp)
                paused.append(qp)
            yield
        finally:
            for qp in reversed(paused):
                lib.vr_qp_resume(qp.ptr)

    def set_features(self, acked: int) -> list[bool]:
        """Hands the acked features to every worker and the TAP (vnet header length,
        offloads). A change of ring kind (split/packed) resets the vqs and re-maps
        them: returns, per vring index, whether its rings are mapped now."""
        hdr = vnet_hdr_len(acked)
        with self.all_paused():
            for qp in self.qps:
                check(lib.vr_qp_set_features(qp.ptr, acked, hdr), f"features {acked:#x}")
            mapped = self._mapped()
            for fd in self.tap.fds:
                taplib.set_vnet_hdr_len(fd, hdr)
                taplib.set_offload(fd, tap_offloads(acked))
            self.hdr_len = hdr
        return mapped

    def install_log(self, new: MappedLog | None) -> None:
        """SET_LOG_BASE: the workers mark into `new` from their next burst on (None: no
        log). The old log is unmapped only once every worker has stopped writing it
        (all paused for the swap); a parked worker holds no unlogged write, so no mark
        is lost in between."""
        with self.all_paused():
            for qp in self.qps:
                if new is None:
                    check(lib.vr_qp_set_log(qp.ptr, 0, 0), "dirty log")
                else:
                    check(lib.vr_qp_set_log(qp.ptr, new.addr, new.words), "dirty log")
            old, self.log = self.log, new
        if old is not None:
            old.release()

    def log_counters(self) -> dict:
        """Pages the workers turned on in dirty logs, and marks that fell beyond a log's
        end, for the life of the port."""
        return {"pages_marked": sum(lib.vr_qp_log_marks(qp.ptr) for qp in self.qps),
                "marks_beyond_log": sum(lib.vr_qp_log_overflow(qp.ptr) for qp in self.qps)}

    def inject(self, frame: bytes) -> None:
        """Writes one frame into the TAP from the control plane (SEND_RARP), behind a
        vnet header that asks for no offload. A TAP write is one frame whatever the
        worker writes on the same queue meanwhile. Raises OSError (EAGAIN: TAP full)."""
        os.write(self.tap.fds[0].fd, bytes(self.hdr_len) + frame)

    async def change_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: the TAP's link MTU (netlink blocks: in a thread), then the
        datapath's. Raises SetupError when the link refuses it (nothing changed)."""
        if mtu != self.mtu:
            await asyncio.to_thread(taplib.configure_link, self.tap, mtu)
            self.set_mtu(mtu)

    def set_mtu(self, mtu: int) -> None:
        """The MTU the datapath sizes mergeable RX buffers for (the TAP's)."""
        with self.all_paused():
            for qp in self.qps:
                check(lib.vr_qp_set_mtu(qp.ptr, mtu), f"mtu {mtu}")
        self.mtu = mtu

    def install_memory(self, mapped: list[MappedRegion]) -> list[bool]:
        """Swaps in a new memory table (every worker paused) and re-maps every ring;
        returns, per vring index, whether its rings are inside the new table."""
        with self.all_paused():
            old = self.mem.install(mapped)
            for qp in self.qps:
                qp.map()
            rings_mapped = self._mapped()
        self.mem.release(old)
        return rings_mapped

    def apply(self, vring: Vring, base: int | None = None) -> bool:
        """Pushes one vring's configuration into its worker (paused around it), with
        a new ring base if given; returns whether its rings are mapped."""
        qp = self.qp_of(vring)
        if vring.which == RX:
            self._steer(vring.qp, vring.enabled)
        with qp.paused():
            qp.push(vring)
            if base is not None:
                check(lib.vr_qp_set_base(qp.ptr, vring.which, base), f"vring {vring.index} base {base:#x}")
                qp.reported_broken[vring.which] = 0  # C cleared a broken ring: log its next break
            slot = vring.saved_slot if vring.saved_slot is not None else ffi.NULL
            check(lib.vr_qp_set_saved(qp.ptr, vring.which, slot), f"vring {vring.index} saved positions")
            qp.map()
            return lib.vr_qp_mapped(qp.ptr, vring.which) == 1

    def _steer(self, qp: int, attached: bool) -> None:
        """Multi-queue: the TAP steers host frames only to queues of pairs whose RX
        ring is enabled. Pair 0 stays attached so the TAP never loses its last queue.
        `_attached` is the device's own record of the TAP queues, not vring state."""
        if qp != 0 and self._attached[qp] != attached:
            taplib.set_queue_attached(self.tap.fds[qp], attached)
            self._attached[qp] = attached

    def _mapped(self) -> list[bool]:
        """Per vring index: whether C could map its rings (caller holds every pause)."""
        return [lib.vr_qp_mapped(qp.ptr, which) == 1 for qp in self.qps for which in (RX, TX)]

    def stop_vring(self, vring: Vring) -> int:
        """GET_VRING_BASE: stops the ring in C and returns where the device stopped."""
        qp = self.qp_of(vring)
        base = ffi.new("uint32_t *")
        with qp.paused():
            check(lib.vr_qp_get_base(qp.ptr, vring.which, base), f"vring {vring.index} base")
            check(lib.vr_qp_set_started(qp.ptr, vring.which, 0), f"vring {vring.index}")
            check(lib.vr_qp_set_saved(qp.ptr, vring.which, ffi.NULL), f"vring {vring.index} saved positions")
        return base[0]

    def ring_identity(self, vring: Vring) -> RingIdentity | None:
        """What ties a packed ring's saved positions to this very ring: its size, the
        guest address of its descriptors and the memory file they are in (the same
        file is the same QEMU process)."""
        if vring.addr is None:
            return None
        for m in self.mem.regions:
            r = m.region
            if r.uva <= vring.addr.desc < r.uva + r.size:
                st = os.fstat(m.fd.fd)
                return RingIdentity(vring.num, r.gpa + vring.addr.desc - r.uva, st.st_dev, st.st_ino)
        return None

    def reset(self, keep_memory: bool = False) -> dict[int, int]:
        """Forgets a frontend: every ring idle in C (its fds no longer watched, so the
        caller may close them), memory unmapped unless `keep_memory` (a device reset
        within one connection), every TAP queue attached. The TAP stays. Returns
        where each vring stopped (vring index -> GET_VRING_BASE value), read before
        the reset. Raises WorkerStuck: then the caller hands the vring fds to hold()."""
        bases: dict[int, int] = {}
        base = ffi.new("uint32_t *")
        with self.all_paused():
            for qp in self.qps:
                for which in (RX, TX):
                    if lib.vr_qp_get_base(qp.ptr, which, base) == 0:
                        bases[2 * qp.index + which] = base[0]
                    lib.vr_qp_set_saved(qp.ptr, which, ffi.NULL)
                    qp.reset_vq(which)
                check(lib.vr_qp_set_log(qp.ptr, 0, 0), "dirty log")
            if not keep_memory:
                self.mem.clear()
            old_log, self.log = self.log, None
        if old_log is not None:
            old_log.release()
        for i in range(self.queue_pairs):
            self._steer(i, True)  # every TAP queue attached while no frontend is there
        return bases

    def hold(self, fds: list[OwnedFd]) -> None:
        """Fds a stuck worker may still use: closed only once it has come back
        (close() hands them to reap_stuck with the rest of the device)."""
        self._held.extend(fds)

    def check_events(self) -> list[str]:
        """Log lines for vrings that broke since the last call (the worker's event fd fired)."""
        lines = []
        for qp in self.qps:
            try:
                os.eventfd_read(qp.event_fd)
            except BlockingIOError:
                pass
            for which in (RX, TX):
                st = lib.vr_qp_stats(qp.ptr, which)
                if st.broken and not qp.reported_broken[which]:
                    qp.reported_broken[which] = st.broken
                    lines.append(
                        f"vring {2 * qp.index + which} stopped: {BROKEN_REASONS.get(st.broken, st.broken)}"
                        f" (detail {st.broken_detail:#x})"
                    )
        return lines

    def counters(self) -> list[dict]:
        out = []
        for qp in self.qps:
            for which, name in ((RX, "rx"), (TX, "tx")):
                out.append({"queue_pair": qp.index, "vring": 2 * qp.index + which, "dir": name, **qp.counters(which)})
        return out

    def close(self) -> None:
        """Frees the workers, unmaps memory, closes the TAP fds. A stuck worker's
        device is handed to reap_stuck() instead, whole."""
        stuck = [qp for qp in self.qps if not qp.free()]
        self.qps.clear()
        if stuck:
            _stuck.append(_Stuck(self.port, stuck, self.mem, self.tap, self._held, self.log))
            log.error("port %s: %d stuck worker(s): memory, fds and TAP kept until they come back",
                      self.port, len(stuck))
            return
        self.mem.clear()
        if self.log is not None:
            self.log.release()
            self.log = None
        if self.saved is not None:
            # kept while a ring is claimed (a daemon stopped or killed under a running
            # guest is restarted into it); gone once nothing in it is worth anything
            self.saved.close(remove=self.saved.empty())
            self.saved = None
        close_all(self._held)
        self.tap.close()


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
