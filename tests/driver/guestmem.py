"""Guest RAM for the test doubles: memfd-backed regions, as QEMU's
memory-backend-memfd,share=on provides them.

Each region has a guest-physical address (gpa), a size, a front-end virtual
address (uva, what QEMU reports as userspace_addr and uses in SET_VRING_ADDR)
and an fd + mmap_offset, exactly the four fields of a vhost-user
VhostUserMemoryRegion.  A back-end maps `size + mmap_offset` bytes of the fd
from offset 0 and finds gpa g at `base + mmap_offset + (g - gpa)`.

Several regions may share one memfd at increasing offsets (QEMU's pc machine
splits RAM below/above 4 GiB like that), which gives a non-zero mmap_offset.
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

# virtio rings are little-endian; scalar access below uses native order.
assert sys.byteorder == "little", "the doubles assume a little-endian host"

UVA_BASE = 0x7F00_0000_0000
PAGE = 4096


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int
    view: memoryview   # the region's bytes (slice of the fd's mapping)
    _next: int = 0     # bump allocator, offset into the region

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.gpa + self.size

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.gpa, self.size, self.uva, self.mmap_offset, self.fd)


class GuestMemory:
    """Guest RAM in one or more memfd regions.

    GuestMemory(16 << 20)                              one region at gpa 0
    GuestMemory(layout=[(0, 1 << 20), (1 << 32, 1 << 20)])   two memfds
    GuestMemory(layout=[...], shared_fd=True)          one memfd, mmap_offset != 0
    layout entries are (gpa, size) or (gpa, size, uva).
    """

    def __init__(self, size: int = 16 << 20, *, gpa: int = 0,
                 layout: Sequence[tuple[int, ...]] | None = None,
                 uva_base: int = UVA_BASE, shared_fd: bool = False,
                 name: str = "guest-ram"):
        if layout is None:
            layout = [(gpa, size)]
        if not 1 <= len(layout) <= 64:
            raise ValueError("bad region count")
        self._regions: list[Region] = []
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        total = sum(align_up(e[1], PAGE) for e in layout)
        shared_map = None
        if shared_fd:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, total)
            shared_map = mmap.mmap(fd, total, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
            self._fds.append(fd)
            self._maps.append(shared_map)
        off = 0
        for i, entry in enumerate(layout):
            rgpa, rsize = entry[0], entry[1]
            ruva = entry[2] if len(entry) > 2 else uva_base + rgpa
            if rsize <= 0 or rsize % PAGE:
                raise ValueError(f"region size {rsize:#x} not a positive page multiple")
            if shared_map is not None:
                view = memoryview(shared_map)[off:off + rsize]
                r = Region(rgpa, rsize, ruva, off, self._fds[0], view)
                off += rsize
            else:
                fd = os.memfd_create(f"{name}{i}", os.MFD_CLOEXEC)
                os.ftruncate(fd, rsize)
                m = mmap.mmap(fd, rsize, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
                self._fds.append(fd)
                self._maps.append(m)
                r = Region(rgpa, rsize, ruva, 0, fd, memoryview(m))
            for o in self._regions:
                if (r.gpa < o.gpa + o.size and o.gpa < r.gpa + r.size) or \
                   (r.uva < o.uva + o.size and o.uva < r.uva + r.size):
                    raise ValueError("overlapping regions")
            self._regions.append(r)

    # --- lifetime ---------------------------------------------------------
    def close(self) -> None:
        for r in self._regions:
            for c in r.__dict__.pop("_casts", {}).values():
                c.release()
            r.view.release()
        self._regions = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass   # a caller still holds a view; the mapping dies with it
        self._maps = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- regions ------------------------------------------------------------
    def regions(self) -> Iterator[tuple[int, int, int, int, int]]:
        """Yield (gpa, size, uva, mmap_offset, fd) per region, in layout order."""
        for r in self._regions:
            yield r.as_tuple()

    def region(self, i: int) -> Region:
        return self._regions[i]

    def region_of(self, gpa: int, n: int = 1) -> Region:
        for r in self._regions:
            if r.contains(gpa, n):
                return r
        raise ValueError(f"gpa {gpa:#x}+{n:#x} outside guest memory")

    # --- translation ------------------------------------------------------------
    def gpa_to_uva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    def uva_to_gpa(self, uva: int) -> int:
        for r in self._regions:
            if r.uva <= uva < r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise ValueError(f"uva {uva:#x} outside guest memory")

    # --- allocation -------------------------------------------------------------
    def alloc(self, size: int, align: int = 16, region: int | None = None) -> int:
        """Bump-allocate `size` bytes aligned to `align` (gpa alignment); returns
        the gpa.  Tries regions in order unless `region` picks one."""
        if size <= 0:
            raise ValueError("size must be > 0")
        cands: Iterable[Region] = (self._regions if region is None
                                   else [self._regions[region]])
        for r in cands:
            start = align_up(r.gpa + r._next, align)
            if start + size <= r.gpa + r.size:
                r._next = start + size - r.gpa
                return start
        raise MemoryError(f"guest memory exhausted ({size:#x} bytes)")

    # --- access by gpa ------------------------------------------------------------
    def _spans(self, gpa: int, n: int) -> Iterator[tuple[memoryview, int, int]]:
        """(view, offset-in-view, count) pieces covering [gpa, gpa+n); adjacent
        regions are crossed, holes raise."""
        while n > 0:
            r = self.region_of(gpa)
            off = gpa - r.gpa
            k = min(n, r.size - off)
            yield r.view, off, k
            gpa += k
            n -= k

    def read(self, gpa: int, n: int) -> bytes:
        return b"".join(bytes(v[o:o + k]) for v, o, k in self._spans(gpa, n))

    def write(self, gpa: int, data: bytes) -> None:
        data = memoryview(bytes(data))
        pos = 0
        for v, o, k in self._spans(gpa, len(data)):
            v[o:o + k] = data[pos:pos + k]
            pos += k

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * n)

    # Aligned scalar access goes through memoryview.cast so that CPython does
    # one native load/store of the full width: a C back-end polling avail.idx
    # on another thread must never see a torn u16 (x86 keeps store order, so
    # "ring entry, then idx" in program order is also the order it observes).
    def _scalar(self, gpa: int, width: int) -> tuple[memoryview, int] | None:
        if gpa % width:
            return None
        r = self.region_of(gpa, width)
        casts = r.__dict__.setdefault("_casts", {})
        c = casts.get(width)
        if c is None:
            c = casts[width] = r.view.cast({2: "H", 4: "I", 8: "Q"}[width])
        return c, (gpa - r.gpa) // width

    def _read_scalar(self, gpa: int, width: int) -> int:
        s = self._scalar(gpa, width)
        if s is None:
            return int.from_bytes(self.read(gpa, width), "little")
        return s[0][s[1]]

    def _write_scalar(self, gpa: int, width: int, v: int) -> None:
        v &= (1 << (8 * width)) - 1
        s = self._scalar(gpa, width)
        if s is None:
            self.write(gpa, v.to_bytes(width, "little"))
        else:
            s[0][s[1]] = v

    def read_u16(self, gpa: int) -> int:
        return self._read_scalar(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self._read_scalar(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self._read_scalar(gpa, 8)

    def write_u16(self, gpa: int, v: int) -> None:
        self._write_scalar(gpa, 2, v)

    def write_u32(self, gpa: int, v: int) -> None:
        self._write_scalar(gpa, 4, v)

    def write_u64(self, gpa: int, v: int) -> None:
        self._write_scalar(gpa, 8, v)
