"""Hostile rings against one real vhostd process: every corruption of
tests/driver/hostile.py, on split and packed rings (direct and indirect), on
the TX and on the RX ring of queue pair 0 of a two-pair port.

datapath/test_hostile.py and datapath/test_packed.py check the C side of each rule
with the datapath alone (the exact VR_BROKEN_* code, the err eventfd, no spin).
Here the whole daemon answers, and for each corruption the test checks that:
  - just that vring is marked broken, with the reason, counted once
    (drop_bad_desc + 1) and logged in exactly one line; legal input (a buffer
    crossing regions, a zero-length descriptor) is delivered, a chain shorter
    than the vnet header is dropped and counted, the ring healthy;
  - queue pair 1 of the same port and a second port of the same daemon keep
    carrying traffic;
  - the frontend recovers that ring by resetting it (GET_VRING_BASE, then fresh
    SET_VRING_NUM/BASE/ADDR/KICK/CALL) and, separately, by reconnecting.
At the end: `ring corruptions tried: N, crashes: 0`.
"""
from __future__ import annotations

import itertools
import os
import struct
import time
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.conftest import DaemonProcess, need_root, network_namespace, packet_socket, recv_matching
from tests.driver import constants as C
from tests.driver import hostile as H
from tests.driver.frontend import Frontend
from tests.driver.guestmem import GuestMemory
from tests.driver.packed import PackedRing
from tests.driver.split import SplitRing, net_hdr
from tests.daemon.traffic import GUEST_MAC, HDR, HOST_MAC, Guest, collect, frame, marker_of, vhostctl
from vhostd.ctl import control_request
from vhostd.native import BROKEN_REASONS, lib

MB = 1 << 20
NUM = {"split": 256, "packed": 200}            # packed sizes need not be powers of two
RING_CLS = {"split": SplitRing, "packed": PackedRing}
FEATURES = C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF, C.VIRTIO_RING_F_EVENT_IDX,
                  C.VIRTIO_RING_F_INDIRECT_DESC, C.VIRTIO_NET_F_MQ)
REASON_CODE = {H.DESC: lib.VR_BROKEN_DESC, H.ADDR: lib.VR_BROKEN_ADDR,
               H.INDIRECT: lib.VR_BROKEN_INDIRECT, H.AVAIL_IDX: lib.VR_BROKEN_AVAIL_IDX}
_marker = itertools.count(1)


# --------------------------------------------------------------------- the daemon

@dataclass
class Env:
    d: DaemonProcess
    netns: str
    socket_b: str
    tap_b: str
    loop: str
    sock_a: object = None
    tried: int = 0
    broken_seen: int = 0
    crashes: int = 0
    kinds: set = field(default_factory=set)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def env(tmp_path_factory, request):
    need_root()
    tmp = tmp_path_factory.mktemp("hostile-ring")
    d = None
    with network_namespace() as netns:
        try:
            d = DaemonProcess(tmp, netns, "hrnga", "--queues", "2", loop=request.param).wait_ready()
            socket_b = str(tmp / "hrngb.sock")
            r = vhostctl(d, "add-port", "--socket", socket_b, "--tap", "hrngb", "--netns", netns)
            assert r.returncode == 0, r.stderr + d.log()
            e = Env(d, netns, socket_b, "hrngb", request.param)
            e.sock_a = packet_socket(netns, d.tap)
            yield e
            e.sock_a.close()
        finally:
            if d is not None:
                rc = d.stop()
                assert rc == 0, f"vhostd exited with {rc}:\n{d.log()}"


def wait_until(cond, what: str, timeout: float = 5.0, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{log()}" if log else ""))
        time.sleep(0.01)


def queue_rows(env: Env) -> dict[int, dict]:
    rep = control_request(env.d.control, {"cmd": "stats", "port": env.d.tap})
    return {q["vring"]: q for q in rep["stats"][0]["queues"]}


# ----------------------------------------------------------------- the guest side

class MQGuest:
    """Two queue pairs (vrings 0-3) of one ring layout in two adjacent memory
    regions, set up like QEMU does, with REPLY_ACK on every request."""

    def __init__(self, path: str, layout: str):
        self.layout = layout
        self.mem = GuestMemory(layout=[(0, 16 * MB), (16 * MB, 16 * MB)], name=f"hring-{layout}")
        self.rings = {i: self._ring() for i in range(4)}
        self.fe = Frontend.connect(path, timeout=10)
        self.fe.ack_all = True

    def _ring(self):
        return RING_CLS[self.layout](self.mem, NUM[self.layout], event_idx=True, indirect=True)

    @property
    def base0(self) -> int:
        return 0 if self.layout == "split" else 0x8000    # packed: slot 0, wrap counter 1

    def setup(self) -> "MQGuest":
        features = FEATURES | (C.bits(C.VIRTIO_F_RING_PACKED) if self.layout == "packed" else 0)
        self.fe.setup_net(self.mem, self.rings, features=features, bases=dict.fromkeys(self.rings, self.base0))
        return self

    def reset_ring(self, idx: int) -> None:
        """The frontend's recovery: stop the ring, then set it up afresh."""
        self.fe.get_vring_base(idx)
        r = self.rings[idx] = self._ring()
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fe.owned_fds += [kick, call]
        self.fe.set_vring_num(idx, r.num)
        self.fe.set_vring_base(idx, self.base0)
        self.fe.set_vring_addr(idx, r)
        self.fe.set_vring_kick(idx, kick)
        self.fe.set_vring_call(idx, call)
        r.kick_fd, r.call_fd = kick, call

    def close(self) -> None:
        self.fe.close()
        self.mem.close()


def flow_frame(marker: int, sport: int, tag: bytes = b"HRX") -> bytes:
    base = Ether(src=HOST_MAC, dst=GUEST_MAC) / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=sport, dport=6000)
    return bytes(base / Raw(tag + struct.pack("!I", marker) + bytes(100)))


def tx_works(env: Env, g: MQGuest, pair: int, n: int = 2) -> None:
    """Frames posted on the TX ring of `pair` reach the TAP."""
    ring = g.rings[2 * pair + 1]
    markers = [next(_marker) for _ in range(n)]
    for m in markers:
        ring.add_out([net_hdr() + frame(m, 150, b"HTX")])
    ring.publish_and_kick()
    want = set(markers)
    while want:
        data = recv_matching(env.sock_a, lambda d: marker_of(d, b"HTX") in want)
        want.discard(marker_of(data, b"HTX"))
    assert len(ring.wait_used(n)) == n


def rx_works(env: Env, g: MQGuest, pair: int) -> None:
    """A host frame reaches the RX ring of `pair`. The multi-queue TAP spreads flows
    over the queues by hash: new flows until one lands on that pair, every RX ring
    holding buffers meanwhile."""
    for i in range(2):
        r = g.rings[2 * i]
        for _ in range(8):
            r.add_in([1526])
        r.publish_and_kick()
    for sport in range(7000, 7064):
        m = next(_marker)
        env.sock_a.send(flow_frame(m, sport))
        deadline = time.monotonic() + 5
        while True:
            hits = {i: [u for u in g.rings[2 * i].get_used() if marker_of(u.data[HDR:], b"HRX") == m]
                    for i in range(2)}
            for i, got in hits.items():
                if got:
                    g.rings[2 * i].add_in([1526])
                    g.rings[2 * i].publish_and_kick()
            if hits[pair]:
                return
            if any(hits.values()):
                break                   # steered to the other pair: try the next flow
            assert time.monotonic() < deadline, f"host frame {m} reached no RX ring"
            time.sleep(0.005)
    raise AssertionError(f"no flow of 64 reached RX of queue pair {pair}")


def port_b_works(env: Env) -> None:
    g = Guest(env.socket_b).setup()
    try:
        sock = packet_socket(env.netns, env.tap_b)
        m = next(_marker)
        g.send([frame(m, 120, b"HPB")])
        assert list(collect(sock, 1, b"HPB")) == [m]
        sock.close()
    finally:
        g.close()


def ring_works(env: Env, g: MQGuest, idx: int) -> None:
    (tx_works if idx % 2 else rx_works)(env, g, idx // 2)


# --------------------------------------------------------------------- the cases

CASES = [(c, t) for c in H.ALL for t in c.targets]


@pytest.mark.parametrize("c,target", CASES, ids=[f"{c.layout}-{t}-{c.name}" for c, t in CASES])
def test_ring_corruption(env, c, target):
    d = env.d
    idx = 1 if target == "tx" else 0            # queue pair 0
    stopped = f"vring {idx} stopped:"
    g = MQGuest(d.socket, c.layout).setup()
    try:
        before = queue_rows(env)
        log_at = len(d.log())
        m = next(_marker)
        f = net_hdr() + frame(m, 200, b"HCR")
        ring = g.rings[idx]
        env.tried += 1
        env.kinds.add((c.layout, c.name))
        c.build(ring, f, C.VRING_DESC_F_WRITE if target == "rx" else 0)
        ring.publish()
        ring.kick()

        if c.expect in REASON_CODE:
            wait_until(lambda: stopped in d.log()[log_at:], stopped, log=d.log)
            rows = queue_rows(env)
            assert rows[idx]["broken"] == REASON_CODE[c.expect], rows[idx]
            assert rows[idx]["drop_bad_desc"] == before[idx]["drop_bad_desc"] + 1
            env.broken_seen += 1
        elif c.expect == H.DELIVERED:
            data = recv_matching(env.sock_a, lambda x: marker_of(x, b"HCR") == m)
            assert data == f[HDR:]
        else:  # DROPPED_HDR
            wait_until(lambda: queue_rows(env)[idx]["drop_bad_hdr"] == before[idx]["drop_bad_hdr"] + 1,
                       "the short chain to be dropped and counted")
        others = queue_rows(env)
        for v, row in others.items():
            if v != idx or c.expect not in REASON_CODE:
                assert row["broken"] == 0, (v, row)

        # the other queue pair and the other port keep carrying traffic
        tx_works(env, g, 1)
        port_b_works(env)
        assert d.alive()

        # counted and logged once, however often the guest kicks a broken ring
        ring.kick()
        tx_works(env, g, 1, n=1)
        lines = [ln for ln in d.log()[log_at:].splitlines() if "stopped:" in ln]
        if c.expect in REASON_CODE:
            assert len(lines) == 1 and BROKEN_REASONS[REASON_CODE[c.expect]] in lines[0], lines
            assert queue_rows(env)[idx]["drop_bad_desc"] == before[idx]["drop_bad_desc"] + 1
        else:
            assert lines == []

        # recovery 1: the frontend resets that ring
        g.reset_ring(idx)
        ring_works(env, g, idx)
        assert queue_rows(env)[idx]["broken"] == 0
    finally:
        g.close()
    if not d.alive():
        env.crashes += 1
        raise AssertionError(f"vhostd died:\n{d.log()}")

    # recovery 2: a new connection (the daemon resets the rings on disconnect)
    g = MQGuest(d.socket, c.layout).setup()
    try:
        ring_works(env, g, idx)
        # the same corruption on a freshly reset ring breaks it again, and is logged again
        g.reset_ring(idx)
        c.build(g.rings[idx], f, C.VRING_DESC_F_WRITE if target == "rx" else 0)
        g.rings[idx].publish()
        g.rings[idx].kick()
        if c.expect in REASON_CODE:
            wait_until(lambda: d.log()[log_at:].count(stopped) == 2, "the second break to be logged",
                       log=d.log)
    finally:
        g.close()


def test_zz_figures(env, capsys):
    """Runs last in this module: the daemon never died, both ports still serve."""
    assert env.d.alive()
    port_b_works(env)
    assert env.crashes == 0
    assert env.tried == len(CASES), "run the whole module for the figures"
    with capsys.disabled():
        print(f"\n[{env.loop}] ring corruptions tried: {env.tried} ({len(env.kinds)} kinds, "
              f"{env.broken_seen} stopped their ring), crashes: {env.crashes}")
