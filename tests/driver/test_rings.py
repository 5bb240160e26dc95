"""Self-tests of the guest-memory and split-ring doubles in tests/driver (no
vhostd involved).

A tiny pure-Python *device* (the back-end's view of a split ring, virtio 1.1
§2.6) consumes what SplitRing posts, which proves the layout; also covered:
GuestMemory regions, notification suppression (§2.6.7, §2.6.10), the raw /
hostile ring helpers and the virtio-net header. The Frontend double is tested
in driver/test_frontend.py.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

import pytest

from tests.driver import constants as C
from tests.driver.guestmem import GuestMemory
from tests.driver.split import (DeviceError, RingFull, SplitRing, net_hdr,
                                parse_net_hdr, split_ring_layout, vring_need_event)


# ============================================================================
# A minimal device-side split ring reader (independent of SplitRing's code:
# it only knows desc/avail/used addresses and the spec's layout).
# ============================================================================
class Device:
    def __init__(self, mem: GuestMemory, num: int, desc: int, avail: int, used: int,
                 base: int = 0):
        self.mem, self.num = mem, num
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail = base
        self.used_idx = base

    def _desc(self, table: int, i: int):
        return struct.unpack("<QIHH", self.mem.read(table + 16 * i, 16))

    def pop(self):
        """Next available chain as (head, [(addr, len, flags)]) or None.
        Bounded walk; raises on loops / nesting like a careful device."""
        avail_idx = struct.unpack("<H", self.mem.read(self.avail + 2, 2))[0]
        if avail_idx == self.last_avail:
            return None
        assert (avail_idx - self.last_avail) & 0xFFFF <= self.num
        slot = self.last_avail % self.num
        head = struct.unpack("<H", self.mem.read(self.avail + 4 + 2 * slot, 2))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        out = []
        table, tnum, i, hops = self.desc, self.num, head, 0
        while True:
            hops += 1
            if hops > self.num:
                raise RuntimeError("descriptor loop")
            addr, ln, fl, nx = self._desc(table, i)
            if fl & C.VRING_DESC_F_INDIRECT:
                assert table == self.desc, "nested indirect"
                assert ln % 16 == 0 and ln > 0
                table, tnum, i, hops = addr, ln // 16, 0, 0
                continue
            out.append((addr, ln, fl))
            if not fl & C.VRING_DESC_F_NEXT:
                break
            assert nx < tnum
            i = nx
        return head, out

    def read_chain(self, descs) -> bytes:
        return b"".join(self.mem.read(a, n) for a, n, f in descs
                        if not f & C.VRING_DESC_F_WRITE)

    def write_chain(self, descs, data: bytes) -> int:
        pos = 0
        for a, n, f in descs:
            if f & C.VRING_DESC_F_WRITE and pos < len(data):
                k = min(n, len(data) - pos)
                self.mem.write(a, data[pos:pos + k])
                pos += k
        return pos

    def push_used(self, head: int, ln: int, publish: bool = True) -> None:
        slot = self.used_idx % self.num
        self.mem.write(self.used + 4 + 8 * slot, struct.pack("<II", head, ln))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.mem.write(self.used + 2, struct.pack("<H", self.used_idx))

    def avail_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.avail, 2))[0]

    def used_event(self) -> int:          # avail->ring[num]
        return struct.unpack("<H", self.mem.read(self.avail + 4 + 2 * self.num, 2))[0]

    def set_avail_event(self, v: int) -> None:   # used->ring[num]
        self.mem.write(self.used + 4 + 8 * self.num, struct.pack("<H", v))


def device_for(ring: SplitRing, base: int = 0) -> Device:
    return Device(ring.mem, ring.num, ring.desc_gpa, ring.avail_gpa, ring.used_gpa, base)


# ============================================================================
# Guest memory
# ============================================================================
def test_guestmem_single_region(mem):
    [(gpa, size, uva, off, fd)] = list(mem.regions())
    assert (gpa, size, uva, off) == (0, 4 << 20, 0x7F00_0000_0000, 0)
    a = mem.alloc(100, 64)
    b = mem.alloc(10, 4096)
    assert a % 64 == 0 and b % 4096 == 0 and b >= a + 100
    mem.write(a, b"hello")
    assert mem.read(a, 5) == b"hello"
    mem.write_u16(a + 6, 0xBEEF)
    mem.write_u32(a + 9, 0x12345678)          # unaligned: byte path
    assert mem.read(a + 6, 2) == b"\xef\xbe"
    assert mem.read_u32(a + 9) == 0x12345678
    assert mem.gpa_to_uva(a) == 0x7F00_0000_0000 + a
    assert mem.uva_to_gpa(0x7F00_0000_0000 + a) == a
    with pytest.raises(ValueError):
        mem.read(size - 2, 4)
    with pytest.raises(MemoryError):
        mem.alloc(size)


@pytest.mark.parametrize("shared", [False, True])
def test_guestmem_two_regions_and_backend_mapping(shared):
    """A back-end maps size + mmap_offset of each fd from 0 and finds gpa g at
    mmap_offset + (g - gpa): check that formula against what the driver wrote."""
    layout = [(0, 1 << 20), (1 << 32, 2 << 20)]
    with GuestMemory(layout=layout, shared_fd=shared) as m:
        regs = list(m.regions())
        assert [(r[0], r[1]) for r in regs] == layout
        assert regs[1][2] == 0x7F00_0000_0000 + (1 << 32)
        if shared:
            assert regs[0][4] == regs[1][4] and regs[1][3] == 1 << 20
        else:
            assert regs[0][4] != regs[1][4] and regs[1][3] == 0
        g2 = m.alloc(64, region=1)
        assert g2 >= 1 << 32
        m.write(g2, b"region-two")
        m.write(0x100, b"region-one")
        for gpa, size, uva, off, fd in regs:
            mm = mmap.mmap(fd, size + off, mmap.MAP_SHARED, mmap.PROT_READ)
            probe = g2 if gpa else 0x100
            host = off + (probe - gpa)
            assert mm[host:host + 10] == (b"region-two" if gpa else b"region-one")
            mm.close()
        with pytest.raises(ValueError):
            m.read((1 << 20) + 5, 1)          # the hole between the regions


def test_guestmem_adjacent_regions_cross():
    with GuestMemory(layout=[(0, 4096), (4096, 4096)]) as m:
        m.write(4090, b"0123456789")
        assert m.read(4090, 10) == b"0123456789"


# ============================================================================
# Split ring layout
# ============================================================================
@pytest.mark.parametrize("num", [1, 2, 4, 64, 256, 1024, 32768])
def test_split_layout_formulas(num):
    d, a, u, total = split_ring_layout(num)
    assert d == 0 and a == 16 * num
    assert u == (16 * num + 6 + 2 * num + 3) & ~3
    assert total == u + 6 + 8 * num
    d, a, u, total = split_ring_layout(num, 4096)
    # Linux vring_init(): used = ALIGN(&avail->ring[num] + sizeof(u16), align)
    assert u == (16 * num + 4 + 2 * num + 2 + 4095) & ~4095


@pytest.mark.parametrize("num", [1, 8, 256])
@pytest.mark.parametrize("used_align", [4, 4096])
def test_split_ring_addresses(mem, num, used_align):
    r = SplitRing(mem, num, used_align=used_align)
    assert r.desc_gpa % 16 == 0 and r.avail_gpa % 2 == 0 and r.used_gpa % 4 == 0
    assert r.avail_gpa == r.desc_gpa + 16 * num
    assert r.used_gpa % used_align == 0
    assert r.used_gpa >= r.avail_gpa + 6 + 2 * num
    assert r.used_event_gpa == r.avail_gpa + 4 + 2 * num
    assert r.avail_event_gpa == r.used_gpa + 4 + 8 * num
    assert r.desc_uva == 0x7F00_0000_0000 + r.desc_gpa
    assert (r.avail_uva, r.used_uva) == (mem.gpa_to_uva(r.avail_gpa), mem.gpa_to_uva(r.used_gpa))


def test_split_ring_separate_parts_in_second_region():
    with GuestMemory(layout=[(0, 1 << 20), (1 << 32, 1 << 20)]) as m:
        d = m.alloc(16 * 8, 16, region=1)
        r = SplitRing(m, 8, desc_gpa=d, region=0, buf_region=1)
        assert r.desc_gpa == d and r.avail_gpa < 1 << 20 and r.used_gpa % 4 == 0
        h = r.add_out([b"abc"])
        r.publish()
        head, descs = device_for(r).pop()
        assert head == h and descs[0][0] >= 1 << 32


# ============================================================================
# Split ring: the device consumes what the driver posts
# ============================================================================
def test_tx_chain_direct(mem):
    r = SplitRing(mem, 8)
    dev = device_for(r)
    assert dev.pop() is None
    h = r.add_out([net_hdr(), b"A" * 60, b"B" * 3])
    assert dev.pop() is None                  # not published yet
    assert r.publish() == 1
    head, descs = dev.pop()
    assert head == h and len(descs) == 3
    assert [d[1] for d in descs] == [12, 60, 3]
    assert all(d[2] & C.VRING_DESC_F_WRITE == 0 for d in descs)
    assert [d[2] & C.VRING_DESC_F_NEXT for d in descs] == [1, 1, 0]
    assert dev.read_chain(descs) == net_hdr() + b"A" * 60 + b"B" * 3
    assert r.num_free == 5
    dev.push_used(head, 0)
    [u] = r.get_used()
    assert (u.head, u.len, u.data) == (h, 0, b"")
    assert r.num_free == 8 and r.outstanding == 0


def test_tx_chain_indirect(mem):
    r = SplitRing(mem, 4, indirect=True)
    dev = device_for(r)
    h = r.add_out([b"x" * 12, b"y" * 100, b"z"])
    single = r.add_out([b"only"])             # Linux: 1 buffer -> no indirect table
    r.publish()
    addr, ln, fl, nx = r.read_desc(h)
    assert fl == C.VRING_DESC_F_INDIRECT and ln == 48
    head, descs = dev.pop()
    assert head == h and dev.read_chain(descs) == b"x" * 12 + b"y" * 100 + b"z"
    assert r.read_desc(single)[2] == 0
    assert dev.read_chain(dev.pop()[1]) == b"only"
    assert r.num_free == 2


def test_rx_chain_and_data(mem):
    r = SplitRing(mem, 8)
    dev = device_for(r)
    h = r.add_in([100, 200])
    h2 = r.add_in([1526], indirect=True)
    r.publish()
    head, descs = dev.pop()
    assert head == h and all(d[2] & C.VRING_DESC_F_WRITE for d in descs)
    payload = bytes(range(256)) * 1
    payload = payload[:250]
    assert dev.write_chain(descs, payload) == 250
    dev.push_used(head, 250)
    head2, descs2 = dev.pop()
    assert head2 == h2 and descs2[0][1] == 1526
    dev.write_chain(descs2, b"q" * 64)
    dev.push_used(head2, 64)
    used = r.get_used()
    assert [(u.head, u.len) for u in used] == [(h, 250), (h2, 64)]
    assert used[0].data == payload and used[1].data == b"q" * 64


def test_mixed_chain_readable_then_writable(mem):
    r = SplitRing(mem, 8)
    h = r.add_chain([b"request"], [16])
    r.publish()
    _, descs = device_for(r).pop()
    assert [bool(d[2] & C.VRING_DESC_F_WRITE) for d in descs] == [False, True]
    assert h == 0


def test_ring_full_and_head_recycling(mem):
    r = SplitRing(mem, 4)
    dev = device_for(r)
    heads = [r.add_out([b"a"]) for _ in range(4)]
    assert sorted(heads) == [0, 1, 2, 3]
    with pytest.raises(RingFull):
        r.add_out([b"b"])
    r.publish()
    for _ in range(4):
        h, d = dev.pop()
        dev.push_used(h, 0)
    assert len(r.get_used()) == 4
    # Out-of-order completion and chains of different lengths, many rounds.
    for round_ in range(200):
        a = r.add_out([b"1", b"2"])
        b = r.add_in([8])
        r.publish()
        ca, cb = dev.pop(), dev.pop()
        dev.push_used(cb[0], 3)
        dev.push_used(ca[0], 0)
        got = r.get_used()
        assert [g.head for g in got] == [b, a]
        assert r.num_free == 4
    assert r.avail_idx == 4 + 400 and r.last_used == 4 + 400


def test_u16_wraparound(mem):
    r = SplitRing(mem, 8)
    start = 0xFFF0
    r.set_avail_idx(start)
    r.last_used = start
    mem.write_u16(r.used_gpa + 2, start)
    dev = device_for(r, base=start)
    for i in range(64):
        h = r.add_in([32])
        r.publish()
        head, descs = dev.pop()
        assert head == h
        dev.write_chain(descs, bytes([i]) * 32)
        dev.push_used(head, 32)
        [u] = r.get_used()
        assert u.data == bytes([i]) * 32
    assert r.avail_idx == (start + 64) & 0xFFFF == r.read_avail_idx()


def test_device_errors_are_caught(mem):
    r = SplitRing(mem, 4)
    dev = device_for(r)
    r.add_in([10])
    r.publish()
    h, _ = dev.pop()
    dev.push_used(h, 11)                      # longer than the writable buffer
    with pytest.raises(DeviceError, match="capacity"):
        r.get_used()

    r2 = SplitRing(mem, 4)
    device_for(r2).push_used(3, 0)            # never posted
    with pytest.raises(DeviceError, match="not outstanding"):
        r2.get_used()

    r3 = SplitRing(mem, 4)
    mem.write_u16(r3.used_gpa + 2, 5)         # used.idx more than num ahead
    with pytest.raises(DeviceError, match="ahead"):
        r3.get_used()

    r4 = SplitRing(mem, 4, strict=False)
    device_for(r4).push_used(2, 7)
    [u] = r4.get_used()
    assert (u.head, u.len, u.data) == (2, 7, None)


# ============================================================================
# Notifications (§2.6.7, §2.6.10)
# ============================================================================
def test_vring_need_event_arithmetic():
    # Kick iff event lies in [old, new) modulo 2^16.
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(4, 10, 0)
    assert not vring_need_event(10, 10, 0)
    assert not vring_need_event(3, 10, 5)
    assert vring_need_event(0xFFFF, 2, 0xFFFE)     # across the wrap
    assert vring_need_event(0, 2, 0xFFFE)
    assert not vring_need_event(2, 2, 0xFFFE)
    for old in (0, 0x7FFF, 0xFFF0):
        for n in range(1, 20):
            new = (old + n) & 0xFFFF
            for k in range(-3, 25):
                event = (old + k) & 0xFFFF
                assert vring_need_event(event, new, old) == (0 <= k < n)


def test_needs_kick_flags_mode(mem):
    r = SplitRing(mem, 8)
    r.add_out([b"a"])
    r.publish()
    assert r.needs_kick()
    mem.write_u16(r.used_gpa, C.VRING_USED_F_NO_NOTIFY)
    r.add_out([b"a"])
    r.publish()
    assert not r.needs_kick()


def test_needs_kick_event_idx(mem):
    r = SplitRing(mem, 8, event_idx=True)
    dev = device_for(r)
    dev.set_avail_event(0)
    r.add_out([b"a"])
    r.add_out([b"b"])
    r.publish()
    assert r.needs_kick()                     # avail_event 0 in [0, 2)
    dev.set_avail_event(5)
    r.add_out([b"c"])
    r.publish()
    assert not r.needs_kick()                 # 5 not in [2, 3)
    dev.set_avail_event(3)
    r.add_out([b"d"])
    r.add_out([b"e"])
    r.publish()
    assert r.needs_kick()                     # 3 in [3, 5)
    # used_event follows last_used after get_used (Linux).
    for _ in range(2):
        h, _ = dev.pop()
        dev.push_used(h, 0)
    r.get_used()
    assert dev.used_event() == 2 == r.used_event()
    r.disable_interrupts()
    assert dev.used_event() == 0
    assert r.enable_interrupts() is False and dev.used_event() == 2


def test_interrupt_flag_mode(mem):
    r = SplitRing(mem, 8)
    dev = device_for(r)
    r.disable_interrupts()
    assert dev.avail_flags() == C.VRING_AVAIL_F_NO_INTERRUPT
    assert r.enable_interrupts() is False
    assert dev.avail_flags() == 0


def test_kick_and_wait_used_with_eventfds(mem):
    r = SplitRing(mem, 8)
    r.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
    r.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        dev = device_for(r)
        r.add_in([64])
        assert r.publish_and_kick()
        assert os.eventfd_read(r.kick_fd) == 1

        def device_thread():
            time.sleep(0.05)
            h, d = dev.pop()
            dev.write_chain(d, b"z" * 64)
            dev.push_used(h, 64)
            os.eventfd_write(r.call_fd, 1)
        t = threading.Thread(target=device_thread)
        t.start()
        [u] = r.wait_used(1, timeout=5)
        t.join()
        assert u.data == b"z" * 64
        with pytest.raises(TimeoutError):
            r.wait_used(1, timeout=0.05)
    finally:
        os.close(r.kick_fd)
        os.close(r.call_fd)


# ============================================================================
# Raw / hostile helpers
# ============================================================================
def test_raw_loop_and_indirect(mem):
    r = SplitRing(mem, 8)
    dev = device_for(r)
    r.make_loop(3)
    r.publish()
    with pytest.raises(RuntimeError, match="loop"):
        dev.pop()
    h = r.make_indirect([(0x1000, 10, 0, 0)], table_len=15)
    r.publish()
    assert r.read_desc(h)[1:3] == (15, C.VRING_DESC_F_INDIRECT)
    with pytest.raises(AssertionError):
        dev.pop()
    [d] = r.reserve_desc()
    r.write_desc(d, 0xDEAD_BEEF_0000, 0xFFFF_FFFF, C.VRING_DESC_F_WRITE, 0)
    assert r.read_desc(d) == (0xDEAD_BEEF_0000, 0xFFFF_FFFF, C.VRING_DESC_F_WRITE, 0)
    r.push_avail(d)
    r.set_avail_idx(r.avail_idx + 100, shadow=False)
    assert r.read_avail_idx() == (r.avail_idx + 100) & 0xFFFF
    with pytest.raises(AssertionError):       # device refuses idx > num ahead
        dev.pop()


# ============================================================================
# virtio-net header
# ============================================================================
def test_net_hdr_bytes():
    assert net_hdr() == bytes(12)
    b = net_hdr(flags=C.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=C.VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16, num_buffers=3)
    assert b == bytes([1, 1, 54, 0, 0xA8, 0x05, 34, 0, 16, 0, 3, 0])
    h = parse_net_hdr(b + b"payload")
    assert (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset,
            h.num_buffers) == (1, 1, 54, 1448, 34, 16, 3)
