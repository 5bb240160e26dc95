"""vhost-user wire format: request ids, flags, feature bits, payload pack/unpack.

Implements the message layout of the vhost-user specification (QEMU
docs/interop/vhost-user.rst, "Message Specification" and "Front-end message
types"). This module checks syntax only: exact payload sizes, reserved bits and
overflow-safe arithmetic. Meaning (queue sizes, state) is checked in session.py.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vhostd.errors import ProtocolError, RequestError

HEADER = struct.Struct("=III")  # request, flags, size (native byte order)
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
REQUEST_FLAGS = VERSION_MASK | FLAG_NEED_REPLY  # the only bits a front-end request may set
MAX_FDS = 8  # per message, VHOST_MEMORY_BASELINE_NREGIONS
MAX_PAYLOAD = 4096  # the largest request we read; anything bigger is a framing error
MEM_TABLE_MAX_REGIONS = 8

U64_MAX = (1 << 64) - 1


class Request(enum.IntEnum):
    """Front-end message types ("VHOST_USER_*")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


# Generic feature bits carried by GET/SET_FEATURES.
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_LOG_ALL = 26  # VHOST_F_LOG_ALL

# SET_VRING_KICK/CALL/ERR u64 payload: index in bits 0-7, bit 8 = no fd, the rest reserved.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
VRING_FILE_RESERVED = U64_MAX & ~(VRING_IDX_MASK | VRING_NOFD_MASK)


def bit(n: int) -> int:
    return 1 << n


def request_name(request: int) -> str:
    """The spec's name of a request id, for log lines ("request 0x99" if unknown)."""
    try:
        return Request(request).name
    except ValueError:
        return f"request {request:#x}"


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        """Checks what a header alone can get wrong; any failure closes the connection
        (the stream cannot be resynchronised). Messages name the request."""
        request, flags, size = HEADER.unpack(data)
        name = request_name(request)
        if flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"{name}: unsupported message version {flags & VERSION_MASK:#x} (flags {flags:#x})")
        if flags & FLAG_REPLY:
            raise ProtocolError(f"{name}: REPLY flag set in a request (flags {flags:#x})")
        if flags & ~REQUEST_FLAGS:
            raise ProtocolError(f"{name}: unknown flag bits {flags & ~REQUEST_FLAGS:#x} (flags {flags:#x})")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"{name}: payload size {size:#x} exceeds {MAX_PAYLOAD:#x}")
        return cls(request, flags, size)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)


def pack_message(request: int, payload: bytes, reply: bool = True) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{what}: payload is {len(data)} bytes, expected {size}")


# --- payload types --------------------------------------------------------------

_U64 = struct.Struct("=Q")


def unpack_u64(data: bytes) -> int:
    _exact(data, _U64.size, "u64")
    return _U64.unpack(data)[0]


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


@dataclass(frozen=True)
class VringState:
    """struct vhost_vring_state: index + num (SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE)."""

    index: int
    num: int
    FORMAT = struct.Struct("=II")

    @classmethod
    def unpack(cls, data: bytes) -> "VringState":
        _exact(data, cls.FORMAT.size, "vring state")
        return cls(*cls.FORMAT.unpack(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """struct vhost_vring_addr: frontend virtual addresses of the three rings."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    FORMAT = struct.Struct("=IIQQQQ")
    F_LOG = 1 << 0

    @classmethod
    def unpack(cls, data: bytes) -> "VringAddr":
        _exact(data, cls.FORMAT.size, "vring address")
        return cls(*cls.FORMAT.unpack(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class LogArea:
    """VhostUserLog (SET_LOG_BASE): the dirty log is the mmap_size bytes at
    mmap_offset of the fd attached (vhost-user spec, "Migration")."""

    size: int
    offset: int
    FORMAT = struct.Struct("=QQ")

    @classmethod
    def unpack(cls, data: bytes) -> "LogArea":
        _exact(data, cls.FORMAT.size, "log area")
        return cls(*cls.FORMAT.unpack(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.size, self.offset)


@dataclass(frozen=True)
class VringFile:
    """u64 payload of SET_VRING_KICK/CALL/ERR: index in bits 0-7, bit 8 = no fd.

    Reserved bits set are refused (RequestError: a failure reply, the connection
    lives on), not a framing error: the payload's size was right."""

    index: int
    nofd: bool
    raw: int

    @classmethod
    def unpack(cls, data: bytes) -> "VringFile":
        raw = unpack_u64(data)
        if raw & VRING_FILE_RESERVED:
            raise RequestError(f"vring file payload {raw:#x} has reserved bits set")
        return cls(raw & VRING_IDX_MASK, bool(raw & VRING_NOFD_MASK), raw)


@dataclass(frozen=True)
class MemRegion:
    """VhostUserMemoryRegion."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    FORMAT = struct.Struct("=QQQQ")

    def check(self) -> None:
        """Overflow-safe sanity: nonzero size and no 64-bit wrap of any end."""
        if self.size == 0:
            raise ProtocolError(f"memory region at gpa {self.gpa:#x} has size 0")
        for name, start in (("gpa", self.gpa), ("uva", self.uva), ("mmap_offset", self.mmap_offset)):
            if start + self.size - 1 > U64_MAX:
                raise ProtocolError(f"memory region {name} {start:#x} + size {self.size:#x} overflows")

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.gpa, self.size, self.uva, self.mmap_offset)


_MEM_HDR = struct.Struct("=II")  # nregions, padding


def unpack_mem_table(data: bytes) -> list[MemRegion]:
    """VhostUserMemory. QEMU always sends room for 8 regions; DPDK sends exactly nregions."""
    if len(data) < _MEM_HDR.size:
        raise ProtocolError(f"memory table: payload is {len(data)} bytes, too short")
    nregions, _ = _MEM_HDR.unpack_from(data)
    if not 1 <= nregions <= MEM_TABLE_MAX_REGIONS:
        raise ProtocolError(f"memory table: {nregions:#x} regions (1..{MEM_TABLE_MAX_REGIONS} allowed)")
    used = _MEM_HDR.size + nregions * MemRegion.FORMAT.size
    full = _MEM_HDR.size + MEM_TABLE_MAX_REGIONS * MemRegion.FORMAT.size
    if len(data) not in (used, full):
        raise ProtocolError(f"memory table: payload is {len(data)} bytes for {nregions} regions")
    regions = []
    for i in range(nregions):
        region = MemRegion(*MemRegion.FORMAT.unpack_from(data, _MEM_HDR.size + i * MemRegion.FORMAT.size))
        region.check()
        regions.append(region)
    return regions


def pack_mem_table(regions: list[MemRegion]) -> bytes:
    return _MEM_HDR.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


_SINGLE_REGION = struct.Struct("=Q")  # padding before the region


def unpack_single_region(data: bytes) -> MemRegion:
    """VhostUserSingleMemRegion (ADD_MEM_REG / REM_MEM_REG)."""
    _exact(data, _SINGLE_REGION.size + MemRegion.FORMAT.size, "single memory region")
    region = MemRegion(*MemRegion.FORMAT.unpack_from(data, _SINGLE_REGION.size))
    region.check()
    return region


def unpack_empty(data: bytes) -> None:
    """Requests without payload. QEMU sends SET_OWNER/RESET_OWNER with none; accept a u64 too."""
    if len(data) not in (0, 8):
        raise ProtocolError(f"request takes no payload, got {len(data)} bytes")
    return None


def unpack_raw(data: bytes) -> bytes:
    """Requests we refuse as unsupported: the payload is not interpreted."""
    return data
