"""Host TAP devices: /dev/net/tun ioctls, and pyroute2 for link state, MTU, MAC, namespace.

Linux Documentation/networking/tuntap.rst: a TAP opened with IFF_TAP|IFF_NO_PI|
IFF_VNET_HDR carries one Ethernet frame per read/write, prefixed by a
virtio_net_hdr whose length TUNSETVNETHDRSZ sets (12 = virtio_net_hdr_v1, the
layout a VERSION_1 guest uses, so headers pass through unchanged).

Persistence: a TAP vhostd creates is made persistent (TUNSETPERSIST), so it
outlives the daemon's fds: the operator's addresses, MTU and bridge membership
survive a crash or a restart, and the next vhostd attaches to the same device.
vhostd marks a TAP it created with the interface alias ALIAS; `remove_tap`
(per port) deletes such a TAP on a clean stop or `vhostctl del-port`. A TAP that
someone else created (`ip tuntap add ... vnet_hdr multi_queue user U`) is only
attached to, never deleted, and needs no capability when owned by our user.

These calls block (netlink, setns): the daemon runs them in a worker thread.
pyroute2's synchronous API cannot run inside a running event loop.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

from vhostd.fds import OwnedFd
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
IFF_PERSIST = 0x0800

ALIAS = "vhostd"  # interface alias of the TAPs vhostd creates (see remove_tap)

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")


@dataclass
class Tap:
    """One TAP device and our fds on it (one per queue pair)."""

    name: str
    netns: str | None
    fds: list[OwnedFd] = field(default_factory=list)
    created: bool = False  # this open created the device (it did not exist before)
    ours: bool = False     # created by vhostd, in this run or an earlier one (alias ALIAS)

    def unpersist(self) -> None:
        """Drops persistence: the device is deleted when the last fd on it closes."""
        if self.fds:
            try:
                fcntl.ioctl(self.fds[0].fd, TUNSETPERSIST, 0)
            except OSError:
                pass

    def close(self, remove: bool = False) -> None:
        """Closes our fds; the device stays (persistent) unless `remove`."""
        if remove:
            self.unpersist()
        for f in self.fds:
            f.close()
        self.fds.clear()


def check_name(name: str) -> str:
    """Linux's dev_valid_name(): 1-15 bytes, not . or .., no '/', ':' or white space."""
    if (not name or len(name.encode()) >= IFNAMSIZ or name in (".", "..") or "/" in name or ":" in name
            or any(c.isspace() for c in name)):
        raise SetupError(f"invalid interface name {name!r} (1-15 characters, no '/', ':' or spaces, "
                         "not . or ..)")
    return name


def _tunsetiff(name: str, flags: int) -> OwnedFd:
    """One queue fd on TAP `name` (created if missing). Raises OSError."""
    fd = OwnedFd(os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        fcntl.ioctl(fd.fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except BaseException:
        fd.close()
        raise
    return fd


def get_flags(fd: OwnedFd) -> int:
    """TUNGETIFF: the device's IFF_* flags as seen through this fd."""
    return _IFREQ.unpack(fcntl.ioctl(fd.fd, TUNGETIFF, bytes(_IFREQ.size)))[1]


def _open_queue(name: str, flags: int) -> OwnedFd:
    try:
        return _tunsetiff(name, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise SetupError(f"TAP {name} is busy (attached by another process)") from None
        if exc.errno == errno.EPERM:
            raise SetupError(f"no permission to create or attach TAP {name} (needs CAP_NET_ADMIN, "
                             "or a persistent TAP owned by this user: `ip tuntap add ... user U`)") from None
        if exc.errno == errno.EINVAL:
            raise SetupError(_einval_reason(name, flags)) from None
        raise SetupError(f"TUNSETIFF {name}: {exc.strerror}") from None


def _einval_reason(name: str, flags: int) -> str:
    """TUNSETIFF says EINVAL for an existing device that is not a TAP, or a TAP whose
    multi_queue flag differs from ours: probe with the other flag to say which."""
    try:
        _tunsetiff(name, flags ^ IFF_MULTI_QUEUE).close()
    except OSError:
        return f"{name} exists but is not a TAP device"
    if flags & IFF_MULTI_QUEUE:
        return (f"TAP {name} exists without multi_queue; more than one queue pair needs a multi-queue TAP "
                f"(`ip tuntap del dev {name} mode tap` and let vhostd create it, or add it with multi_queue)")
    return f"TAP {name} exists with multi_queue (unexpected for one queue pair)"


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
    """Creates the TAP (persistent), or attaches to an existing persistent one of that name.

    With `netns` the tun fd is opened inside that namespace, so the device is
    created (or looked up) there. One queue pair takes a multi-queue TAP as well
    (an operator who pre-creates TAPs with `multi_queue` need not care about
    --queues); more than one needs a multi-queue TAP.
    """
    check_name(name)
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    tap = Tap(name, netns)
    try:
        with _InNetns(netns):
            try:
                first = _tunsetiff(name, flags)
            except OSError as exc:
                if queues == 1 and exc.errno == errno.EINVAL:
                    flags |= IFF_MULTI_QUEUE  # an existing multi-queue TAP: one queue of it
                first = None
            if first is None:
                first = _open_queue(name, flags)
            tap.fds.append(first)
            have = get_flags(first)
            # The kernel gives an existing TAP the flags of the fd that attaches
            # (unless other queues are attached already): check what we got.
            missing = (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) & ~have
            if missing:
                raise SetupError(f"TAP {name} has flags {have:#x}, lacking {missing:#x} "
                                 "(vhostd needs a TAP with vnet_hdr and no packet info)")
            if not have & IFF_PERSIST:
                # We created it (or attached a queue of a multi-queue TAP that
                # another process holds without persistence): keep it beyond our fds.
                fcntl.ioctl(first.fd, TUNSETPERSIST, 1)
                tap.created = True
            for _ in range(queues - 1):
                tap.fds.append(_open_queue(name, flags))
    except BaseException:
        tap.close(remove=tap.created)
        raise
    return tap


def configure_link(tap: Tap, mtu: int | None = None, mac: str | None = None) -> int:
    """Sets MTU and MAC if given and brings the link up; returns the link's MTU.

    Changes only what differs, so a pre-created TAP that is already up with the
    right MTU and MAC needs no CAP_NET_ADMIN. Marks a TAP we created with ALIAS
    and learns whether an attached one carries that mark (`tap.ours`).
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _InNetns(tap.netns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap.name)
            if not idx:
                raise SetupError(f"TAP {tap.name} vanished before it could be brought up")
            link = ipr.get_links(idx[0])[0]
            attrs: dict = {}
            if not link["flags"] & 1:  # IFF_UP
                attrs["state"] = "up"
            if mtu is not None and link.get("mtu") != mtu:
                attrs["mtu"] = mtu
            if mac is not None and (link.get("address") or "").lower() != mac.lower():
                attrs["address"] = mac
            if tap.created:
                attrs["ifalias"] = ALIAS
            tap.ours = tap.created or link.get("ifalias") == ALIAS
            if attrs:
                try:
                    ipr.link("set", index=idx[0], **attrs)
                except NetlinkError as exc:
                    if exc.code == errno.EPERM:
                        what = ", ".join(f"{k} {v}" for k, v in attrs.items())
                        raise SetupError(f"TAP {tap.name} needs {what} and vhostd lacks CAP_NET_ADMIN "
                                         "(set it up beforehand with `ip link set`)") from None
                    raise
            return int(ipr.get_links(idx[0])[0].get("mtu"))
    except NetlinkError as exc:
        raise SetupError(f"configuring TAP {tap.name}: {os.strerror(exc.code)}") from None


LINK_COUNTERS = ("rx_packets", "rx_bytes", "rx_errors", "rx_dropped",
                 "tx_packets", "tx_bytes", "tx_errors", "tx_dropped")


def link_info(name: str, netns: str | None) -> dict:
    """The TAP's link as the kernel sees it (`vhostctl ports`): MAC, MTU, up, and its
    own counters (IFLA_STATS64; the kernel's rx is what the TAP received from
    vhostd, i.e. the guest's TX). Blocking netlink: call it from a thread, which it
    moves into `netns` and back. Raises SetupError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _InNetns(netns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                raise SetupError(f"TAP {name} not found")
            link = ipr.get_links(idx[0])[0]
    except NetlinkError as exc:
        raise SetupError(f"TAP {name}: {os.strerror(exc.code)}") from None
    stats = link.get_attr("IFLA_STATS64") or {}
    return {"mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
            "up": bool(link["flags"] & 1), **{k: int(stats.get(k, 0)) for k in LINK_COUNTERS}}


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
