"""File descriptors vhostd is responsible for: OwnedFd, close_all, eventfd helpers.

vhost-user passes every fd (memory regions, kick/call/err eventfds) as
SCM_RIGHTS; each becomes an OwnedFd the moment recvmsg returns, so every error
path closes it exactly once. The TAP, memory, vring and socket code all hold
OwnedFds: any module may import this one.
"""
from __future__ import annotations

import os


class OwnedFd:
    """An fd we are responsible for closing exactly once.

    Received fds become OwnedFd the moment recvmsg returns, so every error path
    closes them. `take()` hands ownership to another holder.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def take(self) -> "OwnedFd":
        owned, self.fd = OwnedFd(self.fd), -1
        return owned

    def __repr__(self) -> str:
        return f"OwnedFd({self.fd})"

    def __del__(self):
        if self.fd >= 0:  # pragma: no cover - a leak guard, not a code path
            try:
                os.close(self.fd)
            except OSError:
                pass


def close_all(fds: list[OwnedFd]) -> None:
    for f in fds:
        f.close()


def is_eventfd(fd: int) -> bool:
    """Whether fd is an eventfd (vhost-user: kick, call and err fds are eventfds)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:  # no /proc: cannot tell, accept
        return True


def eventfd_count(fd: int) -> int | None:
    """The counter of an eventfd of this process (what a read would return), from
    /proc/self/fdinfo, without consuming it. None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("eventfd-count:"):
                    return int(line.split(":", 1)[1].strip(), 16)
    except (OSError, ValueError):
        pass
    return None
