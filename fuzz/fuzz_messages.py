"""Coverage-guided fuzz target (atheris) for the vhost-user control plane.

Each input is a byte stream a frontend writes into the vhost-user socket, cut
into sendmsg() calls that carry fds the harness makes (memfds of several
sizes, eventfds (blocking or not, counters empty, pending or saturated), pipes,
sockets, /dev/null, repeats of one fd as QEMU does for regions sharing a memfd). It travels the daemon's own path: a real AF_UNIX
socketpair, Connection.recv_message (recvmsg + SCM_RIGHTS, framing,
protocol.Header), then dispatch.dispatch -> Session handlers -> device.py /
memory.py -> the C datapath, against one NetDevice on a real TAP in a network
namespace (the harness's "port"), a new Session per input as for a new
frontend. The loop is dispatch.serve's, minus its `except OSError`, which would
hide a handler's OSError as a lost connection.

A crash is:
  - any exception out of dispatch other than ProtocolError (the one error that
    closes a connection on purpose; RequestError never leaves dispatch);
  - a malformed reply (version, REPLY flag, size);
  - after Session.close(): an fd not closed (fd table differs from the baseline),
    an OwnedFd closed only by its garbage-collection guard, a guest memory
    mapping left, or a vring still holding an fd;
  - a hang (per-input deadline here; libFuzzer's -timeout for the rest).

Input format (fuzz/seedfmt.py writes it; record_message_seeds.py records the
tests' frontend double in it): a sequence of chunks
    u8 nfds (low 4 bits; more than 8 makes the kernel truncate), nfds fd-spec bytes,
    u16 little-endian length, then that many bytes sent with one sendmsg.

Run: scripts/fuzz.sh messages (needs root: TAP + netns).
"""
from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["vhostd", "seedfmt"]):
    import seedfmt  # noqa: E402
    from vhostd import fds as fdsmod  # noqa: E402
    from vhostd import tap as taplib  # noqa: E402
    from vhostd.connection import Connection  # noqa: E402
    from vhostd.dispatch import dispatch  # noqa: E402
    from vhostd.errors import ProtocolError  # noqa: E402
    from vhostd.device import NetDevice  # noqa: E402
    from vhostd.port import PortLog  # noqa: E402
    from vhostd.protocol import HEADER, VERSION, VERSION_MASK, FLAG_REPLY  # noqa: E402
    from vhostd.session import Session  # noqa: E402

INPUT_DEADLINE_S = 10.0
QUEUE_PAIRS = 2
MEMFD_NAME = "vhostd-fuzz-guest"

# --- the one port the harness serves ---------------------------------------------

_leaked_by_gc: list[int] = []
_orig_del = fdsmod.OwnedFd.__del__


def _guard_del(self):
    """OwnedFd's leak guard firing means no code path closed the fd: a leak."""
    if self.fd >= 0:
        _leaked_by_gc.append(self.fd)
    _orig_del(self)


fdsmod.OwnedFd.__del__ = _guard_del


class Harness:
    def __init__(self) -> None:
        self.netns = os.environ.get("VHOSTD_FUZZ_NETNS")
        self.own_netns = self.netns is None
        if self.own_netns:
            self.netns = f"vhd-fuzz-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
        tap = taplib.open_tap("fz0", self.netns, QUEUE_PAIRS)
        mtu = taplib.configure_link(tap)
        self.device = NetDevice("fuzz", tap, QUEUE_PAIRS, mtu)
        self.log = PortLog(logging.getLogger("vhostd"), {"port": "fuzz"})
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.sleep(0))
        self.baseline: set[str] | None = None
        self.execs = 0

    def close(self) -> None:
        self.device.close()
        self.loop.close()
        if self.own_netns:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)


def _open_fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{name}:{os.readlink(f'/proc/self/fd/{name}')}")
        except FileNotFoundError:
            pass  # the listdir fd itself
    return out


def _guest_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if MEMFD_NAME in line)


# --- fds described by the input ----------------------------------------------------

def make_fd(spec: int, previous: int | None) -> int:
    kind = spec & 7
    if kind in (0, 1):
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if kind == 1 else 0))
        os.ftruncate(fd, seedfmt.memfd_size(spec))
        if kind == 1:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd
    if kind == 2:
        # Blocking and/or saturated eventfds too: what a hostile frontend hands
        # over to make the worker sleep in a call/err write (vr_efd_signal).
        blocking = spec & seedfmt.EVENTFD_BLOCKING
        fd = os.eventfd(0, os.EFD_CLOEXEC | (0 if blocking else os.EFD_NONBLOCK))
        if spec & seedfmt.EVENTFD_SATURATED:
            os.eventfd_write(fd, seedfmt.EVENTFD_MAX)
        elif spec & seedfmt.EVENTFD_PENDING:
            os.eventfd_write(fd, 1)
        return fd
    if kind == 3:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if kind == 4:
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == 5:
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == 6:
        return os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    if previous is not None:  # kind 7: the previous fd again (QEMU: regions sharing a memfd)
        return os.dup(previous)
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def send_chunks(sock: socket.socket, data: bytes) -> None:
    for specs, payload in seedfmt.parse(data):
        fds: list[int] = []
        try:
            for s in specs:
                fds.append(make_fd(s, fds[-1] if fds else None))
            if fds and not payload:
                payload = b"\0"  # SCM_RIGHTS needs at least one byte of data
            if not payload:
                continue
            if fds:
                socket.send_fds(sock, [payload], fds)
            else:
                sock.sendall(payload)
        finally:
            for fd in fds:
                os.close(fd)


# --- one input ------------------------------------------------------------------------

def check_replies(stream: bytes) -> None:
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < HEADER.size:
            raise AssertionError(f"truncated reply header: {stream[pos:].hex()}")
        request, flags, size = HEADER.unpack_from(stream, pos)
        if flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY or size not in (0, 8):
            raise AssertionError(f"malformed reply to request {request}: flags {flags:#x} size {size}")
        pos += HEADER.size + size
        if pos > len(stream):
            raise AssertionError(f"reply to request {request} shorter than its size {size}")


async def serve(h: Harness, backend: socket.socket, frontend: socket.socket) -> bytes:
    """dispatch.serve's loop over the backend end; returns what the frontend received."""
    loop = asyncio.get_running_loop()
    replies = bytearray()

    async def drain():
        while True:
            try:
                chunk = await loop.sock_recv(frontend, 65536)
            except ConnectionResetError:
                return  # closed with requests unread (after a ProtocolError)
            if not chunk:
                return
            replies.extend(chunk)

    drainer = loop.create_task(drain())
    session = Session(h.device, Connection(backend), h.log, "fuzz")
    try:
        while True:
            msg = await session.conn.recv_message()
            if msg is None:
                break
            reply = await dispatch(session, *msg)
            if reply is not None:
                await session.conn.send(reply)
    except ProtocolError:
        pass  # the connection closes on purpose
    finally:
        session.close()
    await asyncio.wait_for(drainer, 5)
    leftovers = [v.index for v in session.vrings if v.kick or v.call or v.err]
    if leftovers:
        raise AssertionError(f"vrings {leftovers} still hold fds after Session.close()")
    return bytes(replies)


def one_input(h: Harness, data: bytes) -> None:
    frontend, backend = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        frontend.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        send_chunks(frontend, data)
        frontend.shutdown(socket.SHUT_WR)
        frontend.setblocking(False)
        replies = h.loop.run_until_complete(
            asyncio.wait_for(serve(h, backend, frontend), INPUT_DEADLINE_S))
    except asyncio.TimeoutError:
        raise AssertionError(f"hang: input not served within {INPUT_DEADLINE_S}s") from None
    finally:
        frontend.close()
        backend.close()
    check_replies(replies)
    now = _open_fds()
    if h.baseline is not None and now != h.baseline:
        gc.collect()  # an fd kept alive only by a reference cycle: let the guard see it
        now = _open_fds()
    if _leaked_by_gc:
        fds = list(_leaked_by_gc)
        _leaked_by_gc.clear()
        raise AssertionError(f"fds {fds} were closed only by OwnedFd's garbage-collection guard")
    if len(h.device.mem):
        raise AssertionError("guest memory still mapped after Session.close()")
    if _guest_mappings():
        raise AssertionError("a guest memory mapping outlived Session.close()")
    if h.baseline is None:
        h.baseline = now
    elif now != h.baseline:
        raise AssertionError(f"fd leak: new {sorted(now - h.baseline)} gone {sorted(h.baseline - now)}")


_harness: Harness | None = None


def TestOneInput(data: bytes) -> None:
    global _harness
    if _harness is None:
        _harness = Harness()
        one_input(_harness, b"")  # warm up: executor threads, lazily opened fds
        one_input(_harness, b"")
    one_input(_harness, data)
    _harness.execs += 1


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)
    atheris.Setup(sys.argv, TestOneInput)
    started = time.monotonic()
    try:
        atheris.Fuzz()
    finally:
        if _harness is not None:
            print(f"fuzz_messages: {_harness.execs} inputs in {time.monotonic() - started:.0f}s", file=sys.stderr)
            _harness.close()


if __name__ == "__main__":
    main()
