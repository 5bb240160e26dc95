"""Unix stream sockets the daemon listens on: bind with owner/group/mode, stale
socket files, inherited listeners (--fd, systemd socket activation), peer
credentials.

Used by the vhost-user ports and by the control socket alike.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass

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


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed fd


@dataclass
class Activated:
    """One socket systemd passed (socket activation): its FileDescriptorName= and
    the path it is bound to."""

    name: str
    path: str
    sock: socket.socket
    used: bool = False  # taken by a port or the control socket


def systemd_listeners(environ=os.environ) -> list[Activated]:
    """The listening sockets systemd passed, as sd_listen_fds(3) defines it:
    $LISTEN_FDS fds from fd 3 on, meant for this process only if $LISTEN_PID is
    our pid, named by the colon-separated $LISTEN_FDNAMES. The variables are
    removed so a child process does not take the fds for its own. Each must be a
    listening Unix stream socket (the units use ListenStream= with a path).
    Raises SetupError."""
    pid, count, names = (environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(k, None)
    if not count or pid != str(os.getpid()):
        return []
    if not count.isdigit() or not 0 < int(count) <= 4096:
        raise SetupError(f"LISTEN_FDS={count!r} is not a number of sockets")
    n = int(count)
    labels = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        label = labels[i] if i < len(labels) else "unknown"
        try:
            os.set_inheritable(fd, False)  # systemd passes them without O_CLOEXEC
            sock = inherited_listener(fd)
        except (OSError, SetupError) as exc:
            raise SetupError(f"socket activation: fd {fd} ({label}): "
                             f"{str(exc).removeprefix(f'--fd {fd}: ').removeprefix(f'--fd {fd} ')}") from None
        path = sock.getsockname()
        if isinstance(path, bytes) or not path:  # abstract or unnamed: matched by name only
            path = ""
        out.append(Activated(label, os.path.abspath(path) if path else "", sock))
    return out


# sock_diag (linux/sock_diag.h, linux/unix_diag.h): the kernel's list of Unix
# sockets, asked over netlink without touching any of them.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")


def listener_bound_to(path: str) -> bool | None:
    """Whether a listening Unix socket in our network namespace is bound to the
    file `path` (matched by the file's device and inode), from sock_diag; None
    when the kernel cannot tell (no unix_diag, a seccomp filter)."""
    try:
        st = os.lstat(path)
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        nl.settimeout(2.0)
        body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_VFS, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendto(_NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
                  + body, (0, 0))
        found = False
        while True:
            data = nl.recv(1 << 16)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, pos)
                if length < _NLMSG.size:
                    return None
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    return None
                if kind == _SOCK_DIAG_BY_FAMILY:
                    at = pos + _NLMSG.size + _UNIX_DIAG_MSG.size
                    end = pos + length
                    while at + 4 <= end:  # attributes: u16 length, u16 type, payload, 4-byte aligned
                        alen, atype = struct.unpack_from("=HH", data, at)
                        if alen < 4:
                            break
                        if atype == _UNIX_DIAG_VFS and alen >= 12:
                            ino, kdev = struct.unpack_from("=II", data, at + 4)
                            # the kernel's dev_t: major in the top 12 bits, minor in the low 20
                            if (kdev >> 20, kdev & 0xFFFFF, ino) == want:
                                found = True
                        at += (alen + 3) & ~3
                pos += (length + 3) & ~3
    except OSError:
        return None
    finally:
        nl.close()


def clear_stale(path: str, what: str) -> None:
    """Removes a socket file left by a process that died; refuses a live one.

    A live socket is told by sock_diag first, without connecting: a connect()
    would be accepted by the other daemon as a frontend (a vhost-user port) or a
    client, and logged and counted there. Only a socket no listener is bound to
    is connected to, to be sure before unlinking it (a listener in another
    network namespace is invisible to sock_diag; a stale socket refuses the
    connection, so nobody sees it)."""
    if not os.path.lexists(path):
        return
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise SetupError(f"{what} path {path} exists and is not a socket")
    if listener_bound_to(path):
        raise SetupError(f"{what} path {path} is in use by another process")
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
