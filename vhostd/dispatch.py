"""REQUEST_TABLE: every front-end request of the vhost-user spec -> how we answer it.

One row per request (data, not code): the Session method that handles it (None:
answered as unsupported), the payload parser, how many fds it may carry and
whether it always replies. `dispatch` does the generic checks between syntax
(protocol.py) and meaning (session.py): payload parse, fd count, vring index.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable

from vhostd.connection import OwnedFd, close_all
from vhostd.errors import NativeError, ProtocolError, RequestError, UnsupportedRequest
from vhostd.protocol import (
    Header,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    pack_message,
    pack_u64,
    unpack_empty,
    unpack_mem_table,
    unpack_raw,
    unpack_single_region,
    unpack_u64,
)

log = logging.getLogger(__name__)


class Reply(enum.Enum):
    ACK = "ack"  # a u64 status only with REPLY_ACK negotiated and NEED_REPLY set
    ALWAYS = "always"  # the request is answered with a payload


@dataclass(frozen=True)
class Row:
    handler: str | None
    parse: Callable[[bytes], Any]
    fds: tuple[int, int] = (0, 0)
    reply: Reply = Reply.ACK
    vring: bool = False  # payload carries a vring index to range-check


R = Request
_ALWAYS = Reply.ALWAYS

REQUEST_TABLE: dict[Request, Row] = {
    R.GET_FEATURES: Row("get_features", unpack_empty, reply=_ALWAYS),
    R.SET_FEATURES: Row("set_features", unpack_u64),
    R.SET_OWNER: Row("set_owner", unpack_empty),
    R.RESET_OWNER: Row("reset_owner", unpack_empty),
    R.SET_MEM_TABLE: Row("set_mem_table", unpack_mem_table, fds=(1, 8)),
    R.SET_LOG_BASE: Row(None, unpack_raw, fds=(0, 1), reply=_ALWAYS),
    R.SET_LOG_FD: Row(None, unpack_raw, fds=(0, 1)),
    R.SET_VRING_NUM: Row("set_vring_num", VringState.unpack, vring=True),
    R.SET_VRING_ADDR: Row("set_vring_addr", VringAddr.unpack, vring=True),
    R.SET_VRING_BASE: Row("set_vring_base", VringState.unpack, vring=True),
    R.GET_VRING_BASE: Row("get_vring_base", VringState.unpack, reply=_ALWAYS, vring=True),
    R.SET_VRING_KICK: Row("set_vring_kick", VringFile.unpack, fds=(0, 1), vring=True),
    R.SET_VRING_CALL: Row("set_vring_call", VringFile.unpack, fds=(0, 1), vring=True),
    R.SET_VRING_ERR: Row("set_vring_err", VringFile.unpack, fds=(0, 1), vring=True),
    R.GET_PROTOCOL_FEATURES: Row("get_protocol_features", unpack_empty, reply=_ALWAYS),
    R.SET_PROTOCOL_FEATURES: Row("set_protocol_features", unpack_u64),
    R.GET_QUEUE_NUM: Row("get_queue_num", unpack_empty, reply=_ALWAYS),
    R.SET_VRING_ENABLE: Row("set_vring_enable", VringState.unpack, vring=True),
    R.SEND_RARP: Row(None, unpack_raw),
    R.NET_SET_MTU: Row("net_set_mtu", unpack_u64),
    R.SET_BACKEND_REQ_FD: Row(None, unpack_raw, fds=(0, 1)),
    R.IOTLB_MSG: Row(None, unpack_raw),
    R.SET_VRING_ENDIAN: Row(None, unpack_raw),
    R.GET_CONFIG: Row(None, unpack_raw, reply=_ALWAYS),
    R.SET_CONFIG: Row(None, unpack_raw),
    R.CREATE_CRYPTO_SESSION: Row(None, unpack_raw, reply=_ALWAYS),
    R.CLOSE_CRYPTO_SESSION: Row(None, unpack_raw),
    R.POSTCOPY_ADVISE: Row(None, unpack_raw, reply=_ALWAYS),
    R.POSTCOPY_LISTEN: Row(None, unpack_raw),
    R.POSTCOPY_END: Row(None, unpack_raw),
    R.GET_INFLIGHT_FD: Row(None, unpack_raw, reply=_ALWAYS),
    R.SET_INFLIGHT_FD: Row(None, unpack_raw, fds=(0, 1)),
    R.GPU_SET_SOCKET: Row(None, unpack_raw, fds=(0, 1)),
    R.RESET_DEVICE: Row(None, unpack_raw),
    R.VRING_KICK: Row(None, unpack_raw),
    R.GET_MAX_MEM_SLOTS: Row(None, unpack_raw, reply=_ALWAYS),
    R.ADD_MEM_REG: Row(None, unpack_single_region, fds=(0, 1)),
    R.REM_MEM_REG: Row(None, unpack_single_region, fds=(0, 1)),
    R.SET_STATUS: Row("set_status", unpack_u64),
    R.GET_STATUS: Row("get_status", unpack_empty, reply=_ALWAYS),
    R.GET_SHARED_OBJECT: Row(None, unpack_raw, reply=_ALWAYS),
    R.SET_DEVICE_STATE_FD: Row(None, unpack_raw, fds=(0, 1), reply=_ALWAYS),
    R.CHECK_DEVICE_STATE: Row(None, unpack_raw, reply=_ALWAYS),
}

ACK_OK = pack_u64(0)
ACK_FAIL = pack_u64(1)


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


async def dispatch(session, header: Header, payload: bytes, fds: list[OwnedFd]) -> bytes | None:
    """Runs one request; returns the reply message to send, if any.

    Raises ProtocolError when the connection must close (malformed payload).
    A RequestError becomes a failure reply where the frontend expects one, plus a
    log line; the connection lives on.
    """
    name = _name(header.request)
    try:
        row = REQUEST_TABLE.get(header.request)  # type: ignore[call-overload]
        if row is None or row.handler is None:
            raise UnsupportedRequest(f"{name} is not supported")
        try:
            body = row.parse(payload)
        except ProtocolError as exc:
            raise ProtocolError(f"{name}: {exc}") from None
        lo, hi = row.fds
        if not lo <= len(fds) <= hi:
            raise RequestError(f"{name}: {len(fds)} fds attached, expected {lo}..{hi}")
        if row.vring:
            session.check_vring_index(body)
        try:
            result = await getattr(session, row.handler)(body, fds)
        except NativeError as exc:
            # The datapath refused a value the checks above let through: still a
            # refused request, not a reason to drop the connection or the port.
            raise RequestError(str(exc)) from None
        fds = []  # the handler took ownership
    except RequestError as exc:
        close_all(fds)
        session.count_error()
        log_fn = session.log.info if isinstance(exc, UnsupportedRequest) else session.log.warning
        log_fn("%s", exc if str(exc).startswith(name) else f"{name}: {exc}")
        if row is not None and row.reply is Reply.ALWAYS:
            return pack_message(header.request, b"")  # size 0: the frontend sees a failed request
        if header.need_reply and session.protocol_acked(ProtocolFeature.REPLY_ACK):
            return pack_message(header.request, ACK_FAIL)
        return None
    except BaseException:
        close_all(fds)
        raise
    if row.reply is Reply.ALWAYS:
        return pack_message(header.request, result)
    if header.need_reply and session.protocol_acked(ProtocolFeature.REPLY_ACK):
        return pack_message(header.request, ACK_OK)
    return None
