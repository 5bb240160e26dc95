"""Live migration on the wire, through the frontend double against a real vhostd:
what QEMU's source side does (SET_LOG_BASE, SET_FEATURES with LOG_ALL,
SET_VRING_ADDR with VHOST_VRING_F_LOG, GET_VRING_BASE, logging off again) and the
destination's announce (SEND_RARP). The exact page sets per ring layout are the
datapath's tests (tests/datapath/test_log.py); here: the wiring, the reply QEMU
waits for, what operators see, and that nothing is left behind."""
from __future__ import annotations

import mmap
import os
import re
import time

from tests.conftest import packet_socket, recv_matching
from tests.daemon.traffic import HDR, Guest, frame, marker_of, stats, vhostctl
from tests.driver import constants as C

PAGE = 4096
LOG_ALL = 1 << C.VHOST_F_LOG_ALL
F_LOG = 1                                  # VHOST_VRING_F_LOG


class Log:
    """A dirty log as QEMU makes it: a memfd the test maps and reads."""

    def __init__(self, mem_bytes: int, name: str = "vhost-log"):
        self.size = ((mem_bytes // PAGE + 63) // 64) * 8
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)

    def pages(self) -> set[int]:
        out = set()
        data = bytes(self.map)
        for w in range(self.size // 8):
            v = int.from_bytes(data[8 * w:8 * w + 8], "little")
            while v:
                b = v & -v
                out.add(64 * w + b.bit_length() - 1)
                v ^= b
        return out

    def clear(self) -> None:
        self.map[:] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages_of(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1)) if n else set()


def written_pages(bufs, n: int) -> set[int]:
    out: set[int] = set()
    for gpa, ln, writable in bufs:
        if n <= 0:
            break
        if writable:
            out |= pages_of(gpa, min(ln, n))
            n -= ln
    return out


FEATURES = C.bits(C.VIRTIO_F_VERSION_1, C.VIRTIO_NET_F_MRG_RXBUF, C.VIRTIO_RING_F_EVENT_IDX,
                  C.VHOST_USER_F_PROTOCOL_FEATURES)


def _start_logging(g: Guest, log: Log) -> None:
    """QEMU's order (vhost_migration_log): the log, LOG_ALL, then each ring's
    addresses again with VHOST_VRING_F_LOG and the used ring's guest address."""
    rep = g.fe.set_log_base(log.fd, log.size)
    rep.close_fds()
    assert rep.request == C.SET_LOG_BASE
    g.fe.set_features(FEATURES | LOG_ALL)
    for idx, ring in ((0, g.rx), (1, g.tx)):
        g.fe.set_vring_addr(idx, ring, flags=F_LOG, log=ring.used_gpa)


def _stop_logging(g: Guest) -> None:
    g.fe.set_features(FEATURES)
    for idx, ring in ((0, g.rx), (1, g.tx)):
        g.fe.set_vring_addr(idx, ring)


def _rx_round(g: Guest, sock, n: int, tag: bytes) -> set[int]:
    """n frames from the TAP into posted buffers; the pages the device wrote."""
    g.post_rx(n)
    chains = dict(g.rx._chains)
    for i in range(n):
        sock.send(frame(i, 700, tag))
    used = g.rx.wait_used(n)
    assert sorted(marker_of(u.data[HDR:], tag) for u in used) == list(range(n))
    pages: set[int] = set()
    for u in used:
        pages |= written_pages(chains[u.head].bufs, u.len)
    return pages


def test_offers_what_qemu_needs_to_allow_migration(daemon, netns):
    d = daemon()
    g = Guest(d.socket)
    try:
        assert g.fe.get_features() & LOG_ALL
        assert g.fe.get_features() & (1 << C.VIRTIO_NET_F_GUEST_ANNOUNCE)
        pf = g.fe.get_protocol_features()
        assert pf & (1 << C.PROTOCOL_F_LOG_SHMFD) and pf & (1 << C.PROTOCOL_F_RARP)
    finally:
        g.close()


def test_rx_marks_buffers_and_used_ring_only_while_logging(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup(features=FEATURES)
    log = Log(32 << 20)
    sock = packet_socket(netns, d.tap)
    try:
        # Logging not started: a log without LOG_ALL marks nothing.
        rep = g.fe.set_log_base(log.fd, log.size)
        rep.close_fds()
        _rx_round(g, sock, 8, b"OFF")
        assert log.pages() == set()

        _start_logging(g, log)
        written = _rx_round(g, sock, 8, b"ONN")
        used_ring = pages_of(g.rx.used_gpa, 6 + 8 * g.rx.num)
        marked = log.pages()
        assert written and written <= marked, sorted(written - marked)
        assert used_ring <= marked
        # Nothing else: not the descriptor table, the avail ring or the TX ring.
        assert marked <= written | used_ring, sorted(marked - written - used_ring)

        # TX only reads guest buffers: only its used ring is marked.
        log.clear()
        g.send([frame(i, 400, b"TXL") for i in range(6)])
        got = 0
        while got < 6:
            data = recv_matching(sock, lambda x: marker_of(x, b"TXL") is not None)
            got += 1
        g.tx.wait_used(6)
        wait_until(lambda: log.pages(), "the TX used ring to be marked")
        assert log.pages() <= pages_of(g.tx.used_gpa, 6 + 8 * g.tx.num), sorted(log.pages())

        # Operators see it.
        port = json_ports(d)[0]
        assert port["frontend"]["dirty_log"]["logging"] is True
        assert port["frontend"]["dirty_log"]["pages_marked"] >= len(written)
        assert "dirty logging on" in d.log()
        st = stats(d)["dirty_log"]
        assert st["logging"] is True and st["pages_marked"] == port["frontend"]["dirty_log"]["pages_marked"]
        assert re.search(r"dirty logging on \(migrating\): \d+ pages marked", vhostctl(d, "ports").stdout)
        assert re.search(r"dirty logging on: \d+ pages marked", vhostctl(d, "stats").stdout)
        metrics = metric_samples(vhostctl(d, "metrics").stdout)
        assert metrics[("vhostd_port_dirty_logging", port["name"])] == 1
        assert metrics[("vhostd_port_dirty_log_pages_total", port["name"])] == st["pages_marked"]

        # Cancelled migration: logging off again, the guest's traffic goes on.
        _stop_logging(g)
        log.clear()
        _rx_round(g, sock, 8, b"CAN")
        assert log.pages() == set()
        assert "dirty logging off" in d.log()
        assert json_ports(d)[0]["frontend"]["dirty_log"]["logging"] is False
        assert metric_samples(vhostctl(d, "metrics").stdout)[("vhostd_port_dirty_logging", port["name"])] == 0
        # Pages marked stay counted for the life of the port (a monotonic counter).
        assert stats(d)["dirty_log"]["pages_marked"] >= st["pages_marked"]
        assert data
    finally:
        sock.close()
        g.close()
        log.close()


def test_stop_and_copy_returns_bases_with_every_write_logged(daemon, netns):
    """GET_VRING_BASE while frames keep arriving: once both rings answered, every
    page the device wrote (used entries published) is marked."""
    d = daemon()
    g = Guest(d.socket).setup(features=FEATURES)
    log = Log(32 << 20)
    sock = packet_socket(netns, d.tap)
    try:
        _start_logging(g, log)
        g.post_rx(64)
        chains = dict(g.rx._chains)
        for i in range(64):
            sock.send(frame(i, 900, b"STP"))
        base_rx = g.fe.get_vring_base(0)
        base_tx = g.fe.get_vring_base(1)
        used = g.rx.get_used()
        assert base_rx == g.rx.used_idx() and len(used) == base_rx
        assert base_tx == 0
        written: set[int] = set()
        for u in used:
            written |= written_pages(chains[u.head].bufs, u.len)
        if used:
            written |= pages_of(g.rx.used_gpa, 6 + 8 * g.rx.num)
        assert written <= log.pages(), sorted(written - log.pages())
    finally:
        sock.close()
        g.close()
        log.close()


def test_new_log_replaces_the_old_and_disconnect_unmaps_it(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup(features=FEATURES)
    first, second = Log(32 << 20, "vhd-log-one"), Log(32 << 20, "vhd-log-two")
    sock = packet_socket(netns, d.tap)
    try:
        _start_logging(g, first)
        _rx_round(g, sock, 4, b"ONE")
        assert first.pages()
        assert "vhd-log-one" in maps(d)
        rep = g.fe.set_log_base(second.fd, second.size)    # QEMU resizes or restarts the log
        rep.close_fds()
        first.clear()
        _rx_round(g, sock, 4, b"TWO")
        assert first.pages() == set() and second.pages()
        assert "vhd-log-one" not in maps(d), "the replaced log is still mapped"
        g.fe.set_log_fd(os.eventfd(0, os.EFD_CLOEXEC))
    finally:
        sock.close()
        g.close()
    wait_until(lambda: "frontend disconnected" in d.log(), "the disconnect")
    wait_until(lambda: "vhd-log-two" not in maps(d), "the log to be unmapped after the disconnect")
    first.close()
    second.close()
    # The next frontend starts without a log: LOG_ALL before SET_LOG_BASE marks nothing.
    g = Guest(d.socket).setup(features=FEATURES | LOG_ALL)
    try:
        sock = packet_socket(netns, d.tap)
        _rx_round(g, sock, 2, b"NXT")
        sock.close()
        assert "LOG_ALL acked before SET_LOG_BASE" in d.log()
    finally:
        g.close()


def test_send_rarp_writes_a_broadcast_rarp_frame_into_the_tap(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    sock = packet_socket(netns, d.tap)
    try:
        mac = bytes.fromhex("525400a1b2c3")
        g.fe.send_rarp(mac, need_reply=True)
        data = recv_matching(sock, lambda x: x[12:14] == b"\x80\x35")
        assert data[:6] == b"\xff" * 6 and data[6:12] == mac
        assert data[14:22] == bytes.fromhex("0001080006040003")   # Ethernet/IPv4, reverse request
        assert data[22:28] == mac and data[32:38] == mac
        assert re.search(r"announced 52:54:00:a1:b2:c3", d.log())
        assert stats(d)["totals"]["rx_packets"] == 0               # not a guest frame
    finally:
        sock.close()
        g.close()


# ----------------------------------------------------------------- helpers

def json_ports(d) -> list[dict]:
    import json
    r = vhostctl(d, "ports", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def metric_samples(text: str) -> dict:
    """{(name, port label): value} for the per-port samples, by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, s.labels.get("port")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if "queue" not in s.labels}


def maps(d) -> str:
    with open(f"/proc/{d.proc.pid}/maps") as f:
        return f.read()


def wait_until(pred, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
