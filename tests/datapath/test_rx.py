"""RX through the C datapath (csrc/net_rx.c over split rings), TAP -> guest,
driven through cffi with the Dev of tests/datapath/harness.py: the vnet header
split over buffers, num_buffers, oversize frames and EAGAIN giving the chain
back, no spinning on a readable TAP without guest buffers, disabled rings; and
mergeable RX buffers (VIRTIO_NET_F_MRG_RXBUF, virtio 1.2 §5.1.6.3.2): frames
spread over several chains, unused chains rewound, 64 KiB GSO frames.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time

from vhostd._native import lib

from tests.datapath.harness import (
    F_EVENT_IDX, F_GUEST_TSO4, F_GUEST_TSO6, F_INDIRECT, F_MRG, F_V1, eth_frame,
    mrg_frames, wait_for,
)
from tests.driver import net_hdr, parse_net_hdr
from tests.driver.constants import VRING_USED_F_NO_NOTIFY


# ------------------------------------------------------------------------ RX

def test_rx_basic(make_dev):
    d = make_dev()
    d.rx.add_in([2048])
    assert d.rx.publish_and_kick()
    frame = net_hdr(num_buffers=0) + eth_frame(1000, 4)
    d.peer.send(frame)
    [u] = d.rx.wait_used(1)
    assert u.len == len(frame)
    assert parse_net_hdr(u.data[:12]).num_buffers == 1
    assert u.data[10:12] == b"\x01\x00" and u.data[12:] == frame[12:]
    s = d.stats(lib.VR_RX)
    assert s["packets"] == 1 and s["bytes"] == 1000 and s["calls"] == 1


def test_rx_split_header_buffers(make_dev):
    d = make_dev(features=F_V1 | F_INDIRECT)
    for ind in (False, True):
        d.rx.add_in([4, 7, 100, 2000], indirect=ind)     # num_buffers lands across buffers
        d.rx.publish()
        d.rx.kick()
        frame = net_hdr(num_buffers=0xAAAA) + eth_frame(500, 5)
        d.peer.send(frame)
        [u] = d.rx.wait_used(1)
        assert u.len == len(frame)
        assert u.data == frame[:10] + b"\x01\x00" + frame[12:]


def test_rx_vnet_hdr_10_no_num_buffers(make_dev):
    d = make_dev(features=0, hdr_len=10)
    d.rx.add_in([2048])
    d.rx.publish()
    d.rx.kick()
    frame = net_hdr()[:10] + eth_frame(300, 6)
    d.peer.send(frame)
    [u] = d.rx.wait_used(1)
    assert u.data == frame


def test_rx_oversize_dropped_and_chain_reused(make_dev):
    d = make_dev()
    head = d.rx.add_in([200])
    d.rx.publish()
    d.rx.kick()
    d.peer.send(net_hdr() + eth_frame(1000))           # bigger than the chain: dropped
    d.peer.send(net_hdr() + eth_frame(20))             # runt-free, fits
    [u] = d.rx.wait_used(1)
    assert u.head == head and u.len == 32
    s = d.stats(lib.VR_RX)
    assert s["drop_ring_full"] == 1 and s["packets"] == 1
    # a datagram shorter than the header: dropped, chain reused
    d.rx.add_in([200])
    d.rx.publish()
    d.rx.kick()
    d.peer.send(b"\x00" * 5)
    d.peer.send(net_hdr() + eth_frame(30))
    [u] = d.rx.wait_used(1)
    assert u.len == 42
    assert d.stats(lib.VR_RX)["drop_ring_full"] == 2


def test_rx_eagain_gives_chain_back(make_dev):
    d = make_dev()
    for _ in range(3):
        d.rx.add_in([2048])
    d.rx.publish()
    d.rx.kick()
    wait_for(lambda: d.stats(lib.VR_RX)["kicks"] >= 1)
    time.sleep(0.02)
    assert d.get_base(lib.VR_RX) == 0                   # popped, EAGAIN, rewound
    assert d.rx.used_idx() == 0
    d.peer.send(net_hdr() + eth_frame(60))
    d.rx.wait_used(1)
    assert d.get_base(lib.VR_RX) == 1


def test_rx_ring_empty_no_spin_then_kick(make_dev):
    d = make_dev()
    for i in range(4):
        d.peer.send(net_hdr() + eth_frame(60, i))      # TAP readable, no guest buffers
    time.sleep(0.05)
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.15, "worker spins on a readable TAP"
    assert d.rx.used_flags() & VRING_USED_F_NO_NOTIFY == 0       # kicks requested
    for _ in range(4):
        d.rx.add_in([2048])
    assert d.rx.publish_and_kick()
    got = d.rx.wait_used(4)
    assert [u.data[12:] for u in got] == [eth_frame(60, i) for i in range(4)]


def test_rx_not_read_when_disabled(make_dev):
    d = make_dev(rx_enabled=False)
    d.rx.add_in([2048])
    d.rx.publish()
    d.rx.kick()
    d.peer.send(net_hdr() + eth_frame(60))
    time.sleep(0.1)
    r, _, _ = select.select([d.tap], [], [], 0)
    assert r, "disabled RX ring must leave frames in the TAP"
    assert d.rx.used_idx() == 0
    with d.paused():
        lib.vr_qp_set_enabled(d.qp, lib.VR_RX, 1)
    [u] = d.rx.wait_used(1)
    assert u.data[12:] == eth_frame(60)


# ------------------------------------------------------------ MRG_RXBUF

def test_rx_mrg_frame_spread_and_rewind(make_dev):
    d = make_dev(features=F_V1 | F_MRG)
    with d.paused(settle=True):
        assert lib.vr_qp_set_mtu(d.qp, 9000) == 0
    for _ in range(12):
        d.rx.add_in([1000])                            # 12000 bytes >= 9018 + 12
    assert d.rx.publish_and_kick()
    frame = net_hdr(num_buffers=0x5555) + eth_frame(3000, 11)
    d.peer.send(frame)
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 4 and lens == [1000, 1000, 1000, 12]
    assert data == frame[:10] + b"\x04\x00" + frame[12:]
    # the 8 chains gathered but not filled were given back: the next frame starts there
    assert d.get_base(lib.VR_RX) == 4
    assert d.rx.used_idx() == 4
    d.peer.send(net_hdr() + eth_frame(100, 12))
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 1 and lens == [112] and data[12:] == eth_frame(100, 12)
    assert d.get_base(lib.VR_RX) == 5
    s = d.stats(lib.VR_RX)
    assert s["packets"] == 2 and s["bytes"] == 3100 and s["drop_ring_full"] == 0


def test_rx_mrg_frame_fits_exactly_and_multi_buffer_chains(make_dev):
    d = make_dev(features=F_V1 | F_MRG | F_INDIRECT)
    for i in range(6):
        d.rx.add_in([12, 300, 188], indirect=bool(i & 1))      # 500-byte chains
    d.rx.publish_and_kick()
    frame = net_hdr() + eth_frame(988, 13)                     # 1000 = exactly 2 chains
    d.peer.send(frame)
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 2 and lens == [500, 500]
    assert data == frame[:10] + b"\x02\x00" + frame[12:]
    assert d.get_base(lib.VR_RX) == 2


def test_rx_mrg_64k_gso_frames(make_dev):
    d = make_dev(features=F_V1 | F_MRG | F_GUEST_TSO4 | F_GUEST_TSO6)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    for _ in range(120):
        d.rx.add_in([1536])
    d.rx.publish_and_kick()
    sizes = [65550, 65535 + 14, 1500, 64, 30000, 65550]
    hdr = net_hdr(flags=1, gso_type=1, hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16)
    frames = [hdr + eth_frame(n, 20 + i) for i, n in enumerate(sizes)]
    got = []
    for f in frames:
        d.peer.send(f)
        got += mrg_frames(d.rx, 1)
        while d.rx.outstanding < 120:
            d.rx.add_in([1536])
        d.rx.publish_and_kick()
    for (nb, lens, data), f in zip(got, frames):
        assert nb == -(-len(f) // 1536)
        assert sum(lens) == len(f) and all(x == 1536 for x in lens[:-1])
        assert data == f[:10] + struct.pack("<H", nb) + f[12:]          # TAP header kept
    s = d.stats(lib.VR_RX)
    assert s["packets"] == len(sizes) and s["drop_ring_full"] == 0 and s["broken"] == 0


def test_rx_mrg_need_follows_features(make_dev):
    """Without GSO offloads the largest frame is MTU-bound: a bigger one is dropped
    after the (MTU-sized) gather, and its chains are reused."""
    d = make_dev(features=F_V1 | F_MRG)
    for _ in range(8):
        d.rx.add_in([1024])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(4000, 1))        # > 1518 + 12 gathered: dropped
    d.peer.send(net_hdr() + eth_frame(1514, 2))
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 2 and lens == [1024, 502] and data[12:] == eth_frame(1514, 2)
    assert d.stats(lib.VR_RX)["drop_ring_full"] == 1
    assert d.get_base(lib.VR_RX) == 2


def test_rx_mrg_short_ring(make_dev):
    """Fewer buffers posted than the largest frame needs: small frames still go
    through (read with what the ring holds); a frame too big for it is dropped."""
    d = make_dev(features=F_V1 | F_MRG | F_GUEST_TSO4)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for _ in range(3):
        d.rx.add_in([1024])
    d.rx.publish_and_kick()
    d.peer.send(net_hdr() + eth_frame(5000, 3))        # 5012 > 3072 posted: dropped
    d.peer.send(net_hdr() + eth_frame(1800, 4))
    [(nb, lens, data)] = mrg_frames(d.rx, 1)
    assert nb == 2 and data[12:] == eth_frame(1800, 4)
    s = d.stats(lib.VR_RX)
    assert s["drop_ring_full"] == 1 and s["packets"] == 1
    assert d.get_base(lib.VR_RX) == 2


def test_rx_mrg_burst_order_and_eagain_rewind(make_dev):
    d = make_dev(features=F_V1 | F_MRG | F_EVENT_IDX)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for _ in range(200):
        d.rx.add_in([256])
    d.rx.publish_and_kick()
    wait_for(lambda: d.stats(lib.VR_RX)["kicks"] >= 1)
    time.sleep(0.02)
    assert d.get_base(lib.VR_RX) == 0                  # gathered, EAGAIN, all given back
    rnd = random.Random(5)
    sizes = [rnd.randrange(14, 1515) for _ in range(60)]
    for i, n in enumerate(sizes):
        d.peer.send(net_hdr() + eth_frame(n, i))
    got = []
    while len(got) < len(sizes):
        got += mrg_frames(d.rx, 1)
        while d.rx.outstanding < 200:
            d.rx.add_in([256])
        d.rx.publish_and_kick()
    assert [g[2][12:] for g in got] == [eth_frame(n, i) for i, n in enumerate(sizes)]
    assert [g[0] for g in got] == [-(-(n + 12) // 256) for n in sizes]
    assert d.get_base(lib.VR_RX) == sum(g[0] for g in got) & 0xFFFF


def test_mrg_requires_12_byte_header(make_dev):
    d = make_dev()
    with d.paused():
        assert lib.vr_qp_set_features(d.qp, F_MRG, 10) == -22
        assert lib.vr_qp_set_features(d.qp, F_MRG, 12) == 0
        assert lib.vr_qp_set_mtu(d.qp, 67) == -22
        assert lib.vr_qp_set_mtu(d.qp, 65536) == -22
        assert lib.vr_qp_set_mtu(d.qp, 68) == 0
