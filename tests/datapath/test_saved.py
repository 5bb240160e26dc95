"""Ring positions published for a restart (vr_qp_set_saved, struct vr_vq_saved):
after every burst that moved them, and at SET_VRING_BASE, with an even seq."""
from __future__ import annotations

import pytest

from vhostd._native import ffi, lib

from tests.datapath.harness import F_PACKED, F_V1, eth_frame
from tests.driver import net_hdr


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_positions_published_after_bursts_and_bases(make_dev, packed):
    d = make_dev(features=F_V1 | (F_PACKED if packed else 0), num=8)
    saved = {w: ffi.new("struct vr_vq_saved *") for w in (lib.VR_RX, lib.VR_TX)}
    with d.paused():
        for w, s in saved.items():
            assert lib.vr_qp_set_saved(d.qp, w, s) == 0
    start = 0x8000 if packed else 0
    assert (saved[lib.VR_TX].avail, saved[lib.VR_TX].used) == (start, start)
    assert saved[lib.VR_TX].seq and saved[lib.VR_TX].seq % 2 == 0
    for i in range(11):                         # more than a lap of an 8-entry ring
        d.send([net_hdr() + eth_frame(100, i)])
        d.recv_tap()
        d.tx.wait_used(1)
    with d.paused():
        b = ffi.new("uint32_t *")
        assert lib.vr_qp_get_base(d.qp, lib.VR_TX, b) == 0
        s = saved[lib.VR_TX]
        assert s.seq % 2 == 0
        assert s.avail == b[0] & 0xFFFF
        assert s.used == (b[0] >> 16 if packed else 11)
        assert s.avail == (3 if packed else 11)             # packed: slot 3 of lap 2, wrap 0
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, 5) == 0   # a new base is published at once
        assert (s.avail, s.used) == (5, 5)
