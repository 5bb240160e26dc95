"""Tests for the C datapath (csrc/: guest_mem.c, vring_split.c, net_tx.c,
net_rx.c, worker.c, qp_control.c) driven directly through cffi.

The guest side is tests/driver (GuestMemory + SplitRing): memfd guest RAM laid
out as a guest driver would, mapped a second time by the C side through
vr_mmap, exactly like the control plane does for SET_MEM_TABLE. A SOCK_SEQPACKET
socketpair stands in for the TAP: it keeps frame boundaries in both directions
and reports truncation (MSG_TRUNC) the way a real TAP drops oversize frames.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vhostd._native import ffi, lib

from tests.driver import GuestMemory, SplitRing, net_hdr, parse_net_hdr
from tests.driver.packed import PackedRing
from tests.driver.constants import (
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
)

EFD = os.EFD_NONBLOCK | os.EFD_CLOEXEC
NUM = 256


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
                 tx_enabled: bool = True, rx_enabled: bool = True):
        self.mem = mem if mem is not None else GuestMemory(8 << 20)
        self.hdr_len = hdr_len
        self.num = num
        self.cmem = ffi.new("struct vr_mem *")
        self.maps = []
        regs = list(self.mem.regions())
        for i, (gpa, size, uva, off, fd) in enumerate(regs):
            a = ffi.new("uint64_t *")
            assert lib.vr_mmap(fd, size + off, a) == 0
            self.maps.append((a[0], size + off))
            r = self.cmem.regions[i]
            r.gpa, r.uva, r.size, r.hva = gpa, uva, size, a[0] + off
        self.cmem.nregions = len(regs)
        assert lib.vr_mem_validate(self.cmem) == 0
        self.tap, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tap.setblocking(False)
        self.peer.settimeout(5)
        self.qp = lib.vr_qp_new(self.cmem, self.tap.fileno())
        assert self.qp != ffi.NULL
        ev = bool(features & F_EVENT_IDX)
        ring_cls = PackedRing if features & F_PACKED else SplitRing
        self.rx = ring_cls(self.mem, num, event_idx=ev, region=ring_region)
        self.tx = ring_cls(self.mem, num, event_idx=ev, region=ring_region)
        self.rings = {lib.VR_RX: self.rx, lib.VR_TX: self.tx}
        self.kick_fd = {w: os.eventfd(0, EFD) for w in (0, 1)}
        self.call_fd = {w: os.eventfd(0, EFD) for w in (0, 1)}
        self.err_fd = {w: os.eventfd(0, EFD) for w in (0, 1)}
        with self.paused(settle=True):
            assert lib.vr_qp_set_features(self.qp, features, hdr_len) == 0
            for w, ring in self.rings.items():
                ring.kick_fd, ring.call_fd = self.kick_fd[w], self.call_fd[w]
                assert lib.vr_qp_set_num(self.qp, w, num) == 0
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
        lib.vr_qp_free(self.qp)
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


# ---------------------------------------------------------------- translation

def _table(regions):
    m = ffi.new("struct vr_mem *")
    m.nregions = len(regions)
    for i, (gpa, uva, size, hva) in enumerate(regions):
        r = m.regions[i]
        r.gpa, r.uva, r.size, r.hva = gpa, uva, size, hva
    return m


def xlate(m, addr, ln, space=None):
    space = lib.VR_SPACE_GPA if space is None else space
    p = ffi.new("uint64_t *", ln)
    r = lib.vr_translate(m, space, addr, p)
    return (None if r == ffi.NULL else int(ffi.cast("uintptr_t", r))), p[0]


M1 = 1 << 20
TOP = 2**64


def test_translate_edges():
    m = _table([(0, 0x10_0000_0000, M1, 0x1000_0000),
                (M1, 0x10_0010_0000, M1, 0x2000_0000),
                (1 << 32, 0x20_0000_0000, M1, 0x3000_0000),
                (TOP - 0x1000, 0x30_0000_0000, 0x1000, 0x4000_0000)])
    assert xlate(m, 0, 16) == (0x1000_0000, 16)
    assert xlate(m, M1 - 1, 16) == (0x1000_0000 + M1 - 1, 1)      # clamped at region end
    assert xlate(m, M1, 16) == (0x2000_0000, 16)                     # next region
    assert xlate(m, 2 * M1, 1)[0] is None                            # hole
    assert xlate(m, (1 << 32) - 1, 1)[0] is None
    assert xlate(m, (1 << 32) + M1 - 1, TOP - 1) == (0x3000_0000 + M1 - 1, 1)
    assert xlate(m, 5, 0) == (0x1000_0000 + 5, 0)                    # len 0
    assert xlate(m, TOP - 1, TOP - 1) == (0x4000_0000 + 0xfff, 1)    # top of address space
    assert xlate(m, TOP - 0x1000, TOP - 1) == (0x4000_0000, 0x1000)
    assert xlate(m, TOP - 0x1001, 2)[0] is None
    # uva space
    assert xlate(m, 0x10_0010_0008, 8, lib.VR_SPACE_UVA) == (0x2000_0008, 8)
    assert xlate(m, 0x8, 8, lib.VR_SPACE_UVA)[0] is None
    assert xlate(m, 0, 8, 7)[0] is None                               # bad space
    # spanning two regions: the caller loops on the clamped length
    addr, left, pieces = M1 - 100, 300, []
    while left:
        p, n = xlate(m, addr, left)
        assert p is not None
        pieces.append((p, n))
        addr += n
        left -= n
    assert pieces == [(0x1000_0000 + M1 - 100, 100), (0x2000_0000, 200)]


def test_translate_zero_size_and_nregions_clamp():
    m = _table([(0, 0, 0, 0x1000), (0x1000, 0x1000, 0x1000, 0x5000)])
    assert xlate(m, 0, 8)[0] is None
    assert xlate(m, 0x1000, 8) == (0x5000, 8)
    m.nregions = 1000                 # garbage count: clamped, no overrun
    assert xlate(m, 0x1000, 8) == (0x5000, 8)


def test_mem_validate():
    ok = [(0, 0x1000, M1, 0x1000_0000), (M1, 0x10_0000, M1, 0x2000_0000)]
    assert lib.vr_mem_validate(_table(ok)) == 0
    assert lib.vr_mem_validate(_table([(0, 0, 0, 0x1000)])) < 0                  # size 0
    assert lib.vr_mem_validate(_table([(0, 0, M1, 0), (M1 // 2, M1, M1, 0x1000)])) < 0  # overlap
    assert lib.vr_mem_validate(_table([(TOP - 0x1000, 0, 0x2000, 0x1000)])) < 0  # gpa wraps
    assert lib.vr_mem_validate(_table([(0, TOP - 0x10, 0x1000, 0x1000)])) < 0    # uva wraps
    assert lib.vr_mem_validate(_table([(0, 0, 0x1000, TOP - 0x10)])) < 0         # hva wraps
    m = _table(ok)
    m.nregions = lib.VR_MAX_REGIONS + 1
    assert lib.vr_mem_validate(m) < 0


# ------------------------------------------------------------------------ TX

def test_tx_basic_and_split_header(make_dev):
    d = make_dev()
    frame = eth_frame(1500, 1)
    hdr = net_hdr()
    d.send([hdr + frame])
    assert d.recv_tap() == hdr + frame
    # header split over three descriptors, payload over several
    blob = hdr + frame
    segs = [blob[:3], blob[3:7], blob[7:13], blob[13:600], b"", blob[600:]]
    d.send(segs)
    assert d.recv_tap() == blob
    used = d.tx.wait_used(2)
    assert [u.len for u in used] == [0, 0]
    s = d.stats(lib.VR_TX)
    assert s["packets"] == 2 and s["bytes"] == 3000 and s["kicks"] >= 1
    assert sum(s["batch_hist"]) >= 1
    assert s["broken"] == 0


def test_tx_indirect(make_dev):
    d = make_dev(features=F_V1 | F_INDIRECT)
    blob = net_hdr() + eth_frame(3000, 2)
    segs = [blob[i:i + 100] for i in range(0, len(blob), 100)]
    d.send(segs, indirect=True)
    assert d.recv_tap() == blob
    d.tx.wait_used(1)
    assert d.stats(lib.VR_TX)["packets"] == 1


def test_tx_buffer_spanning_regions(make_dev):
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, M1)])
    d = make_dev(mem=mem, ring_region=0)
    blob = net_hdr() + eth_frame(400, 3)
    gpa = 4 * M1 - 150                       # straddles the region boundary
    mem.write(gpa, blob)
    [desc] = d.tx.reserve_desc(1)
    d.tx.write_desc(desc, gpa, len(blob), 0, 0)
    d.tx.push_avail(desc)
    d.tx.publish()
    d.tx.kick()
    assert d.recv_tap() == blob
    wait_for(lambda: d.tx.used_idx() == 1)


def test_tx_many_in_one_burst_one_call(make_dev):
    d = make_dev()
    before = d.stats(lib.VR_TX)
    for i in range(50):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    for i in range(50):
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
    wait_for(lambda: d.tx.used_idx() == 50)
    s = d.stats(lib.VR_TX)
    assert s["calls"] - before["calls"] == 1
    assert s["batch_hist"][5] == 1                      # 32-63 chains
    assert read_efd(d.call_fd[lib.VR_TX]) == 1
    # idle: kicks requested again (no EVENT_IDX: flags cleared)
    assert d.tx.used_flags() & VRING_USED_F_NO_NOTIFY == 0


def test_tx_bursts_are_bounded(make_dev):
    d = make_dev(num=1024)
    def drain():
        with contextlib.suppress(OSError):
            while True:
                d.peer.recv(4096)
    threading.Thread(target=drain, daemon=True).start()
    for i in range(600):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    wait_for(lambda: d.tx.used_idx() == 600)
    s = d.stats(lib.VR_TX)
    assert s["packets"] + s["drop_tap_busy"] == 600    # the stand-in's buffer is small
    assert sum(s["batch_hist"]) >= 600 // 128           # split into bounded bursts
    assert s["batch_hist"][7] >= 4


def tso(gso_type=1, gso_size=1448, hdr_len=66, csum_start=34, csum_offset=16, flags=1):
    return dict(flags=flags, gso_type=gso_type, gso_size=gso_size, hdr_len=hdr_len,
                csum_start=csum_start, csum_offset=csum_offset)


def uso(**kw):
    return tso(**{"gso_type": 5, "hdr_len": 42, "csum_offset": 6, **kw})


F_TCP4 = F_CSUM | F_TSO4
F_TCP6 = F_CSUM | F_TSO6
F_ALL = F_CSUM | F_TSO4 | F_TSO6 | F_UFO | F_ECN | F_USO
MAXF = 65535 + 18                      # 64 KiB + Ethernet + VLAN

HDR_CASES = [
    # (features, hdr kwargs, frame len, accepted)
    # --- checksum offload
    (0, dict(flags=1, csum_start=14, csum_offset=16), 100, False),      # NEEDS_CSUM w/o CSUM
    (F_CSUM, dict(flags=1, csum_start=14, csum_offset=16), 100, True),
    (F_CSUM, dict(flags=1, csum_start=90, csum_offset=9), 100, False),  # past the end
    (F_CSUM, dict(flags=1, csum_start=90, csum_offset=8), 100, True),   # exactly fits
    (F_CSUM, dict(flags=1, csum_start=0, csum_offset=0), 19, False),    # shorter than an IPv4 header
    (F_CSUM, dict(flags=1, csum_start=0, csum_offset=0), 20, True),
    (F_CSUM, dict(flags=1, csum_start=0xFFFF, csum_offset=0xFFFF), 100, False),  # no u16 wrap
    (F_CSUM, dict(flags=2), 100, False),                                 # DATA_VALID is RX-only
    (F_CSUM, dict(flags=4), 100, False),                                 # RSC_INFO is RX-only
    (F_ALL, dict(flags=0x81), 100, False),                               # unknown flag bit
    # --- TCP segmentation
    (F_TCP4, tso(), 3000, True),
    (F_TCP4, tso(), MAXF, True),                                         # 64 KiB GSO frame
    (F_TCP4, tso(), MAXF + 1, False),
    (F_TSO4, tso(), 3000, False),                                        # NEEDS_CSUM w/o CSUM
    (F_CSUM, tso(), 3000, False),                                        # TSO4 not negotiated
    (F_TCP4, tso(flags=0, csum_start=0, csum_offset=0), 3000, False),    # TCP GSO w/o NEEDS_CSUM
    (F_TCP4, tso(csum_offset=6), 3000, False),                           # not tcphdr.check
    (F_TCP4, tso(gso_size=0), 3000, False),
    (F_TCP4, tso(gso_size=0xFFFF), 3000, False),                         # GSO_BY_FRAGS
    (F_TCP4, tso(gso_size=0xFFFE), 3000, True),                          # > frame: not really GSO, fine
    (F_TCP4, tso(hdr_len=3001), 3000, False),
    (F_TCP4, tso(hdr_len=3000), 3000, True),
    (F_TCP4, tso(hdr_len=0), 53, False),                                 # csum_start + tcphdr > frame
    (F_TCP4, tso(hdr_len=0), 54, True),
    (F_TCP4, tso(gso_type=4), 3000, False),                              # TSO6 not negotiated
    (F_TCP6, tso(gso_type=4, csum_start=54, hdr_len=74), 3000, True),
    (F_TCP6, tso(gso_type=4, csum_start=14, hdr_len=0), 59, False),      # < IPv6 hdr + tcphdr
    (F_TCP6, tso(gso_type=4, csum_start=14, hdr_len=0), 60, True),
    (F_TCP4, tso(gso_type=0x81), 3000, False),                           # ECN w/o HOST_ECN
    (F_TCP4 | F_ECN, tso(gso_type=0x81), 3000, True),
    (F_TCP6 | F_ECN, tso(gso_type=0x84, csum_start=54), 3000, True),
    (F_ALL, dict(gso_type=0x80), 100, False),                            # ECN without GSO
    # --- UDP fragmentation (UFO) and segmentation (USO)
    (F_UFO, dict(gso_type=3, gso_size=1472, hdr_len=42), 3000, True),    # UFO w/o NEEDS_CSUM
    (F_UFO, dict(gso_type=3, gso_size=1472, hdr_len=42), 41, False),
    (F_CSUM | F_UFO, tso(gso_type=3, csum_offset=6, hdr_len=42), 3000, True),
    (F_CSUM | F_TSO4, tso(gso_type=3, csum_offset=6), 3000, False),      # UFO not negotiated
    (F_ALL, tso(gso_type=0x83, csum_offset=6), 3000, False),             # ECN on UDP
    (F_CSUM | F_USO, uso(), 3000, True),
    (F_CSUM | F_USO, uso(), MAXF, True),
    (F_CSUM | F_TSO4 | F_TSO6 | F_UFO, uso(), 3000, False),              # HOST_USO not acked
    (F_CSUM | F_USO, uso(csum_offset=16), 3000, False),                  # not udphdr.check
    (F_CSUM | F_USO, uso(flags=0, csum_start=0, csum_offset=0), 3000, False),
    (F_CSUM | F_USO, uso(gso_size=100), 42 + 12800, True),               # 128 segments
    (F_CSUM | F_USO, uso(gso_size=100), 42 + 12801, False),              # 129
    (F_ALL | F_ECN, uso(gso_type=0x85), 3000, False),
    # --- unknown gso types
    (F_ALL, tso(gso_type=2), 3000, False),
    (F_ALL, tso(gso_type=6), 3000, False),
    (F_ALL, tso(gso_type=0x41), 3000, False),
    # --- frame length
    (0, dict(), 13, False),                                               # runt
    (0, dict(), 14, True),
    (0, dict(), MAXF, True),
    (0, dict(), MAXF + 1, False),
]


@pytest.fixture
def tx_copy_max(request):
    """Sets the process-wide TX copy threshold (read by vr_qp_new) for the test;
    restores the default afterwards."""
    def set_max(n: int) -> None:
        assert lib.vr_set_tx_copy_max(n) == 0
    yield set_max
    assert lib.vr_set_tx_copy_max(TX_COPY_DEFAULT) == 0


TX_COPY_DEFAULT = 512


def tx_copied(d: Dev) -> int:
    with d.paused():
        return lib.vr_qp_tx_copied(d.qp)


# copy_max 512: every case of up to 500 frame bytes is checked in the bounce copy;
# 0: the same cases through the zero-copy writev path.
@pytest.mark.parametrize("copy_max", [0, 512])
@pytest.mark.parametrize("features,hkw,flen,ok", HDR_CASES)
def test_tx_header_validation(make_dev, tx_copy_max, copy_max, features, hkw, flen, ok):
    tx_copy_max(copy_max)
    d = make_dev(features=F_V1 | F_INDIRECT | features)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    hdr = net_hdr(**hkw)
    frame = eth_frame(flen, 7) if flen >= 14 else b"\x00" * flen
    if flen > 4096:                     # big GSO frames: many segments, as a guest posts them
        segs = [hdr[:5], hdr[5:] + frame[:10]] + [frame[i:i + 4096] for i in range(10, flen, 4096)]
        d.send(segs, indirect=True)
    else:
        d.send([hdr[:5], hdr[5:] + frame[:10], frame[10:]])
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    if ok:
        got = d.recv_tap()
        assert got[12:] == frame
        want = parse_net_hdr(hdr)
        if not want.flags & 1:
            want = want._replace(csum_start=0, csum_offset=0)
        if not want.gso_type:
            want = want._replace(hdr_len=0, gso_size=0)
        assert parse_net_hdr(got[:12]) == want
        assert s["packets"] == 1 and s["drop_bad_hdr"] == 0
    else:
        assert d.tap_empty()
        assert s["packets"] == 0 and s["drop_bad_hdr"] == 1
    assert s["broken"] == 0
    assert tx_copied(d) == (1 if ok and 12 + flen <= copy_max else 0)


def test_tx_header_sanitized(make_dev):
    d = make_dev()
    # GSO_NONE: hdr_len/gso_size are meaningless; csum fields without NEEDS_CSUM too
    hdr = net_hdr(hdr_len=999, gso_size=77, csum_start=5, csum_offset=6, num_buffers=3)
    frame = eth_frame(64)
    d.send([hdr + frame])
    got = d.recv_tap()
    assert got == net_hdr() + frame


def test_tx_vnet_hdr_10(make_dev):
    d = make_dev(features=0, hdr_len=10)
    blob = net_hdr()[:10] + eth_frame(100, 9)
    d.send([blob[:4], blob[4:]])
    assert d.recv_tap() == blob
    d.tx.wait_used(1)


def test_tx_header_sanitized_in_the_copy(make_dev):
    """A copied frame (default threshold): the TAP gets the sanitized header, with a
    12- and a 10-byte header (the 10-byte form must not lose the frame's first
    bytes to the header's num_buffers field)."""
    for hl, features in ((12, F_V1), (10, 0)):
        d = make_dev(features=features, hdr_len=hl)
        hdr = net_hdr(hdr_len=999, gso_size=77, csum_start=5, csum_offset=6, num_buffers=3)[:hl]
        frame = eth_frame(64, hl)
        d.send([hdr[:3], hdr[3:] + frame[:5], frame[5:]])
        assert d.recv_tap() == net_hdr()[:hl] + frame
        assert tx_copied(d) == 1


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("uring", [True, False])
def test_tx_copy_threshold_boundary(make_dev, tx_copy_max, packed, uring):
    """Header + frame of exactly the threshold is copied, one byte more goes
    zero-copy; single- and multi-segment chains; the TAP gets identical bytes
    either way and every chain comes back used, in order, with len 0."""
    lib.vr_set_io_uring(int(uring))
    try:
        d = make_dev(features=F_V1 | (F_PACKED if packed else 0))
    finally:
        lib.vr_set_io_uring(1)
    frames, want_copied = [], 0
    for total in (TX_COPY_DEFAULT - 1, TX_COPY_DEFAULT, TX_COPY_DEFAULT + 1, 12 + 14, 12 + 1500):
        blob = net_hdr() + eth_frame(total - 12, total)
        one = [blob]
        step = 7 if total <= 300 else 50
        many = [blob[:2], blob[2:12], b"", blob[12:20]] + [blob[i:i + step] for i in range(20, total, step)]
        for segs in (one, many):
            frames.append((blob, segs))
            want_copied += total <= TX_COPY_DEFAULT
    for blob, segs in frames:
        d.tx.add_out(segs)
    d.tx.publish()
    d.tx.kick()
    used = d.tx.wait_used(len(frames))
    assert [u.len for u in used] == [0] * len(frames)
    for blob, _ in frames:
        assert d.recv_tap() == blob
    s = d.stats(lib.VR_TX)
    assert s["packets"] == len(frames) and s["bytes"] == sum(len(b) - 12 for b, _ in frames)
    assert s["broken"] == 0 and s["drop_bad_hdr"] == 0
    assert tx_copied(d) == want_copied


@pytest.mark.parametrize("copy_max", [0, 128, 512])
def test_tx_copied_and_zero_copy_frames_mixed_in_bursts(make_dev, tx_copy_max, copy_max):
    """Several bursts mixing copied small frames (many segments each) with zero-copy
    large ones: order, bytes and counters as without the copy."""
    tx_copy_max(copy_max)
    d = make_dev(features=F_V1 | F_INDIRECT, num=1024)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rnd = random.Random(5)
    blobs = []
    for i in range(300):
        total = rnd.choice((12 + 60, 12 + 114, 12 + 116, 12 + 400, 12 + 1500))
        blob = net_hdr() + eth_frame(total - 12, i)
        cuts = sorted(rnd.sample(range(1, total), min(total - 1, rnd.randrange(0, 20))))
        segs = [blob[a:b] for a, b in zip([0] + cuts, cuts + [total])]
        d.tx.add_out(segs, indirect=len(segs) > 3)
        blobs.append(blob)
    d.tx.publish()
    d.tx.kick()
    used = d.tx.wait_used(len(blobs))
    assert [u.len for u in used] == [0] * len(blobs)
    for blob in blobs:
        assert d.recv_tap() == blob
    s = d.stats(lib.VR_TX)
    assert s["packets"] == len(blobs) and s["drop_tap_busy"] == 0 and s["broken"] == 0
    assert tx_copied(d) == sum(len(b) <= copy_max for b in blobs)


def test_tx_copy_max_limit():
    assert lib.vr_set_tx_copy_max(513) < 0
    assert lib.vr_set_tx_copy_max(512) == 0
    assert lib.vr_set_tx_copy_max(TX_COPY_DEFAULT) == 0


def test_tx_disabled_ring_drops(make_dev):
    d = make_dev(tx_enabled=False)
    for i in range(5):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    used = d.tx.wait_used(5)
    assert [u.len for u in used] == [0] * 5
    assert d.tap_empty()
    s = d.stats(lib.VR_TX)
    assert s["drop_disabled"] == 5 and s["packets"] == 0
    with d.paused():
        lib.vr_qp_set_enabled(d.qp, lib.VR_TX, 1)
    d.send([net_hdr() + eth_frame(60)])
    assert d.recv_tap() == net_hdr() + eth_frame(60)


def test_tx_tap_busy_and_error(make_dev):
    d = make_dev()
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    n = 100
    for i in range(n):
        d.tx.add_out([net_hdr() + eth_frame(1500, i)])
    d.tx.publish()
    d.tx.kick()
    d.tx.wait_used(n)
    s = d.stats(lib.VR_TX)
    assert s["drop_tap_busy"] > 0
    assert s["packets"] + s["drop_tap_busy"] == n
    while not d.tap_empty(0):
        d.peer.recv(4096)
    # peer gone: EPIPE -> drop_tap_error; the hung-up TAP must not make the worker spin
    d.peer.close()
    d.peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)   # for close()
    for i in range(3):
        d.send([net_hdr() + eth_frame(100, i)])
    d.tx.wait_used(3)
    assert d.stats(lib.VR_TX)["drop_tap_error"] == 3
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.15


# ------------------------------------------------------------------------ RX

def test_rx_basic(make_dev):
    d = make_dev()
    d.rx.add_in([2048])
    assert d.rx.publish_and_kick()
    frame = net_hdr(num_buffers=0) + eth_frame(1000, 4)
    d.peer.send(frame)
    [u] = d.rx.wait_used(1)
    assert u.len == len(frame)
    assert parse_net_hdr(u.data[:12]).num_buffers == 1
    assert u.data[10:12] == b"\x01\x00" and u.data[12:] == frame[12:]
    s = d.stats(lib.VR_RX)
    assert s["packets"] == 1 and s["bytes"] == 1000 and s["calls"] == 1


def test_rx_split_header_buffers(make_dev):
    d = make_dev(features=F_V1 | F_INDIRECT)
    for ind in (False, True):
        d.rx.add_in([4, 7, 100, 2000], indirect=ind)     # num_buffers lands across buffers
        d.rx.publish()
        d.rx.kick()
        frame = net_hdr(num_buffers=0xAAAA) + eth_frame(500, 5)
        d.peer.send(frame)
        [u] = d.rx.wait_used(1)
        assert u.len == len(frame)
        assert u.data == frame[:10] + b"\x01\x00" + frame[12:]


def test_rx_vnet_hdr_10_no_num_buffers(make_dev):
    d = make_dev(features=0, hdr_len=10)
    d.rx.add_in([2048])
    d.rx.publish()
    d.rx.kick()
    frame = net_hdr()[:10] + eth_frame(300, 6)
    d.peer.send(frame)
    [u] = d.rx.wait_used(1)
    assert u.data == frame


def test_rx_oversize_dropped_and_chain_reused(make_dev):
    d = make_dev()
    head = d.rx.add_in([200])
    d.rx.publish()
    d.rx.kick()
    d.peer.send(net_hdr() + eth_frame(1000))           # bigger than the chain: dropped
    d.peer.send(net_hdr() + eth_frame(20))             # runt-free, fits
    [u] = d.rx.wait_used(1)
    assert u.head == head and u.len == 32
    s = d.stats(lib.VR_RX)
    assert s["drop_ring_full"] == 1 and s["packets"] == 1
    # a datagram shorter than the header: dropped, chain reused
    d.rx.add_in([200])
    d.rx.publish()
    d.rx.kick()
    d.peer.send(b"\x00" * 5)
    d.peer.send(net_hdr() + eth_frame(30))
    [u] = d.rx.wait_used(1)
    assert u.len == 42
    assert d.stats(lib.VR_RX)["drop_ring_full"] == 2


def test_rx_eagain_gives_chain_back(make_dev):
    d = make_dev()
    for _ in range(3):
        d.rx.add_in([2048])
    d.rx.publish()
    d.rx.kick()
    wait_for(lambda: d.stats(lib.VR_RX)["kicks"] >= 1)
    time.sleep(0.02)
    assert d.get_base(lib.VR_RX) == 0                   # popped, EAGAIN, rewound
    assert d.rx.used_idx() == 0
    d.peer.send(net_hdr() + eth_frame(60))
    d.rx.wait_used(1)
    assert d.get_base(lib.VR_RX) == 1


def test_rx_ring_empty_no_spin_then_kick(make_dev):
    d = make_dev()
    for i in range(4):
        d.peer.send(net_hdr() + eth_frame(60, i))      # TAP readable, no guest buffers
    time.sleep(0.05)
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.15, "worker spins on a readable TAP"
    assert d.rx.used_flags() & VRING_USED_F_NO_NOTIFY == 0       # kicks requested
    for _ in range(4):
        d.rx.add_in([2048])
    assert d.rx.publish_and_kick()
    got = d.rx.wait_used(4)
    assert [u.data[12:] for u in got] == [eth_frame(60, i) for i in range(4)]


def test_rx_not_read_when_disabled(make_dev):
    d = make_dev(rx_enabled=False)
    d.rx.add_in([2048])
    d.rx.publish()
    d.rx.kick()
    d.peer.send(net_hdr() + eth_frame(60))
    time.sleep(0.1)
    r, _, _ = select.select([d.tap], [], [], 0)
    assert r, "disabled RX ring must leave frames in the TAP"
    assert d.rx.used_idx() == 0
    with d.paused():
        lib.vr_qp_set_enabled(d.qp, lib.VR_RX, 1)
    [u] = d.rx.wait_used(1)
    assert u.data[12:] == eth_frame(60)


# ------------------------------------------------------------ MRG_RXBUF

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


def test_rx_mrg_frame_spread_and_rewind(make_dev):
    d = make_dev(features=F_V1 | F_MRG)
    with d.paused(settle=True):
        assert lib.vr_qp_set_mtu(d.qp, 9000) == 0
    for _ in range(12):
        d.rx.add_in([1000])                            # 12000 bytes >= 9018 + 12
    assert d.rx.publish_and_kick()
    frame = net_hdr(num_buffers=0x5555) + eth_frame(3000, 11)
    d.peer.send(frame)
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 4 and lens == [1000, 1000, 1000, 12]
    assert data == frame[:10] + b"\x04\x00" + frame[12:]
    # the 8 chains gathered but not filled were given back: the next frame starts there
    assert d.get_base(lib.VR_RX) == 4
    assert d.rx.used_idx() == 4
    d.peer.send(net_hdr() + eth_frame(100, 12))
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 1 and lens == [112] and data[12:] == eth_frame(100, 12)
    assert d.get_base(lib.VR_RX) == 5
    s = d.stats(lib.VR_RX)
    assert s["packets"] == 2 and s["bytes"] == 3100 and s["drop_ring_full"] == 0


def test_rx_mrg_frame_fits_exactly_and_multi_buffer_chains(make_dev):
    d = make_dev(features=F_V1 | F_MRG | F_INDIRECT)
    for i in range(6):
        d.rx.add_in([12, 300, 188], indirect=bool(i & 1))      # 500-byte chains
    d.rx.publish_and_kick()
    frame = net_hdr() + eth_frame(988, 13)                     # 1000 = exactly 2 chains
    d.peer.send(frame)
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 2 and lens == [500, 500]
    assert data == frame[:10] + b"\x02\x00" + frame[12:]
    assert d.get_base(lib.VR_RX) == 2


def test_rx_mrg_64k_gso_frames(make_dev):
    d = make_dev(features=F_V1 | F_MRG | F_GUEST_TSO4 | F_GUEST_TSO6)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    for _ in range(120):
        d.rx.add_in([1536])
    d.rx.publish_and_kick()
    sizes = [65550, 65535 + 14, 1500, 64, 30000, 65550]
    hdr = net_hdr(flags=1, gso_type=1, hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16)
    frames = [hdr + eth_frame(n, 20 + i) for i, n in enumerate(sizes)]
    got = []
    for f in frames:
        d.peer.send(f)
        got += mrg_frames(d.rx, 1)
        while d.rx.outstanding < 120:
            d.rx.add_in([1536])
        d.rx.publish_and_kick()
    for (nb, lens, data), f in zip(got, frames):
        assert nb == -(-len(f) // 1536)
        assert sum(lens) == len(f) and all(x == 1536 for x in lens[:-1])
        assert data == f[:10] + struct.pack("<H", nb) + f[12:]          # TAP header kept
    s = d.stats(lib.VR_RX)
    assert s["packets"] == len(sizes) and s["drop_ring_full"] == 0 and s["broken"] == 0


def test_rx_mrg_need_follows_features(make_dev):
    """Without GSO offloads the largest frame is MTU-bound: a bigger one is dropped
    after the (MTU-sized) gather, and its chains are reused."""
    d = make_dev(features=F_V1 | F_MRG)
    for _ in range(8):
        d.rx.add_in([1024])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(4000, 1))        # > 1518 + 12 gathered: dropped
    d.peer.send(net_hdr() + eth_frame(1514, 2))
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 2 and lens == [1024, 502] and data[12:] == eth_frame(1514, 2)
    assert d.stats(lib.VR_RX)["drop_ring_full"] == 1
    assert d.get_base(lib.VR_RX) == 2


def test_rx_mrg_short_ring(make_dev):
    """Fewer buffers posted than the largest frame needs: small frames still go
    through (read with what the ring holds); a frame too big for it is dropped."""
    d = make_dev(features=F_V1 | F_MRG | F_GUEST_TSO4)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for _ in range(3):
        d.rx.add_in([1024])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(5000, 3))        # 5012 > 3072 posted: dropped
    d.peer.send(net_hdr() + eth_frame(1800, 4))
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 2 and data[12:] == eth_frame(1800, 4)
    s = d.stats(lib.VR_RX)
    assert s["drop_ring_full"] == 1 and s["packets"] == 1
    assert d.get_base(lib.VR_RX) == 2


def test_rx_mrg_burst_order_and_eagain_rewind(make_dev):
    d = make_dev(features=F_V1 | F_MRG | F_EVENT_IDX)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for _ in range(200):
        d.rx.add_in([256])
    d.rx.publish_and_kick()
    wait_for(lambda: d.stats(lib.VR_RX)["kicks"] >= 1)
    time.sleep(0.02)
    assert d.get_base(lib.VR_RX) == 0                  # gathered, EAGAIN, all given back
    rnd = random.Random(5)
    sizes = [rnd.randrange(14, 1515) for _ in range(60)]
    for i, n in enumerate(sizes):
        d.peer.send(net_hdr() + eth_frame(n, i))
    got = []
    while len(got) < len(sizes):
        got += mrg_frames(d.rx, 1)
        while d.rx.outstanding < 200:
            d.rx.add_in([256])
        d.rx.publish_and_kick()
    assert [g[2][12:] for g in got] == [eth_frame(n, i) for i, n in enumerate(sizes)]
    assert [g[0] for g in got] == [-(-(n + 12) // 256) for n in sizes]
    assert d.get_base(lib.VR_RX) == sum(g[0] for g in got) & 0xFFFF


def test_mrg_requires_12_byte_header(make_dev):
    d = make_dev()
    with d.paused():
        assert lib.vr_qp_set_features(d.qp, F_MRG, 10) == -22
        assert lib.vr_qp_set_features(d.qp, F_MRG, 12) == 0
        assert lib.vr_qp_set_mtu(d.qp, 67) == -22
        assert lib.vr_qp_set_mtu(d.qp, 65536) == -22
        assert lib.vr_qp_set_mtu(d.qp, 68) == 0


# --------------------------------------------------------- notifications

def test_event_idx_call_suppression(make_dev):
    d = make_dev(features=F_V1 | F_EVENT_IDX)
    tx = d.tx

    def one():
        d.send([net_hdr() + eth_frame(60)])
        d.recv_tap()
        wait_for(lambda: tx.used_idx() == tx.avail_idx)
        tx.last_used = tx.used_idx()   # consume without touching used_event
        return d.stats(lib.VR_TX)

    tx.set_used_event(0)
    s = one()                                           # first call decision: always call
    assert s["calls"] == 1
    tx.set_used_event(1000)                             # far away: suppressed
    s = one()
    assert s["calls"] == 1 and s["calls_suppressed"] == 1
    tx.set_used_event(2)                                # crossing 2 -> 3: call
    s = one()
    assert s["calls"] == 2 and s["calls_suppressed"] == 1
    # the device asks for kicks with avail_event = last_avail when idle
    assert tx.avail_event() == tx.avail_idx == 3
    assert tx.used_flags() == 0
    assert read_efd(d.call_fd[lib.VR_TX]) == 2


def test_event_idx_wraparound(make_dev):
    d = make_dev(features=F_V1 | F_EVENT_IDX)
    base = 0xFFFE
    with d.paused():                                    # as after a migration
        d.mem.write_u16(d.tx.avail_gpa + 2, base)
        d.mem.write_u16(d.tx.used_gpa + 2, base)
        d.tx.avail_idx = d.tx.last_used = base
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base) == 0
    calls = 0
    for i in range(4):
        d.tx.set_used_event(d.tx.last_used)             # Linux: call me at the next one
        d.send([net_hdr() + eth_frame(60, i)])
        d.recv_tap()
        d.tx.wait_used(1)
        calls += 1
        assert d.stats(lib.VR_TX)["calls"] == calls
    assert d.tx.used_idx() == 2
    assert d.get_base(lib.VR_TX) == 2


def test_no_event_idx_call_suppression(make_dev):
    d = make_dev()
    d.tx.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    d.send([net_hdr() + eth_frame(60)])
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["calls"] == 0 and s["calls_suppressed"] == 1
    assert read_efd(d.call_fd[lib.VR_TX]) == 0
    d.tx.set_avail_flags(0)
    d.send([net_hdr() + eth_frame(60)])
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["calls"] == 1 and s["calls_suppressed"] == 1


# ---------------------------------------------------------------- hostile input

def _post(ring):
    ring.publish()
    ring.kick()


def h_next_out_of_range(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, r.alloc_buf(64), 64, VRING_DESC_F_NEXT, d.num + 3)
    r.push_avail(i)
    return lib.VR_BROKEN_DESC


def h_loop2(d, r):
    r.make_loop(2)
    return lib.VR_BROKEN_DESC


def h_loop1(d, r):
    r.make_loop(1)
    return lib.VR_BROKEN_DESC


def h_head_out_of_range(d, r):
    r.push_avail(d.num + 7)
    return lib.VR_BROKEN_DESC


def h_buffer_unmapped(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, 0x7FFF_0000_0000, 64, 0, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_buffer_wraps(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, 2**64 - 8, 64, 0, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_buffer_runs_off_the_end(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, (8 << 20) - 10, 64, 0, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_avail_idx_jump(d, r):
    r.set_avail_idx(d.num + 1)
    return lib.VR_BROKEN_AVAIL_IDX


def h_indirect_nested(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 16, VRING_DESC_F_INDIRECT, 0)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_len_24(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 64, 0, 0), (b, 64, 0, 0)], table_len=24)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_len_0(d, r):
    r.make_indirect([(r.alloc_buf(64), 64, 0, 0)], table_len=0)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_too_big(d, r):
    r.make_indirect([(r.alloc_buf(64), 64, 0, 0)], table_len=16 * (d.num + 1))
    return lib.VR_BROKEN_INDIRECT


def h_indirect_plus_next(d, r):
    [i] = r.reserve_desc(1)
    t = r.alloc_buf(64)
    d.mem.write(t, struct.pack("<QIHH", r.alloc_buf(64), 64, 0, 0))
    r.write_desc(i, t, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, i)
    r.push_avail(i)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_loop(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 64, VRING_DESC_F_NEXT, 1), (b, 64, VRING_DESC_F_NEXT, 0)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_next_out_of_table(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 64, VRING_DESC_F_NEXT, 2), (b, 64, 0, 0)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_table_unmapped(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, 0x7FFF_0000_0000, 32, VRING_DESC_F_INDIRECT, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_tx_writable(d, r):
    r.add_chain([net_hdr() + eth_frame(60)], [64])
    return lib.VR_BROKEN_DESC


HOSTILE = [h_next_out_of_range, h_loop2, h_loop1, h_head_out_of_range, h_buffer_unmapped,
           h_buffer_wraps, h_buffer_runs_off_the_end, h_avail_idx_jump, h_indirect_nested,
           h_indirect_len_24, h_indirect_len_0, h_indirect_too_big, h_indirect_plus_next,
           h_indirect_loop, h_indirect_next_out_of_table, h_indirect_table_unmapped,
           h_tx_writable]


def _check_broken(d, w, want):
    wait_for(lambda: d.stats(w)["broken"], what="vq broken")
    s = d.stats(w)
    assert s["broken"] == want, (s["broken"], want)
    assert s["drop_bad_desc"] == 1
    assert read_efd(d.err_fd[w]) == 1
    assert read_efd(lib.vr_qp_event_fd(d.qp)) >= 1


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__[2:])
def test_hostile_tx(make_dev, hostile):
    d = make_dev(features=F_V1 | F_INDIRECT)
    want = hostile(d, d.tx)
    _post(d.tx)
    _check_broken(d, lib.VR_TX, want)
    # the other vq keeps working, the worker is alive and pausable
    d.rx.add_in([2048])
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    [u] = d.rx.wait_used(1)
    assert u.len == 72
    with d.paused():
        pass
    # the broken vq is no longer serviced
    d.tx.add_out([net_hdr() + eth_frame(60)])
    _post(d.tx)
    time.sleep(0.05)
    assert d.tap_empty()
    assert d.stats(lib.VR_TX)["drop_bad_desc"] == 1     # logged once
    with d.paused():
        assert lib.vr_qp_reset_vq(d.qp, lib.VR_TX) == 0
        assert d.stats(lib.VR_TX)["broken"] == 0
        assert d.stats(lib.VR_TX)["drop_bad_desc"] == 0
        assert lib.vr_qp_mapped(d.qp, lib.VR_TX) == 0
    # a reset vq has no rings or kick fd: nothing is serviced until reconfigured
    d.tx.kick()
    time.sleep(0.05)
    assert d.stats(lib.VR_TX)["broken"] == 0
    assert d.tap_empty()


def test_indirect_without_feature_is_bad(make_dev):
    d = make_dev()
    d.tx.add_out([net_hdr(), eth_frame(60)], indirect=True)
    _post(d.tx)
    _check_broken(d, lib.VR_TX, lib.VR_BROKEN_DESC)


def test_indirect_table_spanning_regions_is_bad(make_dev):
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, M1)])
    d = make_dev(mem=mem, ring_region=0, features=F_V1 | F_INDIRECT)
    t = 4 * M1 - 16
    b = d.tx.alloc_buf(128)
    blob = net_hdr() + eth_frame(60)
    mem.write(b, blob)
    mem.write(t, struct.pack("<QIHH", b, 30, VRING_DESC_F_NEXT, 1)
              + struct.pack("<QIHH", b + 30, len(blob) - 30, 0, 0))
    [i] = d.tx.reserve_desc(1)
    d.tx.write_desc(i, t, 32, VRING_DESC_F_INDIRECT, 0)
    d.tx.push_avail(i)
    _post(d.tx)
    _check_broken(d, lib.VR_TX, lib.VR_BROKEN_INDIRECT)


def test_hostile_rx_readable_desc(make_dev):
    d = make_dev()
    d.rx.add_chain([b"x" * 64], [2048])
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    _check_broken(d, lib.VR_RX, lib.VR_BROKEN_DESC)
    d.send([net_hdr() + eth_frame(60)])                # TX still works
    assert d.recv_tap() == net_hdr() + eth_frame(60)
    t0 = time.process_time()                            # broken RX + readable TAP: no spin
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.15


def test_hostile_rx_readable_after_writable(make_dev):
    d = make_dev()
    a, b = d.rx.reserve_desc(2)
    d.rx.write_desc(a, d.rx.alloc_buf(64), 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, b)
    d.rx.write_desc(b, d.rx.alloc_buf(64), 64, 0, 0)
    d.rx.push_avail(a)
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    _check_broken(d, lib.VR_RX, lib.VR_BROKEN_DESC)


@pytest.mark.parametrize("features,hdr_len,sizes", [
    (F_V1, 12, [8]), (F_V1, 12, [4, 7]), (F_V1, 12, [0]), (F_V1 | F_PACKED, 12, [11]), (0, 10, [9]),
])
def test_hostile_rx_chain_shorter_than_header(make_dev, features, hdr_len, sizes):
    """Without MRG_RXBUF, an RX chain smaller than the vnet header is malformed: the
    ring stops (DESC, counted once) instead of dropping every later frame as
    ring-full; the chain is left unconsumed; TX keeps working."""
    d = make_dev(features=features, hdr_len=hdr_len)
    head = d.rx.add_in(sizes)
    _post(d.rx)
    d.peer.send(net_hdr()[:hdr_len] + eth_frame(60))
    _check_broken(d, lib.VR_RX, lib.VR_BROKEN_DESC)
    s = d.stats(lib.VR_RX)
    assert s["broken_detail"] == head and s["drop_bad_desc"] == 1 and s["drop_ring_full"] == 0
    assert d.get_base(lib.VR_RX) & 0xFFFF == (0x8000 if features & F_PACKED else 0)   # left unconsumed
    d.send([net_hdr()[:hdr_len] + eth_frame(60)])      # TX still works
    assert d.recv_tap() == net_hdr()[:hdr_len] + eth_frame(60)
    assert d.stats(lib.VR_RX)["drop_bad_desc"] == 1     # counted once


def test_rx_chain_of_exactly_the_header_is_not_malformed(make_dev):
    d = make_dev()
    d.rx.add_in([12])
    _post(d.rx)
    d.peer.send(net_hdr())                              # header-only datagram: fits
    [u] = d.rx.wait_used(1)
    assert u.len == 12
    s = d.stats(lib.VR_RX)
    assert s["broken"] == 0 and s["packets"] == 1


def test_rings_outside_memory(make_dev):
    d = make_dev()
    with d.paused():
        assert lib.vr_qp_set_addr(d.qp, lib.VR_TX, 0x1234_0000_0000, d.tx.avail_uva,
                                  d.tx.used_uva) == 0
        assert lib.vr_qp_map(d.qp) == -14                 # -EFAULT
    d.send([net_hdr() + eth_frame(60)])
    time.sleep(0.05)
    assert d.tap_empty() and d.tx.used_idx() == 0
    # a ring straddling the end of memory
    with d.paused():
        end_uva = d.mem.gpa_to_uva(0) + (8 << 20) - 100
        assert lib.vr_qp_set_addr(d.qp, lib.VR_TX, d.tx.desc_uva, d.tx.avail_uva, end_uva) == 0
        assert lib.vr_qp_map(d.qp) == -14
    # RX is unaffected
    d.rx.add_in([2048])
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    d.rx.wait_used(1)
    with d.paused():
        assert lib.vr_qp_set_addr(d.qp, lib.VR_TX, d.tx.desc_uva, d.tx.avail_uva,
                                  d.tx.used_uva) == 0
        assert lib.vr_qp_map(d.qp) == 0
    assert d.recv_tap() == net_hdr() + eth_frame(60)   # serviced after resume


# ------------------------------------------------------- control-plane API

def test_config_requires_pause_and_validates(make_dev):
    d = make_dev()
    assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 256) == -16          # -EBUSY
    assert lib.vr_qp_resume(d.qp) == -22                           # not paused
    with d.paused():
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 0) == -22
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 100) == -22
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 65536) == -22
        assert lib.vr_qp_set_num(d.qp, 2, 256) == -22
        assert lib.vr_qp_set_features(d.qp, F_V1, 11) == -22
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, 0x10000) == -22
        # nested pause
        assert lib.vr_qp_pause(d.qp) == 0
        assert lib.vr_qp_resume(d.qp) == 0
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, 0) == 0


def test_set_get_base_and_wrap(make_dev):
    d = make_dev()
    base = 65530
    with d.paused():                                    # as after a migration
        d.mem.write_u16(d.tx.avail_gpa + 2, base)
        d.mem.write_u16(d.tx.used_gpa + 2, base)
        d.tx.avail_idx = d.tx.last_used = base
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base) == 0
        b = ffi.new("uint32_t *")
        assert lib.vr_qp_get_base(d.qp, lib.VR_TX, b) == 0 and b[0] == base
    for i in range(10):
        d.send([net_hdr() + eth_frame(60, i)])
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
        d.tx.wait_used(1)
    assert d.get_base(lib.VR_TX) == (base + 10) & 0xFFFF == 4
    assert d.tx.used_idx() == 4


def test_replace_kick_fd(make_dev):
    d = make_dev()
    new = os.eventfd(0, EFD)
    with d.paused():
        assert lib.vr_qp_set_kick(d.qp, lib.VR_TX, new) == 0
        os.close(d.kick_fd[lib.VR_TX])                  # caller closes the old one at once
        d.kick_fd[lib.VR_TX] = new
        d.tx.kick_fd = new
    d.send([net_hdr() + eth_frame(60)])
    assert d.recv_tap() == net_hdr() + eth_frame(60)


def test_pause_resume_under_traffic(make_dev):
    d = make_dev(features=F_V1 | F_EVENT_IDX | F_INDIRECT)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    n_tx, n_rx = 2000, 2000
    received, stop = [], threading.Event()
    errors = []

    def reader():
        try:
            while len(received) < n_tx:
                received.append(d.peer.recv(4096))
        except Exception as e:                          # pragma: no cover
            errors.append(e)

    def sender():                                       # host -> guest via the "TAP"
        try:
            for i in range(n_rx):
                d.peer.send(net_hdr() + struct.pack("<I", i) + eth_frame(60, 0)[4:])
        except Exception as e:                          # pragma: no cover
            errors.append(e)

    def toggler():
        k = 0
        while not stop.is_set():
            assert lib.vr_qp_pause(d.qp) == 0
            if k % 3 == 0:
                assert lib.vr_qp_pause(d.qp) == 0
                assert lib.vr_qp_resume(d.qp) == 0
            assert lib.vr_qp_resume(d.qp) == 0
            k += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, sender, toggler)]
    for t in threads:
        t.start()
    rx_got = []
    i = 0
    deadline = time.monotonic() + 60
    while (i < n_tx or len(rx_got) < n_rx) and time.monotonic() < deadline:
        while i < n_tx and d.tx.outstanding < 64:
            d.tx.add_out([net_hdr(), struct.pack("<I", i) + eth_frame(60, 0)[4:]],
                         indirect=bool(i & 1))
            i += 1
            d.tx.publish_and_kick()
        while d.rx.outstanding < 32:
            d.rx.add_in([2048])
        d.rx.publish_and_kick()
        d.tx.get_used()
        rx_got += d.rx.get_used()
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(received) == n_tx
    assert [struct.unpack_from("<I", f, 12)[0] for f in received] == list(range(n_tx))
    assert [struct.unpack_from("<I", u.data, 12)[0] for u in rx_got] == list(range(n_rx))
    s_tx, s_rx = d.stats(lib.VR_TX), d.stats(lib.VR_RX)
    assert s_tx["packets"] == n_tx and s_rx["packets"] == n_rx
    assert s_tx["broken"] == 0 and s_rx["broken"] == 0
    assert s_rx["drop_ring_full"] == 0 and s_tx["drop_tap_busy"] == 0


def test_free_while_paused(make_dev):
    d = make_dev()
    assert lib.vr_qp_pause(d.qp) == 0
    # Dev.close() frees the qp while it is still paused: must not hang


# ---------------------------------------------------------------- property

@pytest.fixture(scope="module")
def prop_dev():
    d = Dev(features=F_V1 | F_INDIRECT, num=256)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield d
    d.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flen=st.one_of(st.integers(14, 2000), st.integers(2000, 65535 + 18)),
       cuts=st.lists(st.floats(0, 1), max_size=40),
       zero_len=st.integers(0, 3),
       indirect=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_tx_property_byte_identical(prop_dev, flen, cuts, zero_len, indirect, seed):
    d = prop_dev
    blob = net_hdr() + eth_frame(flen, seed)
    pts = sorted({int(c * len(blob)) for c in cuts} | {0, len(blob)})
    segs = [blob[a:b] for a, b in zip(pts, pts[1:])]
    rnd = random.Random(seed)
    for _ in range(zero_len):
        segs.insert(rnd.randrange(len(segs) + 1), b"")
    before = d.stats(lib.VR_TX)["packets"]
    d.send(segs, indirect=indirect)
    assert d.recv_tap() == blob
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["packets"] == before + 1 and s["broken"] == 0
