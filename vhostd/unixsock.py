"""Unix stream sockets the daemon listens on: bind with owner/group/mode, stale
socket files, inherited listeners (--fd), peer credentials.

Used by the vhost-user ports and by the control socket alike.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from vhostd.errors import SetupError


def inherited_listener(fd: int) -> socket.socket:
    """--fd: a listening AF_UNIX stream socket handed over by the parent (libvirt, systemd)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise SetupError(f"--fd {fd} is not a socket") from None
        raise SetupError(f"--fd {fd}: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SetupError(f"--fd {fd} is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SetupError(f"--fd {fd} is not a listening socket")
    sock.setblocking(False)
    return sock


def clear_stale(path: str, what: str) -> None:
    """Removes a socket file left by a process that died; refuses a live one."""
    if not os.path.lexists(path):
        return
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise SetupError(f"{what} path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale socket from a previous run
    else:
        raise SetupError(f"{what} path {path} is in use by another process")
    finally:
        probe.close()


def bind_unix(path: str, uid: int | None, gid: int | None, mode: int, what: str = "socket") -> socket.socket:
    """A listening AF_UNIX socket at `path` with owner `uid`, group `gid` (None: ours) and
    permission bits `mode`. It is bound under a umask that leaves it 0600, so nobody
    else can connect before the owner, group and mode are in place."""
    clear_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # process-wide, but nothing else creates files meanwhile
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot create {what} {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        if uid is not None or gid is not None:
            try:
                os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
            except PermissionError:
                raise SetupError(
                    f"cannot give {what} {path} owner {'-' if uid is None else uid} group "
                    f"{'-' if gid is None else gid}: not permitted (another owner needs CAP_CHOWN; "
                    "another group needs membership in it)") from None
        os.chmod(path, mode)
        sock.listen(4)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    return sock


def peer_pid(sock: socket.socket) -> str:
    """"pid N" of the connected peer (SO_PEERCRED) for log lines; "" if unknown."""
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f"pid {pid}" if pid else ""
    except OSError:
        return ""
