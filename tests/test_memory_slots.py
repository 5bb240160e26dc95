"""memory.py ADD_MEM_REG / REM_MEM_REG table building: one region mapped or unmapped
at a time, refusals before anything is mapped, no fd or mapping left behind."""
from __future__ import annotations

import os

import pytest

from vhostd.errors import RequestError
from vhostd.fds import OwnedFd
from vhostd.memory import GuestMemory
from vhostd.native import lib
from vhostd.protocol import MemRegion

SIZE = 1 << 16


def _fd() -> OwnedFd:
    fd = os.memfd_create("slot")
    os.ftruncate(fd, SIZE)
    return OwnedFd(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:slot" in line)


def _region(i: int) -> MemRegion:
    return MemRegion(gpa=i * SIZE * 2, size=SIZE, uva=0x7000_0000_0000 + i * SIZE * 2, mmap_offset=0)


def test_add_and_remove_hundreds_of_regions_one_at_a_time():
    fds0, maps0 = _open_fds(), _maps()
    mem = GuestMemory()
    for i in range(300):
        fd = _fd()
        table = mem.with_added(_region(i), fd)
        assert mem.install(table) == []  # nothing dropped: the old regions stay mapped
        fd.close()
    assert len(mem) == 300 and mem.table.nregions == 300
    assert _maps() - maps0 == 300
    for i in range(0, 300, 2):
        dropped = mem.install(mem.without(_region(i)))
        assert [m.region for m in dropped] == [_region(i)]
        mem.release(dropped)
    assert len(mem) == 150 and mem.table.nregions == 150
    assert _maps() - maps0 == 150
    mem.clear()
    assert (_open_fds(), _maps()) == (fds0, maps0)


@pytest.mark.parametrize("bad", [
    _region(0),                                                   # duplicate
    MemRegion(gpa=SIZE // 2, size=SIZE, uva=0x1000_0000, mmap_offset=0),  # gpa overlap
    MemRegion(gpa=1 << 40, size=SIZE, uva=0x7000_0000_0000, mmap_offset=0),  # uva overlap
    MemRegion(gpa=1 << 40, size=SIZE * 4, uva=0x1000_0000, mmap_offset=0),  # beyond its file
])
def test_refused_region_leaves_nothing_behind(bad):
    mem = GuestMemory()
    first = _fd()
    mem.install(mem.with_added(_region(0), first))
    first.close()
    fds0, maps0 = _open_fds(), _maps()
    fd = _fd()
    with pytest.raises(RequestError):
        mem.with_added(bad, fd)
    fd.close()
    assert (_open_fds(), _maps(), len(mem)) == (fds0, maps0, 1)
    mem.clear()


def test_unknown_removal_is_refused():
    mem = GuestMemory()
    with pytest.raises(RequestError, match="no memory region"):
        mem.without(_region(3))


def test_beyond_the_limit_is_refused(monkeypatch):
    mem = GuestMemory()
    mem.regions = [object()] * lib.VR_MAX_REGIONS  # only the count is looked at
    fd = _fd()
    with pytest.raises(RequestError, match="max"):
        mem.with_added(_region(0), fd)
    fd.close()
    mem.regions = []
