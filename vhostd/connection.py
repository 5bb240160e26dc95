"""One vhost-user socket: raw non-blocking AF_UNIX reads with recvmsg + SCM_RIGHTS.

Never an asyncio Transport: Transports drop ancillary data, and every fd the
frontend passes (memory regions, kick/call eventfds) travels as SCM_RIGHTS with
the first byte of its message (vhost-user spec, "Communication").
"""
from __future__ import annotations

import array
import asyncio
import socket

from vhostd.errors import ProtocolError
from vhostd.fds import OwnedFd, close_all
from vhostd.protocol import HEADER, MAX_FDS, Header, request_name

_FD_SIZE = array.array("i").itemsize


class Connection:
    """Message framing over a connected vhost-user socket."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self.closed = False

    async def _wait(self, writable: bool = False) -> None:
        fut = self._loop.create_future()
        fd = self.sock.fileno()
        add, remove = (
            (self._loop.add_writer, self._loop.remove_writer)
            if writable
            else (self._loop.add_reader, self._loop.remove_reader)
        )
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def _recv_some(self, n: int) -> tuple[bytes, list[OwnedFd], bool]:
        """Up to n bytes and the fds that came with them; True if the kernel
        dropped fds beyond MAX_FDS (MSG_CTRUNC)."""
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(n, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE))
            except (BlockingIOError, InterruptedError):
                await self._wait()
                continue
            fds = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                    fds.extend(OwnedFd(fd) for fd in arr)
            return data, fds, bool(flags & socket.MSG_CTRUNC)

    async def recv_message(self) -> tuple[Header, bytes, list[OwnedFd]] | None:
        """The next message, or None on a clean EOF between messages."""
        fds: list[OwnedFd] = []
        truncated = False
        try:
            head = b""
            while len(head) < HEADER.size:
                chunk, more, cut = await self._recv_some(HEADER.size - len(head))
                fds.extend(more)
                truncated |= cut
                if not chunk:
                    if head or fds or truncated:
                        raise ProtocolError("connection closed inside a message header")
                    return None
                head += chunk
            if truncated:   # fds come with the first byte: name the request they came with
                raise ProtocolError(f"{request_name(HEADER.unpack(head)[0])}: more than {MAX_FDS} fds "
                                    "in one message")
            header = Header.unpack(head)
            payload = b""
            while len(payload) < header.size:
                chunk, more, cut = await self._recv_some(header.size - len(payload))
                fds.extend(more)
                if cut:
                    raise ProtocolError(f"{header.name}: more than {MAX_FDS} fds in one message")
                if not chunk:
                    raise ProtocolError(f"connection closed inside request {header.request} payload")
                payload += chunk
            if len(fds) > MAX_FDS:
                raise ProtocolError(f"{header.name}: {len(fds)} fds in one message (max {MAX_FDS})")
            return header, payload, fds
        except BaseException:
            close_all(fds)
            raise

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            view = view[sent:]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
