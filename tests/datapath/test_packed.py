"""Packed virtqueue (csrc/vring_packed.c) through the same net datapath, driven by
the guest-side PackedRing double: mirrors the split-ring tests of the
datapath/test_*.py modules (TX/RX, wrap-around over several laps of a small
non-power-of-two queue, event suppression in both modes, indirect tables,
hostile descriptors, SET/GET base).
"""

from __future__ import annotations

import random
import struct
import time

import pytest

from vhostd._native import ffi, lib

from tests.datapath.harness import (
    F_EVENT_IDX, F_INDIRECT, F_MRG, F_PACKED, F_V1, Dev, eth_frame, mrg_frames,
    read_efd, wait_for,
)
from tests.driver import net_hdr
from tests.driver.constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from tests.driver.packed import (
    VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

FP = F_V1 | F_PACKED


@pytest.fixture
def make_dev():
    devs = []

    def make(features=FP, **kw):
        d = Dev(features=features | F_PACKED, **kw)
        devs.append(d)
        return d
    yield make
    for d in devs:
        d.close()


def base_of(slot, wrap, uslot=None, uwrap=None):
    uslot = slot if uslot is None else uslot
    uwrap = wrap if uwrap is None else uwrap
    return slot | wrap << 15 | (uslot | uwrap << 15) << 16


# ------------------------------------------------------------------ TX / RX

def test_tx_basic_split_header_and_indirect(make_dev):
    d = make_dev(FP | F_INDIRECT)
    blob = net_hdr() + eth_frame(1500, 1)
    d.send([blob])
    assert d.recv_tap() == blob
    d.send([blob[:3], blob[3:7], blob[7:13], blob[13:600], b"", blob[600:]])
    assert d.recv_tap() == blob
    d.send([blob[i:i + 100] for i in range(0, len(blob), 100)], indirect=True)
    assert d.recv_tap() == blob
    used = d.tx.wait_used(3)
    assert [u.len for u in used] == [0, 0, 0]
    s = d.stats(lib.VR_TX)
    assert s["packets"] == 3 and s["broken"] == 0
    # slots used: 1 + 6 + 1 (indirect)
    assert d.get_base(lib.VR_TX) == base_of(8, 1)


def test_tx_burst_one_call(make_dev):
    d = make_dev()
    for i in range(50):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    for i in range(50):
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
    d.tx.wait_used(50)
    s = d.stats(lib.VR_TX)
    assert s["calls"] == 1 and s["batch_hist"][5] == 1
    assert d.tx.device_event()[1] == VRING_PACKED_EVENT_FLAG_ENABLE    # idle: kicks wanted


def test_rx_basic_and_split_buffers(make_dev):
    d = make_dev(FP | F_INDIRECT)
    d.rx.add_in([2048])
    d.rx.add_in([4, 7, 100, 2000])
    d.rx.add_in([4, 7, 100, 2000], indirect=True)
    assert d.rx.publish_and_kick()
    frames = [net_hdr(num_buffers=0xAAAA) + eth_frame(500 + i, i) for i in range(3)]
    for f in frames:
        d.peer.send(f)
    got = d.rx.wait_used(3)
    for u, f in zip(got, frames):
        assert u.len == len(f) and u.data == f[:10] + b"\x01\x00" + f[12:]
    # used descriptors carry WRITE (len is meaningful) and both wrap bits
    assert d.get_base(lib.VR_RX) == base_of(6, 1)


def test_rx_oversize_dropped_chain_reused(make_dev):
    d = make_dev()
    d.rx.add_in([200])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(1000))
    d.peer.send(net_hdr() + eth_frame(20))
    [u] = d.rx.wait_used(1)
    assert u.len == 32
    assert d.stats(lib.VR_RX)["drop_ring_full"] == 1


def test_rx_mrg_rewind_packed(make_dev):
    d = make_dev(FP | F_MRG, num=10)
    with d.paused():
        assert lib.vr_qp_set_mtu(d.qp, 9000) == 0
    for _ in range(10):
        d.rx.add_in([1000])
    d.rx.publish_and_kick()
    frame = net_hdr() + eth_frame(2500, 3)
    d.peer.send(frame)
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 3 and lens == [1000, 1000, 512]
    assert data == frame[:10] + b"\x03\x00" + frame[12:]
    assert d.get_base(lib.VR_RX) == base_of(3, 1)          # 7 gathered chains given back
    # over the wrap: more frames than the ring holds, recycled as they come back
    got = []
    for i in range(12):
        d.peer.send(net_hdr() + eth_frame(1200 + i, 10 + i))
        got += mrg_frames(d.rx, 1)
        while d.rx.num_free:
            d.rx.add_in([1000])
        d.rx.publish_and_kick()
    assert [g[2][12:] for g in got] == [eth_frame(1200 + i, 10 + i) for i in range(12)]
    assert all(g[0] == 2 for g in got)
    assert d.get_base(lib.VR_RX) == base_of(7, 1)          # 3 + 24 = 27 = 2 laps + 7


# ---------------------------------------------------------------- wrap-around

@pytest.mark.parametrize("num", [7, 5, 3])
def test_wraparound_laps_small_queue(make_dev, num):
    d = make_dev(FP | F_INDIRECT | F_EVENT_IDX, num=num)
    rnd = random.Random(num)
    sent = 0
    for lap in range(8 * num):
        k = rnd.randrange(1, num + 1)
        blob = net_hdr() + eth_frame(rnd.randrange(14, 3000), lap)
        cuts = sorted(rnd.sample(range(1, len(blob)), k - 1)) if k > 1 else []
        segs = [blob[a:b] for a, b in zip([0] + cuts, cuts + [len(blob)])]
        ind = rnd.random() < 0.3
        d.tx.add_out(segs, indirect=ind)
        d.tx.publish_and_kick()
        assert d.recv_tap() == blob
        d.tx.wait_used(1)
        sent += 1 if ind else k
        # RX: one frame per lap in a chain of 1-3 buffers
        n = rnd.randrange(1, min(3, num) + 1)
        d.rx.add_in([1024] * n, indirect=rnd.random() < 0.3)
        d.rx.publish_and_kick()
        f = net_hdr() + eth_frame(rnd.randrange(14, 1000), 1000 + lap)
        d.peer.send(f)
        [u] = d.rx.wait_used(1)
        assert u.data == f[:10] + b"\x01\x00" + f[12:]
    b = d.get_base(lib.VR_TX)
    assert b & 0x7FFF == sent % num and (b >> 15) & 1 == (1 ^ (sent // num) & 1)
    assert b >> 16 == b & 0xFFFF
    assert d.stats(lib.VR_TX)["broken"] == 0 and d.stats(lib.VR_RX)["broken"] == 0


# ------------------------------------------------------------- notifications

def test_call_suppression_flags(make_dev):
    d = make_dev()
    d.tx.set_driver_event(VRING_PACKED_EVENT_FLAG_DISABLE)
    d.send([net_hdr() + eth_frame(60)])
    d.recv_tap()
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["calls"] == 0 and s["calls_suppressed"] == 1
    assert read_efd(d.call_fd[lib.VR_TX]) == 0
    d.tx.set_driver_event(VRING_PACKED_EVENT_FLAG_ENABLE)
    d.send([net_hdr() + eth_frame(60)])
    d.recv_tap()
    d.tx.wait_used(1)
    assert d.stats(lib.VR_TX)["calls"] == 1


def test_call_suppression_event_idx(make_dev):
    d = make_dev(FP | F_EVENT_IDX, num=6)
    tx = d.tx

    def one(nsegs=1):
        blob = net_hdr() + eth_frame(60)
        d.send([blob[:6], blob[6:]] if nsegs == 2 else [blob])
        d.recv_tap()
        wait_for(lambda: tx._used_ready())
        tx._cb_disabled = True              # consume without moving the event
        tx.get_used()
        tx._cb_disabled = False
        return d.stats(lib.VR_TX)

    assert one()["calls"] == 1               # first decision always calls
    tx.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, 4, True)   # slot 4, lap 1
    assert one(2)["calls"] == 1              # slots 1-2: before the event
    assert one()["calls_suppressed"] == 2    # slot 3
    assert one()["calls"] == 2               # slot 4: the event
    tx.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, 1, False)  # slot 1 of the next lap
    assert one(2)["calls"] == 2              # slots 5 and 0 (wraps): not yet
    assert one()["calls"] == 3               # slot 1, lap 0
    # idle device asks for a kick at its next avail slot, in DESC mode
    off_wrap, flags = tx.device_event()
    assert flags == VRING_PACKED_EVENT_FLAG_DESC and off_wrap == tx.avail_pos == 2


def test_kick_suppression_while_draining(make_dev):
    d = make_dev(FP | F_EVENT_IDX)
    # the driver follows the device's requests: each publish after idle kicks
    for i in range(5):
        # Idle: the device wrote off_wrap, then (release) the DESC flag that makes
        # it count. Waited for before the first publish too: the pass the worker
        # makes when the rings start may still be running (DISABLE, then DESC).
        wait_for(lambda: d.tx.device_event() == (d.tx.avail_pos, VRING_PACKED_EVENT_FLAG_DESC))
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
        assert d.tx.publish_and_kick(), f"publish {i}: no kick asked for, device event {d.tx.device_event()}"
        d.recv_tap()
        d.tx.wait_used(1)
    wait_for(lambda: d.tx.device_event() == (d.tx.avail_pos, VRING_PACKED_EVENT_FLAG_DESC))
    d.tx.add_out([net_hdr() + eth_frame(60)])
    d.tx.publish()
    d.tx.set_driver_event(VRING_PACKED_EVENT_FLAG_ENABLE)
    assert d.tx.needs_kick()


# ---------------------------------------------------------------- hostile input

def _buf(r, n=64, fill=b""):
    g = r.alloc_buf(n)
    if fill:
        r.mem.write(g, fill)
    return g


def h_chain_longer_than_ring(d, r):
    r.post_raw([(_buf(r), 64, VRING_DESC_F_NEXT)] * d.num)   # last one keeps NEXT too
    return lib.VR_BROKEN_DESC


def h_buffer_unmapped(d, r):
    r.post_raw([(0x7FFF_0000_0000, 64, 0)])
    return lib.VR_BROKEN_ADDR


def h_buffer_wraps(d, r):
    r.post_raw([(2**64 - 8, 64, 0)])
    return lib.VR_BROKEN_ADDR


def h_indirect_nested(d, r):
    r.make_indirect([(_buf(r), 16, VRING_DESC_F_INDIRECT)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_len_24(d, r):
    r.make_indirect([(_buf(r), 64, 0), (_buf(r), 64, 0)], table_len=24)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_len_0(d, r):
    r.make_indirect([(_buf(r), 64, 0)], table_len=0)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_too_big(d, r):
    r.make_indirect([(_buf(r), 64, 0)], table_len=16 * (d.num + 1))
    return lib.VR_BROKEN_INDIRECT


def h_indirect_plus_next(d, r):
    r.make_indirect([(_buf(r), 64, 0)], flags=VRING_DESC_F_NEXT)
    return lib.VR_BROKEN_INDIRECT


def h_indirect_inside_chain(d, r):
    t = _buf(r, 64)
    r.mem.write(t, struct.pack("<QIHH", _buf(r), 64, 0, 0))
    r.post_raw([(_buf(r), 64, 0), (t, 16, VRING_DESC_F_INDIRECT)])
    return lib.VR_BROKEN_INDIRECT


def h_indirect_table_unmapped(d, r):
    r.post_raw([(0x7FFF_0000_0000, 32, VRING_DESC_F_INDIRECT)])
    return lib.VR_BROKEN_ADDR


def h_indirect_misaligned(d, r):
    t = _buf(r, 64) + 8                 # 8-byte, not 16-byte aligned
    r.mem.write(t, struct.pack("<QIHH", _buf(r), 64, 0, 0))
    r.post_raw([(t, 16, VRING_DESC_F_INDIRECT)])
    return lib.VR_BROKEN_INDIRECT


def h_tx_writable(d, r):
    r.add_chain([net_hdr() + eth_frame(60)], [64])
    return lib.VR_BROKEN_DESC


HOSTILE = [h_chain_longer_than_ring, h_buffer_unmapped, h_buffer_wraps, h_indirect_nested,
           h_indirect_len_24, h_indirect_len_0, h_indirect_too_big, h_indirect_plus_next,
           h_indirect_inside_chain, h_indirect_table_unmapped, h_indirect_misaligned, h_tx_writable]


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__[2:])
def test_hostile_tx(make_dev, hostile):
    d = make_dev(FP | F_INDIRECT, num=16)
    want = hostile(d, d.tx)
    d.tx.publish()
    d.tx.kick()
    wait_for(lambda: d.stats(lib.VR_TX)["broken"], what="vq broken")
    s = d.stats(lib.VR_TX)
    assert s["broken"] == want and s["drop_bad_desc"] == 1
    assert read_efd(d.err_fd[lib.VR_TX]) == 1
    assert d.tap_empty()
    # RX keeps working; the broken ring is left alone
    d.rx.add_in([2048])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(60))
    [u] = d.rx.wait_used(1)
    assert u.len == 72
    with d.paused():
        assert lib.vr_qp_reset_vq(d.qp, lib.VR_TX) == 0
        assert d.stats(lib.VR_TX)["broken"] == 0


def test_indirect_without_feature_is_bad(make_dev):
    d = make_dev()
    d.tx.add_out([net_hdr(), eth_frame(60)], indirect=True)
    d.tx.publish()
    d.tx.kick()
    wait_for(lambda: d.stats(lib.VR_TX)["broken"])
    assert d.stats(lib.VR_TX)["broken"] == lib.VR_BROKEN_DESC


def test_hostile_rx_readable(make_dev):
    d = make_dev()
    d.rx.add_chain([b"x" * 64], [2048])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(60))
    wait_for(lambda: d.stats(lib.VR_RX)["broken"])
    assert d.stats(lib.VR_RX)["broken"] == lib.VR_BROKEN_DESC
    assert d.get_base(lib.VR_RX) == base_of(0, 1)       # not consumed
    t0 = time.process_time()
    time.sleep(0.2)
    assert time.process_time() - t0 < 0.1


# ------------------------------------------------------------------ base / size

def test_queue_size_and_base_validation(make_dev):
    d = make_dev(num=7)
    with d.paused():
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 100) == 0        # any size for packed
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 32768) == 0
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 32769) == -22
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 7) == 0
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base_of(7, 1)) == -22   # slot >= num
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base_of(6, 1, 7, 1)) == -22
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base_of(0, 1)) == 0
        # back to split: sizes must be powers of two again
        assert lib.vr_qp_set_features(d.qp, F_V1, 12) == 0
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 100) == -22
        assert lib.vr_qp_mapped(d.qp, lib.VR_TX) == 0           # 7 is no split size
        assert lib.vr_qp_set_features(d.qp, FP, 12) == 0
        assert lib.vr_qp_mapped(d.qp, lib.VR_TX) == 1           # re-translated as packed
        b = ffi.new("uint32_t *")
        assert lib.vr_qp_get_base(d.qp, lib.VR_TX, b) == 0 and b[0] == base_of(0, 1)


@pytest.mark.parametrize("qemu_style", [True, False])
def test_set_get_base_resume_mid_ring(make_dev, qemu_style):
    """As after a reconnect: the frontend restores the positions (QEMU: both halves;
    DPDK 22.11: avail only) and traffic continues from there across the wrap."""
    d = make_dev(num=7)
    start = 5
    with d.paused():
        for r in (d.tx, d.rx):                     # move the doubles to slot 5, lap 1:
            r.next_avail = r.last_used = start     # slots 0-4 were used in lap 1,
            for slot in range(start):              # slots 5-6 in lap 0 (flags 0)
                r.write_desc(slot, 0, 0, 0, 0x8080)
        base = base_of(start, 1) if qemu_style else start | 1 << 15
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base) == 0
        assert lib.vr_qp_set_base(d.qp, lib.VR_RX, base) == 0
    for i in range(10):
        d.send([net_hdr() + eth_frame(60, i)])
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
        d.tx.wait_used(1)
    assert d.get_base(lib.VR_TX) == base_of((start + 10) % 7, 1)   # crossed two wraps
    d.rx.add_in([2048])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(60))
    d.rx.wait_used(1)
    assert d.get_base(lib.VR_RX) == base_of(6, 1)
