"""Hostile and broken rings against the C datapath alone, driven through cffi
with the Dev of tests/datapath/harness.py: each malformed descriptor chain
(out-of-range indices, loops, unmapped or wrapping buffers, bad indirect
tables, the avail index running ahead, wrong descriptor directions, RX chains
shorter than the vnet header, rings outside guest memory) marks just that vring
broken with the exact VR_BROKEN_* code, counted once and signalled on the err
eventfd, without spinning; the other vring keeps working. The whole daemon's
answer to the same input is tests/daemon/test_hostile_rings.py.
"""

from __future__ import annotations

import struct
import time

import pytest

from vhostd._native import lib

from tests.datapath.harness import (
    F_INDIRECT, F_PACKED, F_V1, M1, eth_frame, read_efd, wait_for,
)
from tests.driver import GuestMemory, net_hdr
from tests.driver.constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE


# ---------------------------------------------------------------- hostile input

def _post(ring):
    ring.publish()
    ring.kick()


def h_next_out_of_range(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, r.alloc_buf(64), 64, VRING_DESC_F_NEXT, d.num + 3)
    r.push_avail(i)
    return lib.VR_BROKEN_DESC


def h_loop2(d, r):
    r.make_loop(2)
    return lib.VR_BROKEN_DESC


def h_loop1(d, r):
    r.make_loop(1)
    return lib.VR_BROKEN_DESC


def h_head_out_of_range(d, r):
    r.push_avail(d.num + 7)
    return lib.VR_BROKEN_DESC


def h_buffer_unmapped(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, 0x7FFF_0000_0000, 64, 0, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_buffer_wraps(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, 2**64 - 8, 64, 0, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_buffer_runs_off_the_end(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, (8 << 20) - 10, 64, 0, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_avail_idx_jump(d, r):
    r.set_avail_idx(d.num + 1)
    return lib.VR_BROKEN_AVAIL_IDX


def h_indirect_nested(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 16, VRING_DESC_F_INDIRECT, 0)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_len_24(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 64, 0, 0), (b, 64, 0, 0)], table_len=24)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_len_0(d, r):
    r.make_indirect([(r.alloc_buf(64), 64, 0, 0)], table_len=0)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_too_big(d, r):
    r.make_indirect([(r.alloc_buf(64), 64, 0, 0)], table_len=16 * (d.num + 1))
    return lib.VR_BROKEN_INDIRECT


def h_indirect_plus_next(d, r):
    [i] = r.reserve_desc(1)
    t = r.alloc_buf(64)
    d.mem.write(t, struct.pack("<QIHH", r.alloc_buf(64), 64, 0, 0))
    r.write_desc(i, t, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, i)
    r.push_avail(i)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_loop(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 64, VRING_DESC_F_NEXT, 1), (b, 64, VRING_DESC_F_NEXT, 0)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_next_out_of_table(d, r):
    b = r.alloc_buf(64)
    r.make_indirect([(b, 64, VRING_DESC_F_NEXT, 2), (b, 64, 0, 0)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_table_unmapped(d, r):
    [i] = r.reserve_desc(1)
    r.write_desc(i, 0x7FFF_0000_0000, 32, VRING_DESC_F_INDIRECT, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_ADDR


def h_indirect_misaligned(d, r):
    """A table at an 8-byte (not 16-byte) aligned address: every descriptor load
    from it would be misaligned (undefined behaviour in C)."""
    b = r.alloc_buf(64)
    t = r.alloc_buf(64) + 8
    d.mem.write(t, struct.pack("<QIHH", b, 64, 0, 0))
    [i] = r.reserve_desc(1)
    r.write_desc(i, t, 16, VRING_DESC_F_INDIRECT, 0)
    r.push_avail(i)
    return lib.VR_BROKEN_INDIRECT


def h_tx_writable(d, r):
    r.add_chain([net_hdr() + eth_frame(60)], [64])
    return lib.VR_BROKEN_DESC


HOSTILE = [h_next_out_of_range, h_loop2, h_loop1, h_head_out_of_range, h_buffer_unmapped,
           h_buffer_wraps, h_buffer_runs_off_the_end, h_avail_idx_jump, h_indirect_nested,
           h_indirect_len_24, h_indirect_len_0, h_indirect_too_big, h_indirect_plus_next,
           h_indirect_loop, h_indirect_next_out_of_table, h_indirect_table_unmapped,
           h_indirect_misaligned, h_tx_writable]


def _check_broken(d, w, want):
    wait_for(lambda: d.stats(w)["broken"], what="vq broken")
    s = d.stats(w)
    assert s["broken"] == want, (s["broken"], want)
    assert s["drop_bad_desc"] == 1
    assert read_efd(d.err_fd[w]) == 1
    assert read_efd(lib.vr_qp_event_fd(d.qp)) >= 1


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__[2:])
def test_hostile_tx(make_dev, hostile):
    d = make_dev(features=F_V1 | F_INDIRECT)
    want = hostile(d, d.tx)
    _post(d.tx)
    _check_broken(d, lib.VR_TX, want)
    # the other vq keeps working, the worker is alive and pausable
    d.rx.add_in([2048])
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    [u] = d.rx.wait_used(1)
    assert u.len == 72
    with d.paused():
        pass
    # the broken vq is no longer serviced
    d.tx.add_out([net_hdr() + eth_frame(60)])
    _post(d.tx)
    time.sleep(0.05)
    assert d.tap_empty()
    assert d.stats(lib.VR_TX)["drop_bad_desc"] == 1     # logged once
    with d.paused():
        assert lib.vr_qp_reset_vq(d.qp, lib.VR_TX) == 0
        assert d.stats(lib.VR_TX)["broken"] == 0
        assert d.stats(lib.VR_TX)["drop_bad_desc"] == 0
        assert lib.vr_qp_mapped(d.qp, lib.VR_TX) == 0
    # a reset vq has no rings or kick fd: nothing is serviced until reconfigured
    d.tx.kick()
    time.sleep(0.05)
    assert d.stats(lib.VR_TX)["broken"] == 0
    assert d.tap_empty()


def test_indirect_without_feature_is_bad(make_dev):
    d = make_dev()
    d.tx.add_out([net_hdr(), eth_frame(60)], indirect=True)
    _post(d.tx)
    _check_broken(d, lib.VR_TX, lib.VR_BROKEN_DESC)


def test_indirect_table_spanning_regions_is_bad(make_dev):
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, M1)])
    d = make_dev(mem=mem, ring_region=0, features=F_V1 | F_INDIRECT)
    t = 4 * M1 - 16
    b = d.tx.alloc_buf(128)
    blob = net_hdr() + eth_frame(60)
    mem.write(b, blob)
    mem.write(t, struct.pack("<QIHH", b, 30, VRING_DESC_F_NEXT, 1)
              + struct.pack("<QIHH", b + 30, len(blob) - 30, 0, 0))
    [i] = d.tx.reserve_desc(1)
    d.tx.write_desc(i, t, 32, VRING_DESC_F_INDIRECT, 0)
    d.tx.push_avail(i)
    _post(d.tx)
    _check_broken(d, lib.VR_TX, lib.VR_BROKEN_INDIRECT)


def test_hostile_rx_readable_desc(make_dev):
    d = make_dev()
    d.rx.add_chain([b"x" * 64], [2048])
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    _check_broken(d, lib.VR_RX, lib.VR_BROKEN_DESC)
    d.send([net_hdr() + eth_frame(60)])                # TX still works
    assert d.recv_tap() == net_hdr() + eth_frame(60)
    t0 = time.process_time()                            # broken RX + readable TAP: no spin
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.15


def test_hostile_rx_readable_after_writable(make_dev):
    d = make_dev()
    a, b = d.rx.reserve_desc(2)
    d.rx.write_desc(a, d.rx.alloc_buf(64), 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, b)
    d.rx.write_desc(b, d.rx.alloc_buf(64), 64, 0, 0)
    d.rx.push_avail(a)
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    _check_broken(d, lib.VR_RX, lib.VR_BROKEN_DESC)


@pytest.mark.parametrize("features,hdr_len,sizes", [
    (F_V1, 12, [8]), (F_V1, 12, [4, 7]), (F_V1, 12, [0]), (F_V1 | F_PACKED, 12, [11]), (0, 10, [9]),
])
def test_hostile_rx_chain_shorter_than_header(make_dev, features, hdr_len, sizes):
    """Without MRG_RXBUF, an RX chain smaller than the vnet header is malformed: the
    ring stops (DESC, counted once) instead of dropping every later frame as
    ring-full; the chain is left unconsumed; TX keeps working."""
    d = make_dev(features=features, hdr_len=hdr_len)
    head = d.rx.add_in(sizes)
    _post(d.rx)
    d.peer.send(net_hdr()[:hdr_len] + eth_frame(60))
    _check_broken(d, lib.VR_RX, lib.VR_BROKEN_DESC)
    s = d.stats(lib.VR_RX)
    assert s["broken_detail"] == head and s["drop_bad_desc"] == 1 and s["drop_ring_full"] == 0
    assert d.get_base(lib.VR_RX) & 0xFFFF == (0x8000 if features & F_PACKED else 0)   # left unconsumed
    d.send([net_hdr()[:hdr_len] + eth_frame(60)])      # TX still works
    assert d.recv_tap() == net_hdr()[:hdr_len] + eth_frame(60)
    assert d.stats(lib.VR_RX)["drop_bad_desc"] == 1     # counted once


def test_rx_chain_of_exactly_the_header_is_not_malformed(make_dev):
    d = make_dev()
    d.rx.add_in([12])
    _post(d.rx)
    d.peer.send(net_hdr())                              # header-only datagram: fits
    [u] = d.rx.wait_used(1)
    assert u.len == 12
    s = d.stats(lib.VR_RX)
    assert s["broken"] == 0 and s["packets"] == 1


def test_rings_outside_memory(make_dev):
    d = make_dev()
    with d.paused():
        assert lib.vr_qp_set_addr(d.qp, lib.VR_TX, 0x1234_0000_0000, d.tx.avail_uva,
                                  d.tx.used_uva) == 0
        assert lib.vr_qp_map(d.qp) == -14                 # -EFAULT
    d.send([net_hdr() + eth_frame(60)])
    time.sleep(0.05)
    assert d.tap_empty() and d.tx.used_idx() == 0
    # a ring straddling the end of memory
    with d.paused():
        end_uva = d.mem.gpa_to_uva(0) + (8 << 20) - 100
        assert lib.vr_qp_set_addr(d.qp, lib.VR_TX, d.tx.desc_uva, d.tx.avail_uva, end_uva) == 0
        assert lib.vr_qp_map(d.qp) == -14
    # RX is unaffected
    d.rx.add_in([2048])
    _post(d.rx)
    d.peer.send(net_hdr() + eth_frame(60))
    d.rx.wait_used(1)
    with d.paused():
        assert lib.vr_qp_set_addr(d.qp, lib.VR_TX, d.tx.desc_uva, d.tx.avail_uva,
                                  d.tx.used_uva) == 0
        assert lib.vr_qp_map(d.qp) == 0
    assert d.recv_tap() == net_hdr() + eth_frame(60)   # serviced after resume
