"""Guest-side split virtqueue driver (virtio 1.1 §2.6), the role Linux's
drivers/virtio/virtio_ring.c plays in a guest, over GuestMemory.

Layout (one contiguous block, as vring_init() lays it out):
    desc   at p                      16 * num   (le64 addr, le32 len, le16 flags, le16 next)
    avail  at p + 16*num             6 + 2*num  (le16 flags, le16 idx, le16 ring[num], le16 used_event)
    used   at align(avail + 6 + 2*num, used_align)
                                     6 + 8*num  (le16 flags, le16 idx, {le32 id, le32 len}[num], le16 avail_event)
used_align defaults to 4 (the spec minimum, §2.6 "Queue Part Alignment"), the
tightest layout a device must accept; Linux's legacy layout uses 4096.

Ordering: descriptors and avail ring entries are written before avail.idx
(publish); used.idx is read before the used ring entries (get_used).  On x86
CPython stores land in program order, and scalar ring fields are written with
single native stores (GuestMemory.write_u16), so the device never sees a torn
index.

The driver checks what the device hands back (ids it never posted, used.idx
running ahead, len beyond the writable capacity) and raises DeviceError: that
is how the back-end's bugs surface.  Hostile tests use the raw helpers at the
end of the class.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from .constants import (
    VIRTIO_NET_HDR_SIZE, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
)
from .guestmem import GuestMemory, align_up
from .ring import RingDriver

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class RingFull(Exception):
    """Not enough free descriptors for the chain."""


class DeviceError(AssertionError):
    """The device (back-end) broke the split-ring contract."""


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio 1.1 §2.6.7.2 / Linux vring_need_event, u16 wrap-around arithmetic."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def split_ring_layout(num: int, used_align: int = 4) -> tuple[int, int, int, int]:
    """(desc_off, avail_off, used_off, total_size) of a contiguous split ring."""
    desc_off = 0
    avail_off = 16 * num
    used_off = align_up(avail_off + 6 + 2 * num, used_align)
    return desc_off, avail_off, used_off, used_off + 6 + 8 * num


@dataclass
class Used:
    head: int
    len: int
    data: bytes | None       # first `len` bytes of the writable buffers (b"" for out-only)


@dataclass
class _Chain:
    descs: list[int]                        # ring descriptor indices (1 if indirect)
    bufs: list[tuple[int, int, bool]]       # (gpa, len, writable) in chain order
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (cls, gpa) to recycle
    in_capacity: int = 0


class SplitRing(RingDriver):
    def __init__(self, mem: GuestMemory, num: int, *, event_idx: bool = False,
                 indirect: bool = False, used_align: int = 4,
                 region: int | None = None, buf_region: int | None = None,
                 desc_gpa: int | None = None, avail_gpa: int | None = None,
                 used_gpa: int | None = None, strict: bool = True):
        if not 1 <= num <= 32768:
            raise ValueError("queue size out of range")
        self.mem = mem
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.strict = strict
        self.buf_region = buf_region
        if desc_gpa is None and avail_gpa is None and used_gpa is None:
            d, a, u, total = split_ring_layout(num, used_align)
            base = mem.alloc(total, 4096, region)
            desc_gpa, avail_gpa, used_gpa = base + d, base + a, base + u
        else:
            if desc_gpa is None:
                desc_gpa = mem.alloc(16 * num, 16, region)
            if avail_gpa is None:
                avail_gpa = mem.alloc(6 + 2 * num, 2, region)
            if used_gpa is None:
                used_gpa = mem.alloc(6 + 8 * num, used_align, region)
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        mem.fill(desc_gpa, 16 * num)
        mem.fill(avail_gpa, 6 + 2 * num)
        mem.fill(used_gpa, 6 + 8 * num)

        self.avail_idx = 0          # shadow of avail.idx (u16)
        self.last_used = 0          # next used.ring slot to consume (u16)
        self._num_added = 0         # since the last needs_kick()
        self._avail_flags = 0
        self._cb_disabled = False
        # Free descriptors as a stack; freed chains go back on top in chain
        # order, like Linux's free_head list.
        self._free = list(range(num - 1, -1, -1))
        self._chains: dict[int, _Chain] = {}
        self._pool: dict[int, list[int]] = {}
        self.kick_fd: int | None = None     # set by Frontend.setup_net
        self.call_fd: int | None = None

    # --- addresses ----------------------------------------------------------
    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.mem.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.mem.gpa_to_uva(self.used_gpa)

    @property
    def used_event_gpa(self) -> int:        # avail->ring[num]
        return self.avail_gpa + 4 + 2 * self.num

    @property
    def avail_event_gpa(self) -> int:       # used->ring[num]
        return self.used_gpa + 4 + 8 * self.num

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        return len(self._chains)

    # --- posting ------------------------------------------------------------
    def add_chain(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (),
                  indirect: bool | None = None) -> int:
        """Post a chain: device-readable buffers `out` (one descriptor each)
        followed by device-writable buffers of `in_sizes`.  indirect=None uses
        an indirect table when the ring was created with indirect=True and the
        chain has more than one buffer (Linux's rule).  Returns the head id;
        the chain is visible to the device after publish()."""
        n = len(out) + len(in_sizes)
        if n == 0:
            raise ValueError("empty chain")
        use_ind = (self.indirect and n > 1) if indirect is None else indirect
        need = 1 if use_ind else n
        if need > len(self._free):
            raise RingFull(f"{need} descriptors needed, {len(self._free)} free")
        ch = _Chain([], [])
        self._fill(ch, out, in_sizes)
        entries = [(gpa, ln, VRING_DESC_F_WRITE if w else 0) for gpa, ln, w in ch.bufs]
        if use_ind:
            cls, table = self._chunk(16 * n)
            ch.chunks.append((cls, table))
            for i, (gpa, ln, fl) in enumerate(entries):
                last = i == n - 1
                self.mem.write(table + 16 * i, _DESC.pack(
                    gpa, ln, fl | (0 if last else VRING_DESC_F_NEXT), 0 if last else i + 1))
            head = self._free.pop()
            ch.descs = [head]
            self.write_desc(head, table, 16 * n, VRING_DESC_F_INDIRECT, 0)
        else:
            ch.descs = [self._free.pop() for _ in range(n)]
            for i, (gpa, ln, fl) in enumerate(entries):
                last = i == n - 1
                self.write_desc(ch.descs[i], gpa, ln,
                                fl | (0 if last else VRING_DESC_F_NEXT),
                                0 if last else ch.descs[i + 1])
            head = ch.descs[0]
        self._chains[head] = ch
        self.push_avail(head)
        return head

    def publish(self) -> int:
        """Make every entry added so far visible: store avail.idx (after the
        ring entries, which add_* already wrote).  Returns the new idx."""
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)
        return self.avail_idx

    def needs_kick(self) -> bool:
        """Linux virtqueue_kick_prepare_split(): with EVENT_IDX,
        vring_need_event(avail_event, new, old); otherwise kick unless the
        device set VRING_USED_F_NO_NOTIFY.  Covers entries since the last call."""
        new = self.avail_idx
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        if self.event_idx:
            return vring_need_event(self.avail_event(), new, old)
        return not (self.used_flags() & VRING_USED_F_NO_NOTIFY)

    # --- completion -----------------------------------------------------------
    def get_used(self) -> list[Used]:
        """Consume every used entry the device published since the last call;
        free their descriptors.  With EVENT_IDX (and interrupts enabled) writes
        used_event = last_used afterwards, as Linux does."""
        idx = self.used_idx()
        ahead = (idx - self.last_used) & 0xFFFF
        if ahead > self.num:
            raise DeviceError(f"used.idx {idx:#x} is {ahead} ahead of last_used "
                              f"{self.last_used:#x} (queue size {self.num})")
        res: list[Used] = []
        while self.last_used != idx:
            slot = self.last_used % self.num
            head, ln = _USED_ELEM.unpack(
                self.mem.read(self.used_gpa + 4 + 8 * slot, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            ch = self._chains.pop(head, None)
            if ch is None:
                if self.strict:
                    raise DeviceError(f"used id {head} was not outstanding")
                res.append(Used(head, ln, None))
                continue
            if ln > ch.in_capacity and self.strict:
                self._chains[head] = ch
                raise DeviceError(f"used len {ln} for head {head} exceeds the "
                                  f"writable capacity {ch.in_capacity}")
            data = bytearray()
            want = min(ln, ch.in_capacity)
            for gpa, blen, w in ch.bufs:
                if not w or len(data) >= want:
                    continue
                data += self.mem.read(gpa, min(blen, want - len(data)))
            for d in reversed(ch.descs):
                self._free.append(d)
            self._release(ch.chunks)
            res.append(Used(head, ln, bytes(data)))
        if self.event_idx and not self._cb_disabled:
            self.set_used_event(self.last_used)
        return res

    def _progress(self) -> str:
        return f"used.idx={self.used_idx()}, avail.idx={self.avail_idx}"

    # --- notification suppression (§2.6.7, §2.6.10) -------------------------
    def disable_interrupts(self) -> None:
        """Linux virtqueue_disable_cb_split: NO_INTERRUPT in avail.flags, or
        with EVENT_IDX used_event = 0 (Linux's own 'hack' value)."""
        self._cb_disabled = True
        if self.event_idx:
            self.set_used_event(0)
        else:
            self.set_avail_flags(self._avail_flags | VRING_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> bool:
        """Re-enable calls; returns True if used entries are already pending
        (the caller must poll once more, the race every driver handles)."""
        self._cb_disabled = False
        if self.event_idx:
            self.set_used_event(self.last_used)
        else:
            self.set_avail_flags(self._avail_flags & ~VRING_AVAIL_F_NO_INTERRUPT)
        return self.used_idx() != self.last_used

    def set_avail_flags(self, flags: int) -> None:
        self._avail_flags = flags & 0xFFFF
        self.mem.write_u16(self.avail_gpa, self._avail_flags)

    def set_used_event(self, v: int) -> None:
        self.mem.write_u16(self.used_event_gpa, v)

    def used_event(self) -> int:
        return self.mem.read_u16(self.used_event_gpa)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.avail_event_gpa)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_gpa)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_gpa + 2)

    def read_avail_idx(self) -> int:
        return self.mem.read_u16(self.avail_gpa + 2)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        return _USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * (slot % self.num), 8))

    # --- raw access for hostile tests ----------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0,
                   next: int = 0) -> None:
        """Write descriptor i verbatim (any values; i is taken modulo num)."""
        self.mem.write(self.desc_gpa + 16 * (i % self.num),
                       _DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF,
                                  flags & 0xFFFF, next & 0xFFFF))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of descriptor i."""
        return _DESC.unpack(self.mem.read(self.desc_gpa + 16 * (i % self.num), 16))

    def reserve_desc(self, n: int = 1) -> list[int]:
        """Take n descriptor indices off the free list for hand-built chains
        (the driver will not reuse them)."""
        if n > len(self._free):
            raise RingFull("not enough free descriptors")
        return [self._free.pop() for _ in range(n)]

    def push_avail(self, head: int) -> None:
        """Write avail.ring[avail_idx % num] = head and advance the shadow idx
        (not published).  Any u16 value is accepted."""
        self.mem.write_u16(self.avail_gpa + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._num_added += 1

    def set_avail_ring(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.avail_gpa + 4 + 2 * (slot % self.num), head)

    def set_avail_idx(self, v: int, shadow: bool = True) -> None:
        """Store avail.idx = v verbatim (e.g. num + 5 ahead); shadow=True also
        moves the driver's own idx so later adds continue from there."""
        self.mem.write_u16(self.avail_gpa + 2, v)
        if shadow:
            self.avail_idx = v & 0xFFFF

    def make_loop(self, length: int = 2, buf_len: int = 64, write: bool = False) -> int:
        """Post (unpublished) a chain whose `next` links form a cycle of
        `length` descriptors (length 1 = a descriptor pointing at itself).
        Returns the head; the descriptors stay reserved."""
        ids = self.reserve_desc(length)
        buf = self.alloc_buf(buf_len)
        fl = VRING_DESC_F_NEXT | (VRING_DESC_F_WRITE if write else 0)
        for k, d in enumerate(ids):
            self.write_desc(d, buf, buf_len, fl, ids[(k + 1) % length])
        self.push_avail(ids[0])
        return ids[0]

    def make_indirect(self, entries: Sequence[tuple[int, int, int, int]],
                      table_len: int | None = None) -> int:
        """Post (unpublished) one INDIRECT descriptor whose table holds the raw
        (addr, len, flags, next) entries; table_len overrides the descriptor's
        len (e.g. not a multiple of 16, or 0).  Returns the head."""
        [d] = self.reserve_desc(1)
        table = self.alloc_buf(max(16 * len(entries), 16))
        for k, (a, ln, fl, nx) in enumerate(entries):
            self.mem.write(table + 16 * k, _DESC.pack(a, ln, fl, nx))
        self.write_desc(d, table, 16 * len(entries) if table_len is None else table_len,
                        VRING_DESC_F_INDIRECT, 0)
        self.push_avail(d)
        return d


# --- virtio-net header (virtio_net_hdr_v1, §5.1.6) ---------------------------
_NET_HDR = struct.Struct("<BBHHHHH")
assert _NET_HDR.size == VIRTIO_NET_HDR_SIZE


class NetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int
    num_buffers: int


def net_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """12-byte virtio_net_hdr_v1: u8 flags, u8 gso_type, le16 hdr_len,
    gso_size, csum_start, csum_offset, num_buffers."""
    return _NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start,
                         csum_offset, num_buffers)


def parse_net_hdr(b: bytes) -> NetHdr:
    return NetHdr(*_NET_HDR.unpack_from(b, 0))
