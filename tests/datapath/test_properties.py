"""Property tests: the same random traffic through a split ring and a packed ring
(non-power-of-two size) must come out byte-identical, both ways: guest -> TAP
(random frame sizes, chain shapes, direct or indirect) and TAP -> guest
(random buffer shapes, mergeable or not; reassembled by num_buffers).
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vhostd._native import lib

from tests.datapath.harness import (
    F_EVENT_IDX, F_INDIRECT, F_MRG, F_PACKED, F_V1, Dev, eth_frame, mrg_frames,
)
from tests.driver import net_hdr, parse_net_hdr

KINDS = {"split": (0, 64), "packed": (F_PACKED, 61)}


@pytest.fixture(scope="module")
def devs():
    out = {}
    for mrg in (False, True):
        for kind, (flag, num) in KINDS.items():
            feats = F_V1 | F_INDIRECT | F_EVENT_IDX | flag | (F_MRG if mrg else 0)
            d = Dev(features=feats, num=num)
            for s in (d.tap, d.peer):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            out[(kind, mrg)] = d
    yield out
    for d in out.values():
        d.close()


tx_frame = st.tuples(st.integers(14, 9000), st.lists(st.floats(0, 1), max_size=12),
                     st.booleans(), st.integers(0, 2**31))
rx_shape = st.lists(st.integers(64, 3000), min_size=1, max_size=3)


def run_tx(d, frames):
    out = []
    for flen, cuts, indirect, seed in frames:
        blob = net_hdr() + eth_frame(flen, seed)
        pts = sorted({int(c * len(blob)) for c in cuts} | {0, len(blob)})
        d.send([blob[a:b] for a, b in zip(pts, pts[1:])], indirect=indirect)
        out.append(d.recv_tap())
        d.tx.wait_used(1)
    return out


def run_rx(d, frames, shapes, mrg):
    out = []
    k = 0
    for flen, seed in frames:
        f = net_hdr(num_buffers=7) + eth_frame(flen, seed)
        if mrg:
            # keep enough buffers posted for the largest frame (1518 + 12) plus this one
            while sum(c for c in d._posted) < len(f) + 1530:
                shape = shapes[k % len(shapes)]
                k += 1
                d.rx.add_in(shape, indirect=len(shape) > 1 and k % 2 == 0)
                d._posted.append(sum(shape))
            d.rx.publish_and_kick()
            d.peer.send(f)
            [(nb, lens, data)] = mrg_frames(d.rx, 1)
            del d._posted[:nb]
            out.append((nb, data))
        else:
            shape = list(shapes[k % len(shapes)])
            k += 1
            if sum(shape) < len(f):
                shape.append(len(f) - sum(shape))
            d.rx.add_in(shape, indirect=len(shape) > 1 and k % 2 == 0)
            d.rx.publish_and_kick()
            d.peer.send(f)
            [u] = d.rx.wait_used(1)
            out.append((1, u.data))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tx=st.lists(tx_frame, min_size=1, max_size=6),
       rx=st.lists(st.tuples(st.integers(14, 1514), st.integers(0, 2**31)), min_size=1, max_size=6),
       shapes=st.lists(rx_shape, min_size=1, max_size=4),
       mrg=st.booleans())
def test_split_and_packed_agree(devs, tx, rx, shapes, mrg):
    results = {}
    for kind in KINDS:
        d = devs[(kind, mrg)]
        if not hasattr(d, "_posted"):
            d._posted = []
        results[kind] = (run_tx(d, tx), run_rx(d, rx, shapes, mrg))
        for w in (lib.VR_RX, lib.VR_TX):
            assert d.stats(w)["broken"] == 0
    assert results["split"] == results["packed"]
    tx_out, rx_out = results["split"]
    assert tx_out == [net_hdr() + eth_frame(n, s) for n, _, _, s in tx]
    for (nb, data), (flen, seed) in zip(rx_out, rx):
        assert parse_net_hdr(data).num_buffers == nb
        assert data[12:] == eth_frame(flen, seed) and data[:10] == net_hdr()[:10]
