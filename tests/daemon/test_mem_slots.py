"""ADD_MEM_REG / REM_MEM_REG against a real vhostd: hundreds of regions added one at
a time while traffic flows, the region count in `vhostctl ports`, refusals, and no
fd or mapping left behind once they are removed."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import packet_socket
from tests.driver.frontend import Nack
from tests.daemon.test_leaks import snapshot
from tests.daemon.traffic import Guest, collect, frame, vhostctl

SIZE = 1 << 16
N = 300


def _region(i: int, fd: int) -> tuple[int, int, int, int, int]:
    gpa = (1 << 32) + i * 2 * SIZE
    return (gpa, SIZE, 0x6000_0000_0000 + gpa, 0, fd)


def _regions(d) -> int:
    return json.loads(vhostctl(d, "ports", "--json").stdout)[0]["frontend"]["memory_regions"]


def test_hundreds_of_regions_added_and_removed_with_traffic(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    fds = []
    try:
        assert g.fe.get_max_mem_slots() == 512
        sock = packet_socket(netns, d.tap)
        before = snapshot(d.proc.pid)
        for i in range(N):
            fd = os.memfd_create("slot")
            os.ftruncate(fd, SIZE)
            fds.append(fd)
            g.fe.add_mem_reg(_region(i, fd))
        assert _regions(d) == N + 1
        g.send([frame(i) for i in range(8)])
        assert len(collect(sock, 8)) == 8
        # QEMU 7.2 with several queue pairs sends each ADD_MEM_REG and REM_MEM_REG
        # once per pair: the same region from the same file is counted, not mapped again
        g.fe.add_mem_reg(_region(0, fds[0]), need_reply=True)
        assert _regions(d) == N + 1
        g.fe.rem_mem_reg(_region(0, fds[0]), need_reply=True)
        assert _regions(d) == N + 1  # one reference left
        # refusals: the same addresses from another file, overlap, unknown removal;
        # the connection lives on
        other = os.memfd_create("slot")
        os.ftruncate(other, SIZE)
        fds.append(other)
        with pytest.raises(Nack):
            g.fe.add_mem_reg(_region(0, other), need_reply=True)
        with pytest.raises(Nack):
            g.fe.add_mem_reg(_region(0, fds[0])[:1] + (SIZE * 2,) + _region(0, fds[0])[2:], need_reply=True)
        with pytest.raises(Nack):
            g.fe.rem_mem_reg(_region(N + 5, fds[0]), need_reply=True)
        for i in range(N):
            g.fe.rem_mem_reg(_region(i, fds[i]))
        assert _regions(d) == 1
        g.send([frame(i) for i in range(8, 16)])
        assert len(collect(sock, 8)) == 8
        after = snapshot(d.proc.pid)
        assert (after["fds"], after["memfd_maps"]) == (before["fds"], before["memfd_maps"])
    finally:
        for fd in fds:
            os.close(fd)
        g.close()
