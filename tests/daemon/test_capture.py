"""`vhostctl capture` against a real daemon: the frames a guest sent (TX) and the
frames the TAP delivered to it (RX) come back as a pcap file, byte for byte, read
with scapy; a reader that does not keep up loses capture records (counted), never
the guest's frames; bad requests get one line."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

from scapy.utils import rdpcap

from tests.conftest import ROOT, packet_socket
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of, stats

ENV = dict(os.environ, PYTHONPATH=str(ROOT))
CTL = [sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; sys.exit(vhostctl_main(sys.argv[1:]))"]


def start_capture(d, *args, stdout=None) -> subprocess.Popen:
    """vhostctl capture in the background, returned once the daemon has attached it."""
    starts = d.log().count("capture started")
    p = subprocess.Popen([*CTL, "--control", d.control, "capture", *args], stdout=stdout or subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 15
    while d.log().count("capture started") == starts:
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    return p


def by_marker(frames, tag: bytes) -> dict[int, bytes]:
    return {marker_of(f, tag): f for f in frames if marker_of(f, tag) is not None}


def test_capture_both_directions_byte_for_byte(daemon, netns, tmp_path):
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        out = tmp_path / "cap.pcap"
        p = start_capture(d, d.tap, "-c", "10", "-w", str(out))
        tx = [frame(i, size, b"CTX") for i, size in enumerate((60, 128, 700, 1514, 1000))]
        g.send(tx)
        collect(sock, 5, b"CTX")
        g.post_rx(8)
        rx = [frame(i, size, b"CRX") for i, size in enumerate((64, 300, 1514, 90, 512))]
        for f in rx:
            sock.send(f)
        used = g.rx.wait_used(5)
        assert p.wait(30) == 0, p.stderr.read().decode()
        assert "10 frame(s) captured, 0 dropped (count reached)" in p.stderr.read().decode()
        p.stderr.close()
        pkts = rdpcap(str(out))
        assert len(pkts) == 10
        got = [bytes(pk) for pk in pkts]
        assert by_marker(got, b"CTX") == dict(enumerate(tx))
        assert by_marker(got, b"CRX") == dict(enumerate(rx))
        # what the guest got is what the capture shows (the vnet header left out)
        assert by_marker([u.data[HDR:] for u in used], b"CRX") == dict(enumerate(rx))
        assert all(pk.wirelen == len(bytes(pk)) for pk in pkts)
    finally:
        g.close()


def test_capture_to_stdout_one_direction_with_snaplen(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, d.tap)
        p = start_capture(d, d.tap, "--direction", "rx", "--queue", "0", "-s", "100", "-c", "3", "-w", "-",
                          stdout=subprocess.PIPE)
        g.send([frame(i, 600, b"NOT") for i in range(4)])   # TX: not asked for
        collect(sock, 4, b"NOT")
        g.post_rx(4)
        rx = [frame(i, 400, b"CRX") for i in range(3)]
        for f in rx:
            sock.send(f)
        g.rx.wait_used(3)
        data, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        pkts = rdpcap(io.BytesIO(data))
        assert [bytes(pk) for pk in pkts] == [f[:100] for f in rx]
        assert [pk.wirelen for pk in pkts] == [400] * 3
    finally:
        g.close()


def test_a_reader_that_does_not_read_loses_capture_records_not_frames(daemon, netns):
    d = daemon()
    g = Guest(d.socket).setup()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(d.control)
        s.sendall(json.dumps({"cmd": "capture", "port": d.tap, "direction": "tx"}).encode() + b"\n")
        f = s.makefile("rb")
        assert json.loads(f.readline())["ok"]
        # ~14 MB of frames, more than the ring and the backlog hold, while we read nothing
        n, batch = 10000, 125
        one = frame(0, 1400, b"FLD")
        for _ in range(0, n, batch):
            g.send([one] * batch)
            g.tx.wait_used(batch, timeout=20)
        t = stats(d)["totals"]
        assert t["tx_packets"] == n and sum(v for k, v in t.items() if "drop" in k) == 0, t
        s.shutdown(socket.SHUT_WR)  # stop: the daemon flushes what it has, then the totals
        while True:
            head = f.read(4)
            size = int.from_bytes(head, "little")
            if size == 0:
                break
            block = f.read(size)
            assert len(block) == size
        totals = json.loads(f.readline())
        assert totals["dropped"] > 0 and 0 < totals["frames"] and totals["frames"] + totals["dropped"] <= n, totals
        assert "capture stopped: stopped by the client" in d.log() and d.alive()
    finally:
        s.close()
        g.close()


def test_bad_capture_requests_are_one_line(daemon, tmp_path):
    d = daemon()
    cases = [(["nope", "-w", "-"], "no port named 'nope'"),
             ([d.tap, "--queue", "3", "-w", "-"], "has no queue pair 3"),
             ([d.tap, "-w", str(tmp_path / "nodir" / "x.pcap")], "cannot write")]
    for args, message in cases:
        r = subprocess.run([*CTL, "--control", d.control, "capture", *args], capture_output=True, text=True,
                           env=ENV, cwd=ROOT, timeout=30)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    # one capture per queue pair at a time
    p = start_capture(d, d.tap, "-w", "-")
    r = subprocess.run([*CTL, "--control", d.control, "capture", d.tap, "-w", "-"], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=30)
    assert r.returncode == 1 and "already being captured" in r.stderr, r.stderr
    p.terminate()  # SIGTERM: vhostctl asks the daemon to stop and exits 0
    assert p.wait(30) == 0, p.stderr.read().decode()
    p.stderr.close()
    assert "capture stopped: stopped by the client" in d.log()
