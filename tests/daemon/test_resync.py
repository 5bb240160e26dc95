"""Ring index resync on reconnect (session.py `_resync_base`): a split ring whose
SET_VRING_BASE (last_avail_idx) disagrees with used->idx in guest memory starts
from used->idx, with one log line — the state a frontend leaves when the previous
backend died with chains consumed but not yet marked used.

The guest double lays out the rings as the dead backend left them: chains posted,
used->idx behind avail->idx; the frontend double then sends the stale base."""
from __future__ import annotations

import os
import socket
import time

from tests.conftest import packet_socket
from tests.driver import constants as C
from tests.driver.frontend import DEFAULT_PROTOCOL_FEATURES
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of, stats


def _wait_log(d, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in d.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{d.log()}"
        time.sleep(0.05)
    return d.log()


def _handshake_enable_before_kick(g: Guest, bases: dict[int, int]) -> None:
    """The QEMU 7.2 handshake, except that each ring is enabled before its kick fd
    arrives (setup_net enables after, as QEMU does): the ring starts enabled."""
    fe = g.fe
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features() & DEFAULT_PROTOCOL_FEATURES)
    fe.set_owner()
    fe.set_features(C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF, C.VIRTIO_RING_F_EVENT_IDX,
                           C.VHOST_USER_F_PROTOCOL_FEATURES))
    fe.set_mem_table(g.mem)
    for idx, ring in ((0, g.rx), (1, g.tx)):
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.owned_fds += [kick, call]
        ring.kick_fd, ring.call_fd = kick, call
        fe.set_vring_num(idx, ring.num)
        fe.set_vring_base(idx, bases[idx])
        fe.set_vring_addr(idx, ring)
        fe.set_vring_enable(idx, True)
        fe.set_vring_call(idx, call)
        fe.set_vring_kick(idx, kick)


def _tx_in_flight(g: Guest, n: int, completed: int) -> list[bytes]:
    """n TX chains posted and consumed by a backend that died after completing `completed`."""
    frames = [frame(i) for i in range(n)]
    for f in frames:
        g.tx.add_out([bytes(HDR) + f])
    g.tx.publish()
    g.mem.write_u16(g.tx.used_gpa + 2, completed)
    return frames


def _reconnect_with_tx_in_flight(g: Guest, d, netns: str, n: int, completed: int,
                                 tx_base: int) -> tuple[list[bytes], socket.socket]:
    """`_tx_in_flight` (n chains, `completed` used), a packet socket on d's TAP, then the
    enable-before-kick handshake with the TX ring's base at tx_base: the frames and the socket."""
    frames = _tx_in_flight(g, n, completed=completed)
    sock = packet_socket(netns, d.tap)
    _handshake_enable_before_kick(g, bases={0: 0, 1: tx_base})
    return frames, sock


def _wait_used(ring, idx: int) -> None:
    deadline = time.monotonic() + 5
    while ring.used_idx() != idx:
        assert time.monotonic() < deadline, f"used idx {ring.used_idx()}, expected {idx}"
        time.sleep(0.02)


def test_tx_resyncs_to_used_idx_and_resends_the_chains_in_flight(daemon, netns):
    d = daemon()
    g = Guest(d.socket)
    try:
        # the frontend remembers last_avail_idx 5 (all consumed), used->idx says 3
        frames, sock = _reconnect_with_tx_in_flight(g, d, netns, 5, completed=3, tx_base=5)
        got = collect(sock, 2)
        assert got == {3: frames[3], 4: frames[4]}  # sent again from used->idx
        _wait_used(g.tx, 5)
        log = _wait_log(d, "vring 1: base 0x5 disagrees with used idx 0x3")
        assert log.count("disagrees with used idx") == 1, log  # the RX ring (0 == 0) is not touched
        # nothing but the two chains: no frame 0..2 was sent again
        sock.settimeout(0.5)
        extra = []
        try:
            while True:
                data, addr = sock.recvfrom(65536)
                if marker_of(data) is not None:
                    extra.append(marker_of(data))
        except TimeoutError:
            pass
        assert extra == [], f"unexpected frames {extra}"
    finally:
        g.close()


def test_tx_resync_in_qemu_order_returns_the_chains_to_the_guest(daemon, netns):
    """QEMU sends the kick fd before SET_VRING_ENABLE: the ring starts disabled, so
    the resynced chains are consumed and dropped (spec: a started, disabled TX ring
    discards) — but the guest gets its descriptors back instead of leaking them."""
    d = daemon()
    g = Guest(d.socket)
    try:
        _tx_in_flight(g, 5, completed=3)
        g.setup(bases={0: 0, 1: 5})
        g.tx.kick()
        _wait_used(g.tx, 5)
        _wait_log(d, "vring 1: base 0x5 disagrees with used idx 0x3")
        # Dropped if the worker's first pass ran before SET_VRING_ENABLE, sent if the
        # enable came first (the worker thread is scheduled late on a busy host):
        # either way both chains were consumed exactly once.
        t = stats(d)["totals"]
        assert t["tx_drop_disabled"] + t["tx_packets"] == 2, t
    finally:
        g.close()


def test_rx_resyncs_to_used_idx_and_refills_the_buffers_in_flight(daemon, netns):
    d = daemon()
    g = Guest(d.socket)
    try:
        heads = [g.rx.add_in([2048]) for _ in range(4)]
        g.rx.publish()
        g.mem.write_u16(g.rx.used_gpa + 2, 2)  # the dead backend filled 2 of the 4 buffers
        g.setup(bases={0: 4, 1: 0})
        _wait_log(d, "vring 0: base 0x4 disagrees with used idx 0x2")
        sock = packet_socket(netns, d.tap)
        f = frame(7, 200, b"RXF")
        sock.send(f)
        _wait_used(g.rx, 3)
        head, length = g.rx.read_used_elem(2)
        assert head == heads[2] and length == HDR + len(f)
        gpa = g.rx._chains[head].bufs[0][0]
        assert g.mem.read(gpa + HDR, len(f)) == f
    finally:
        g.close()


def test_no_resync_when_base_matches_used_idx(daemon, netns):
    d = daemon()
    g = Guest(d.socket)
    try:
        frames, sock = _reconnect_with_tx_in_flight(g, d, netns, 3, completed=1, tx_base=1)
        assert collect(sock, 2) == {1: frames[1], 2: frames[2]}
        assert "disagrees with used idx" not in d.log()
    finally:
        g.close()
