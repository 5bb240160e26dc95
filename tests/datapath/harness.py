"""Shared harness for the C datapath tests, which drive csrc/ (guest_mem.c,
vring_split.c, vring_packed.c, net_tx.c, net_rx.c, worker.c, qp_control.c)
directly through cffi: the test modules of tests/datapath/ import from here, and
tests/datapath/conftest.py hands them the make_dev fixture.

Dev is one queue pair with both rings configured and running. The guest side is
tests/driver (GuestMemory + SplitRing or PackedRing): memfd guest RAM laid out as
a guest driver would, mapped a second time by the C side through vr_mmap,
exactly like the control plane does for SET_MEM_TABLE. A SOCK_SEQPACKET
socketpair stands in for the TAP: it keeps frame boundaries in both directions
and reports truncation (MSG_TRUNC) the way a real TAP drops oversize frames.

Not a test module (no test_ prefix: pytest collects nothing here).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import time

import pytest

from vhostd._native import ffi, lib

from tests.driver import GuestMemory, SplitRing, parse_net_hdr
from tests.driver.packed import PackedRing

EFD = os.EFD_NONBLOCK | os.EFD_CLOEXEC
NUM = 256
M1 = 1 << 20


def bit(n: int) -> int:
    return 1 << n


F_V1 = bit(lib.VR_F_VERSION_1)
F_INDIRECT = bit(lib.VR_F_INDIRECT_DESC)
F_EVENT_IDX = bit(lib.VR_F_EVENT_IDX)
F_CSUM = bit(lib.VR_F_CSUM)
F_TSO4 = bit(lib.VR_F_HOST_TSO4)
F_TSO6 = bit(lib.VR_F_HOST_TSO6)
F_UFO = bit(lib.VR_F_HOST_UFO)
F_ECN = bit(lib.VR_F_HOST_ECN)
F_USO = bit(lib.VR_F_HOST_USO)
F_PACKED = bit(lib.VR_F_RING_PACKED)
F_MRG = bit(lib.VR_F_MRG_RXBUF)
F_GUEST_TSO4 = bit(lib.VR_F_GUEST_TSO4)
F_GUEST_TSO6 = bit(lib.VR_F_GUEST_TSO6)
F_GUEST_UFO = bit(lib.VR_F_GUEST_UFO)
F_GUEST_USO4 = bit(lib.VR_F_GUEST_USO4)

STAT_FIELDS = ("packets", "bytes", "drop_ring_full", "drop_tap_busy", "drop_tap_error",
               "drop_bad_desc", "drop_bad_hdr", "drop_disabled", "kicks", "calls",
               "calls_suppressed", "broken", "broken_detail")


def wait_for(cond, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.001)


def eth_frame(n: int, seed: int = 0) -> bytes:
    """n bytes (n >= 14) that look like an Ethernet frame; payload is seeded noise."""
    rnd = random.Random(seed)
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + rnd.randbytes(n - 14)


class Dev:
    """One queue pair over fresh guest memory, both rings configured and running."""

    def __init__(self, features: int = F_V1, hdr_len: int = 12, num: int = NUM,
                 mem: GuestMemory | None = None, ring_region: int | None = None,
                 tx_enabled: bool = True, rx_enabled: bool = True, rings=None,
                 io_mode: int = lib.VR_IO_URING, tx_copy_max: int | None = None):
        self.features = features
        self.hdr_len = hdr_len
        self.num = num
        self.cmem = ffi.new("struct vr_mem *")
        self.maps = []
        self.mem = None
        self.keep = []      # buffers the worker may write into until close() (a dirty log)
        self.tap, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tap.setblocking(False)
        self.peer.settimeout(5)
        self.qp = lib.vr_qp_new(self.cmem, self.tap.fileno(), io_mode)
        assert self.qp != ffi.NULL
        self.kick_fd = {w: os.eventfd(0, EFD) for w in (0, 1)}
        self.call_fd = {w: os.eventfd(0, EFD) for w in (0, 1)}
        self.err_fd = {w: os.eventfd(0, EFD) for w in (0, 1)}
        with self.paused(settle=True):
            if tx_copy_max is not None:
                assert lib.vr_qp_set_tx_copy_max(self.qp, tx_copy_max) == 0
            self._attach(mem, ring_region, tx_enabled, rx_enabled, rings)

    def _attach(self, mem, ring_region, tx_enabled, rx_enabled, rings) -> None:
        """Maps `mem` (a fresh 8 MiB one if None) into the C region table and
        configures both rings over it, as the control plane does for a frontend
        (SET_MEM_TABLE, SET_FEATURES, SET_VRING_*). Caller holds the pause.
        rings: a function (mem, which) -> ring to lay the rings out itself."""
        features = self.features
        self.mem = mem if mem is not None else GuestMemory(8 << 20)
        regs = sorted(self.mem.regions())                   # the C table is sorted by gpa
        for i, (gpa, size, uva, off, fd) in enumerate(regs):
            a = ffi.new("uint64_t *")
            assert lib.vr_mmap(fd, size + off, a) == 0
            self.maps.append((a[0], size + off))
            r = self.cmem.regions[i]
            r.gpa, r.uva, r.size, r.hva = gpa, uva, size, a[0] + off
        self.cmem.nregions = len(regs)
        assert lib.vr_mem_validate(self.cmem) == 0
        ev = bool(features & F_EVENT_IDX)
        ring_cls = PackedRing if features & F_PACKED else SplitRing
        if rings is None:
            self.rx = ring_cls(self.mem, self.num, event_idx=ev, region=ring_region)
            self.tx = ring_cls(self.mem, self.num, event_idx=ev, region=ring_region)
        else:
            self.rx, self.tx = rings(self.mem, lib.VR_RX), rings(self.mem, lib.VR_TX)
        self.rings = {lib.VR_RX: self.rx, lib.VR_TX: self.tx}
        assert lib.vr_qp_set_features(self.qp, features, self.hdr_len) == 0
        for w, ring in self.rings.items():
            ring.kick_fd, ring.call_fd = self.kick_fd[w], self.call_fd[w]
            assert lib.vr_qp_set_num(self.qp, w, self.num) == 0
            assert lib.vr_qp_set_addr(self.qp, w, ring.desc_uva, ring.avail_uva,
                                      ring.used_uva) == 0
            # packed: avail slot 0 with wrap counter 1 (as DPDK virtio-user sends it)
            base = 0x8000 if features & F_PACKED else 0
            assert lib.vr_qp_set_base(self.qp, w, base) == 0
            assert lib.vr_qp_set_kick(self.qp, w, self.kick_fd[w]) == 0
            assert lib.vr_qp_set_call(self.qp, w, self.call_fd[w]) == 0
            assert lib.vr_qp_set_err(self.qp, w, self.err_fd[w]) == 0
            assert lib.vr_qp_set_started(self.qp, w, 1) == 0
        assert lib.vr_qp_set_enabled(self.qp, lib.VR_TX, int(tx_enabled)) == 0
        assert lib.vr_qp_set_enabled(self.qp, lib.VR_RX, int(rx_enabled)) == 0
        assert lib.vr_qp_map(self.qp) == 0

    def _detach(self) -> None:
        """The frontend goes: both vqs reset, its memory unmapped (caller holds the pause)."""
        for w in (lib.VR_RX, lib.VR_TX):
            assert lib.vr_qp_reset_vq(self.qp, w) == 0
        self.cmem.nregions = 0
        for a, n in self.maps:
            lib.vr_munmap(a, n)
        self.maps = []
        self.mem.close()

    def reconnect(self, mem: GuestMemory | None = None, ring_region: int | None = None, rings=None) -> None:
        """A second frontend on the same queue pair, as the daemon keeps one queue
        pair per port across frontends: the first one's memory is unmapped and the
        new memory (usually mapped where the old one was) and rings set up."""
        with self.paused(settle=True):
            self._detach()
            self._attach(mem, ring_region, True, True, rings)

    @contextlib.contextmanager
    def paused(self, settle: bool = False):
        """Worker parked inside. settle: after resuming, also wait until the worker
        has finished the pass that resume starts and gone back to sleep, so that
        the rings' notification areas hold its idle requests (no DISABLE / NO_NOTIFY
        left from a pass still running when the test publishes)."""
        assert lib.vr_qp_pause(self.qp) == 0
        waits = lib.vr_qp_idle_waits(self.qp)
        try:
            yield
        finally:
            assert lib.vr_qp_resume(self.qp) == 0
        if settle:
            wait_for(lambda: lib.vr_qp_idle_waits(self.qp) > waits, what="the worker to go idle after resume")

    def stats(self, w: int) -> dict:
        """Counters as of the worker's last finished burst: the pause is the barrier
        (the worker counts a call just after publishing the used entries the test
        may already have seen)."""
        with self.paused():
            s = lib.vr_qp_stats(self.qp, w)
            d = {k: getattr(s, k) for k in STAT_FIELDS}
            d["batch_hist"] = list(s.batch_hist)
        return d

    def get_base(self, w: int) -> int:
        b = ffi.new("uint32_t *")
        with self.paused():
            assert lib.vr_qp_get_base(self.qp, w, b) == 0
        return b[0]

    # --- TX helpers ---
    def send(self, segs, indirect=None) -> int:
        head = self.tx.add_out(segs, indirect=indirect)
        self.tx.publish()
        self.tx.kick()
        return head

    def recv_tap(self, timeout: float = 5.0) -> bytes:
        self.peer.settimeout(timeout)
        return self.peer.recv(1 << 17)

    def tap_empty(self, wait: float = 0.05) -> bool:
        r, _, _ = select.select([self.peer], [], [], wait)
        return not r

    def close(self):
        assert lib.vr_qp_free(self.qp) == 0
        self.qp = None
        for d in (self.kick_fd, self.call_fd, self.err_fd):
            for fd in d.values():
                os.close(fd)
        self.tap.close()
        self.peer.close()
        for a, n in self.maps:
            lib.vr_munmap(a, n)
        self.mem.close()


@pytest.fixture
def make_dev():
    devs = []

    def make(**kw):
        d = Dev(**kw)
        devs.append(d)
        return d
    yield make
    for d in devs:
        d.close()


def read_efd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def mrg_frames(ring, n, timeout=5.0):
    """Reassemble n mergeable frames from used entries: (num_buffers, [lens], bytes)."""
    used = []
    deadline = time.monotonic() + timeout
    frames = []
    while len(frames) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(frames)}/{n} frames"
        used += ring.wait_used(1, timeout=left) if not used else ring.get_used()
        while used:
            nb = parse_net_hdr(used[0].data[:12]).num_buffers
            assert nb >= 1
            if len(used) < nb:
                break
            part, used = used[:nb], used[nb:]
            frames.append((nb, [u.len for u in part], b"".join(u.data for u in part)))
        if len(frames) < n and not used:
            time.sleep(0.001)
    assert not used
    return frames
