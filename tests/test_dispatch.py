"""dispatch.py: the request table covers the spec; generic checks; error replies."""
import asyncio
import dataclasses
import logging
import struct

import pytest

from vhostd.fds import OwnedFd
from vhostd.dispatch import REQUEST_TABLE, Reply, dispatch
from vhostd.errors import ProtocolError
from vhostd.protocol import HEADER, Header, ProtocolFeature, Request, bit


def test_every_request_has_a_row():
    assert set(REQUEST_TABLE) == set(Request)


def test_handled_rows_name_session_methods():
    from vhostd.session import Session

    for req, row in REQUEST_TABLE.items():
        if row.handler is not None:
            assert getattr(Session, row.handler.__name__) is row.handler, req


def test_always_reply_requests_match_the_spec():
    always = {r for r, row in REQUEST_TABLE.items() if row.reply is Reply.ALWAYS}
    for r in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
              Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_INFLIGHT_FD,
              Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.SET_LOG_BASE):
        assert r in always, r.name


class FakeSession:
    """Records handler calls; the real Session is tested in test_session.py."""

    queue_pairs = 1

    def __init__(self, protocol_features=0, owner=True):
        self.protocol_features = protocol_features
        self.owner = owner
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.errors = 0
        self.calls = []

    def protocol_acked(self, f):
        return bool(self.protocol_features & bit(f))

    def count_error(self):
        self.errors += 1

    def get_features(self):
        return struct.pack("=Q", 0x1234)

    async def set_vring_num(self, state):
        self.calls.append(("num", state))


FAKE_HANDLERS = {Request.GET_FEATURES: FakeSession.get_features, Request.SET_VRING_NUM: FakeSession.set_vring_num}


def run(session, req, payload=b"", fds=(), flags=0x1):
    """dispatch alone: the rows of FAKE_HANDLERS call FakeSession's methods."""
    header = Header(req, flags, len(payload))
    table = {r: dataclasses.replace(REQUEST_TABLE[r], handler=h) for r, h in FAKE_HANDLERS.items()}
    saved = {r: REQUEST_TABLE[r] for r in table}
    REQUEST_TABLE.update(table)
    try:
        return asyncio.run(dispatch(session, header, payload, list(fds)))
    finally:
        REQUEST_TABLE.update(saved)


def test_get_features_replies():
    reply = run(FakeSession(), Request.GET_FEATURES)
    assert HEADER.unpack_from(reply) == (1, 0x5, 8)
    assert reply[12:] == struct.pack("=Q", 0x1234)


def test_ack_only_with_reply_ack_and_need_reply():
    payload = struct.pack("=II", 0, 256)
    assert run(FakeSession(), Request.SET_VRING_NUM, payload, flags=0x9) is None
    s = FakeSession(bit(ProtocolFeature.REPLY_ACK))
    assert run(s, Request.SET_VRING_NUM, payload, flags=0x1) is None
    reply = run(s, Request.SET_VRING_NUM, payload, flags=0x9)
    assert reply[12:] == struct.pack("=Q", 0)


def test_vring_index_out_of_range_fails_with_ack():
    s = FakeSession(bit(ProtocolFeature.REPLY_ACK))
    reply = run(s, Request.SET_VRING_NUM, struct.pack("=II", 2, 256), flags=0x9)
    assert reply[12:] == struct.pack("=Q", 1)
    assert s.errors == 1 and not s.calls
    # the full u32 is checked, not a narrowed byte
    reply = run(s, Request.SET_VRING_NUM, struct.pack("=II", 0x100, 256), flags=0x9)
    assert reply[12:] == struct.pack("=Q", 1)


def test_unsupported_always_reply_gets_empty_reply(caplog):
    s = FakeSession()
    with caplog.at_level(logging.INFO):
        reply = run(s, Request.GET_CONFIG, b"\0" * 12)
    assert HEADER.unpack_from(reply) == (Request.GET_CONFIG, 0x5, 0)
    assert "GET_CONFIG is not supported" in caplog.text


def test_unknown_request_id_is_not_fatal():
    s = FakeSession(bit(ProtocolFeature.REPLY_ACK))
    reply = run(s, 999, b"", flags=0x9)
    assert reply[12:] == struct.pack("=Q", 1)


def test_unexpected_fds_closed(tmp_path):
    import os

    r, w = os.pipe()
    s = FakeSession()
    run(s, Request.SET_VRING_NUM, struct.pack("=II", 0, 256), fds=[OwnedFd(r)])
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)
    assert s.errors == 1


def test_bad_payload_size_closes_connection():
    r, w = __import__("os").pipe()
    fd = OwnedFd(r)
    with pytest.raises(ProtocolError, match="SET_VRING_NUM"):
        run(FakeSession(), Request.SET_VRING_NUM, b"\0" * 5, fds=[])
    fd.close()
    __import__("os").close(w)


def test_vring_file_becomes_index_and_fd_or_none():
    from vhostd.dispatch import vring_fd
    from vhostd.errors import RequestError
    from vhostd.protocol import VringFile

    fd = OwnedFd(-1)
    assert vring_fd(VringFile(1, False, 1), [fd]) is fd
    assert vring_fd(VringFile(1, True, 0x101), []) is None
    with pytest.raises(RequestError, match="no-fd flag"):
        vring_fd(VringFile(1, True, 0x101), [fd])
    with pytest.raises(RequestError, match="no fd attached"):
        vring_fd(VringFile(1, False, 1), [])


def test_owner_requests_refused_before_set_owner_with_the_usual_error_path(caplog):
    s = FakeSession(bit(ProtocolFeature.REPLY_ACK), owner=False)
    with caplog.at_level(logging.WARNING):
        reply = run(s, Request.SET_VRING_NUM, struct.pack("=II", 0, 256), flags=0x9)
    assert reply[12:] == struct.pack("=Q", 1)  # a failed REPLY_ACK, the connection lives on
    assert s.errors == 1 and not s.calls
    assert "SET_VRING_NUM before SET_OWNER" in caplog.text
    # what QEMU asks before SET_OWNER is answered
    assert run(s, Request.GET_FEATURES)[12:] == struct.pack("=Q", 0x1234)
    assert s.errors == 1


def test_pre_owner_negotiation_rows_are_open():
    for r in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
              Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.SET_BACKEND_REQ_FD,
              Request.GET_CONFIG, Request.SET_OWNER, Request.RESET_OWNER, Request.GET_STATUS):
        assert not REQUEST_TABLE[r].owner, r.name


def test_reply_ack_follows_the_features_the_request_came_with():
    """A handler that drops REPLY_ACK (RESET_OWNER) still acks the request that asked."""
    s = FakeSession(bit(ProtocolFeature.REPLY_ACK))

    async def drop(session, state):
        session.protocol_features = 0

    FAKE_HANDLERS[Request.SET_VRING_NUM] = drop
    try:
        reply = run(s, Request.SET_VRING_NUM, struct.pack("=II", 0, 256), flags=0x9)
    finally:
        FAKE_HANDLERS[Request.SET_VRING_NUM] = FakeSession.set_vring_num
    assert reply[12:] == struct.pack("=Q", 0)
    assert run(s, Request.SET_VRING_NUM, struct.pack("=II", 0, 256), flags=0x9) is None
