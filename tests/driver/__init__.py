"""Test doubles for vhostd: a guest (memory + split virtqueue driver) and a
vhost-user front-end (QEMU / DPDK virtio-user stand-in).

They encode the virtio and vhost-user wire formats themselves with `struct` and
never import vhostd, so a misreading of the spec in vhostd shows up as a test
failure instead of being mirrored here.
"""

from .constants import *  # noqa: F401,F403
from .guestmem import GuestMemory, Region  # noqa: F401
from .split import (  # noqa: F401
    DeviceError, NetHdr, RingFull, SplitRing, Used, net_hdr, parse_net_hdr,
    vring_need_event,
)
from .frontend import (  # noqa: F401
    ConnectionClosed, Frontend, Nack, ProtocolError, RingFds,
)
