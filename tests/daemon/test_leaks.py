"""Leaks and load against one real vhostd process.

- 500 frontends in a row, each: connect, the full QEMU-style handshake
  (SET_MEM_TABLE with a memfd, both rings, kick/call eventfds), frames both ways,
  disconnect. The daemon's fd count and mappings must be back to what they were
  after a warm-up (cycle 50), and its RSS must grow by less than RSS_BOUND.
- 32 ports in one daemon (a TOML config), all carrying frames at once: every
  port's frames are checked at its TAP and in its guest, and its counters.

Figures are printed (run with -s to see them; docs/RELIABILITY.md quotes them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT, DaemonProcess, packet_socket, recv_matching
from tests.driver.guestmem import GuestMemory
from tests.daemon.traffic import HDR, Guest, frame, marker_of, vhostctl

CYCLES = 500
WARMUP = 50
RSS_BOUND = 2 << 20  # bytes of RSS growth allowed between the warm-up and the end


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def snapshot(pid: int) -> dict:
    st = proc_status(pid)
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "maps": len(maps),
        "memfd_maps": sum(1 for m in maps if "memfd:" in m),
        "rss": int(st["VmRSS"].split()[0]) * 1024,
        "threads": int(st["Threads"]),
    }


def wait_disconnects(d: DaemonProcess, n: int, timeout: float = 10.0) -> None:
    """Until the daemon has logged the end of n frontends (it released them)."""
    deadline = time.monotonic() + timeout
    while d.log().count("frontend disconnected") < n:
        assert d.alive() and time.monotonic() < deadline, d.log()[-3000:]
        time.sleep(0.01)


def settled(pid: int, idle_fds: int, timeout: float = 5.0) -> dict:
    """A snapshot once the fd count is back to `idle_fds` (the session logs its end a
    moment before it has released everything), or after `timeout` (a leak)."""
    deadline = time.monotonic() + timeout
    while len(os.listdir(f"/proc/{pid}/fd")) != idle_fds and time.monotonic() < deadline:
        time.sleep(0.01)
    return snapshot(pid)


def one_cycle(d: DaemonProcess, pkt, cycle: int) -> None:
    g = Guest(d.socket, num=64, mem=GuestMemory(2 << 20))
    try:
        g.setup()
        tx = [frame(cycle * 4 + k, 200, b"LKT") for k in range(2)]
        g.send(tx)
        want = {cycle * 4, cycle * 4 + 1}
        while want:
            data = recv_matching(pkt, lambda f: marker_of(f, b"LKT") in want)
            want.discard(marker_of(data, b"LKT"))
        g.post_rx(2)
        rx = frame(cycle, 300, b"LKR")
        pkt.send(rx)
        used = g.rx.wait_used(1)
        assert used[0].data[HDR:] == rx
    finally:
        g.close()


def test_500_connect_configure_traffic_disconnect_cycles_leave_fds_and_rss_flat(tmp_path, netns, loop_kind):
    d = DaemonProcess(tmp_path, netns, "vlk0", loop=loop_kind).wait_ready()
    pkt = packet_socket(netns, "vlk0")
    try:
        pid = d.proc.pid
        t0 = time.monotonic()
        first = snapshot(pid)
        warm = None
        for cycle in range(1, CYCLES + 1):
            one_cycle(d, pkt, cycle)
            if cycle == WARMUP:
                wait_disconnects(d, cycle)
                warm = settled(pid, first["fds"])
        wait_disconnects(d, CYCLES)
        end = settled(pid, first["fds"])
        elapsed = time.monotonic() - t0
        print(f"\n[leaks] {loop_kind}: {CYCLES} cycles in {elapsed:.1f} s ({elapsed / CYCLES * 1000:.0f} ms each); "
              f"idle daemon before: {first['fds']} fds, {first['rss'] >> 10} KiB RSS; "
              f"after cycle {WARMUP}: {warm['fds']} fds, {warm['maps']} mappings, {warm['rss'] >> 10} KiB RSS, "
              f"{warm['threads']} threads; after cycle {CYCLES}: {end['fds']} fds, {end['maps']} mappings, "
              f"{end['rss'] >> 10} KiB RSS, {end['threads']} threads; RSS change {WARMUP}->{CYCLES}: "
              f"{(end['rss'] - warm['rss']) / 1024:+.0f} KiB", file=sys.stderr)
        assert end["fds"] == warm["fds"] == first["fds"], (first, warm, end)
        assert end["memfd_maps"] == 0 and end["maps"] == warm["maps"], (warm, end)
        assert end["threads"] == warm["threads"], (warm, end)
        assert end["rss"] - warm["rss"] < RSS_BOUND, (warm, end)
        assert d.log().count("memory table:") == CYCLES
        s = json.loads(vhostctl(d, "stats", "--json").stdout)[0]["totals"]
        assert s["tx_packets"] == 2 * CYCLES and s["rx_packets"] == CYCLES, s
    finally:
        pkt.close()
        assert d.stop() == 0, d.log()[-3000:]


PORTS = 32
TX_PER_PORT = 64
RX_PER_PORT = 16


def test_32_ports_in_one_daemon_carry_frames_at_once(tmp_path, netns):
    conf = tmp_path / "vhostd.toml"
    ctl = tmp_path / "ctl.sock"
    text = f'control = "{ctl}"\n'
    for i in range(PORTS):
        text += f'[[port]]\nname = "p{i:02d}"\nsocket = "{tmp_path}/p{i:02d}.sock"\ntap = "vmp{i:02d}"\n' \
                f'netns = "{netns}"\n'
    conf.write_text(text)
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vhostd", "--config", str(conf)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    class D:
        control = str(ctl)

    guests: list[Guest] = []
    pkts = []
    try:
        deadline = time.monotonic() + 60
        while not ctl.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        t0 = time.monotonic()
        for i in range(PORTS):
            g = Guest(f"{tmp_path}/p{i:02d}.sock", num=256, mem=GuestMemory(4 << 20))
            guests.append(g.setup())
            pkts.append(packet_socket(netns, f"vmp{i:02d}"))
        for g in guests:
            g.post_rx(RX_PER_PORT)
        # every guest posts its frames before any is collected: 32 workers busy at once
        sent = {}
        for i, g in enumerate(guests):
            frames = [frame(i * 1000 + k, 100 + (k * 37) % 1400, b"P32") for k in range(TX_PER_PORT)]
            sent[i] = frames
            g.send(frames)
        for i, pkt in enumerate(pkts):
            for k in range(RX_PER_PORT):
                pkt.send(frame(i * 1000 + k, 120 + k * 50, b"R32"))
        for i, pkt in enumerate(pkts):
            got = {}
            while len(got) < TX_PER_PORT:
                data = recv_matching(pkt, lambda f: marker_of(f, b"P32") is not None)
                got[marker_of(data, b"P32")] = data
            assert got == {i * 1000 + k: f for k, f in enumerate(sent[i])}, f"port p{i:02d}: frames differ"
        for i, g in enumerate(guests):
            used = g.rx.wait_used(RX_PER_PORT)
            marks = sorted(marker_of(u.data[HDR:], b"R32") for u in used)
            assert marks == [i * 1000 + k for k in range(RX_PER_PORT)], f"port p{i:02d}: RX {marks}"
        elapsed = time.monotonic() - t0
        r = vhostctl(D, "stats", "--json")
        assert r.returncode == 0, r.stderr
        stats = {s["port"]: s["totals"] for s in json.loads(r.stdout)}
        assert len(stats) == PORTS
        for i in range(PORTS):
            t = stats[f"p{i:02d}"]
            assert t["tx_packets"] == TX_PER_PORT and t["rx_packets"] == RX_PER_PORT, (i, t)
            assert t["tx_bytes"] == sum(map(len, sent[i])), (i, t)
            drops = {k: v for k, v in t.items() if "drop" in k and v}
            assert not drops, (i, drops)
        snap = snapshot(proc.pid)
        print(f"\n[load] {PORTS} ports, all connected: {PORTS * TX_PER_PORT} frames guest->TAP and "
              f"{PORTS * RX_PER_PORT} TAP->guest verified per port and in the counters, no drops "
              f"({elapsed:.1f} s including 32 handshakes); daemon {snap['threads']} threads, {snap['fds']} fds, "
              f"{snap['rss'] >> 20} MiB RSS", file=sys.stderr)
    finally:
        for p in pkts:
            p.close()
        for g in guests:
            g.close()
        proc.terminate()
        rc = proc.wait(20)
        log.close()
        assert rc == 0, (tmp_path / "daemon.log").read_text()[-3000:]
