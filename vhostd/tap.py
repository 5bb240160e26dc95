"""Host TAP devices: /dev/net/tun ioctls, and pyroute2 for link state, MTU, MAC, namespace.

Linux Documentation/networking/tuntap.rst: a TAP opened with IFF_TAP|IFF_NO_PI|
IFF_VNET_HDR carries one Ethernet frame per read/write, prefixed by a
virtio_net_hdr whose length TUNSETVNETHDRSZ sets (12 = virtio_net_hdr_v1, the
layout a VERSION_1 guest uses, so headers pass through unchanged).

These calls block (netlink, setns): the daemon runs them in a worker thread.
pyroute2's synchronous API cannot run inside a running event loop.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

from vhostd.connection import OwnedFd
from vhostd.errors import SetupError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

# TUNSETOFFLOAD flags: what the TAP may hand us (and so the guest) as GSO / partial checksum
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")


@dataclass
class Tap:
    """One TAP device and our fds on it (one per queue pair)."""

    name: str
    netns: str | None
    fds: list[OwnedFd] = field(default_factory=list)

    def close(self) -> None:
        for f in self.fds:
            f.close()
        self.fds.clear()


def check_name(name: str) -> str:
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise SetupError(f"invalid interface name {name!r} (1-15 characters, no '/' or spaces)")
    return name


def _open_queue(name: str, flags: int) -> OwnedFd:
    fd = OwnedFd(os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        fcntl.ioctl(fd.fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except OSError as exc:
        fd.close()
        if exc.errno == errno.EBUSY:
            raise SetupError(f"TAP {name} is busy (attached by another process)") from None
        if exc.errno == errno.EPERM:
            raise SetupError(f"no permission to create or attach TAP {name} (needs CAP_NET_ADMIN)") from None
        if exc.errno == errno.EINVAL:
            raise SetupError(f"{name} exists but is not a TAP with matching queue flags") from None
        raise SetupError(f"TUNSETIFF {name}: {exc.strerror}") from None
    return fd


class _InNetns:
    """Moves the calling thread into a network namespace and back (setns is per thread).

    Used instead of pyroute2's IPRoute(netns=...), which forks a helper process:
    a forked child shares the event loop's signal wake-up fd, and its signals would
    reach the daemon's loop as if the daemon had received them.
    """

    def __init__(self, netns: str | None):
        self.netns = netns

    def __enter__(self):
        if self.netns:
            from pyroute2 import netns as pnetns

            if self.netns not in pnetns.listnetns():
                raise SetupError(f"network namespace {self.netns} not found (create it with `ip netns add {self.netns}`)")
            pnetns.pushns(self.netns)
        return self

    def __exit__(self, *exc):
        if self.netns:
            from pyroute2 import netns as pnetns

            pnetns.popns()


def open_tap(name: str, netns: str | None = None, queues: int = 1) -> Tap:
    """Creates the TAP, or attaches to an existing persistent one of that name.

    With `netns` the tun fd is opened inside that namespace, so the device is
    created (or looked up) there.
    """
    check_name(name)
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    tap = Tap(name, netns)
    try:
        with _InNetns(netns):
            for _ in range(queues):
                tap.fds.append(_open_queue(name, flags))
    except BaseException:
        tap.close()
        raise
    return tap


def configure_link(tap: Tap, mtu: int | None = None, mac: str | None = None) -> int:
    """Sets MTU and MAC if given and brings the link up; returns the link's MTU."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _InNetns(tap.netns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap.name)
            if not idx:
                raise SetupError(f"TAP {tap.name} vanished before it could be brought up")
            attrs: dict = {"state": "up"}
            if mtu is not None:
                attrs["mtu"] = mtu
            if mac is not None:
                attrs["address"] = mac
            ipr.link("set", index=idx[0], **attrs)
            return int(ipr.get_links(idx[0])[0].get("mtu"))
    except NetlinkError as exc:
        raise SetupError(f"configuring TAP {tap.name}: {os.strerror(exc.code)}") from None


def set_vnet_hdr_len(fd: OwnedFd, length: int) -> None:
    fcntl.ioctl(fd.fd, TUNSETVNETHDRSZ, struct.pack("i", length))


def set_offload(fd: OwnedFd, flags: int) -> None:
    """TUNSETOFFLOAD: which GSO/checksum kinds the TAP may hand us (TUN_F_*)."""
    fcntl.ioctl(fd.fd, TUNSETOFFLOAD, flags)


def supports_offload(fd: OwnedFd, flags: int) -> bool:
    """Whether this kernel's TAP accepts `flags` (USO needs Linux 6.2). Leaves offloads off."""
    try:
        set_offload(fd, flags)
    except OSError:
        return False
    finally:
        set_offload(fd, 0)
    return True


def set_queue_attached(fd: OwnedFd, attached: bool) -> None:
    """TUNSETQUEUE on a multi-queue TAP: a detached queue gets no frames from the
    host, so flows are not steered to a queue pair the guest has disabled."""
    flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
    fcntl.ioctl(fd.fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
