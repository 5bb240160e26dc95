"""REQUEST_TABLE: every front-end request of the vhost-user spec -> how we answer it.

One row per request (data, not code): the Session method that handles it (None:
answered as unsupported), the payload parser, how many fds it may carry and
whether it always replies. `dispatch` does the generic checks between syntax
(protocol.py) and meaning (session.py): payload parse, owner, fd count, vring index;
it turns a SET_VRING_KICK/CALL/ERR payload and its fds into (index, fd or None).
`serve` is one frontend connection's loop: message, dispatch, reply.

dispatch sits above session: its rows name Session's methods, and Session never
names a request id.
"""
from __future__ import annotations

import enum
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from vhostd.fds import OwnedFd, close_all
from vhostd.errors import (
    NativeError,
    ProtocolError,
    RequestError,
    SetupError,
    UnsupportedRequest,
    VhostError,
    WorkerStuck,
)
from vhostd.protocol import (
    Header,
    LogArea,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    pack_message,
    pack_u64,
    request_name,
    unpack_empty,
    unpack_mem_table,
    unpack_raw,
    unpack_single_region,
    unpack_u64,
)
from vhostd.session import Session

log = logging.getLogger(__name__)
# One debug line per request, by name; cli.py enables it with -vv only.
request_log = logging.getLogger("vhostd.requests")


def _port_of(session) -> str:
    return getattr(session.log, "extra", {}).get("port", "?")


class Reply(enum.Enum):
    ACK = "ack"  # a u64 status only with REPLY_ACK negotiated and NEED_REPLY set
    ALWAYS = "always"  # the request is answered with a payload


@dataclass(frozen=True)
class Row:
    """How one request is handled. The handler is called with the session and
    only what it needs, told by the payload type:
      no payload (unpack_empty)      -> handler(session)
      a vring file (VringFile)       -> handler(session, index, OwnedFd or None)
      a payload with fds (fds[1] > 0) -> handler(session, value, fds)
      any other payload              -> handler(session, value)
    A handler that returns normally owns the fds it was given."""

    handler: Callable | None
    parse: Callable[[bytes], Any]
    fds: tuple[int, int] = (0, 0)
    reply: Reply = Reply.ACK
    vring: bool = False  # payload carries a vring index to range-check
    owner: bool = False  # refused until SET_OWNER (see above REQUEST_TABLE)


R = Request
S = Session
_ALWAYS = Reply.ALWAYS

# owner=True: refused until SET_OWNER. The vhost-user spec: SET_OWNER is "issued when
# a new connection is established. It marks the front-end as the owner of the
# session" (the "session start"). Only requests that change or act on the device
# need it: features, memory, dirty log, ring state and fds (GET_VRING_BASE stops a
# ring), RARP, MTU, status and reset. The negotiation that real frontends send
# before SET_OWNER stays open: QEMU's vhost_user_backend_init sends GET_FEATURES,
# GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS (and
# SET_BACKEND_REQ_FD) before vhost_dev_init's SET_OWNER; the read-only GET_STATUS
# is answered too. DPDK's virtio-user and rust-vmm's frontends send SET_OWNER
# first. SET_OWNER twice is accepted (libvhost-user and DPDK's backend do), and
# RESET_OWNER ends the ownership (Session.reset_owner).

REQUEST_TABLE: dict[Request, Row] = {
    R.GET_FEATURES: Row(S.get_features, unpack_empty, reply=_ALWAYS),
    R.SET_FEATURES: Row(S.set_features, unpack_u64, owner=True),
    R.SET_OWNER: Row(S.set_owner, unpack_empty),
    R.RESET_OWNER: Row(S.reset_owner, unpack_empty),
    R.SET_MEM_TABLE: Row(S.set_mem_table, unpack_mem_table, fds=(1, 8), owner=True),
    R.SET_LOG_BASE: Row(S.set_log_base, LogArea.unpack, fds=(0, 1), reply=_ALWAYS, owner=True),
    R.SET_LOG_FD: Row(S.set_log_fd, unpack_raw, fds=(0, 1), owner=True),
    R.SET_VRING_NUM: Row(S.set_vring_num, VringState.unpack, vring=True, owner=True),
    R.SET_VRING_ADDR: Row(S.set_vring_addr, VringAddr.unpack, vring=True, owner=True),
    R.SET_VRING_BASE: Row(S.set_vring_base, VringState.unpack, vring=True, owner=True),
    R.GET_VRING_BASE: Row(S.get_vring_base, VringState.unpack, reply=_ALWAYS, vring=True, owner=True),
    R.SET_VRING_KICK: Row(S.set_vring_kick, VringFile.unpack, fds=(0, 1), vring=True, owner=True),
    R.SET_VRING_CALL: Row(S.set_vring_call, VringFile.unpack, fds=(0, 1), vring=True, owner=True),
    R.SET_VRING_ERR: Row(S.set_vring_err, VringFile.unpack, fds=(0, 1), vring=True, owner=True),
    R.GET_PROTOCOL_FEATURES: Row(S.get_protocol_features, unpack_empty, reply=_ALWAYS),
    R.SET_PROTOCOL_FEATURES: Row(S.set_protocol_features, unpack_u64),
    R.GET_QUEUE_NUM: Row(S.get_queue_num, unpack_empty, reply=_ALWAYS),
    R.SET_VRING_ENABLE: Row(S.set_vring_enable, VringState.unpack, vring=True, owner=True),
    R.SEND_RARP: Row(S.send_rarp, unpack_u64, owner=True),
    R.NET_SET_MTU: Row(S.net_set_mtu, unpack_u64, owner=True),
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
    R.RESET_DEVICE: Row(S.reset_device, unpack_empty, owner=True),
    R.VRING_KICK: Row(None, unpack_raw),
    R.GET_MAX_MEM_SLOTS: Row(S.get_max_mem_slots, unpack_empty, reply=_ALWAYS),
    R.ADD_MEM_REG: Row(S.add_mem_reg, unpack_single_region, fds=(0, 1), owner=True),
    # QEMU attaches the region's fd to REM_MEM_REG as well (vhost-user.c send_remove_regions).
    R.REM_MEM_REG: Row(S.rem_mem_reg, unpack_single_region, fds=(0, 1), owner=True),
    R.SET_STATUS: Row(S.set_status, unpack_u64, owner=True),
    R.GET_STATUS: Row(S.get_status, unpack_empty, reply=_ALWAYS),
    R.GET_SHARED_OBJECT: Row(None, unpack_raw, reply=_ALWAYS),
    R.SET_DEVICE_STATE_FD: Row(None, unpack_raw, fds=(0, 1), reply=_ALWAYS),
    R.CHECK_DEVICE_STATE: Row(None, unpack_raw, reply=_ALWAYS),
}

ACK_OK = pack_u64(0)
ACK_FAIL = pack_u64(1)


def check_vring_index(index: int, queue_pairs: int) -> None:
    """virtio 1.2 §5.1.2: a net device with N queue pairs has virtqueues 0..2N-1
    (the control queue is not offered). The full u32 of the payload is checked."""
    if index >= 2 * queue_pairs:
        raise RequestError(f"vring index {index:#x} out of range (queues={queue_pairs})")


def vring_fd(body: VringFile, fds: list[OwnedFd]) -> OwnedFd | None:
    """The fd of a SET_VRING_KICK/CALL/ERR: the one attached, or None with the
    no-fd flag (vhost-user spec: bit 8 set means no fd is passed)."""
    if body.nofd:
        if fds:
            raise RequestError(f"vring {body.index}: fd attached with the no-fd flag")
        return None
    if len(fds) != 1:
        raise RequestError(f"vring {body.index}: no fd attached")
    return fds[0]


def _arguments(row: Row, body, fds: list[OwnedFd]) -> tuple:
    if row.parse is unpack_empty:
        return ()
    if isinstance(body, VringFile):
        return body.index, vring_fd(body, fds)
    if row.fds[1]:
        return body, fds
    return (body,)


async def dispatch(session, header: Header, payload: bytes, fds: list[OwnedFd]) -> bytes | None:
    """Runs one request; returns the reply message to send, if any.

    Raises ProtocolError when the connection must close (malformed payload).
    A RequestError (or a NativeError/SetupError from carrying it out) becomes a failure reply
    where the frontend expects one, plus exactly one log line naming the request;
    the connection lives on. Every fd not taken by a handler is closed here.
    """
    name = request_name(header.request)
    # REPLY_ACK as it was when the request came: RESET_OWNER clears the protocol
    # features, and the frontend that asked still waits for its ack. (Or as the request
    # left it: a SET_PROTOCOL_FEATURES that acks REPLY_ACK is answered, as before.)
    acking = session.protocol_acked(ProtocolFeature.REPLY_ACK)
    try:
        row = REQUEST_TABLE.get(header.request)  # type: ignore[call-overload]
        if row is None or row.handler is None:
            raise UnsupportedRequest(f"{name} is not supported")
        try:
            body = row.parse(payload)
        except ProtocolError as exc:
            raise ProtocolError(f"{name}: {exc}") from None
        if row.owner and not session.owner:
            raise RequestError(f"{name} before SET_OWNER")
        lo, hi = row.fds
        if not lo <= len(fds) <= hi:
            raise RequestError(f"{name}: {len(fds)} fds attached, expected {lo}..{hi}")
        if row.vring:
            check_vring_index(body.index, session.queue_pairs)
        try:
            result = row.handler(session, *_arguments(row, body, fds))
            if inspect.isawaitable(result):
                result = await result
        except (NativeError, SetupError) as exc:
            # The datapath refused a value the checks above let through, or the host
            # cannot carry the request out (NET_SET_MTU without CAP_NET_ADMIN): still
            # a refused request, not a reason to drop the connection or the port.
            raise RequestError(str(exc)) from None
        fds = []  # the handler took ownership
    except RequestError as exc:
        close_all(fds)
        session.count_error()
        log_fn = session.log.info if isinstance(exc, UnsupportedRequest) else session.log.warning
        log_fn("%s", exc if str(exc).startswith(name) else f"{name}: {exc}")
        if row is not None and row.reply is Reply.ALWAYS:
            return pack_message(header.request, b"")  # size 0: the frontend sees a failed request
        if header.need_reply and (acking or session.protocol_acked(ProtocolFeature.REPLY_ACK)):
            return pack_message(header.request, ACK_FAIL)
        return None
    except BaseException:
        close_all(fds)
        raise
    if row.reply is Reply.ALWAYS:
        return pack_message(header.request, result)
    if header.need_reply and (acking or session.protocol_acked(ProtocolFeature.REPLY_ACK)):
        return pack_message(header.request, ACK_OK)
    return None


async def serve(session: Session) -> None:
    """Serves one frontend's requests until it disconnects; always releases
    everything the session holds (Session.close)."""
    try:
        while True:
            msg = await session.conn.recv_message()
            if msg is None:
                session.log.info("frontend disconnected")
                return
            header, payload, fds = msg
            if request_log.isEnabledFor(logging.DEBUG):
                request_log.debug("port %s: %s flags %#x size %d fds %d", _port_of(session), header.name,
                                  header.flags, header.size, len(fds))
            reply = await dispatch(session, header, payload, fds)
            if reply is not None:
                await session.conn.send(reply)
    except WorkerStuck:
        raise  # not this frontend's connection alone: the port fails (Port.serve)
    except (ProtocolError, VhostError) as exc:
        # ProtocolError: framing cannot be trusted any more. Any other VhostError
        # here escaped dispatch by mistake: end this frontend, never the port.
        session.count_error()
        session.log.warning("closing connection: %s", exc)
    except (ConnectionError, OSError) as exc:
        session.log.info("frontend connection lost: %s", exc)
    finally:
        session.close()
