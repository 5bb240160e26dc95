"""Integration: feature sets a real QEMU guest can ack although the virtio spec
tells drivers not to (virtio 1.2 §5.1.3.1 dependencies broken) are served, and
frames cross both ways with correct checksums. Frontend double + real TAP."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.conftest import packet_socket
from tests.driver import constants as C
from tests.driver.split import parse_net_hdr
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of

INCONSISTENT = {
    "host_tso4_without_csum": (C.VIRTIO_NET_F_HOST_TSO4, C.VIRTIO_NET_F_HOST_ECN),
    "guest_tso4_without_guest_csum": (C.VIRTIO_NET_F_GUEST_TSO4, C.VIRTIO_NET_F_GUEST_ECN),
    "guest_ecn_without_guest_tso": (C.VIRTIO_NET_F_GUEST_CSUM, C.VIRTIO_NET_F_GUEST_ECN),
    "host_ufo_without_csum": (C.VIRTIO_NET_F_HOST_UFO, C.VIRTIO_NET_F_GUEST_CSUM),
}


def checksums_ok(data: bytes) -> bool:
    """scapy recomputes the IP and UDP checksums; equal means they were right."""
    pkt = Ether(data)
    fixed = pkt.copy()
    del fixed[IP].chksum, fixed[UDP].chksum
    fixed = Ether(bytes(fixed))
    return pkt[IP].chksum == fixed[IP].chksum and pkt[UDP].chksum == fixed[UDP].chksum


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_inconsistent_feature_set_carries_traffic(daemon, netns, name):
    d = daemon()
    g = Guest(d.socket).setup(features=C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF,
                                              C.VIRTIO_RING_F_EVENT_IDX, *INCONSISTENT[name]))
    try:
        sock = packet_socket(netns, d.tap)
        out = [frame(i, size) for i, size in enumerate([60, 128, 1000, 1514] * 4)]
        g.send(out)
        got = collect(sock, len(out))
        assert [got[i] for i in range(len(out))] == out
        assert all(checksums_ok(f) for f in got.values())
        g.post_rx(32)
        back = [frame(i, size, b"RXF") for i, size in enumerate([60, 600, 1514] * 4)]
        for f in back:
            sock.send(f)
        used = {marker_of(u.data[HDR:], b"RXF"): u for u in g.rx.wait_used(len(back))}
        for i, f in enumerate(back):
            hdr = parse_net_hdr(used[i].data[:HDR])
            # Whatever was acked, the guest gets no GSO and no partial checksum it
            # cannot take: these frames arrive complete, checksums filled in.
            assert (hdr.flags, hdr.gso_type) == (0, 0)
            assert used[i].data[HDR:] == f and checksums_ok(used[i].data[HDR:])
    finally:
        g.close()
