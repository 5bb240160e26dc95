"""Notifications in the C datapath (csrc/vring_split.c, worker.c), driven through
cffi with the Dev of tests/datapath/harness.py: used-buffer notifications
(calls) suppressed with EVENT_IDX (used_event, across the 16-bit index wrap)
and without it (VRING_AVAIL_F_NO_INTERRUPT), and the kicks the device asks for
when idle (virtio 1.2 §2.7.7, §2.7.10).
"""

from __future__ import annotations

from vhostd._native import lib

from tests.datapath.harness import F_EVENT_IDX, F_V1, eth_frame, read_efd, wait_for
from tests.driver import net_hdr
from tests.driver.constants import VRING_AVAIL_F_NO_INTERRUPT


# --------------------------------------------------------- notifications

def test_event_idx_call_suppression(make_dev):
    d = make_dev(features=F_V1 | F_EVENT_IDX)
    tx = d.tx

    def one():
        d.send([net_hdr() + eth_frame(60)])
        d.recv_tap()
        wait_for(lambda: tx.used_idx() == tx.avail_idx)
        tx.last_used = tx.used_idx()   # consume without touching used_event
        return d.stats(lib.VR_TX)

    tx.set_used_event(0)
    s = one()                                           # first call decision: always call
    assert s["calls"] == 1
    tx.set_used_event(1000)                             # far away: suppressed
    s = one()
    assert s["calls"] == 1 and s["calls_suppressed"] == 1
    tx.set_used_event(2)                                # crossing 2 -> 3: call
    s = one()
    assert s["calls"] == 2 and s["calls_suppressed"] == 1
    # the device asks for kicks with avail_event = last_avail when idle
    assert tx.avail_event() == tx.avail_idx == 3
    assert tx.used_flags() == 0
    assert read_efd(d.call_fd[lib.VR_TX]) == 2


def test_event_idx_wraparound(make_dev):
    d = make_dev(features=F_V1 | F_EVENT_IDX)
    base = 0xFFFE
    with d.paused():                                    # as after a migration
        d.mem.write_u16(d.tx.avail_gpa + 2, base)
        d.mem.write_u16(d.tx.used_gpa + 2, base)
        d.tx.avail_idx = d.tx.last_used = base
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base) == 0
    calls = 0
    for i in range(4):
        d.tx.set_used_event(d.tx.last_used)             # Linux: call me at the next one
        d.send([net_hdr() + eth_frame(60, i)])
        d.recv_tap()
        d.tx.wait_used(1)
        calls += 1
        assert d.stats(lib.VR_TX)["calls"] == calls
    assert d.tx.used_idx() == 2
    assert d.get_base(lib.VR_TX) == 2


def test_no_event_idx_call_suppression(make_dev):
    d = make_dev()
    d.tx.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    d.send([net_hdr() + eth_frame(60)])
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["calls"] == 0 and s["calls_suppressed"] == 1
    assert read_efd(d.call_fd[lib.VR_TX]) == 0
    d.tx.set_avail_flags(0)
    d.send([net_hdr() + eth_frame(60)])
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["calls"] == 1 and s["calls_suppressed"] == 1
