"""Traffic helpers shared by the integration tests: scapy frames with markers, a
guest (memory + RX/TX split rings + frontend double), vhostctl in a subprocess."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.conftest import ROOT, recv_matching
from tests.driver import constants as C
from tests.driver.frontend import Frontend
from tests.driver.guestmem import GuestMemory
from tests.driver.packed import PackedRing
from tests.driver.split import SplitRing, net_hdr

HDR = 12
GUEST_MAC, HOST_MAC = "02:00:00:00:00:02", "02:00:00:00:00:01"


def frame(i: int, size: int = 128, tag: bytes = b"VHD") -> bytes:
    base = Ether(src=GUEST_MAC, dst=HOST_MAC) / IP(src="198.18.0.2", dst="198.18.0.1") / UDP(sport=4000, dport=5000)
    marker = tag + struct.pack("!I", i)
    pad = max(0, size - len(base) - len(marker))
    return bytes(base / Raw(marker + bytes((i + k) & 0xFF for k in range(pad))))


def marker_of(data: bytes, tag: bytes = b"VHD") -> int | None:
    pos = data.find(tag)
    return struct.unpack_from("!I", data, pos + len(tag))[0] if pos >= 0 else None


def vhostctl(d, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; "
                           "sys.exit(vhostctl_main(sys.argv[1:]))", "--control", d.control, *args],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def stats(d) -> dict:
    r = vhostctl(d, "stats", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


class Guest:
    """Guest memory + an RX/TX ring pair, connected and set up through a Frontend."""

    def __init__(self, path: str, num: int = 256, event_idx: bool = True, indirect: bool = False,
                 mem: GuestMemory | None = None, packed: bool = False):
        self.mem = mem or GuestMemory(32 << 20)
        ring = PackedRing if packed else SplitRing
        self.packed = packed
        self.rx = ring(self.mem, num, event_idx=event_idx, indirect=indirect)
        self.tx = ring(self.mem, num, event_idx=event_idx, indirect=indirect)
        self.fe = Frontend.connect(path, timeout=10)
        self.fe.ack_all = True

    def setup(self, **kw) -> "Guest":
        if self.packed and "features" not in kw:
            kw["features"] = C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF, C.VIRTIO_F_RING_PACKED,
                                    *([C.VIRTIO_RING_F_EVENT_IDX] if self.tx.event_idx else []))
        if self.packed and "bases" not in kw:
            kw["bases"] = {0: 0x8000, 1: 0x8000}        # slot 0, wrap counter 1 (as DPDK sends it)
        self.fe.setup_net(self.mem, {0: self.rx, 1: self.tx}, **kw)
        return self

    def send(self, frames: list[bytes], split: int | None = None) -> None:
        for f in frames:
            data = net_hdr() + f
            bufs = [data] if split is None else [data[i:i + split] for i in range(0, len(data), split)]
            self.tx.add_out(bufs)
        self.tx.publish_and_kick()

    def post_rx(self, n: int, size: int = 1526) -> None:
        for _ in range(n):
            self.rx.add_in([size])
        self.rx.publish_and_kick()

    def close(self) -> None:
        self.fe.close()
        self.mem.close()


def collect(sock, n: int, tag: bytes = b"VHD") -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    while len(got) < n:
        data = recv_matching(sock, lambda d: marker_of(d, tag) is not None)
        got[marker_of(data, tag)] = data
    return got


