"""The input format of fuzz_messages.py: sendmsg() chunks with fd descriptions.

chunk = u8 header (low 4 bits: number of fds, 0..15), that many fd-spec bytes,
        u16 little-endian length, then the bytes (a short input ends the last chunk).

fd-spec byte, low 3 bits the kind:
    0 memfd of memfd_size(spec) bytes      1 the same, sealed against shrinking
    2 eventfd                              3 pipe (read end)
    4 /dev/null (a character device)       5 a socket
    6 memfd of 0 bytes                     7 the previous fd of this chunk again
Bits 3-6 of a memfd spec: size class, 4 KiB << class (4 KiB .. 128 MiB).
Bits of an eventfd spec: 3 blocking (no EFD_NONBLOCK), 4 counter saturated
(0xfffffffffffffffe: one more write blocks or fails), 5 counter 1 (a kick or
call already pending).
"""
from __future__ import annotations

import struct

_LEN = struct.Struct("<H")
MEMFD = 0
MEMFD_SEALED = 1
EVENTFD = 2
PIPE = 3
DEVNULL = 4
SOCKET = 5
MEMFD_EMPTY = 6
SAME_AS_PREVIOUS = 7


EVENTFD_BLOCKING = 1 << 3
EVENTFD_SATURATED = 1 << 4
EVENTFD_PENDING = 1 << 5
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


def memfd_size(spec: int) -> int:
    return 4096 << ((spec >> 3) & 15)


def memfd_spec(size: int, sealed: bool = False) -> int:
    """The smallest memfd size class holding `size` bytes."""
    cls = 0
    while memfd_size(cls << 3) < size and cls < 15:
        cls += 1
    return (MEMFD_SEALED if sealed else MEMFD) | cls << 3


def parse(data: bytes) -> list[tuple[list[int], bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        nfds = data[pos] & 15
        pos += 1
        specs = list(data[pos:pos + nfds])
        pos += nfds
        if pos + _LEN.size > len(data):
            out.append((specs, data[pos:]))
            break
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        out.append((specs, data[pos:pos + n]))
        pos += n
    return out


def encode(chunks: list[tuple[list[int], bytes]]) -> bytes:
    out = bytearray()
    for specs, payload in chunks:
        if len(specs) > 15 or len(payload) > 0xFFFF:
            raise ValueError("chunk too large for the format")
        out.append(len(specs))
        out += bytes(specs)
        out += _LEN.pack(len(payload)) + payload
    return bytes(out)
