"""The dirty-page log of live migration (vhost-user spec, "Migration" and
SET_LOG_BASE): the frontend's shared bitmap, one bit per 4 KiB guest-physical
page from gpa 0 up, which the datapath marks (csrc/vr_internal.h, "dirty log")
while VHOST_F_LOG_ALL is negotiated and the frontend harvests concurrently.

SET_LOG_BASE carries the log's memfd and `{u64 mmap_size, u64 mmap_offset}`;
the log is the mmap_size bytes at mmap_offset. A frontend may send it again at
any time (QEMU 7.2 once per queue pair, again with a new memfd after a
cancelled migration, and before growing guest memory): the new log replaces
the old one between two bursts of every worker (the device pauses them), and
the old mapping is released only after that, so no mark is lost or lands in
memory the frontend no longer reads.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from vhostd.errors import RequestError
from vhostd.fds import OwnedFd
from vhostd.memory import check_memory_fs
from vhostd.native import check, ffi, lib

LOG_PAGE = 4096
PAGES_PER_WORD = 64          # bit p % 64 of u64 word p / 64
MAX_LOG_BYTES = 1 << 34      # covers 2^49 bytes of guest-physical space: any real guest


@dataclass
class MappedLog:
    base: int        # address mmap returned
    length: int      # bytes mapped (offset + size)
    addr: int        # the log's first word
    words: int       # its size in u64 words
    fd: OwnedFd

    @property
    def covers(self) -> int:
        """Bytes of guest-physical space the log has bits for (from gpa 0)."""
        return self.words * PAGES_PER_WORD * LOG_PAGE

    def release(self) -> None:
        lib.vr_munmap(self.base, self.length)
        self.fd.close()


def map_log(size: int, offset: int, fd: OwnedFd, memory_top: int) -> MappedLog:
    """Checks and maps a log. `memory_top`: the end of the highest guest memory region
    (0 before SET_MEM_TABLE). Raises RequestError with one line saying why."""
    if size == 0 or size % 8 or offset % 8:
        raise RequestError(f"log size {size:#x} / offset {offset:#x}: both must be multiples of 8, size > 0")
    if size > MAX_LOG_BYTES or offset > MAX_LOG_BYTES:
        raise RequestError(f"log size {size:#x} / offset {offset:#x} too large")
    st = os.fstat(fd.fd)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError("log fd is not a memory file (memfd)")
    check_memory_fs(fd.fd, "log")
    if st.st_size < offset + size:
        raise RequestError(f"log size {size:#x} + offset {offset:#x} exceeds its file ({st.st_size:#x} bytes)")
    words = size // 8
    if memory_top > words * PAGES_PER_WORD * LOG_PAGE:
        raise RequestError(f"log of {size:#x} bytes covers guest memory up to "
                           f"{words * PAGES_PER_WORD * LOG_PAGE:#x}, but it reaches {memory_top:#x}")
    addr = ffi.new("uint64_t *")
    check(lib.vr_mmap(fd.fd, offset + size, addr), f"mmap of the dirty log ({size:#x} bytes)")
    return MappedLog(addr[0], offset + size, addr[0] + offset, words, fd.take())
