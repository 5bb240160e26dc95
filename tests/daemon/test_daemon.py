"""Integration: a frontend double speaks vhost-user over the real socket to a real
vhostd process; frames cross the split rings and a real TAP in a network namespace
the test creates. Runs under uvloop and the stdlib asyncio loop."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, packet_socket
from tests.driver import constants as C
from tests.driver.frontend import Frontend, Nack
from tests.driver.guestmem import GuestMemory
from tests.driver.split import SplitRing, net_hdr
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of, stats, vhostctl


def test_tx_guest_to_tap(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        frames = [frame(i, size) for i, size in enumerate([60, 64, 128, 512, 1000, 1514] * 5)]
        g.send(frames[:15])
        g.send(frames[15:], split=100)  # header and payload spread over many descriptors
        got = collect(sock, len(frames))
        assert [got[i] for i in range(len(frames))] == frames
        used = g.tx.wait_used(len(frames))
        assert len(used) == len(frames)
        s = stats(d)
        assert s["totals"]["tx_packets"] == len(frames)
        assert s["totals"]["tx_bytes"] == sum(map(len, frames))
        assert s["totals"]["tx_drop_bad_hdr"] == 0
    finally:
        g.close()


def test_rx_tap_to_guest(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        g.post_rx(64)
        sock = packet_socket(netns, d.tap)
        frames = [frame(i, size, b"RXF") for i, size in enumerate([60, 100, 600, 1514] * 10)]
        for f in frames:
            sock.send(f)
        used = g.rx.wait_used(len(frames))
        datas = {marker_of(u.data[HDR:], b"RXF"): u for u in used}
        for i, f in enumerate(frames):
            u = datas[i]
            assert u.len == HDR + len(f)
            hdr = u.data[:HDR]
            assert hdr[:10] == b"\0" * 10  # no offloads negotiated
            assert struct.unpack_from("<H", hdr, 10)[0] == 1  # num_buffers
            assert u.data[HDR:] == f
        assert stats(d)["totals"]["rx_packets"] == len(frames)
    finally:
        g.close()


def test_rx_waits_for_buffers_then_delivers(daemon, netns):
    """TAP readable with an empty RX ring must not spin or lose the wake-up."""
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        for i in range(8):
            sock.send(frame(i, 200, b"LAT"))
        time.sleep(0.3)
        assert g.rx.get_used() == []
        g.post_rx(16)
        used = g.rx.wait_used(8)
        assert sorted(marker_of(u.data[HDR:], b"LAT") for u in used) == list(range(8))
    finally:
        g.close()


def test_reconnect_after_disconnect_keeps_tap_and_counters(daemon, netns):
    d = daemon()
    sock = None
    for round_ in range(3):
        g = Guest(d.socket).setup()
        try:
            sock = sock or packet_socket(netns, d.tap)
            g.send([frame(100 * round_ + i) for i in range(5)])
            collect(sock, 5)
        finally:
            g.close()
        time.sleep(0.2)
    assert stats(d)["totals"]["tx_packets"] == 15
    assert d.alive()
    assert d.log().count("frontend disconnected") == 3


def test_burst_histogram_is_monotonic_across_frontends(daemon, netns):
    # Like the packet counters, the burst-size histogram carries over from one
    # frontend to the next: Prometheus must never see it go down.
    d = daemon()

    def hist() -> dict:
        return {(q["dir"], b): n for q in stats(d)["queues"] for b, n in q["batch_hist"].items()}

    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        g.send([frame(i) for i in range(5)])
        collect(sock, 5)
        g.tx.wait_used(5)
    finally:
        g.close()
    before = hist()
    assert sum(before.values()) > 0
    g = Guest(d.socket).setup()  # the new frontend's rings start from zero
    try:
        after = hist()
        assert all(after[k] >= v for k, v in before.items()), (before, after)
    finally:
        g.close()
    assert "started: serving 1 port(s)" in d.log()


def test_verbose_twice_logs_every_request_by_name(daemon, netns, tmp_path):
    quiet = daemon(tap="vtpq0")          # -v: no line per request
    loud = daemon("-v", tap="vtpv0")     # -vv
    for d in (quiet, loud):
        Guest(d.socket).setup().close()
    time.sleep(0.2)
    assert "SET_MEM_TABLE" in loud.log() and "port vtpv0: SET_VRING_ADDR flags" in loud.log(), loud.log()
    assert "SET_MEM_TABLE" not in quiet.log() and "request 5" not in quiet.log()


def test_without_event_idx_and_with_indirect(daemon, netns):
    d = daemon()
    g = Guest(d.socket, event_idx=False, indirect=True).setup()
    try:
        sock = packet_socket(netns, d.tap)
        frames = [frame(i, 700) for i in range(20)]
        g.send(frames, split=64)  # several descriptors -> the driver uses indirect tables
        got = collect(sock, 20)
        assert [got[i] for i in range(20)] == frames
        g.post_rx(8)
        for i in range(8):
            sock.send(frame(i, 300, b"IND"))
        assert len(g.rx.wait_used(8)) == 8
    finally:
        g.close()


def test_vhostctl_ports_and_errors(daemon, netns):
    d = daemon()
    r = vhostctl(d, "ports", "--json")
    assert r.returncode == 0
    ports = json.loads(r.stdout)
    assert ports[0]["name"] == d.tap and ports[0]["connected"] is False
    g = Guest(d.socket).setup()
    try:
        port = json.loads(vhostctl(d, "ports", "--json").stdout)[0]
        assert port["connected"] is True
        assert "VERSION_1" in port["frontend"]["feature_names"]
        assert port["frontend"]["queue_pairs_enabled"] == 1
    finally:
        g.close()
    r = vhostctl(d, "stats", "nosuchport")
    assert r.returncode == 1 and "no port named 'nosuchport'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vhostd.cli"], capture_output=True)  # module is not a program
    bad = vhostctl(type("D", (), {"control": d.control + ".missing"}), "ports")
    assert bad.returncode == 1 and "not running" in bad.stderr


# --- hostile frontends ------------------------------------------------------------


def test_garbage_closes_connection_daemon_survives(daemon, netns):
    d = daemon()
    fe = Frontend.connect(d.socket)
    fe.request(C.GET_FEATURES, flags=0x2)  # version 2
    assert fe.expect_closed()
    fe.close()
    fe = Frontend.connect(d.socket)
    fe.request(C.SET_MEM_TABLE, b"\xff" * 8)  # nregions 0xffffffff
    assert fe.expect_closed()
    fe.close()
    fe = Frontend.connect(d.socket)
    fe.send_raw(struct.pack("=III", 1, 1, 0x7FFFFFFF))  # absurd size
    assert fe.expect_closed()
    fe.close()
    g = Guest(d.socket).setup()  # still serving
    g.close()
    assert "closing connection" in d.log()


def test_bad_requests_are_refused_with_reply_ack(daemon, netns, tmp_path):
    d = daemon()
    g = Guest(d.socket)
    fe = g.fe
    try:
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features() & (1 << C.PROTOCOL_F_REPLY_ACK))
        fe.set_owner()
        with pytest.raises(Nack):
            fe.set_features(1 << 63)  # never offered
        fe.set_features(1 << C.VIRTIO_F_VERSION_1 | 1 << C.VHOST_USER_F_PROTOCOL_FEATURES)
        # a region claiming more than its file holds would SIGBUS on access
        small = os.memfd_create("small")
        os.ftruncate(small, 4096)
        with pytest.raises(Nack):
            fe.set_mem_table([(0, 1 << 20, 0x7F0000000000, 0, small)])
        os.close(small)
        fe.set_mem_table(g.mem)
        with pytest.raises(Nack):
            fe.set_vring_num(0, 3)  # not a power of two
        with pytest.raises(Nack):
            fe.set_vring_num(7, 256)  # vring index out of range
        fe.set_vring_num(0, 256)
        with pytest.raises(Nack):
            fe.set_vring_addr(0, desc=0x10, used=0x20, avail=0x30)  # not in guest memory
        assert fe.get_queue_num() == 1
        with pytest.raises(Nack):
            fe.net_set_mtu(1500)  # not negotiated / unsupported
        assert fe.ping()
    finally:
        g.close()
    assert d.alive()


def test_descriptor_outside_memory_breaks_only_that_ring(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        # TX chain pointing far outside guest memory
        head = g.tx.reserve_desc(1)[0]
        g.tx.write_desc(head, 0x7000_0000_0000, 1500, 0)
        g.tx.push_avail(head)
        g.tx.publish()
        g.tx.kick()
        deadline = time.time() + 5
        while "vring 1 stopped" not in d.log():
            assert time.time() < deadline, d.log()
            time.sleep(0.05)
        assert "buffer outside guest memory" in d.log()
        # RX keeps working
        sock = packet_socket(netns, d.tap)
        g.post_rx(4)
        sock.send(frame(1, 200, b"ALV"))
        assert len(g.rx.wait_used(1)) == 1
        s = stats(d)
        assert s["totals"]["tx_drop_bad_desc"] >= 1
    finally:
        g.close()
    # a new frontend gets a healthy ring again
    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        g.send([frame(7)])
        collect(sock, 1)
    finally:
        g.close()


def test_setup_failures_exit_nonzero_with_one_line(tmp_path, netns):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vhostd", *args], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)

    r = run("--socket", str(tmp_path / "s"), "--tap", "vtapx", "--netns", "vhd-does-not-exist", "--control", "")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "vhostd: error: network namespace vhd-does-not-exist not found (create it with `ip netns add vhd-does-not-exist`)")
    (tmp_path / "file").write_text("x")
    r = run("--socket", str(tmp_path / "file"), "--tap", "vtapy", "--netns", netns, "--control", "")
    assert r.returncode == 1 and "exists and is not a socket" in r.stderr
    r = run("--socket", str(tmp_path / "s"), "--tap", "x" * 20, "--control", "")
    assert r.returncode == 1 and "invalid interface name" in r.stderr
    r = run("--help")
    for flag in ("--socket", "--tap", "--netns", "--mac", "--mtu", "--queues", "--client", "--control", "--verbose"):
        assert flag in r.stdout


def test_client_mode_connects_to_listening_frontend(tmp_path, netns, loop_kind):
    from tests.conftest import DaemonProcess

    path = str(tmp_path / "vtapc.sock")
    d = DaemonProcess(tmp_path, netns, "vtapc", loop=loop_kind, client=True)
    try:
        d.wait_ready()
        time.sleep(1.2)  # the daemon retries while nobody listens
        listener = Frontend.listen(path, timeout=10)
        fe = listener.accept(timeout=10)
        mem = GuestMemory(16 << 20)
        rx, tx = SplitRing(mem, 128, event_idx=True), SplitRing(mem, 128, event_idx=True)
        fe.ack_all = True
        fe.setup_net(mem, {0: rx, 1: tx})
        sock = packet_socket(netns, "vtapc")
        tx.add_out([net_hdr() + frame(42)])
        tx.publish_and_kick()
        collect(sock, 1)
        fe.close()
        listener.close_listener()
        mem.close()
    finally:
        assert d.stop() == 0, d.log()


def test_frontend_shrinking_guest_memory_breaks_rings_not_daemon(daemon, netns):
    """A frontend that truncates its memory file after SET_MEM_TABLE makes the
    worker's next access fault (SIGBUS): the rings stop, the daemon lives on."""
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        (_gpa, _size, _uva, _off, fd) = next(g.mem.regions())
        os.ftruncate(fd, 0)  # the rings and buffers are gone from under the daemon
        g.tx.kick()
        deadline = time.time() + 5
        while d.log().count("guest memory became inaccessible") < 2:
            assert d.alive(), d.log()
            assert time.time() < deadline, d.log()
            time.sleep(0.05)
        assert d.alive()
        assert g.fe.ping()  # the control plane still answers this frontend
    finally:
        g.fe.close()  # its memory cannot be unmapped cleanly by the test's own views either
    # the next frontend is served normally
    g2 = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        g2.send([frame(5)])
        collect(sock, 1)
    finally:
        g2.close()
