"""The C datapath's control-plane API (csrc/qp_control.c: the vr_qp_* calls)
driven through cffi with the Dev of tests/datapath/harness.py: configuration
only while paused, and validated; SET/GET base across the 16-bit wrap;
replacing a kick fd; pause/resume (nested) under traffic in both directions;
freeing a paused queue pair.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from vhostd._native import ffi, lib

from tests.datapath.harness import EFD, F_EVENT_IDX, F_INDIRECT, F_V1, eth_frame
from tests.driver import net_hdr


# ------------------------------------------------------- control-plane API

def test_config_requires_pause_and_validates(make_dev):
    d = make_dev()
    assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 256) == -16          # -EBUSY
    assert lib.vr_qp_resume(d.qp) == -22                           # not paused
    with d.paused():
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 0) == -22
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 100) == -22
        assert lib.vr_qp_set_num(d.qp, lib.VR_TX, 65536) == -22
        assert lib.vr_qp_set_num(d.qp, 2, 256) == -22
        assert lib.vr_qp_set_features(d.qp, F_V1, 11) == -22
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, 0x10000) == -22
        # nested pause
        assert lib.vr_qp_pause(d.qp) == 0
        assert lib.vr_qp_resume(d.qp) == 0
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, 0) == 0


def test_set_get_base_and_wrap(make_dev):
    d = make_dev()
    base = 65530
    with d.paused():                                    # as after a migration
        d.mem.write_u16(d.tx.avail_gpa + 2, base)
        d.mem.write_u16(d.tx.used_gpa + 2, base)
        d.tx.avail_idx = d.tx.last_used = base
        assert lib.vr_qp_set_base(d.qp, lib.VR_TX, base) == 0
        b = ffi.new("uint32_t *")
        assert lib.vr_qp_get_base(d.qp, lib.VR_TX, b) == 0 and b[0] == base
    for i in range(10):
        d.send([net_hdr() + eth_frame(60, i)])
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
        d.tx.wait_used(1)
    assert d.get_base(lib.VR_TX) == (base + 10) & 0xFFFF == 4
    assert d.tx.used_idx() == 4


def test_replace_kick_fd(make_dev):
    d = make_dev()
    new = os.eventfd(0, EFD)
    with d.paused():
        assert lib.vr_qp_set_kick(d.qp, lib.VR_TX, new) == 0
        os.close(d.kick_fd[lib.VR_TX])                  # caller closes the old one at once
        d.kick_fd[lib.VR_TX] = new
        d.tx.kick_fd = new
    d.send([net_hdr() + eth_frame(60)])
    assert d.recv_tap() == net_hdr() + eth_frame(60)


def test_pause_resume_under_traffic(make_dev):
    d = make_dev(features=F_V1 | F_EVENT_IDX | F_INDIRECT)
    d.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    n_tx, n_rx = 2000, 2000
    received, stop = [], threading.Event()
    errors = []

    def reader():
        try:
            while len(received) < n_tx:
                received.append(d.peer.recv(4096))
        except Exception as e:                          # pragma: no cover
            errors.append(e)

    def sender():                                       # host -> guest via the "TAP"
        try:
            for i in range(n_rx):
                d.peer.send(net_hdr() + struct.pack("<I", i) + eth_frame(60, 0)[4:])
        except Exception as e:                          # pragma: no cover
            errors.append(e)

    def toggler():
        k = 0
        while not stop.is_set():
            assert lib.vr_qp_pause(d.qp) == 0
            if k % 3 == 0:
                assert lib.vr_qp_pause(d.qp) == 0
                assert lib.vr_qp_resume(d.qp) == 0
            assert lib.vr_qp_resume(d.qp) == 0
            k += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, sender, toggler)]
    for t in threads:
        t.start()
    rx_got = []
    i = 0
    deadline = time.monotonic() + 60
    while (i < n_tx or len(rx_got) < n_rx) and time.monotonic() < deadline:
        while i < n_tx and d.tx.outstanding < 64:
            d.tx.add_out([net_hdr(), struct.pack("<I", i) + eth_frame(60, 0)[4:]],
                         indirect=bool(i & 1))
            i += 1
            d.tx.publish_and_kick()
        while d.rx.outstanding < 32:
            d.rx.add_in([2048])
        d.rx.publish_and_kick()
        d.tx.get_used()
        rx_got += d.rx.get_used()
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(received) == n_tx
    assert [struct.unpack_from("<I", f, 12)[0] for f in received] == list(range(n_tx))
    assert [struct.unpack_from("<I", u.data, 12)[0] for u in rx_got] == list(range(n_rx))
    s_tx, s_rx = d.stats(lib.VR_TX), d.stats(lib.VR_RX)
    assert s_tx["packets"] == n_tx and s_rx["packets"] == n_rx
    assert s_tx["broken"] == 0 and s_rx["broken"] == 0
    assert s_rx["drop_ring_full"] == 0 and s_tx["drop_tap_busy"] == 0


def test_free_while_paused(make_dev):
    d = make_dev()
    assert lib.vr_qp_pause(d.qp) == 0
    # Dev.close() frees the qp while it is still paused: must not hang
