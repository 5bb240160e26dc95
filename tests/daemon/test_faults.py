"""A hostile frontend or client against a running vhostd: it must not freeze the
daemon, exhaust its fds, or make it create sockets where it likes.

- blocking, saturated kick/call/err eventfds (the frontend makes them blocking
  and fills the counters): the port's own ring stops, and every other port,
  vhostctl and the metrics keep answering;
- slow and flooding clients on the metrics endpoint and the control socket;
- `vhostctl add-port` with a socket outside the allowed directories;
- a queue pair's worker that will not park: its port fails, the daemon goes on
  (in-process, so that the test can make a worker stall).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request

import pytest

from tests.conftest import network_namespace, need_root, packet_socket
from tests.driver.frontend import ConnectionClosed
from tests.daemon.test_operations import config_daemon, free_tcp_port  # noqa: F401  (fixture)
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of

EFD_MAX = 0xFFFF_FFFF_FFFF_FFFE     # a write of 1 to a counter this high blocks


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(cond, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return v


def get_metrics(port: int, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def port_carries_traffic(sock_path: str, netns: str, tap: str) -> None:
    g = Guest(sock_path).setup()
    try:
        s = packet_socket(netns, tap)
        g.send([frame(i, 200) for i in range(3)])
        assert sorted(collect(s, 3)) == [0, 1, 2]
        g.post_rx(4)
        s.send(frame(7, 300, b"BPR"))
        got: list = []
        while not any(marker_of(u.data[HDR:], b"BPR") == 7 for u in got):
            got += g.rx.wait_used(1)
        s.close()
    finally:
        g.close()


def blocking_saturated(fd: int) -> None:
    """What a hostile frontend does to an eventfd it already passed: blocking mode
    (the flag lives on the shared file description) and a full counter."""
    os.set_blocking(fd, True)
    os.eventfd_write(fd, EFD_MAX)


def test_blocking_saturated_eventfds_do_not_freeze_the_daemon(config_daemon, netns):
    mport = free_tcp_port()
    d = config_daemon(["vefa", "vefb"], metrics=mport)
    g = Guest(d.sock("vefa")).setup()
    try:
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        g.fe.set_vring_err(1, err)
        blocking_saturated(g.tx.call_fd)        # TX call: written after the frames below
        blocking_saturated(err)                 # TX err: written when the ring stops
        blocking_saturated(g.rx.kick_fd)        # RX kick: read by the worker
        g.send([frame(i, 200) for i in range(4)])
        time.sleep(0.3)                         # the worker is now asleep in its call write
        t0 = time.monotonic()
        base = g.fe.get_vring_base(1)           # pauses that worker: must come back
        took = time.monotonic() - t0
        print(f"\nGET_VRING_BASE answered after {took * 1000:.0f} ms; base {base:#x}")
        # the daemon, its control socket, its metrics and its other port all answer
        ports = d.ctl_json("ports")
        assert {p["name"] for p in ports} == {"vefa", "vefb"}
        text = get_metrics(mport)
        assert 'vhostd_packets_total{direction="tx",port="vefa",queue="0"} 4.0' in text
        port_carries_traffic(d.sock("vefb"), netns, "vefb")
        wait_until(lambda: "vring 1 stopped: " in d.log(), "the stopped ring's log line")
        assert "blocked" in d.log().split("vring 1 stopped: ", 1)[1].splitlines()[0]
    finally:
        for fd in (g.tx.call_fd, g.rx.kick_fd):
            os.set_blocking(fd, False)
        g.close()
    # the port serves its next frontend normally
    port_carries_traffic(d.sock("vefa"), netns, "vefa")


def test_metrics_endpoint_survives_slow_and_flooding_clients(config_daemon):
    mport = free_tcp_port()
    d = config_daemon(["vmfl"], metrics=mport)
    pid = d.proc.pid
    get_metrics(mport)
    base = fd_count(pid)
    idle = []
    for _ in range(200):                        # connect and say nothing
        s = socket.create_connection(("127.0.0.1", mport))
        idle.append(s)
    time.sleep(0.5)
    held = fd_count(pid) - base
    print(f"\n200 idle metrics connections: the daemon holds {held} fds for them")
    assert held <= 16 + 4, f"{held} fds held by idle metrics clients"
    slow = socket.create_connection(("127.0.0.1", mport))
    slow.sendall(b"GET /metrics HTTP/1.0\r\n")
    for _ in range(4):                          # one header line every 2 s: never done in time
        time.sleep(2)
        try:
            slow.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
    slow.settimeout(5)
    assert slow.recv(100) == b"", "the slow client was not cut off"
    for s in idle + [slow]:
        s.close()
    wait_until(lambda: fd_count(pid) <= base + 2, "the daemon to release the metrics connections")
    assert "vhostd_ports 1" in get_metrics(mport)


def test_control_socket_survives_idle_and_flooding_clients(config_daemon):
    d = config_daemon(["vcfl"])
    pid = d.proc.pid
    assert d.ctl("ports").returncode == 0
    base = fd_count(pid)
    idle = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.control)
        idle.append(s)
    time.sleep(0.5)
    held = fd_count(pid) - base
    print(f"\n100 idle control connections: the daemon holds {held} fds for them")
    assert held <= 64 + 4
    # idle connections are closed after the idle timeout; vhostctl works again at once
    wait_until(lambda: fd_count(pid) <= base + 2, "idle control connections to be closed", timeout=20)
    for s in idle:
        s.close()
    r = d.ctl("ports")
    assert r.returncode == 0, r.stderr


def test_add_port_socket_must_be_inside_the_socket_directories(config_daemon, netns, tmp_path_factory):
    d = config_daemon(["vsd1"])
    other = tmp_path_factory.mktemp("elsewhere")
    for path in (other / "x.sock", d.tmp / ".." / other.name / "y.sock"):
        r = d.ctl("add-port", "--socket", str(path), "--tap", "vsdx", "--netns", netns)
        assert r.returncode == 1 and "outside the socket directories" in r.stderr, r.stderr
    assert list(other.iterdir()) == []
    assert "vsdx" not in {p["name"] for p in d.ctl_json("ports")}
    # inside: the control socket's directory
    r = d.ctl("add-port", "--socket", str(d.tmp / "in.sock"), "--tap", "vsdy", "--netns", netns)
    assert r.returncode == 0, r.stderr


def test_add_port_relative_socket_is_resolved_by_vhostctl(config_daemon, netns):
    d = config_daemon(["vsd2"])
    import subprocess
    import sys

    from tests.conftest import ROOT
    r = subprocess.run([sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; "
                        "sys.exit(vhostctl_main(sys.argv[1:]))", "--control", d.control, "add-port",
                        "--socket", "rel.sock", "--tap", "vsdr", "--netns", netns],
                       capture_output=True, text=True, cwd=d.tmp, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert (d.tmp / "rel.sock").exists()
    assert str(d.tmp / "rel.sock") in json.dumps(d.ctl_json("ports"))


# ------------------------------------------------------------- a stuck worker

def test_worker_that_will_not_park_fails_only_its_port(tmp_path):
    """In-process: the test tells port A's worker to spin (deaf to nudges) and then
    sends a request that must pause it. After the pause timeout port A fails
    (logged, listed as failed, its frontend dropped); port B, the control socket
    and the event loop go on; once the worker comes back, its memory, fds and TAP
    are released."""
    need_root()
    from vhostd import device
    from vhostd._native import lib
    from vhostd.config import DaemonConfig, PortConfig
    from vhostd.ctl import control_request
    from vhostd.daemon import Daemon

    with network_namespace() as ns:
        ctl = str(tmp_path / "ctl.sock")
        a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
        cfg = DaemonConfig(ports=[PortConfig(socket=a, tap="vstka", netns=ns),
                                  PortConfig(socket=b, tap="vstkb", netns=ns)], control=ctl)

        async def scenario():
            d = Daemon(cfg, None)
            run = asyncio.create_task(d.run())
            while not os.path.exists(ctl):
                await asyncio.sleep(0.05)
            g = await asyncio.to_thread(lambda: Guest(a).setup())
            try:
                qp = d.ports["vstka"].device.qps[0]
                assert lib.vr_qp_test_stall(qp.ptr, 4000) == 0
                await asyncio.to_thread(g.send, [frame(1)])     # the kick wakes it into the stall
                await asyncio.sleep(0.3)
                with pytest.raises((ConnectionClosed, OSError, TimeoutError)):
                    await asyncio.to_thread(g.fe.get_vring_base, 1)
                assert "vstka" not in d.ports and "vstka" in d.failed
                assert d.stuck_workers == 1 and device.stuck_count() == 1
                ports = await asyncio.to_thread(control_request, ctl, {"cmd": "ports"})
                row = next(p for p in ports["ports"] if p["name"] == "vstka")
                assert row["state"] == "failed" and "stuck" in row["error"]
                await asyncio.to_thread(port_carries_traffic, b, ns, "vstkb")
                # the worker comes back after its stall; housekeeping releases it
                for _ in range(200):
                    if device.stuck_count() == 0:
                        break
                    await asyncio.sleep(0.1)
                assert device.stuck_count() == 0
            finally:
                await asyncio.to_thread(g.close)
                d.stopping.set()
                await run

        lib.vr_set_pause_timeout(500)
        try:
            asyncio.run(scenario())
        finally:
            lib.vr_set_pause_timeout(5000)
