"""TX through the C datapath (csrc/net_tx.c over split and packed rings), guest ->
TAP, driven through cffi with the Dev of tests/datapath/harness.py: headers and
frames split over descriptors, indirect tables, buffers across regions, bursts,
vnet header validation and sanitizing (virtio 1.2 §5.1.6.2), the bounce-copy
threshold, disabled rings, a busy or gone TAP, and a property test that any
chain shape reaches the TAP byte-identical.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vhostd._native import lib

from tests.datapath.harness import (
    F_CSUM, F_ECN, F_INDIRECT, F_PACKED, F_TSO4, F_TSO6, F_UFO, F_USO, F_V1, M1, Dev,
    eth_frame, read_efd, wait_for,
)
from tests.driver import GuestMemory, net_hdr, parse_net_hdr
from tests.driver.constants import VRING_USED_F_NO_NOTIFY


# ------------------------------------------------------------------------ TX

def test_tx_basic_and_split_header(make_dev):
    d = make_dev()
    frame = eth_frame(1500, 1)
    hdr = net_hdr()
    d.send([hdr + frame])
    assert d.recv_tap() == hdr + frame
    # header split over three descriptors, payload over several
    blob = hdr + frame
    segs = [blob[:3], blob[3:7], blob[7:13], blob[13:600], b"", blob[600:]]
    d.send(segs)
    assert d.recv_tap() == blob
    used = d.tx.wait_used(2)
    assert [u.len for u in used] == [0, 0]
    s = d.stats(lib.VR_TX)
    assert s["packets"] == 2 and s["bytes"] == 3000 and s["kicks"] >= 1
    assert sum(s["batch_hist"]) >= 1
    assert s["broken"] == 0


def test_tx_indirect(make_dev):
    d = make_dev(features=F_V1 | F_INDIRECT)
    blob = net_hdr() + eth_frame(3000, 2)
    segs = [blob[i:i + 100] for i in range(0, len(blob), 100)]
    d.send(segs, indirect=True)
    assert d.recv_tap() == blob
    d.tx.wait_used(1)
    assert d.stats(lib.VR_TX)["packets"] == 1


def test_tx_buffer_spanning_regions(make_dev):
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, M1)])
    d = make_dev(mem=mem, ring_region=0)
    blob = net_hdr() + eth_frame(400, 3)
    gpa = 4 * M1 - 150                       # straddles the region boundary
    mem.write(gpa, blob)
    [desc] = d.tx.reserve_desc(1)
    d.tx.write_desc(desc, gpa, len(blob), 0, 0)
    d.tx.push_avail(desc)
    d.tx.publish()
    d.tx.kick()
    assert d.recv_tap() == blob
    wait_for(lambda: d.tx.used_idx() == 1)


def test_tx_many_in_one_burst_one_call(make_dev):
    d = make_dev()
    before = d.stats(lib.VR_TX)
    for i in range(50):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    for i in range(50):
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
    wait_for(lambda: d.tx.used_idx() == 50)
    s = d.stats(lib.VR_TX)
    assert s["calls"] - before["calls"] == 1
    assert s["batch_hist"][5] == 1                      # 32-63 chains
    assert read_efd(d.call_fd[lib.VR_TX]) == 1
    # idle: kicks requested again (no EVENT_IDX: flags cleared)
    assert d.tx.used_flags() & VRING_USED_F_NO_NOTIFY == 0


def test_tx_bursts_are_bounded(make_dev):
    d = make_dev(num=1024)
    def drain():
        with contextlib.suppress(OSError):
            while True:
                d.peer.recv(4096)
    threading.Thread(target=drain, daemon=True).start()
    for i in range(600):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    wait_for(lambda: d.tx.used_idx() == 600)
    s = d.stats(lib.VR_TX)
    assert s["packets"] + s["drop_tap_busy"] == 600    # the stand-in's buffer is small
    assert sum(s["batch_hist"]) >= 600 // 128           # split into bounded bursts
    assert s["batch_hist"][7] >= 4


def tso(gso_type=1, gso_size=1448, hdr_len=66, csum_start=34, csum_offset=16, flags=1):
    return dict(flags=flags, gso_type=gso_type, gso_size=gso_size, hdr_len=hdr_len,
                csum_start=csum_start, csum_offset=csum_offset)


def uso(**kw):
    return tso(**{"gso_type": 5, "hdr_len": 42, "csum_offset": 6, **kw})


F_TCP4 = F_CSUM | F_TSO4
F_TCP6 = F_CSUM | F_TSO6
F_ALL = F_CSUM | F_TSO4 | F_TSO6 | F_UFO | F_ECN | F_USO
MAXF = 65535 + 18                      # 64 KiB + Ethernet + VLAN

HDR_CASES = [
    # (features, hdr kwargs, frame len, accepted)
    # --- checksum offload
    (0, dict(flags=1, csum_start=14, csum_offset=16), 100, False),      # NEEDS_CSUM w/o CSUM
    (F_CSUM, dict(flags=1, csum_start=14, csum_offset=16), 100, True),
    (F_CSUM, dict(flags=1, csum_start=90, csum_offset=9), 100, False),  # past the end
    (F_CSUM, dict(flags=1, csum_start=90, csum_offset=8), 100, True),   # exactly fits
    (F_CSUM, dict(flags=1, csum_start=0, csum_offset=0), 19, False),    # shorter than an IPv4 header
    (F_CSUM, dict(flags=1, csum_start=0, csum_offset=0), 20, True),
    (F_CSUM, dict(flags=1, csum_start=0xFFFF, csum_offset=0xFFFF), 100, False),  # no u16 wrap
    (F_CSUM, dict(flags=2), 100, False),                                 # DATA_VALID is RX-only
    (F_CSUM, dict(flags=4), 100, False),                                 # RSC_INFO is RX-only
    (F_ALL, dict(flags=0x81), 100, False),                               # unknown flag bit
    # --- TCP segmentation
    (F_TCP4, tso(), 3000, True),
    (F_TCP4, tso(), MAXF, True),                                         # 64 KiB GSO frame
    (F_TCP4, tso(), MAXF + 1, False),
    (F_TSO4, tso(), 3000, False),                                        # NEEDS_CSUM w/o CSUM
    (F_CSUM, tso(), 3000, False),                                        # TSO4 not negotiated
    (F_TCP4, tso(flags=0, csum_start=0, csum_offset=0), 3000, False),    # TCP GSO w/o NEEDS_CSUM
    (F_TCP4, tso(csum_offset=6), 3000, False),                           # not tcphdr.check
    (F_TCP4, tso(gso_size=0), 3000, False),
    (F_TCP4, tso(gso_size=0xFFFF), 3000, False),                         # GSO_BY_FRAGS
    (F_TCP4, tso(gso_size=0xFFFE), 3000, True),                          # > frame: not really GSO, fine
    (F_TCP4, tso(hdr_len=3001), 3000, False),
    (F_TCP4, tso(hdr_len=3000), 3000, True),
    (F_TCP4, tso(hdr_len=0), 53, False),                                 # csum_start + tcphdr > frame
    (F_TCP4, tso(hdr_len=0), 54, True),
    (F_TCP4, tso(gso_type=4), 3000, False),                              # TSO6 not negotiated
    (F_TCP6, tso(gso_type=4, csum_start=54, hdr_len=74), 3000, True),
    (F_TCP6, tso(gso_type=4, csum_start=14, hdr_len=0), 59, False),      # < IPv6 hdr + tcphdr
    (F_TCP6, tso(gso_type=4, csum_start=14, hdr_len=0), 60, True),
    (F_TCP4, tso(gso_type=0x81), 3000, False),                           # ECN w/o HOST_ECN
    (F_TCP4 | F_ECN, tso(gso_type=0x81), 3000, True),
    (F_TCP6 | F_ECN, tso(gso_type=0x84, csum_start=54), 3000, True),
    (F_ALL, dict(gso_type=0x80), 100, False),                            # ECN without GSO
    # --- UDP fragmentation (UFO) and segmentation (USO)
    (F_UFO, dict(gso_type=3, gso_size=1472, hdr_len=42), 3000, True),    # UFO w/o NEEDS_CSUM
    (F_UFO, dict(gso_type=3, gso_size=1472, hdr_len=42), 41, False),
    (F_CSUM | F_UFO, tso(gso_type=3, csum_offset=6, hdr_len=42), 3000, True),
    (F_CSUM | F_TSO4, tso(gso_type=3, csum_offset=6), 3000, False),      # UFO not negotiated
    (F_ALL, tso(gso_type=0x83, csum_offset=6), 3000, False),             # ECN on UDP
    (F_CSUM | F_USO, uso(), 3000, True),
    (F_CSUM | F_USO, uso(), MAXF, True),
    (F_CSUM | F_TSO4 | F_TSO6 | F_UFO, uso(), 3000, False),              # HOST_USO not acked
    (F_CSUM | F_USO, uso(csum_offset=16), 3000, False),                  # not udphdr.check
    (F_CSUM | F_USO, uso(flags=0, csum_start=0, csum_offset=0), 3000, False),
    (F_CSUM | F_USO, uso(gso_size=100), 42 + 12800, True),               # 128 segments
    (F_CSUM | F_USO, uso(gso_size=100), 42 + 12801, False),              # 129
    (F_ALL | F_ECN, uso(gso_type=0x85), 3000, False),
    # --- unknown gso types
    (F_ALL, tso(gso_type=2), 3000, False),
    (F_ALL, tso(gso_type=6), 3000, False),
    (F_ALL, tso(gso_type=0x41), 3000, False),
    # --- frame length
    (0, dict(), 13, False),                                               # runt
    (0, dict(), 14, True),
    (0, dict(), MAXF, True),
    (0, dict(), MAXF + 1, False),
]


TX_COPY_DEFAULT = 512


def tx_copied(d: Dev) -> int:
    with d.paused():
        return lib.vr_qp_tx_copied(d.qp)


# copy_max 512: every case of up to 500 frame bytes is checked in the bounce copy;
# 0: the same cases through the zero-copy writev path.
@pytest.mark.parametrize("copy_max", [0, 512])
@pytest.mark.parametrize("features,hkw,flen,ok", HDR_CASES)
def test_tx_header_validation(make_dev, copy_max, features, hkw, flen, ok):
    d = make_dev(features=F_V1 | F_INDIRECT | features, tx_copy_max=copy_max)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    hdr = net_hdr(**hkw)
    frame = eth_frame(flen, 7) if flen >= 14 else b"\x00" * flen
    if flen > 4096:                     # big GSO frames: many segments, as a guest posts them
        segs = [hdr[:5], hdr[5:] + frame[:10]] + [frame[i:i + 4096] for i in range(10, flen, 4096)]
        d.send(segs, indirect=True)
    else:
        d.send([hdr[:5], hdr[5:] + frame[:10], frame[10:]])
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    if ok:
        got = d.recv_tap()
        assert got[12:] == frame
        want = parse_net_hdr(hdr)
        if not want.flags & 1:
            want = want._replace(csum_start=0, csum_offset=0)
        if not want.gso_type:
            want = want._replace(hdr_len=0, gso_size=0)
        assert parse_net_hdr(got[:12]) == want
        assert s["packets"] == 1 and s["drop_bad_hdr"] == 0
    else:
        assert d.tap_empty()
        assert s["packets"] == 0 and s["drop_bad_hdr"] == 1
    assert s["broken"] == 0
    assert tx_copied(d) == (1 if ok and 12 + flen <= copy_max else 0)


def test_tx_header_sanitized(make_dev):
    d = make_dev()
    # GSO_NONE: hdr_len/gso_size are meaningless; csum fields without NEEDS_CSUM too
    hdr = net_hdr(hdr_len=999, gso_size=77, csum_start=5, csum_offset=6, num_buffers=3)
    frame = eth_frame(64)
    d.send([hdr + frame])
    got = d.recv_tap()
    assert got == net_hdr() + frame


def test_tx_vnet_hdr_10(make_dev):
    d = make_dev(features=0, hdr_len=10)
    blob = net_hdr()[:10] + eth_frame(100, 9)
    d.send([blob[:4], blob[4:]])
    assert d.recv_tap() == blob
    d.tx.wait_used(1)


def test_tx_header_sanitized_in_the_copy(make_dev):
    """A copied frame (default threshold): the TAP gets the sanitized header, with a
    12- and a 10-byte header (the 10-byte form must not lose the frame's first
    bytes to the header's num_buffers field)."""
    for hl, features in ((12, F_V1), (10, 0)):
        d = make_dev(features=features, hdr_len=hl)
        hdr = net_hdr(hdr_len=999, gso_size=77, csum_start=5, csum_offset=6, num_buffers=3)[:hl]
        frame = eth_frame(64, hl)
        d.send([hdr[:3], hdr[3:] + frame[:5], frame[5:]])
        assert d.recv_tap() == net_hdr()[:hl] + frame
        assert tx_copied(d) == 1


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("uring", [True, False])
def test_tx_copy_threshold_boundary(make_dev, packed, uring):
    """Header + frame of exactly the threshold is copied, one byte more goes
    zero-copy; single- and multi-segment chains; the TAP gets identical bytes
    either way and every chain comes back used, in order, with len 0."""
    d = make_dev(features=F_V1 | (F_PACKED if packed else 0),
                 io_mode=lib.VR_IO_URING if uring else lib.VR_IO_SYSCALL)
    frames, want_copied = [], 0
    for total in (TX_COPY_DEFAULT - 1, TX_COPY_DEFAULT, TX_COPY_DEFAULT + 1, 12 + 14, 12 + 1500):
        blob = net_hdr() + eth_frame(total - 12, total)
        one = [blob]
        step = 7 if total <= 300 else 50
        many = [blob[:2], blob[2:12], b"", blob[12:20]] + [blob[i:i + step] for i in range(20, total, step)]
        for segs in (one, many):
            frames.append((blob, segs))
            want_copied += total <= TX_COPY_DEFAULT
    for blob, segs in frames:
        d.tx.add_out(segs)
    d.tx.publish()
    d.tx.kick()
    used = d.tx.wait_used(len(frames))
    assert [u.len for u in used] == [0] * len(frames)
    for blob, _ in frames:
        assert d.recv_tap() == blob
    s = d.stats(lib.VR_TX)
    assert s["packets"] == len(frames) and s["bytes"] == sum(len(b) - 12 for b, _ in frames)
    assert s["broken"] == 0 and s["drop_bad_hdr"] == 0
    assert tx_copied(d) == want_copied


@pytest.mark.parametrize("copy_max", [0, 128, 512])
def test_tx_copied_and_zero_copy_frames_mixed_in_bursts(make_dev, copy_max):
    """Several bursts mixing copied small frames (many segments each) with zero-copy
    large ones: order, bytes and counters as without the copy."""
    d = make_dev(features=F_V1 | F_INDIRECT, num=1024, tx_copy_max=copy_max)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rnd = random.Random(5)
    blobs = []
    for i in range(300):
        total = rnd.choice((12 + 60, 12 + 114, 12 + 116, 12 + 400, 12 + 1500))
        blob = net_hdr() + eth_frame(total - 12, i)
        cuts = sorted(rnd.sample(range(1, total), min(total - 1, rnd.randrange(0, 20))))
        segs = [blob[a:b] for a, b in zip([0] + cuts, cuts + [total])]
        d.tx.add_out(segs, indirect=len(segs) > 3)
        blobs.append(blob)
    d.tx.publish()
    d.tx.kick()
    used = d.tx.wait_used(len(blobs))
    assert [u.len for u in used] == [0] * len(blobs)
    for blob in blobs:
        assert d.recv_tap() == blob
    s = d.stats(lib.VR_TX)
    assert s["packets"] == len(blobs) and s["drop_tap_busy"] == 0 and s["broken"] == 0
    assert tx_copied(d) == sum(len(b) <= copy_max for b in blobs)


def test_tx_copy_max_limit(make_dev):
    d = make_dev()
    with d.paused():
        assert lib.vr_qp_set_tx_copy_max(d.qp, 513) < 0
        assert lib.vr_qp_set_tx_copy_max(d.qp, 512) == 0
        assert lib.vr_qp_set_tx_copy_max(d.qp, 0) == 0
    assert lib.vr_qp_set_tx_copy_max(d.qp, 100) == -errno.EBUSY     # paused only


def test_tx_disabled_ring_drops(make_dev):
    d = make_dev(tx_enabled=False)
    for i in range(5):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    used = d.tx.wait_used(5)
    assert [u.len for u in used] == [0] * 5
    assert d.tap_empty()
    s = d.stats(lib.VR_TX)
    assert s["drop_disabled"] == 5 and s["packets"] == 0
    with d.paused():
        lib.vr_qp_set_enabled(d.qp, lib.VR_TX, 1)
    d.send([net_hdr() + eth_frame(60)])
    assert d.recv_tap() == net_hdr() + eth_frame(60)


def test_tx_tap_busy_and_error(make_dev):
    d = make_dev()
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    n = 100
    for i in range(n):
        d.tx.add_out([net_hdr() + eth_frame(1500, i)])
    d.tx.publish()
    d.tx.kick()
    d.tx.wait_used(n)
    s = d.stats(lib.VR_TX)
    assert s["drop_tap_busy"] > 0
    assert s["packets"] + s["drop_tap_busy"] == n
    while not d.tap_empty(0):
        d.peer.recv(4096)
    # peer gone: EPIPE -> drop_tap_error; the hung-up TAP must not make the worker spin
    d.peer.close()
    d.peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)   # for close()
    for i in range(3):
        d.send([net_hdr() + eth_frame(100, i)])
    d.tx.wait_used(3)
    assert d.stats(lib.VR_TX)["drop_tap_error"] == 3
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.15


# ---------------------------------------------------------------- property

@pytest.fixture(scope="module")
def prop_dev():
    d = Dev(features=F_V1 | F_INDIRECT, num=256)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield d
    d.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flen=st.one_of(st.integers(14, 2000), st.integers(2000, 65535 + 18)),
       cuts=st.lists(st.floats(0, 1), max_size=40),
       zero_len=st.integers(0, 3),
       indirect=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_tx_property_byte_identical(prop_dev, flen, cuts, zero_len, indirect, seed):
    d = prop_dev
    blob = net_hdr() + eth_frame(flen, seed)
    pts = sorted({int(c * len(blob)) for c in cuts} | {0, len(blob)})
    segs = [blob[a:b] for a, b in zip(pts, pts[1:])]
    rnd = random.Random(seed)
    for _ in range(zero_len):
        segs.insert(rnd.randrange(len(segs) + 1), b"")
    before = d.stats(lib.VR_TX)["packets"]
    d.send(segs, indirect=indirect)
    assert d.recv_tap() == blob
    d.tx.wait_used(1)
    s = d.stats(lib.VR_TX)
    assert s["packets"] == before + 1 and s["broken"] == 0
