"""vhost-user front-end double (the role of QEMU's hw/virtio/vhost-user.c or
DPDK's virtio-user) over a real AF_UNIX SOCK_STREAM socket.

Wire format (QEMU docs/interop/vhost-user.rst, "Message Specification"):
header u32 request | u32 flags | u32 size, host byte order, then `size` bytes
of payload; fds ride along as SCM_RIGHTS on the same sendmsg.  flags bits 0-1
carry the version (1), bit 2 REPLY, bit 3 NEED_REPLY.

Every payload is packed here with `struct` from the spec, independent of
vhostd.protocol.  The pack_* functions are pure so that tests can compare
bytes; Frontend's typed helpers send them.  `request()` takes overrides
(flags, size) and `send_raw()` sends anything, for hostile tests.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from . import constants as C
from .guestmem import GuestMemory
from .split import SplitRing

HDR = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")           # u32 index, u32 num
VRING_ADDR = struct.Struct("=IIQQQQ")        # index, flags, desc, used, avail, log
MEM_HDR = struct.Struct("=II")               # u32 nregions, u32 padding
MEM_REGION = struct.Struct("=QQQQ")          # gpa, size, uva, mmap_offset
MAX_REPLY_PAYLOAD = 0x1000

# What QEMU 7.2's vhost-user-net asks for by default (of what vhostd may offer).
DEFAULT_PROTOCOL_FEATURES = C.bits(C.PROTOCOL_F_MQ, C.PROTOCOL_F_RARP, C.PROTOCOL_F_LOG_SHMFD,
                                   C.PROTOCOL_F_REPLY_ACK, C.PROTOCOL_F_NET_MTU)


class ProtocolError(AssertionError):
    """The back-end's reply broke the wire format."""


class ConnectionClosed(ProtocolError):
    """The back-end closed the connection."""


class Nack(Exception):
    """A REPLY_ACK status != 0."""

    def __init__(self, request: int, status: int):
        super().__init__(f"{C.REQUEST_NAMES.get(request, request)} nacked: status {status:#x}")
        self.request = request
        self.status = status


class RingFds(NamedTuple):
    kick: int
    call: int


@dataclass
class Reply:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def u64(self) -> int:
        if len(self.payload) != 8:
            raise ProtocolError(f"{C.REQUEST_NAMES.get(self.request)} reply size "
                                f"{len(self.payload)}, expected 8")
        return U64.unpack(self.payload)[0]

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# --- pure encoders ---------------------------------------------------------------
def pack_header(request: int, size: int, *, need_reply: bool = False,
                reply: bool = False, version: int = C.VHOST_USER_VERSION,
                flags: int | None = None) -> bytes:
    if flags is None:
        flags = (version & C.VHOST_USER_VERSION_MASK) \
            | (C.VHOST_USER_REPLY if reply else 0) \
            | (C.VHOST_USER_NEED_REPLY if need_reply else 0)
    return HDR.pack(request, flags, size)


def pack_message(request: int, payload: bytes = b"", *, need_reply: bool = False,
                 flags: int | None = None, size: int | None = None) -> bytes:
    return pack_header(request, len(payload) if size is None else size,
                       need_reply=need_reply, flags=flags) + payload


def pack_u64(v: int) -> bytes:
    return U64.pack(v & (2**64 - 1))


def pack_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index & 0xFFFF_FFFF, num & 0xFFFF_FFFF)


def pack_vring_addr(index: int, desc: int, used: int, avail: int,
                    flags: int = 0, log: int = 0) -> bytes:
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


def pack_vring_file(index: int, nofd: bool) -> bytes:
    return pack_u64((index & C.VRING_IDX_MASK) | (C.VRING_NOFD_MASK if nofd else 0))


def pack_region(gpa: int, size: int, uva: int, mmap_offset: int) -> bytes:
    return MEM_REGION.pack(gpa, size, uva, mmap_offset)


def pack_mem_table(regions: Sequence[tuple[int, ...]], nregions: int | None = None) -> bytes:
    """VhostUserMemory: u32 nregions, u32 padding, then one 32-byte region per
    entry (only the regions present, as QEMU and DPDK send it).  Entries are
    (gpa, size, uva, mmap_offset[, fd])."""
    n = len(regions) if nregions is None else nregions
    return MEM_HDR.pack(n, 0) + b"".join(pack_region(*r[:4]) for r in regions)


def pack_single_region(gpa: int, size: int, uva: int, mmap_offset: int) -> bytes:
    """VhostUserSingleMemRegion (ADD/REM_MEM_REG): u64 padding + region."""
    return pack_u64(0) + pack_region(gpa, size, uva, mmap_offset)


# --- the front-end ------------------------------------------------------------------
class Frontend:
    """One vhost-user connection, front-end side.

    Typed helpers for requests without a mandatory reply take need_reply=None,
    meaning "set NEED_REPLY if REPLY_ACK is negotiated and self.ack_all"; when a
    NEED_REPLY is sent they wait for the u64 status and raise Nack if != 0.
    """

    def __init__(self, sock: socket.socket | None = None, timeout: float = 5.0):
        self.sock = sock
        self.timeout = timeout
        self.listener: socket.socket | None = None
        self.path: str | None = None
        self.features = 0              # acked with SET_FEATURES
        self.protocol_features = 0     # acked with SET_PROTOCOL_FEATURES
        self.ack_all = False
        self.owned_fds: list[int] = []  # eventfds made by setup_net, closed by close()

    # --- connection ---------------------------------------------------------
    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> "Frontend":
        """Connect to a back-end in server mode, retrying until the socket
        exists and accepts."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                fe = cls(s, timeout)
                fe.path = path
                return fe
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no vhost-user listener at {path} after {timeout}s")
                time.sleep(0.01)

    @classmethod
    def listen(cls, path: str, timeout: float = 5.0) -> "Frontend":
        """Listen on `path` for a back-end in client mode; call accept()."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fe = cls(None, timeout)
        fe.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fe.listener.bind(path)
        fe.listener.listen(1)
        fe.path = path
        return fe

    def accept(self, timeout: float | None = None) -> "Frontend":
        assert self.listener is not None, "listen() first"
        self.listener.settimeout(self.timeout if timeout is None else timeout)
        try:
            s, _ = self.listener.accept()
        except socket.timeout:
            raise TimeoutError("back-end did not connect") from None
        if self.sock is not None:
            self.sock.close()
        self.sock = s
        self.features = self.protocol_features = 0
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self.owned_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned_fds = []

    def close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self.path:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.close_listener()

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << C.PROTOCOL_F_REPLY_ACK))

    # --- raw wire -------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (and SCM_RIGHTS fds) verbatim."""
        assert self.sock is not None, "not connected"
        if fds:
            n = socket.send_fds(self.sock, [data], list(fds))
        else:
            n = self.sock.send(data)
        if n < len(data):
            self.sock.sendall(data[n:])

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
                need_reply: bool = False, *, flags: int | None = None,
                size: int | None = None) -> None:
        """Send one message.  flags/size override the header fields verbatim
        (wrong version, size not matching the payload)."""
        self.send_raw(pack_message(req, payload, need_reply=need_reply,
                                   flags=flags, size=size), fds)

    def _recv_exact(self, n: int, deadline: float, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out reading from the back-end "
                                   f"({len(buf)}/{n} bytes)")
            self.sock.settimeout(left)
            try:
                data, got, _, _ = socket.recv_fds(self.sock, n - len(buf), C.VHOST_USER_MAX_FDS)
            except socket.timeout:
                raise TimeoutError(f"timed out reading from the back-end "
                                   f"({len(buf)}/{n} bytes)") from None
            except ConnectionResetError:
                data, got = b"", []
            fds += got
            if not data:
                for fd in fds:
                    os.close(fd)
                raise ConnectionClosed(f"back-end closed the connection "
                                       f"({len(buf)}/{n} bytes read)")
            buf += data
        return bytes(buf)

    def reply(self, req: int | None = None, timeout: float | None = None) -> Reply:
        """Read one reply; check version, the REPLY bit and (if given) the
        request id.  Raises TimeoutError, ConnectionClosed, ProtocolError."""
        assert self.sock is not None, "not connected"
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        fds: list[int] = []
        request, flags, size = HDR.unpack(self._recv_exact(HDR.size, deadline, fds))
        if size > MAX_REPLY_PAYLOAD:
            raise ProtocolError(f"reply size {size:#x} too large")
        payload = self._recv_exact(size, deadline, fds) if size else b""
        rep = Reply(request, flags, payload, fds)
        problem = None
        if flags & C.VHOST_USER_VERSION_MASK != C.VHOST_USER_VERSION:
            problem = f"reply version {flags & 3} != 1 (flags {flags:#x})"
        elif not flags & C.VHOST_USER_REPLY:
            problem = f"reply without the REPLY flag (flags {flags:#x})"
        elif req is not None and request != req:
            problem = (f"reply to {C.REQUEST_NAMES.get(request, request)}, expected "
                       f"{C.REQUEST_NAMES.get(req, req)}")
        if problem:
            rep.close_fds()
            raise ProtocolError(problem)
        return rep

    def expect_closed(self, timeout: float = 2.0) -> bool:
        """True if the back-end closes the connection within `timeout`, False
        if it stays open and silent; raises ProtocolError if it sends data."""
        assert self.sock is not None, "not connected"
        self.sock.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, C.VHOST_USER_MAX_FDS)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        for fd in fds:
            os.close(fd)
        if data:
            raise ProtocolError(f"expected a close, got {len(data)} bytes: {data[:32].hex()}")
        return True

    # --- request/reply plumbing ------------------------------------------------
    def _get(self, req: int, payload: bytes = b"") -> Reply:
        self.request(req, payload)
        return self.reply(req)

    def _set(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool | None = None) -> int:
        if need_reply is None:
            need_reply = self.ack_all and self.reply_ack
        self.request(req, payload, fds, need_reply)
        if not need_reply:
            return 0
        status = self.reply(req).u64()
        if status:
            raise Nack(req, status)
        return status

    # --- typed helpers (vhost-user.rst "Front-end message types") ----------------
    def get_features(self) -> int:
        return self._get(C.GET_FEATURES).u64()

    def set_features(self, features: int, need_reply: bool | None = None) -> None:
        self._set(C.SET_FEATURES, pack_u64(features), need_reply=need_reply)
        self.features = features

    def get_protocol_features(self) -> int:
        return self._get(C.GET_PROTOCOL_FEATURES).u64()

    def set_protocol_features(self, features: int, need_reply: bool | None = None) -> None:
        # REPLY_ACK takes effect from the next message on.
        self._set(C.SET_PROTOCOL_FEATURES, pack_u64(features), need_reply=need_reply)
        self.protocol_features = features

    def set_owner(self, need_reply: bool | None = None) -> None:
        self._set(C.SET_OWNER, need_reply=need_reply)

    def reset_owner(self, need_reply: bool | None = None) -> None:
        self._set(C.RESET_OWNER, need_reply=need_reply)

    def set_mem_table(self, mem: GuestMemory | Sequence[tuple[int, int, int, int, int]],
                      need_reply: bool | None = None) -> None:
        """One fd per region (repeated when regions share a memfd, as QEMU does)."""
        regions = list(mem.regions()) if isinstance(mem, GuestMemory) else list(mem)
        self._set(C.SET_MEM_TABLE, pack_mem_table(regions), [r[4] for r in regions],
                  need_reply)

    def get_max_mem_slots(self) -> int:
        return self._get(C.GET_MAX_MEM_SLOTS).u64()

    def add_mem_reg(self, region: tuple[int, int, int, int, int],
                    need_reply: bool | None = None) -> None:
        self._set(C.ADD_MEM_REG, pack_single_region(*region[:4]), [region[4]], need_reply)

    def rem_mem_reg(self, region: tuple[int, ...], need_reply: bool | None = None) -> None:
        self._set(C.REM_MEM_REG, pack_single_region(*region[:4]), (), need_reply)

    def set_vring_num(self, index: int, num: int, need_reply: bool | None = None) -> None:
        self._set(C.SET_VRING_NUM, pack_vring_state(index, num), need_reply=need_reply)

    def set_vring_base(self, index: int, base: int, need_reply: bool | None = None) -> None:
        self._set(C.SET_VRING_BASE, pack_vring_state(index, base), need_reply=need_reply)

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; returns the back-end's last_avail_idx (state.num)."""
        rep = self._get(C.GET_VRING_BASE, pack_vring_state(index, 0))
        if len(rep.payload) != VRING_STATE.size:
            raise ProtocolError(f"GET_VRING_BASE reply size {len(rep.payload)}, expected 8")
        ridx, num = VRING_STATE.unpack(rep.payload)
        if ridx != index:
            raise ProtocolError(f"GET_VRING_BASE reply for ring {ridx}, asked {index}")
        return num

    def set_vring_addr(self, index: int, ring: SplitRing | None = None, *,
                       desc: int | None = None, used: int | None = None,
                       avail: int | None = None, flags: int = 0, log: int = 0,
                       need_reply: bool | None = None) -> None:
        """Front-end virtual addresses (uva); taken from `ring` unless given."""
        if ring is not None:
            desc = ring.desc_uva if desc is None else desc
            used = ring.used_uva if used is None else used
            avail = ring.avail_uva if avail is None else avail
        self._set(C.SET_VRING_ADDR, pack_vring_addr(index, desc, used, avail, flags, log),
                  need_reply=need_reply)

    def _vring_file(self, req: int, index: int, fd: int | None,
                    need_reply: bool | None) -> None:
        self._set(req, pack_vring_file(index, fd is None), () if fd is None else [fd],
                  need_reply)

    def set_vring_kick(self, index: int, fd: int | None, need_reply: bool | None = None) -> None:
        self._vring_file(C.SET_VRING_KICK, index, fd, need_reply)

    def set_vring_call(self, index: int, fd: int | None, need_reply: bool | None = None) -> None:
        self._vring_file(C.SET_VRING_CALL, index, fd, need_reply)

    def set_vring_err(self, index: int, fd: int | None, need_reply: bool | None = None) -> None:
        self._vring_file(C.SET_VRING_ERR, index, fd, need_reply)

    def set_vring_enable(self, index: int, enable: bool | int = True,
                         need_reply: bool | None = None) -> None:
        self._set(C.SET_VRING_ENABLE, pack_vring_state(index, int(enable)),
                  need_reply=need_reply)

    def get_queue_num(self) -> int:
        return self._get(C.GET_QUEUE_NUM).u64()

    def set_status(self, status: int, need_reply: bool | None = None) -> None:
        self._set(C.SET_STATUS, pack_u64(status), need_reply=need_reply)

    def get_status(self) -> int:
        return self._get(C.GET_STATUS).u64()

    def net_set_mtu(self, mtu: int, need_reply: bool | None = None) -> None:
        self._set(C.NET_SET_MTU, pack_u64(mtu), need_reply=need_reply)

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> Reply:
        """SET_LOG_BASE {mmap_size, mmap_offset} + the log's fd; the back-end always
        replies (LOG_SHMFD). Returns the reply (its fds are the caller's)."""
        self.request(C.SET_LOG_BASE, pack_u64(size) + pack_u64(offset), [fd])
        return self.reply(C.SET_LOG_BASE)

    def set_log_fd(self, fd: int | None, need_reply: bool | None = None) -> None:
        self._set(C.SET_LOG_FD, b"", [] if fd is None else [fd], need_reply)

    def send_rarp(self, mac: bytes, need_reply: bool | None = None) -> None:
        """MAC in the first 6 bytes of the u64 payload."""
        self._set(C.SEND_RARP, bytes(mac[:6]).ljust(8, b"\0"), need_reply=need_reply)

    def set_backend_req_fd(self, fd: int, need_reply: bool | None = None) -> None:
        self._set(C.SET_BACKEND_REQ_FD, b"", [fd], need_reply)

    def reset_device(self, need_reply: bool | None = None) -> None:
        self._set(C.RESET_DEVICE, need_reply=need_reply)

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the back-end still answers GET_FEATURES."""
        try:
            self.request(C.GET_FEATURES)
            self.reply(C.GET_FEATURES, timeout).u64()
            return True
        except (OSError, TimeoutError, ProtocolError):
            return False

    # --- hostile helpers ------------------------------------------------------------
    def send_truncated_header(self, req: int = C.GET_FEATURES, nbytes: int = 6,
                              close: bool = True) -> None:
        """Send the first `nbytes` of a header, then (by default) close."""
        self.send_raw(pack_header(req, 0)[:nbytes])
        if close:
            self.sock.shutdown(socket.SHUT_WR)

    # --- the QEMU 7.2 vhost-user-net handshake ----------------------------------------
    def setup_net(self, mem: GuestMemory, rings: Mapping[int, SplitRing],
                  features: int | None = None, protocol_features: int | None = None,
                  *, mtu: int | None = None, qemu_extras: bool = False,
                  bases: Mapping[int, int] | None = None) -> dict[int, RingFds]:
        """GET_FEATURES, [GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
        GET_QUEUE_NUM if MQ], SET_OWNER, SET_FEATURES, [NET_SET_MTU], SET_MEM_TABLE
        (NEED_REPLY with REPLY_ACK), per ring SET_VRING_NUM/BASE/ADDR/KICK/CALL,
        then SET_VRING_ENABLE 1 per ring when PROTOCOL_FEATURES was acked.

        features=None acks VERSION_1 | MRG_RXBUF | EVENT_IDX/INDIRECT_DESC as the
        rings were built; the acked set is `features & offered` plus bit 30 if
        offered (QEMU adds it).  qemu_extras adds what QEMU also does in
        vhost_dev_init: a second GET_FEATURES after SET_OWNER and an early
        SET_VRING_CALL per ring (a throwaway eventfd) before SET_FEATURES.
        Returns {index: RingFds(kick, call)} and sets ring.kick_fd/call_fd; the
        eventfds (non-blocking) belong to this Frontend."""
        if features is None:
            features = C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF)
            if any(r.event_idx for r in rings.values()):
                features |= 1 << C.VIRTIO_RING_F_EVENT_IDX
            if any(r.indirect for r in rings.values()):
                features |= 1 << C.VIRTIO_RING_F_INDIRECT_DESC
            if len(rings) > 2:
                features |= 1 << C.VIRTIO_NET_F_MQ
        if protocol_features is None:
            protocol_features = DEFAULT_PROTOCOL_FEATURES

        offered = self.get_features()
        has_pf = bool(offered & (1 << C.VHOST_USER_F_PROTOCOL_FEATURES))
        if has_pf:
            pf = self.get_protocol_features() & protocol_features
            self.set_protocol_features(pf)
            if pf & (1 << C.PROTOCOL_F_MQ):
                qn = self.get_queue_num()
                if 2 * qn < len(rings):
                    raise ValueError(f"back-end supports {qn} queue pairs, "
                                     f"{len(rings)} rings requested")
        self.set_owner()
        if qemu_extras:
            self.get_features()
            for idx in rings:
                early = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.owned_fds.append(early)
                self.set_vring_call(idx, early)
        acked = features & offered
        if has_pf:
            acked |= 1 << C.VHOST_USER_F_PROTOCOL_FEATURES
        ev = bool(acked & (1 << C.VIRTIO_RING_F_EVENT_IDX))
        for idx, r in rings.items():
            if r.event_idx != ev:
                raise ValueError(f"ring {idx}: event_idx={r.event_idx} but EVENT_IDX "
                                 f"{'acked' if ev else 'not acked'}")
        self.set_features(acked)
        if mtu is not None and self.protocol_features & (1 << C.PROTOCOL_F_NET_MTU):
            self.net_set_mtu(mtu)
        self.set_mem_table(mem, need_reply=self.reply_ack)
        out: dict[int, RingFds] = {}
        for idx, r in rings.items():
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.owned_fds += [kick, call]
            self.set_vring_num(idx, r.num)
            self.set_vring_base(idx, r.used_idx() if bases is None else bases[idx])
            self.set_vring_addr(idx, r)
            self.set_vring_kick(idx, kick)
            self.set_vring_call(idx, call)
            r.kick_fd, r.call_fd = kick, call
            out[idx] = RingFds(kick, call)
        if has_pf:
            for idx in rings:
                self.set_vring_enable(idx, True)
        return out
