"""Self-tests of the vhost-user Frontend double in tests/driver (no vhostd
involved).

A tiny in-test socket server (MiniBackend) checks the vhost-user bytes the
Frontend sends against bytes written out by hand from
docs/interop/vhost-user.rst, and answers with canned replies, NACKs, fds or
malformed replies to exercise the Frontend's reply validation. The guest
memory and split ring doubles are tested in driver/test_rings.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time

import pytest

from tests.driver import constants as C
from tests.driver import frontend as F
from tests.driver.frontend import ConnectionClosed, Frontend, Nack, ProtocolError
from tests.driver.guestmem import GuestMemory
from tests.driver.split import SplitRing


# ============================================================================
# Frontend: encodings against hand-written spec bytes
# ============================================================================
def le(*fields):
    """Concatenate (value, width) pairs little-endian (= native on x86)."""
    return b"".join(v.to_bytes(w, "little") for v, w in fields)


def test_constants_match_spec():
    assert (C.GET_FEATURES, C.SET_MEM_TABLE, C.SET_VRING_KICK, C.GET_PROTOCOL_FEATURES,
            C.SET_VRING_ENABLE, C.NET_SET_MTU, C.SET_STATUS, C.GET_STATUS) == \
        (1, 5, 12, 15, 18, 20, 39, 40)
    assert sorted(C.REQUEST_NAMES) == list(range(1, 44))
    assert C.REQUEST_NAMES[35] == "VRING_KICK"
    assert C.VHOST_USER_F_PROTOCOL_FEATURES == 30 and C.PROTOCOL_F_REPLY_ACK == 3
    assert C.VIRTIO_F_VERSION_1 == 32 and C.VIRTIO_RING_F_EVENT_IDX == 29


def test_pack_functions():
    assert F.pack_header(C.GET_FEATURES, 0) == le((1, 4), (1, 4), (0, 4))
    assert F.pack_header(C.SET_MEM_TABLE, 40, need_reply=True) == le((5, 4), (9, 4), (40, 4))
    assert F.pack_header(3, 8, reply=True) == le((3, 4), (5, 4), (8, 4))
    assert F.pack_vring_state(1, 256) == le((1, 4), (256, 4))
    assert F.pack_vring_addr(1, 0x10, 0x20, 0x30, 1, 0x40) == \
        le((1, 4), (1, 4), (0x10, 8), (0x20, 8), (0x30, 8), (0x40, 8))
    assert F.pack_vring_file(3, False) == le((3, 8))
    assert F.pack_vring_file(3, True) == le((0x103, 8))
    regs = [(0, 0x100000, 0x7F0000000000, 0, 9), (1 << 32, 0x200000, 0x7F0100000000, 0x100000, 9)]
    assert F.pack_mem_table(regs) == le((2, 4), (0, 4)) + \
        le((0, 8), (0x100000, 8), (0x7F0000000000, 8), (0, 8)) + \
        le((1 << 32, 8), (0x200000, 8), (0x7F0100000000, 8), (0x100000, 8))
    assert F.pack_single_region(1, 2, 3, 4) == le((0, 8), (1, 8), (2, 8), (3, 8), (4, 8))


# --- a trivial in-test vhost-user back-end ------------------------------------
def recv_exact(sock, n, fds):
    buf = b""
    while len(buf) < n:
        data, got, _, _ = socket.recv_fds(sock, n - len(buf), 16)
        fds += got
        if not data:
            return None
        buf += data
    return buf


class MiniBackend:
    """Records every message; answers GET_* with canned values and NEED_REPLY
    with status 0 (or `nack`)."""

    def __init__(self, sock, features=0, protocol_features=0, queue_num=1, nack=0,
                 reply_hook=None):
        self.sock = sock
        self.msgs = []                     # (req, flags, payload, nfds)
        self.fds = []
        self.answers = {C.GET_FEATURES: features, C.GET_PROTOCOL_FEATURES: protocol_features,
                        C.GET_QUEUE_NUM: queue_num, C.GET_STATUS: 0xF, C.GET_MAX_MEM_SLOTS: 32}
        self.nack = nack
        self.reply_hook = reply_hook
        self.eof = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while True:
            fds = []
            try:
                hdr = recv_exact(self.sock, 12, fds)
            except OSError:
                break
            if hdr is None:
                break
            req, flags, size = struct.unpack("=III", hdr)
            payload = recv_exact(self.sock, size, fds) if size else b""
            if payload is None:
                break
            self.msgs.append((req, flags, payload, len(fds)))
            self.fds += fds
            if self.reply_hook and self.reply_hook(self, req, flags, payload):
                continue
            if req in self.answers:
                self.send(req, le((self.answers[req], 8)))
            elif req == C.GET_VRING_BASE:
                idx = struct.unpack("=I", payload[:4])[0]
                self.send(req, le((idx, 4), (0x1234, 4)))
            elif flags & C.VHOST_USER_NEED_REPLY:
                self.send(req, le((self.nack, 8)))
        self.eof.set()

    def send(self, req, payload, flags=C.VHOST_USER_VERSION | C.VHOST_USER_REPLY, fds=()):
        data = struct.pack("=III", req, flags, len(payload)) + payload
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(2)
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vud", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pair(sockdir):
    """(Frontend, MiniBackend factory) over a real listening AF_UNIX socket."""
    path = os.path.join(sockdir, "vhost.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    made = []

    def make(**kw):
        fe = Frontend.connect(path, timeout=2)
        conn, _ = srv.accept()
        be = MiniBackend(conn, **kw)
        made.append((fe, be))
        return fe, be
    yield make
    for fe, be in made:
        fe.close()
        be.close()
    srv.close()


def wait_msgs(be, n, timeout=2.0):
    deadline = time.monotonic() + timeout
    while len(be.msgs) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(be.msgs) >= n, be.msgs
    return be.msgs


def test_typed_helpers_bytes(pair, mem):
    fe, be = pair(features=0x1_4000_8000, protocol_features=0xB)
    V, NR = 1, 1 | C.VHOST_USER_NEED_REPLY
    ring = SplitRing(mem, 256)
    efd = os.eventfd(0)
    try:
        assert fe.get_features() == 0x1_4000_8000
        fe.set_features(0x1_4000_8000)
        assert fe.get_protocol_features() == 0xB
        fe.set_protocol_features(0xB)
        assert fe.get_queue_num() == 1
        fe.set_owner()
        fe.reset_owner()
        fe.set_mem_table(mem, need_reply=True)
        fe.set_vring_num(0, 256)
        fe.set_vring_base(1, 7)
        fe.set_vring_addr(0, ring)
        fe.set_vring_kick(0, efd)
        fe.set_vring_call(1, None)
        fe.set_vring_err(2, efd)
        fe.set_vring_enable(1, True)
        assert fe.get_vring_base(1) == 0x1234
        fe.set_status(0xF)
        assert fe.get_status() == 0xF
        fe.net_set_mtu(9000)
        fe.send_rarp(bytes.fromhex("525400123456"))
        assert fe.get_max_mem_slots() == 32
        fe.ack_all = True
        fe.set_vring_enable(0, False)         # NEED_REPLY: REPLY_ACK acked + ack_all
    finally:
        os.close(efd)
    gpa, size, uva, off, _ = next(mem.regions())
    expected = [
        (C.GET_FEATURES, V, b"", 0),
        (C.SET_FEATURES, V, le((0x1_4000_8000, 8)), 0),
        (C.GET_PROTOCOL_FEATURES, V, b"", 0),
        (C.SET_PROTOCOL_FEATURES, V, le((0xB, 8)), 0),
        (C.GET_QUEUE_NUM, V, b"", 0),
        (C.SET_OWNER, V, b"", 0),
        (C.RESET_OWNER, V, b"", 0),
        (C.SET_MEM_TABLE, NR, le((1, 4), (0, 4), (gpa, 8), (size, 8), (uva, 8), (off, 8)), 1),
        (C.SET_VRING_NUM, V, le((0, 4), (256, 4)), 0),
        (C.SET_VRING_BASE, V, le((1, 4), (7, 4)), 0),
        (C.SET_VRING_ADDR, V, le((0, 4), (0, 4), (0x7F0000000000 + ring.desc_gpa, 8),
                                 (0x7F0000000000 + ring.used_gpa, 8),
                                 (0x7F0000000000 + ring.avail_gpa, 8), (0, 8)), 0),
        (C.SET_VRING_KICK, V, le((0, 8)), 1),
        (C.SET_VRING_CALL, V, le((0x101, 8)), 0),
        (C.SET_VRING_ERR, V, le((2, 8)), 1),
        (C.SET_VRING_ENABLE, V, le((1, 4), (1, 4)), 0),
        (C.GET_VRING_BASE, V, le((1, 4), (0, 4)), 0),
        (C.SET_STATUS, V, le((0xF, 8)), 0),
        (C.GET_STATUS, V, b"", 0),
        (C.NET_SET_MTU, V, le((9000, 8)), 0),
        (C.SEND_RARP, V, bytes.fromhex("5254001234560000"), 0),
        (C.GET_MAX_MEM_SLOTS, V, b"", 0),
        (C.SET_VRING_ENABLE, NR, le((0, 4), (0, 4)), 0),
    ]
    got = wait_msgs(be, len(expected))
    for g, e in zip(got, expected):
        assert g == e, (C.REQUEST_NAMES[e[0]], g, e)
    assert len(got) == len(expected)


def test_mem_table_two_regions_shared_fd(pair):
    with GuestMemory(layout=[(0, 1 << 20), (1 << 32, 1 << 20)], shared_fd=True) as m:
        fe, be = pair()
        fe.set_mem_table(m)
        [(req, flags, payload, nfds)] = wait_msgs(be, 1)
        assert req == C.SET_MEM_TABLE and nfds == 2 and len(payload) == 8 + 2 * 32
        assert payload == le((2, 4), (0, 4),
                             (0, 8), (1 << 20, 8), (0x7F0000000000, 8), (0, 8),
                             (1 << 32, 8), (1 << 20, 8), (0x7F0000000000 + (1 << 32), 8),
                             (1 << 20, 8))


def test_nack_raises(pair):
    fe, be = pair(nack=1)
    fe.protocol_features = 1 << C.PROTOCOL_F_REPLY_ACK
    with pytest.raises(Nack) as ei:
        fe.set_owner(need_reply=True)
    assert ei.value.status == 1 and ei.value.request == C.SET_OWNER


def test_setup_net_sequence(pair):
    pf = C.bits(C.PROTOCOL_F_MQ, C.PROTOCOL_F_REPLY_ACK, C.PROTOCOL_F_NET_MTU,
                C.PROTOCOL_F_STATUS)
    feats = C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF, C.VIRTIO_RING_F_EVENT_IDX,
                   C.VHOST_USER_F_PROTOCOL_FEATURES, C.VIRTIO_NET_F_CSUM)
    fe, be = pair(features=feats, protocol_features=pf, queue_num=1)
    with GuestMemory(1 << 20) as m:
        rings = {0: SplitRing(m, 64, event_idx=True), 1: SplitRing(m, 64, event_idx=True)}
        fds = fe.setup_net(m, rings, mtu=1500)
        assert set(fds) == {0, 1} and rings[0].kick_fd == fds[0].kick
        msgs = wait_msgs(be, 20)
        order = [C.REQUEST_NAMES[x[0]] for x in msgs]
        ring_part = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                     "SET_VRING_KICK", "SET_VRING_CALL"]
        assert order == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                         "GET_QUEUE_NUM", "SET_OWNER", "SET_FEATURES", "NET_SET_MTU",
                         "SET_MEM_TABLE"] + ring_part * 2 + ["SET_VRING_ENABLE"] * 2
        # STATUS not in our default request; CSUM offered but not asked for.
        assert struct.unpack("=Q", msgs[2][2])[0] == C.bits(
            C.PROTOCOL_F_MQ, C.PROTOCOL_F_REPLY_ACK, C.PROTOCOL_F_NET_MTU)
        assert struct.unpack("=Q", msgs[5][2])[0] == feats & ~(1 << C.VIRTIO_NET_F_CSUM)
        assert msgs[7][1] & C.VHOST_USER_NEED_REPLY and msgs[7][3] == 1
        assert [m_[3] for m_ in msgs[8:18]] == [0, 0, 0, 1, 1] * 2
        assert msgs[-1][2] == le((1, 4), (1, 4))
        # The kick eventfd handed over is the one the ring writes.
        rings[1].kick()
        assert len(be.fds) == 5               # mem, kick0, call0, kick1, call1
        assert os.eventfd_read(be.fds[3]) == 1


def test_setup_net_without_protocol_features_and_qemu_extras(pair):
    feats = C.bits(C.VIRTIO_F_VERSION_1)
    fe, be = pair(features=feats)
    with GuestMemory(1 << 20) as m:
        rings = {0: SplitRing(m, 8), 1: SplitRing(m, 8)}
        fe.setup_net(m, rings, qemu_extras=True)
        msgs = wait_msgs(be, 17)
        order = [C.REQUEST_NAMES[x[0]] for x in msgs]
        assert order[:6] == ["GET_FEATURES", "SET_OWNER", "GET_FEATURES",
                             "SET_VRING_CALL", "SET_VRING_CALL", "SET_FEATURES"]
        assert "SET_VRING_ENABLE" not in order and "GET_PROTOCOL_FEATURES" not in order
        assert len(order) == 6 + 1 + 10


def test_setup_net_event_idx_mismatch(pair):
    fe, be = pair(features=C.bits(C.VIRTIO_F_VERSION_1))
    with GuestMemory(1 << 20) as m:
        with pytest.raises(ValueError, match="event_idx"):
            fe.setup_net(m, {0: SplitRing(m, 8, event_idx=True)},
                         features=C.bits(C.VIRTIO_F_VERSION_1))


def test_reply_with_fds(pair):
    memfd = os.memfd_create("inflight")
    os.write(memfd, b"inflight-area")

    def hook(be, req, flags, payload):
        if req == C.GET_INFLIGHT_FD:
            be.send(req, le((4096, 8), (0, 8), (1, 2), (256, 2)), fds=[memfd])
            return True
        return False
    fe, be = pair(reply_hook=hook)
    try:
        fe.request(C.GET_INFLIGHT_FD, le((4096, 8), (0, 8), (1, 2), (256, 2)))
        rep = fe.reply(C.GET_INFLIGHT_FD)
        assert len(rep.fds) == 1 and len(rep.payload) == 20
        assert os.pread(rep.fds[0], 13, 0) == b"inflight-area"
        rep.close_fds()
    finally:
        os.close(memfd)


def test_reply_validation(pair):
    def hook(be, req, flags, payload):
        if req == C.GET_FEATURES:
            be.send(req, le((1, 8)), flags=1)                       # no REPLY bit
        elif req == C.GET_QUEUE_NUM:
            be.send(C.GET_FEATURES, le((1, 8)))                     # wrong id
        elif req == C.GET_STATUS:
            be.send(req, le((1, 8)), flags=2 | C.VHOST_USER_REPLY)  # version 2
        elif req == C.GET_PROTOCOL_FEATURES:
            be.send(req, le((1, 4)))                                # short payload
        elif req == C.GET_MAX_MEM_SLOTS:
            be.sock.shutdown(socket.SHUT_RDWR)
        return True
    fe, be = pair(reply_hook=hook)
    with pytest.raises(ProtocolError, match="REPLY"):
        fe.get_features()
    with pytest.raises(ProtocolError, match="expected GET_QUEUE_NUM"):
        fe.get_queue_num()
    with pytest.raises(ProtocolError, match="version"):
        fe.get_status()
    with pytest.raises(ProtocolError, match="size"):
        fe.get_protocol_features()
    with pytest.raises(TimeoutError):
        fe.request(C.GET_VRING_BASE, F.pack_vring_state(0, 0))
        fe.reply(C.GET_VRING_BASE, timeout=0.1)
    with pytest.raises(ConnectionClosed):
        fe.get_max_mem_slots()


def test_hostile_raw_messages(pair):
    fe, be = pair()
    fds = [os.eventfd(0) for _ in range(9)]
    try:
        fe.request(C.SET_OWNER, flags=2)                            # wrong version
        fe.request(C.SET_VRING_KICK, le((0, 8)), fds=fds)           # 9 fds
        fe.request(C.SET_FEATURES, le((1, 8)), size=4)              # size < payload
        fe.send_truncated_header(C.GET_FEATURES, 6)
    finally:
        for fd in fds:
            os.close(fd)
    assert be.eof.wait(2)
    assert be.msgs[0] == (C.SET_OWNER, 2, b"", 0)
    assert be.msgs[1] == (C.SET_VRING_KICK, 1, le((0, 8)), 9)
    assert be.msgs[2] == (C.SET_FEATURES, 1, le((1, 4)), 0)
    # The 4 surplus payload bytes + 6 header bytes are all that is left: the
    # server sees a truncated header, then EOF.
    assert len(be.msgs) == 3


def test_expect_closed_and_ping(pair):
    fe, be = pair(features=5)
    assert fe.ping()
    assert fe.expect_closed(0.05) is False
    be.sock.shutdown(socket.SHUT_RDWR)
    assert fe.expect_closed(1.0) is True


def test_listen_accept_client_mode_backend(sockdir):
    path = os.path.join(sockdir, "fe.sock")
    fe = Frontend.listen(path)
    try:
        def backend():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return MiniBackend(s, features=0x42)
        t = threading.Thread(target=lambda: holder.append(backend()))
        holder = []
        t.start()
        fe.accept(timeout=2)
        t.join()
        assert fe.get_features() == 0x42
        holder[0].close()
    finally:
        fe.close()
        fe.close_listener()
    assert not os.path.exists(path)


def test_connect_retries_until_socket_exists(sockdir):
    path = os.path.join(sockdir, "late.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def late():
        time.sleep(0.1)
        srv.bind(path)
        srv.listen(1)
    t = threading.Thread(target=late)
    t.start()
    fe = Frontend.connect(path, timeout=2)
    t.join()
    fe.close()
    srv.close()
    with pytest.raises(TimeoutError):
        Frontend.connect(os.path.join(sockdir, "never.sock"), timeout=0.05)
