"""Ring corruptions a hostile guest can make, laid out in guest memory by the
split and packed ring drivers (virtio 1.1 §2.6 and §2.7): untrusted addresses
and lengths, bounded chain walks, indirect tables, fields read once, short chains.

Each Corruption posts (but does not publish) one bad chain or index on a ring
and says what the device must do with it: stop the ring with a reason
(DESC, ADDR, INDIRECT, AVAIL_IDX) or, for input that is legal or only a bad
frame, DELIVERED (the frame reaches the TAP) / DROPPED_HDR (dropped and counted
as a bad header, ring healthy). `build(ring, frame, w)` gets the ring driver, a
valid vnet header + Ethernet frame, and the flag a buffer of this direction
carries (VRING_DESC_F_WRITE on RX, 0 on TX), so one corruption serves both.
The chains are raw: the driver does not track them, so a test must not
collect used entries from a ring it corrupted (reset or replace the ring).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from .constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from .packed import PackedRing
from .split import SplitRing

DESC, ADDR, INDIRECT, AVAIL_IDX = "desc", "addr", "indirect", "avail_idx"
DELIVERED, DROPPED_HDR = "delivered", "dropped_hdr"
UNMAPPED = 0x7FFF_0000_0000
_DESC = struct.Struct("<QIHH")        # split layout; packed tables: addr, len, id, flags


@dataclass(frozen=True)
class Corruption:
    name: str
    layout: str                        # "split" | "packed"
    targets: tuple[str, ...]           # "tx", "rx"
    build: Callable
    expect: str


def _buf(r, n: int = 64, data: bytes = b"") -> int:
    g = r.alloc_buf(max(n, len(data)))
    if data:
        r.mem.write(g, data)
    return g


def mem_end(r) -> int:
    return max(gpa + size for gpa, size, *_ in r.mem.regions())


def region_boundary(r) -> int:
    """The first byte of region 1 (the test's memory has two adjacent regions)."""
    reg = r.mem.region(0)
    return reg.gpa + reg.size


# --- split ------------------------------------------------------------------------

def _split_one(r: SplitRing, addr: int, ln: int, flags: int = 0, nxt: int = 0) -> int:
    [i] = r.reserve_desc(1)
    r.write_desc(i, addr, ln, flags, nxt)
    r.push_avail(i)
    return i


def _split_indirect(r: SplitRing, entries, table_len=None, table_addr=None, flags=VRING_DESC_F_INDIRECT):
    if table_addr is None:
        return r.make_indirect(entries, table_len)
    for k, e in enumerate(entries):
        r.mem.write(table_addr + 16 * k, _DESC.pack(*e))
    return _split_one(r, table_addr, 16 * len(entries) if table_len is None else table_len, flags)


SPLIT: list[Corruption] = []


def split(name, expect, targets=("tx", "rx")):
    def deco(fn):
        SPLIT.append(Corruption(name, "split", targets, fn, expect))
        return fn
    return deco


@split("next_out_of_range", DESC)
def _(r, f, w):
    _split_one(r, _buf(r), 64, w | VRING_DESC_F_NEXT, r.num + 3)


@split("loop_of_two", DESC)
def _(r, f, w):
    r.make_loop(2, write=bool(w))


@split("self_loop", DESC)
def _(r, f, w):
    r.make_loop(1, write=bool(w))


@split("head_out_of_range", DESC)
def _(r, f, w):
    r.push_avail(r.num + 7)


@split("avail_idx_too_far_ahead", AVAIL_IDX)
def _(r, f, w):
    r.set_avail_idx((r.avail_idx + r.num + 1) & 0xFFFF)


@split("buffer_unmapped", ADDR)
def _(r, f, w):
    _split_one(r, UNMAPPED, 64, w)


@split("buffer_wraps_2_64", ADDR)
def _(r, f, w):
    _split_one(r, 2**64 - 8, 64, w)


@split("buffer_runs_off_memory", ADDR)
def _(r, f, w):
    _split_one(r, mem_end(r) - 10, 64, w)


@split("empty_chain", DESC)
def _(r, f, w):
    _split_one(r, _buf(r), 0, w)


@split("indirect_nested", INDIRECT)
def _(r, f, w):
    _split_indirect(r, [(_buf(r), 16, VRING_DESC_F_INDIRECT, 0)])


@split("indirect_len_not_16n", INDIRECT)
def _(r, f, w):
    _split_indirect(r, [(_buf(r), 64, w, 0), (_buf(r), 64, w, 0)], table_len=24)


@split("indirect_len_0", INDIRECT)
def _(r, f, w):
    _split_indirect(r, [(_buf(r), 64, w, 0)], table_len=0)


@split("indirect_longer_than_queue", INDIRECT)
def _(r, f, w):
    _split_indirect(r, [(_buf(r), 64, w, 0)], table_len=16 * (r.num + 1))


@split("indirect_with_next", INDIRECT)
def _(r, f, w):
    t = _buf(r, 16, _DESC.pack(_buf(r), 64, w, 0))
    [i] = r.reserve_desc(1)
    r.write_desc(i, t, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, i)
    r.push_avail(i)


@split("indirect_loop", INDIRECT)
def _(r, f, w):
    b = _buf(r)
    _split_indirect(r, [(b, 64, w | VRING_DESC_F_NEXT, 1), (b, 64, w | VRING_DESC_F_NEXT, 0)])


@split("indirect_next_out_of_table", INDIRECT)
def _(r, f, w):
    b = _buf(r)
    _split_indirect(r, [(b, 64, w | VRING_DESC_F_NEXT, 2), (b, 64, w, 0)])


@split("indirect_table_unmapped", ADDR)
def _(r, f, w):
    _split_one(r, UNMAPPED, 32, VRING_DESC_F_INDIRECT)


@split("indirect_table_crosses_regions", INDIRECT)
def _(r, f, w):
    b = _buf(r)
    _split_indirect(r, [(b, 32, w | VRING_DESC_F_NEXT, 1), (b + 32, 32, w, 0)],
                    table_addr=region_boundary(r) - 16)


@split("tx_writable_descriptor", DESC, ("tx",))
def _(r, f, w):
    r.add_chain([f], [64])


@split("rx_readable_descriptor", DESC, ("rx",))
def _(r, f, w):
    r.add_chain([b"x" * 64], [2048])


@split("rx_readable_after_writable", DESC, ("rx",))
def _(r, f, w):
    a, b = r.reserve_desc(2)
    r.write_desc(a, _buf(r), 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, b)
    r.write_desc(b, _buf(r), 64, 0, 0)
    r.push_avail(a)


@split("chain_shorter_than_vnet_header", DROPPED_HDR, ("tx",))
def _(r, f, w):
    _split_one(r, _buf(r, 8, f[:8]), 8)


@split("zero_length_unmapped_descriptor_inside_chain", DELIVERED, ("tx",))
def _(r, f, w):
    a, b, c = r.reserve_desc(3)
    r.write_desc(a, _buf(r, 20, f[:20]), 20, VRING_DESC_F_NEXT, b)
    r.write_desc(b, UNMAPPED, 0, VRING_DESC_F_NEXT, c)
    r.write_desc(c, _buf(r, len(f) - 20, f[20:]), len(f) - 20, 0, 0)
    r.push_avail(a)


@split("buffer_crosses_regions", DELIVERED, ("tx",))
def _(r, f, w):
    at = region_boundary(r) - 30
    r.mem.write(at, f)
    _split_one(r, at, len(f))


# --- packed -----------------------------------------------------------------------

PACKED: list[Corruption] = []


def packed(name, expect, targets=("tx", "rx")):
    def deco(fn):
        PACKED.append(Corruption(name, "packed", targets, fn, expect))
        return fn
    return deco


def _pk_table(r: PackedRing, entries) -> int:
    """An indirect table of (addr, len, flags) entries (packed layout)."""
    t = _buf(r, max(16 * len(entries), 16))
    for k, (a, ln, fl) in enumerate(entries):
        r.mem.write(t + 16 * k, struct.pack("<QIHH", a, ln, 0, fl))
    return t


@packed("chain_longer_than_ring", DESC)
def _(r, f, w):
    r.post_raw([(_buf(r), 64, w | VRING_DESC_F_NEXT)] * r.num)


@packed("buffer_unmapped", ADDR)
def _(r, f, w):
    r.post_raw([(UNMAPPED, 64, w)])


@packed("buffer_wraps_2_64", ADDR)
def _(r, f, w):
    r.post_raw([(2**64 - 8, 64, w)])


@packed("buffer_runs_off_memory", ADDR)
def _(r, f, w):
    r.post_raw([(mem_end(r) - 10, 64, w)])


@packed("empty_chain", DESC)
def _(r, f, w):
    r.post_raw([(_buf(r), 0, w)])


@packed("indirect_nested", INDIRECT)
def _(r, f, w):
    r.make_indirect([(_buf(r), 16, VRING_DESC_F_INDIRECT)])


@packed("indirect_len_not_16n", INDIRECT)
def _(r, f, w):
    r.make_indirect([(_buf(r), 64, w), (_buf(r), 64, w)], table_len=24)


@packed("indirect_len_0", INDIRECT)
def _(r, f, w):
    r.make_indirect([(_buf(r), 64, w)], table_len=0)


@packed("indirect_longer_than_queue", INDIRECT)
def _(r, f, w):
    r.make_indirect([(_buf(r), 64, w)], table_len=16 * (r.num + 1))


@packed("indirect_with_next", INDIRECT)
def _(r, f, w):
    r.make_indirect([(_buf(r), 64, w)], flags=VRING_DESC_F_NEXT)


@packed("indirect_inside_chain", INDIRECT)
def _(r, f, w):
    r.post_raw([(_buf(r), 64, w), (_pk_table(r, [(_buf(r), 64, w)]), 16, VRING_DESC_F_INDIRECT)])


@packed("indirect_table_unmapped", ADDR)
def _(r, f, w):
    r.post_raw([(UNMAPPED, 32, VRING_DESC_F_INDIRECT)])


@packed("indirect_table_crosses_regions", INDIRECT)
def _(r, f, w):
    t = region_boundary(r) - 16
    b = _buf(r)
    for k, (a, ln, fl) in enumerate([(b, 32, w), (b + 32, 32, w)]):
        r.mem.write(t + 16 * k, struct.pack("<QIHH", a, ln, 0, fl))
    r.post_raw([(t, 32, VRING_DESC_F_INDIRECT)])


@packed("tx_writable_descriptor", DESC, ("tx",))
def _(r, f, w):
    r.post_raw([(_buf(r, len(f), f), len(f), 0), (_buf(r), 64, VRING_DESC_F_WRITE)])


@packed("rx_readable_descriptor", DESC, ("rx",))
def _(r, f, w):
    r.post_raw([(_buf(r), 64, 0), (_buf(r), 2048, VRING_DESC_F_WRITE)])


@packed("rx_readable_after_writable", DESC, ("rx",))
def _(r, f, w):
    r.post_raw([(_buf(r), 64, VRING_DESC_F_WRITE), (_buf(r), 64, 0)])


@packed("chain_shorter_than_vnet_header", DROPPED_HDR, ("tx",))
def _(r, f, w):
    r.post_raw([(_buf(r, 8, f[:8]), 8, 0)])


@packed("zero_length_unmapped_descriptor_inside_chain", DELIVERED, ("tx",))
def _(r, f, w):
    r.post_raw([(_buf(r, 20, f[:20]), 20, 0), (UNMAPPED, 0, 0), (_buf(r, len(f) - 20, f[20:]), len(f) - 20, 0)])


@packed("buffer_crosses_regions", DELIVERED, ("tx",))
def _(r, f, w):
    at = region_boundary(r) - 30
    r.mem.write(at, f)
    r.post_raw([(at, len(f), 0)])


ALL: list[Corruption] = SPLIT + PACKED
