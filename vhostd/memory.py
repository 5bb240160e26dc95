"""Guest memory: the regions of SET_MEM_TABLE / ADD_MEM_REG mapped from the frontend's fds.

vhost-user spec, "Memory region description": each region is mmapped from its
fd with length size + mmap_offset; host address = base + mmap_offset + (gpa - gpa_start).
This module owns the mappings and their lifetime and keeps the C region table
(struct vr_mem) in step; the datapath translates through that table only.
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from vhostd.fds import OwnedFd
from vhostd.errors import RequestError
from vhostd.native import check, ffi, lib
from vhostd.protocol import MemRegion

log = logging.getLogger(__name__)

F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK = 0x0002

# File systems QEMU's shared guest memory lives on (statfs f_type, linux/magic.h):
# memory-backend-memfd and /dev/shm files are tmpfs (shmem), hugepage memfds and
# memory-backend-file on /dev/hugepages are hugetlbfs. Both are memory: access
# never waits on a device or a server. A file on a disk, NFS or FUSE could make a
# worker (page faults) or the event loop (pread) wait without bound.
TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
GUEST_MEMORY_FS = {TMPFS_MAGIC: "tmpfs", HUGETLBFS_MAGIC: "hugetlbfs"}


@dataclass
class MappedRegion:
    region: MemRegion
    base: int  # address returned by mmap
    length: int  # size + mmap_offset
    fd: OwnedFd
    refs: int = 1  # ADD_MEM_REG of this very region, less REM_MEM_REG (GuestMemory.identical)

    @property
    def hva(self) -> int:
        return self.base + self.region.mmap_offset


def _map(region: MemRegion, fd: OwnedFd) -> MappedRegion:
    """mmap one region after checking the fd really backs it.

    Touching a mapping past the end of its file raises SIGBUS, which would kill
    the daemon: a region must fit inside the file it claims to come from.
    """
    st = os.fstat(fd.fd)
    length = region.size + region.mmap_offset
    if not stat.S_ISREG(st.st_mode):
        raise RequestError(f"memory region gpa {region.gpa:#x}: fd is not a regular file or memfd")
    check_memory_fs(fd.fd, f"memory region gpa {region.gpa:#x}")
    if st.st_size < length:
        raise RequestError(
            f"memory region gpa {region.gpa:#x}: size {region.size:#x} + offset {region.mmap_offset:#x} "
            f"exceeds its file ({st.st_size:#x} bytes)"
        )
    try:
        sealed = bool(fcntl.fcntl(fd.fd, F_GET_SEALS) & F_SEAL_SHRINK)
    except OSError:
        sealed = False
    if not sealed:
        log.debug("memory region gpa %#x: file is not sealed against shrinking", region.gpa)
    addr = ffi.new("uint64_t *")
    check(lib.vr_mmap(fd.fd, length, addr), f"mmap of region gpa {region.gpa:#x} size {region.size:#x}")
    return MappedRegion(region, addr[0], length, fd.take())


def check_memory_fs(fd: int, what: str) -> None:
    """Refuses a file that is not on tmpfs/memfd or hugetlbfs (RequestError)."""
    fs = ffi.new("uint64_t *")
    check(lib.vr_fd_fs_type(fd, fs), f"{what}: fstatfs")
    if fs[0] not in GUEST_MEMORY_FS:
        raise RequestError(f"{what}: file is on a file system of type {fs[0]:#x}, not guest memory "
                           "(use memory-backend-memfd, or a file on /dev/shm or hugetlbfs)")


def _unmap(m: MappedRegion) -> None:
    lib.vr_munmap(m.base, m.length)
    m.fd.close()


class GuestMemory:
    """The mapped regions of one device and the C table describing them.

    `table` is what every queue pair of the device reads; callers change it only
    while those queue pairs are paused.
    """

    def __init__(self) -> None:
        self.table = ffi.new("struct vr_mem *")
        self.regions: list[MappedRegion] = []

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def total_size(self) -> int:
        return sum(m.region.size for m in self.regions)

    def prepare(self, regions: list[MemRegion], fds: list[OwnedFd]) -> list[MappedRegion]:
        """Maps a new table without touching the live one (all or nothing)."""
        if len(regions) > lib.VR_MAX_REGIONS:
            raise RequestError(f"{len(regions)} memory regions (max {lib.VR_MAX_REGIONS})")
        _check_disjoint(regions)
        mapped: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                mapped.append(_map(region, fd))
            self._check_table(mapped)
        except BaseException:
            for m in mapped:
                _unmap(m)
            raise
        return mapped

    @staticmethod
    def _check_table(mapped: list[MappedRegion]) -> None:
        probe = ffi.new("struct vr_mem *")
        _fill(probe, mapped)
        if lib.vr_mem_validate(probe) < 0:
            raise RequestError("memory table has overlapping or wrapping regions")

    def install(self, mapped: list[MappedRegion]) -> list[MappedRegion]:
        """Swaps in a prepared table; returns the regions it dropped, for `release`.

        A region present in both tables (the same MappedRegion object, as `with_added`
        and `without` keep them) stays mapped. The caller has paused every queue
        pair reading this table.
        """
        kept = {id(m) for m in mapped}
        dropped = [m for m in self.regions if id(m) not in kept]
        self.regions = mapped
        _fill(self.table, self.regions)
        return dropped

    def with_added(self, region: MemRegion, fd: OwnedFd) -> list[MappedRegion]:
        """ADD_MEM_REG: the live regions plus `region`, mapped alone (the live table is
        untouched). An overlapping or duplicate region, or one past the limit, is
        refused before anything is mapped; the caller closes the fd then."""
        if len(self.regions) >= lib.VR_MAX_REGIONS:
            raise RequestError(f"memory region gpa {region.gpa:#x}: already {len(self.regions)} regions "
                               f"(max {lib.VR_MAX_REGIONS})")
        _check_disjoint([m.region for m in self.regions] + [region])
        new = _map(region, fd)
        table = self.regions + [new]
        try:
            self._check_table(table)
        except BaseException:
            _unmap(new)
            raise
        return table

    def identical(self, region: MemRegion, fd: OwnedFd) -> MappedRegion | None:
        """The live region `region` repeats exactly (addresses, size, offset, and the
        same file behind the fd), or None. QEMU 7.2 keeps one memory table per queue
        pair and sends ADD_MEM_REG and REM_MEM_REG once per queue pair on the same
        connection; a repeat is counted, not refused, and unmapped with the last
        REM_MEM_REG."""
        st = os.fstat(fd.fd)
        for m in self.regions:
            if m.region == region:
                mine = os.fstat(m.fd.fd)
                if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                    return m
        return None

    def find(self, region: MemRegion) -> MappedRegion | None:
        """The live region REM_MEM_REG names (see `without`)."""
        for m in self.regions:
            r = m.region
            if (r.gpa, r.size, r.uva) == (region.gpa, region.size, region.uva):
                return m
        return None

    def without(self, region: MemRegion) -> list[MappedRegion]:
        """REM_MEM_REG: the live regions less the one with region's gpa and size (and
        frontend address: QEMU sends the region as it added it). mmap_offset is not
        compared: the spec identifies a region by its addresses."""
        for i, m in enumerate(self.regions):
            r = m.region
            if (r.gpa, r.size, r.uva) == (region.gpa, region.size, region.uva):
                return self.regions[:i] + self.regions[i + 1:]
        raise RequestError(f"no memory region gpa {region.gpa:#x} size {region.size:#x} "
                           f"uva {region.uva:#x} to remove")

    @staticmethod
    def release(old: list[MappedRegion]) -> None:
        for m in old:
            _unmap(m)

    def clear(self) -> None:
        """Unmaps everything (queue pairs paused or gone)."""
        self.release(self.install([]))

    def pread(self, uva: int, n: int) -> bytes | None:
        """n bytes at frontend address uva, read with pread from the region's file
        rather than through the mapping: a frontend that shrank its file gets a
        short read here, not a SIGBUS in the control plane. None if the range is
        not inside one region or the read comes back short."""
        for m in self.regions:
            r = m.region
            if r.uva <= uva and uva + n <= r.uva + r.size:
                try:
                    data = os.pread(m.fd.fd, n, r.mmap_offset + uva - r.uva)
                except OSError:
                    return None
                return data if len(data) == n else None
        return None


def _check_disjoint(regions: list[MemRegion]) -> None:
    """No two regions may share a guest-physical or a frontend-virtual byte: either
    would make a translation ambiguous. Checked before anything is mapped (ranges
    are already known not to wrap, protocol.MemRegion.check)."""
    for space in ("gpa", "uva"):
        spans = sorted((getattr(r, space), r.size) for r in regions)
        for (a, a_size), (b, _) in zip(spans, spans[1:]):
            if b < a + a_size:
                raise RequestError(f"memory regions overlap: {space} {a:#x}+{a_size:#x} and {b:#x}")


def _fill(table, mapped: list[MappedRegion]) -> None:
    """The C table, sorted by guest-physical address (the datapath binary-searches it)."""
    table.nregions = len(mapped)
    for i, m in enumerate(sorted(mapped, key=lambda m: m.region.gpa)):
        r = table.regions[i]
        r.gpa, r.uva, r.size, r.hva = m.region.gpa, m.region.uva, m.region.size, m.hva
