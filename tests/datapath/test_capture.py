"""Packet capture in the C datapath (csrc/capture.c): what the worker copies into a
queue pair's capture ring while `vhostctl capture` runs.

TX frames are taken as the guest sent them once their vnet header passed the
checks (copied small frames and zero-copy large ones alike), RX frames once the
TAP delivered them into guest buffers; records carry the frame without the vnet
header. A ring that is full drops capture records (counted), never the guest's
frames.
"""
from __future__ import annotations

import struct

import pytest

from vhostd._native import ffi, lib

from tests.datapath.harness import F_INDIRECT, F_MRG, F_PACKED, F_V1, eth_frame
from tests.driver import net_hdr

REC = struct.Struct("=IIIBBHQ")
assert REC.size == ffi.sizeof("struct vr_cap_rec")


def records(cap, bufsize: int = 1 << 22) -> list[tuple[int, int, int, bytes]]:
    """(dir, queue, origlen, data) of every record waiting in the ring."""
    buf = ffi.new("uint8_t[]", bufsize)
    out = []
    while True:
        n = lib.vr_capture_read(cap, buf, bufsize)
        assert n >= 0
        if n == 0:
            return out
        raw = bytes(ffi.buffer(buf, n))
        pos = 0
        while pos < n:
            ln, caplen, origlen, d, q, _pad, ts = REC.unpack_from(raw, pos)
            assert ln % 8 == 0 and ln >= REC.size + caplen and ts > 0
            out.append((d, q, origlen, raw[pos + REC.size:pos + REC.size + caplen]))
            pos += ln


@pytest.fixture
def capture():
    caps = []

    def make(dev, bytes_: int = 1 << 20, snaplen: int = 65535,
             dirs: int = lib.VR_CAP_RX | lib.VR_CAP_TX, queue: int = 0):
        cap = lib.vr_capture_new(bytes_, snaplen, dirs, queue)
        assert cap != ffi.NULL
        with dev.paused():
            assert lib.vr_qp_set_capture(dev.qp, cap) == 0
        caps.append((dev, cap))
        return cap
    yield make
    for dev, cap in caps:
        if dev.qp:
            with dev.paused():
                lib.vr_qp_set_capture(dev.qp, ffi.NULL)
        lib.vr_capture_free(cap)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_capture_both_directions_byte_for_byte(make_dev, capture, packed):
    d = make_dev(features=F_V1 | F_MRG | F_INDIRECT | (F_PACKED if packed else 0))
    cap = capture(d)
    tx = [eth_frame(n, n) for n in (60, 300, 499, 1000, 1514)]      # copied and zero-copy
    for f in tx:
        d.send([net_hdr()[:5], net_hdr()[5:] + f[:20], f[20:]])
    for f in tx:
        assert d.recv_tap()[12:] == f
    d.tx.wait_used(len(tx))
    rx = [eth_frame(n, 100 + n) for n in (64, 700, 1500)]
    for _ in rx:
        d.rx.add_in([2048])
    d.rx.publish_and_kick()
    for f in rx:
        d.peer.send(net_hdr() + f)
    d.rx.wait_used(len(rx))
    with d.paused():
        got = records(cap)
    assert [(dr, data) for dr, _q, _o, data in got if dr == lib.VR_CAP_TX] == [(lib.VR_CAP_TX, f) for f in tx]
    assert [(dr, data) for dr, _q, _o, data in got if dr == lib.VR_CAP_RX] == [(lib.VR_CAP_RX, f) for f in rx]
    assert all(q == 0 and o == len(data) for _d, q, o, data in got)
    assert lib.vr_capture_frames(cap) == len(tx) + len(rx) and lib.vr_capture_drops(cap) == 0


def test_capture_snaplen_direction_and_queue(make_dev, capture):
    d = make_dev()
    cap = capture(d, snaplen=100, dirs=lib.VR_CAP_TX, queue=3)
    f = eth_frame(1400, 5)
    d.send([net_hdr() + f])
    d.recv_tap()
    d.rx.add_in([2048])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(200, 6))                       # RX: not captured
    d.rx.wait_used(1)
    with d.paused():
        got = records(cap)
    assert got == [(lib.VR_CAP_TX, 3, 1400, f[:100])]


def test_full_ring_drops_capture_records_not_frames(make_dev, capture):
    """A ring nobody reads: the capture drops records (counted), every guest frame
    still reaches the TAP."""
    d = make_dev(num=1024)
    cap = capture(d, bytes_=4096)
    frames = [eth_frame(1000, i) for i in range(40)]
    for f in frames:
        d.tx.add_out([net_hdr() + f])
    d.tx.publish()
    d.tx.kick()
    for f in frames:
        assert d.recv_tap()[12:] == f
    d.tx.wait_used(len(frames))
    with d.paused():
        got = records(cap)
        drops = lib.vr_capture_drops(cap)
    assert 1 <= len(got) < len(frames) and drops == len(frames) - len(got)
    assert [data for _d, _q, _o, data in got] == frames[:len(got)]    # the first ones, whole
    assert d.stats(lib.VR_TX)["packets"] == len(frames)


def test_detached_capture_takes_nothing(make_dev, capture):
    d = make_dev()
    cap = capture(d)
    with d.paused():
        assert lib.vr_qp_set_capture(d.qp, ffi.NULL) == 0
    d.send([net_hdr() + eth_frame(100, 1)])
    d.recv_tap()
    with d.paused():
        assert records(cap) == [] and lib.vr_capture_frames(cap) == 0


def test_capture_arguments_checked():
    for args in ((1000, 100, 3, 0), (1 << 20, 0, 3, 0), (1 << 20, 100, 0, 0), (1 << 20, 100, 4, 0),
                 (1 << 31, 100, 3, 0)):
        assert lib.vr_capture_new(*args) == ffi.NULL, args


class _QP:
    """What vhostd.capture.Capture needs of a device.QueuePair, over a harness Dev."""

    def __init__(self, dev):
        self.index, self.ptr, self.paused = 0, dev.qp, dev.paused


def test_drain_is_bounded_per_call_and_loses_nothing(make_dev, monkeypatch):
    """Capture.drain() returns after about DRAIN_BUDGET bytes of records and says
    there is more; the event loop gets its turn between calls, and the calls
    together return every record, in order, as pcap records."""
    import struct as st

    from vhostd import capture as capmod

    monkeypatch.setattr(capmod, "DRAIN_BUDGET", 16 << 10)
    d = make_dev(num=1024)
    cap = capmod.Capture.start("p", [_QP(d)], None, "tx", capmod.MAX_SNAPLEN, 0)
    try:
        frames = [eth_frame(1000, i) for i in range(300)]
        for k in range(0, len(frames), 50):
            for f in frames[k:k + 50]:
                d.tx.add_out([net_hdr() + f])
            d.tx.publish()
            d.tx.kick()
            for f in frames[k:k + 50]:
                assert d.recv_tap()[12:] == f
            d.tx.wait_used(50)
        chunks = []
        while True:
            data, more = cap.drain()
            assert len(data) <= (16 << 10) + capmod.MAX_RECORD
            chunks.append(data)
            if not more:
                break
        assert len(chunks) > 3  # ~300 kB of records, at most ~80 kB per call
        stream, got, pos = b"".join(chunks), [], 0
        while pos < len(stream):
            _s, _ns, caplen, origlen = st.unpack_from("<IIII", stream, pos)
            got.append(stream[pos + 16:pos + 16 + caplen])
            pos += 16 + caplen
        assert got == frames and cap.frames == len(frames) and cap.dropped == 0
    finally:
        cap.stop()
