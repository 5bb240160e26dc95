"""Guest-side packed virtqueue driver (virtio 1.1 §2.7), the role Linux's
virtqueue_*_packed functions play in a guest, over GuestMemory.  Same API as
SplitRing (add_out/add_in/publish/kick/get_used/wait_used, notification
suppression, indirect tables, raw hostile helpers) so tests can run the same
traffic over both ring kinds.

Layout (SET_VRING_ADDR carries three addresses, as for split rings):
    desc ring      desc_uva   16 * num  (le64 addr, le32 len, le16 id, le16 flags)
    driver area    avail_uva  4         (le16 off_wrap, le16 flags): written by us
    device area    used_uva   4         (le16 off_wrap, le16 flags): written by the device
Any queue size 1..32768 (no power-of-two rule).

A descriptor is made available by writing its flags with AVAIL = our wrap counter
and USED = its inverse; a chain's head flags are written last, at publish(), so
the device sees a chain whole.  The device writes a used descriptor (id, len,
then flags with AVAIL = USED = its wrap counter) at the slot of the chain's head
and skips the chain's other slots; get_used() follows it the same way.

The driver checks what the device hands back (ids it never posted, a len beyond
the writable capacity) and raises DeviceError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Sequence

from .constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from .guestmem import GuestMemory
from .ring import RingDriver
from .split import DeviceError, RingFull, Used

_DESC = struct.Struct("<QIHH")
_EVENT = struct.Struct("<HH")

VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
VRING_PACKED_EVENT_FLAG_ENABLE = 0
VRING_PACKED_EVENT_FLAG_DISABLE = 1
VRING_PACKED_EVENT_FLAG_DESC = 2
VRING_PACKED_EVENT_F_WRAP_CTR = 15


def avail_bits(wrap: bool) -> int:
    """AVAIL/USED bits that make a descriptor available in lap `wrap`."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


def used_bits(wrap: bool) -> int:
    return (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if wrap else 0


@dataclass
class _Chain:
    ndesc: int                                   # ring slots the chain occupies
    bufs: list[tuple[int, int, bool]]            # (gpa, len, writable) in chain order
    chunks: list[tuple[int, int]] = field(default_factory=list)
    in_capacity: int = 0


class PackedRing(RingDriver):
    def __init__(self, mem: GuestMemory, num: int, *, event_idx: bool = False,
                 indirect: bool = False, region: int | None = None,
                 buf_region: int | None = None, strict: bool = True, **_ignored):
        if not 1 <= num <= 32768:
            raise ValueError("queue size out of range")
        self.mem = mem
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.strict = strict
        self.buf_region = buf_region
        self.desc_gpa = mem.alloc(16 * num, 16, region)
        self.driver_gpa = mem.alloc(4, 4, region)
        self.device_gpa = mem.alloc(4, 4, region)
        mem.fill(self.desc_gpa, 16 * num)
        mem.fill(self.driver_gpa, 4)
        mem.fill(self.device_gpa, 4)

        self.next_avail = 0          # next slot to fill
        self.avail_wrap = True       # §2.7.1: wrap counters start at 1
        self.last_used = 0           # next slot the device writes a used desc at
        self.used_wrap = True
        self._num_added = 0          # descriptors since the last needs_kick()
        self._pending_heads: list[tuple[int, int]] = []   # (slot, flags) until publish()
        self._free_ids = list(range(num - 1, -1, -1))
        self._num_free = num         # free ring slots
        self._chains: dict[int, _Chain] = {}
        self._pool: dict[int, list[int]] = {}
        self._cb_disabled = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        if event_idx:
            self.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, 0, True)

    # --- addresses ----------------------------------------------------------
    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:          # driver event suppression area
        return self.mem.gpa_to_uva(self.driver_gpa)

    @property
    def used_uva(self) -> int:           # device event suppression area
        return self.mem.gpa_to_uva(self.device_gpa)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def outstanding(self) -> int:
        return len(self._chains)

    @property
    def avail_pos(self) -> int:
        """next_avail | wrap << 15: what the device's avail half of GET_VRING_BASE
        reports once it has consumed everything published."""
        return self.next_avail | (int(self.avail_wrap) << 15)

    # --- posting ----------------------------------------------------------------
    def _advance(self) -> None:
        self.next_avail += 1
        if self.next_avail == self.num:
            self.next_avail = 0
            self.avail_wrap = not self.avail_wrap

    def _write_chain(self, entries: Sequence[tuple[int, int, int]], bid: int) -> int:
        """Lay (addr, len, flags-without-avail-bits) entries out from next_avail;
        every descriptor carries the buffer id; the head's flags are deferred to
        publish().  Returns the head slot."""
        head = self.next_avail
        for i, (addr, ln, fl) in enumerate(entries):
            slot, wrap = self.next_avail, self.avail_wrap
            if i < len(entries) - 1:
                fl |= VRING_DESC_F_NEXT
            flags = (fl & ~(VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)) | avail_bits(wrap)
            self.mem.write(self.desc_gpa + 16 * slot, _DESC.pack(addr, ln, bid, 0))
            if i == 0:
                self._pending_heads.append((slot, flags))
            else:
                self.mem.write_u16(self.desc_gpa + 16 * slot + 14, flags)
            self._advance()
        self._num_added += len(entries)
        return head

    def add_chain(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (),
                  indirect: bool | None = None) -> int:
        """Post a chain (readable `out` buffers, then writable buffers of
        `in_sizes`); visible to the device after publish().  Returns the buffer id."""
        n = len(out) + len(in_sizes)
        if n == 0:
            raise ValueError("empty chain")
        use_ind = (self.indirect and n > 1) if indirect is None else indirect
        need = 1 if use_ind else n
        if need > self._num_free or not self._free_ids:
            raise RingFull(f"{need} descriptors needed, {self._num_free} free")
        ch = _Chain(need, [])
        self._fill(ch, out, in_sizes)
        entries = [(gpa, ln, VRING_DESC_F_WRITE if w else 0) for gpa, ln, w in ch.bufs]
        bid = self._free_ids.pop()
        if use_ind:
            cls, table = self._chunk(16 * n)
            ch.chunks.append((cls, table))
            for i, (gpa, ln, fl) in enumerate(entries):
                self.mem.write(table + 16 * i, _DESC.pack(gpa, ln, 0, fl))
            self._write_chain([(table, 16 * n, VRING_DESC_F_INDIRECT)], bid)
        else:
            self._write_chain(entries, bid)
        self._num_free -= need
        self._chains[bid] = ch
        return bid

    def publish(self) -> int:
        """Make every chain added so far available: write the head flags, in order
        (each a single u16 store after the chain's other descriptors)."""
        for slot, flags in self._pending_heads:
            self.mem.write_u16(self.desc_gpa + 16 * slot + 14, flags)
        self._pending_heads.clear()
        return self.avail_pos

    def needs_kick(self) -> bool:
        """Linux virtqueue_kick_prepare_packed(): the device's event area decides;
        in DESC mode, kick if the descriptors added since the last call crossed
        its off_wrap."""
        added, self._num_added = self._num_added, 0
        off_wrap, flags = self.device_event()
        if flags != VRING_PACKED_EVENT_FLAG_DESC:
            return flags != VRING_PACKED_EVENT_FLAG_DISABLE
        ev = off_wrap & 0x7FFF
        if bool(off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != self.avail_wrap:
            ev -= self.num
        new = self.next_avail
        return new - added <= ev < new

    # --- completion ---------------------------------------------------------------
    def _used_ready(self) -> bool:
        flags = self.mem.read_u16(self.desc_gpa + 16 * self.last_used + 14)
        ub = flags & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)
        return ub == used_bits(self.used_wrap)

    def get_used(self) -> list[Used]:
        res: list[Used] = []
        for _ in range(self.num + 1):
            if not self._used_ready():
                break
            addr, ln, bid, _fl = _DESC.unpack(self.mem.read(self.desc_gpa + 16 * self.last_used, 16))
            ch = self._chains.pop(bid, None)
            if ch is None:
                raise DeviceError(f"used id {bid} at slot {self.last_used} was not outstanding")
            if ln > ch.in_capacity and self.strict and ch.in_capacity:
                self._chains[bid] = ch
                raise DeviceError(f"used len {ln} for id {bid} exceeds the writable "
                                  f"capacity {ch.in_capacity}")
            data = bytearray()
            want = min(ln, ch.in_capacity)
            for gpa, blen, w in ch.bufs:
                if not w or len(data) >= want:
                    continue
                data += self.mem.read(gpa, min(blen, want - len(data)))
            self.last_used += ch.ndesc
            if self.last_used >= self.num:
                self.last_used -= self.num
                self.used_wrap = not self.used_wrap
            self._num_free += ch.ndesc
            self._free_ids.append(bid)
            self._release(ch.chunks)
            res.append(Used(bid, ln, bytes(data)))
        else:
            raise DeviceError("more used descriptors than the ring holds")
        if self.event_idx and not self._cb_disabled:
            self.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, self.last_used, self.used_wrap)
        return res

    def _progress(self) -> str:
        return f"last_used={self.last_used}, next_avail={self.next_avail}"

    # --- notification suppression (§2.7.10) ------------------------------------------
    def disable_interrupts(self) -> None:
        self._cb_disabled = True
        self.set_driver_event(VRING_PACKED_EVENT_FLAG_DISABLE)

    def enable_interrupts(self) -> bool:
        self._cb_disabled = False
        if self.event_idx:
            self.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, self.last_used, self.used_wrap)
        else:
            self.set_driver_event(VRING_PACKED_EVENT_FLAG_ENABLE)
        return self._used_ready()

    def set_driver_event(self, flags: int, off: int | None = None, wrap: bool | None = None) -> None:
        """Driver event suppression: off_wrap (if given) first, then flags."""
        if off is not None:
            self.mem.write_u16(self.driver_gpa, (off & 0x7FFF) | (int(bool(wrap)) << 15))
        self.mem.write_u16(self.driver_gpa + 2, flags)

    def driver_event(self) -> tuple[int, int]:
        return _EVENT.unpack(self.mem.read(self.driver_gpa, 4))

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote."""
        return _EVENT.unpack(self.mem.read(self.device_gpa, 4))

    # --- raw access for hostile tests ------------------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, bid: int = 0, flags: int = 0) -> None:
        """Write descriptor `slot` verbatim (flags include whatever AVAIL/USED bits)."""
        self.mem.write(self.desc_gpa + 16 * (slot % self.num),
                       _DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF,
                                  bid & 0xFFFF, flags & 0xFFFF))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of descriptor `slot`."""
        return _DESC.unpack(self.mem.read(self.desc_gpa + 16 * (slot % self.num), 16))

    def post_raw(self, entries: Sequence[tuple[int, int, int]], bid: int = 0) -> int:
        """Post (unpublished, untracked) raw (addr, len, flags) descriptors from
        next_avail with correct AVAIL/USED bits and NEXT on all but the last."""
        if len(entries) > self._num_free:
            raise RingFull("not enough free slots")
        self._num_free -= len(entries)
        return self._write_chain(entries, bid)

    def make_indirect(self, entries: Sequence[tuple[int, int, int]],
                      table_len: int | None = None, flags: int = 0) -> int:
        """Post (unpublished) one INDIRECT descriptor over a table of raw
        (addr, len, flags) entries; table_len overrides its len."""
        table = self.alloc_buf(max(16 * len(entries), 16))
        for k, (a, ln, fl) in enumerate(entries):
            self.mem.write(table + 16 * k, _DESC.pack(a, ln, 0, fl))
        ln = 16 * len(entries) if table_len is None else table_len
        return self.post_raw([(table, ln, VRING_DESC_F_INDIRECT | flags)])
