"""TAP lifetime (tap.py): vhostd's TAPs are persistent, so an operator's addresses
and MTU survive a crash and a restart; a restarted daemon attaches to the existing
TAP; remove_tap deletes only TAPs vhostd created; attaching to a TAP with the wrong
flags fails with one clear line. Real TAPs in a namespace the test creates."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vhostd.config import PortConfig
from vhostd.errors import SetupError
from vhostd.port import Port

from tests.conftest import ROOT, DaemonProcess, packet_socket
from tests.daemon.traffic import Guest, collect, frame, vhostctl


def ip(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True, check=check)


def link(netns: str, name: str) -> dict | None:
    """`ip -j -d addr show dev NAME` as a dict, None if there is no such device."""
    r = ip(netns, "-j", "-d", "addr", "show", "dev", name, check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)[0]


def addresses(info: dict) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", [])}


def frames_pass(d: DaemonProcess, netns: str, tap: str, n: int = 8, tag: bytes = b"VHD") -> None:
    """A frontend double connects, sends n frames; all reach the TAP."""
    g = Guest(d.socket).setup()
    try:
        sock = packet_socket(netns, tap)
        frames = [frame(i, 200, tag) for i in range(n)]
        g.send(frames)
        assert collect(sock, n, tag) == dict(enumerate(frames))
        sock.close()
    finally:
        g.close()


def start(tmp_path, netns, tap, *extra) -> DaemonProcess:
    """A daemon, once it serves (its log says so: the control socket of a killed
    predecessor may still be on disk, so its existence proves nothing)."""
    d = DaemonProcess(tmp_path, netns, tap, *extra)
    deadline = time.monotonic() + 15
    while "listening on" not in d.log() or not os.path.exists(d.control):
        assert d.alive(), f"vhostd exited with {d.proc.returncode}:\n{d.log()}"
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    return d


def test_tap_and_its_addresses_and_mtu_survive_sigkill_and_restart(tmp_path, netns):
    d = start(tmp_path, netns, "vtp0")
    assert "(created, persistent)" in d.log()
    ip(netns, "addr", "add", "198.18.0.1/24", "dev", "vtp0")
    ip(netns, "link", "set", "dev", "vtp0", "mtu", "1400")
    frames_pass(d, netns, "vtp0")
    d.proc.kill()
    d.proc.wait()
    info = link(netns, "vtp0")
    assert info is not None, "the TAP died with the daemon"
    assert "198.18.0.1/24" in addresses(info) and info["mtu"] == 1400, info
    assert info.get("ifalias") == "vhostd", info

    d2 = start(tmp_path, netns, "vtp0")
    assert "(existing, attached)" in d2.log(), d2.log()
    info = link(netns, "vtp0")
    assert "198.18.0.1/24" in addresses(info) and info["mtu"] == 1400, info
    frames_pass(d2, netns, "vtp0", tag=b"TWO")
    assert d2.stop() == 0
    assert link(netns, "vtp0") is not None, "a clean stop keeps the TAP by default"


def test_remove_tap_deletes_taps_vhostd_created_and_keeps_precreated_ones(tmp_path, netns):
    d = start(tmp_path, netns, "vtp1", "--remove-tap")
    assert d.stop() == 0
    assert link(netns, "vtp1") is None, "--remove-tap: the TAP vhostd created is gone after a clean stop"

    # created by an earlier run (kept), removed by a later run with --remove-tap: the alias marks it
    d = start(tmp_path, netns, "vtp2")
    assert d.stop() == 0 and link(netns, "vtp2") is not None
    d = start(tmp_path, netns, "vtp2", "--remove-tap")
    assert "(existing, attached)" in d.log()
    assert d.stop() == 0
    assert link(netns, "vtp2") is None

    # pre-created by the operator: attached, never deleted
    ip(netns, "tuntap", "add", "dev", "vtp3", "mode", "tap", "vnet_hdr")
    d = start(tmp_path, netns, "vtp3", "--remove-tap")
    frames_pass(d, netns, "vtp3")
    assert d.stop() == 0
    assert link(netns, "vtp3") is not None, "a pre-created TAP must survive --remove-tap"


def test_sigkill_never_removes_a_tap_even_with_remove_tap(tmp_path, netns):
    d = start(tmp_path, netns, "vtp4", "--remove-tap")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert link(netns, "vtp4") is not None


def test_del_port_keeps_or_removes_the_tap_per_port_setting(tmp_path, netns):
    conf = tmp_path / "vhostd.toml"
    ctl = tmp_path / "ctl.sock"
    conf.write_text(
        f'control = "{ctl}"\n'
        f'[[port]]\nname = "keep"\nsocket = "{tmp_path}/keep.sock"\ntap = "vtpk"\nnetns = "{netns}"\n'
        f'[[port]]\nname = "drop"\nsocket = "{tmp_path}/drop.sock"\ntap = "vtpd"\nnetns = "{netns}"\n'
        f'remove_tap = true\n')
    d = DaemonProcess.from_config(tmp_path, conf, ctl)
    try:
        d.wait_ready()
        for name in ("keep", "drop"):
            r = vhostctl(d, "del-port", name)
            assert r.returncode == 0, r.stdout + r.stderr
        assert link(netns, "vtpk") is not None
        assert link(netns, "vtpd") is None
    finally:
        assert d.stop() == 0, d.log()


def _setup_fails(tmp_path, netns, tap, *extra) -> str:
    r = subprocess.run([sys.executable, "-m", "vhostd", "--socket", str(tmp_path / f"{tap}.sock"), "--tap", tap,
                        "--netns", netns, "--control", "", *extra], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    return r.stderr


def test_attach_with_mismatching_flags_fails_clearly(tmp_path, netns):
    ip(netns, "tuntap", "add", "dev", "vtpsq", "mode", "tap", "vnet_hdr")
    err = _setup_fails(tmp_path, netns, "vtpsq", "--queues", "2")
    assert "TAP vtpsq exists without multi_queue" in err, err
    assert link(netns, "vtpsq") is not None  # an operator's TAP is left alone on failure

    ip(netns, "tuntap", "add", "dev", "vtun0", "mode", "tun")
    err = _setup_fails(tmp_path, netns, "vtun0")
    assert "vtun0 exists but is not a TAP device" in err, err

    ip(netns, "link", "add", "vdum0", "type", "veth", "peer", "name", "vdum1")
    err = _setup_fails(tmp_path, netns, "vdum0")
    assert "vdum0 exists but is not a TAP device" in err, err


def test_attach_to_precreated_taps_multi_queue_or_without_vnet_hdr(tmp_path, netns):
    # one queue pair on a multi-queue TAP (the README's `ip tuntap add ... multi_queue vnet_hdr`)
    ip(netns, "tuntap", "add", "dev", "vtpmq", "mode", "tap", "multi_queue", "vnet_hdr")
    d = start(tmp_path, netns, "vtpmq")
    frames_pass(d, netns, "vtpmq")
    assert d.stop() == 0
    d = start(tmp_path, netns, "vtpmq", "--queues", "2")
    frames_pass(d, netns, "vtpmq", tag=b"TWO")
    assert d.stop() == 0
    # made without vnet_hdr: the kernel gives a TAP the flags of the fd that attaches first
    ip(netns, "tuntap", "add", "dev", "vtpnv", "mode", "tap")
    d = start(tmp_path, netns, "vtpnv")
    frames_pass(d, netns, "vtpnv")
    assert d.stop() == 0


def test_a_failed_open_removes_the_tap_it_created(tmp_path, netns):
    # the TAP is created, then setting a MAC fails (multicast address): nothing stays
    # behind. The settings checks refuse such a MAC up front, so the port is opened
    # in process with a PortConfig that skipped them.
    cfg = PortConfig(socket=str(tmp_path / "vtpf.sock"), tap="vtpf", netns=netns, mac="01:00:00:00:00:01")
    with pytest.raises(SetupError) as exc:
        asyncio.run(Port(cfg).open())
    err = str(exc.value)
    assert "vtpf" in err, err
    assert link(netns, "vtpf") is None


def test_reload_keeps_the_tap_of_a_changed_port_and_removes_a_dropped_one(tmp_path, netns):
    """A port whose settings change is reopened on the same TAP (kept even with
    remove_tap); a port dropped from the file goes with its TAP when remove_tap says so."""
    conf = tmp_path / "vhostd.toml"
    ctl = tmp_path / "ctl.sock"

    def write(mtu: int | None, present: bool = True) -> None:
        text = f'control = "{ctl}"\n'
        if present:
            text += (f'[[port]]\nname = "r"\nsocket = "{tmp_path}/r.sock"\ntap = "vtpr"\nnetns = "{netns}"\n'
                     f'remove_tap = true\n' + (f"mtu = {mtu}\n" if mtu else ""))
        conf.write_text(text)

    write(None)
    d = DaemonProcess.from_config(tmp_path, conf, ctl)
    try:
        d.wait_ready()
        ip(netns, "addr", "add", "198.18.0.1/24", "dev", "vtpr")
        write(1400)
        r = vhostctl(d, "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        info = link(netns, "vtpr")
        assert info is not None and info["mtu"] == 1400 and "198.18.0.1/24" in addresses(info), info
        write(None, present=False)
        r = vhostctl(d, "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        assert link(netns, "vtpr") is None
    finally:
        assert d.stop() == 0, d.log()


def test_attach_to_a_tap_without_vnet_hdr_held_by_another_process_fails_clearly(tmp_path, netns):
    """The kernel keeps a multi-queue TAP's flags while another queue is attached: a
    TAP another process opened without IFF_VNET_HDR cannot carry our headers."""
    import fcntl
    import struct

    from pyroute2 import netns as pnetns

    pnetns.pushns(netns)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    finally:
        pnetns.popns()
    try:
        # TUNSETIFF: IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE, no IFF_VNET_HDR
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"vtpx", 0x0002 | 0x1000 | 0x0100))
        err = _setup_fails(tmp_path, netns, "vtpx", "--queues", "2")
        assert "TAP vtpx has flags" in err and "lacking 0x4000" in err, err
        assert link(netns, "vtpx") is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", ["regular file", "missing directory", "in use"])
def test_a_socket_that_cannot_be_bound_removes_the_tap_it_created(tmp_path, netns, case):
    # The TAP is created before the socket is bound; a bind that fails must not
    # leave it behind (the next try would say "existing, attached").
    other = None
    if case == "regular file":
        sock = tmp_path / "plain"
        sock.write_text("x")
    elif case == "missing directory":
        sock = tmp_path / "nodir" / "s.sock"
    else:
        other = start(tmp_path, netns, "vtpo")
        sock = other.socket
    try:
        r = subprocess.run([sys.executable, "-m", "vhostd", "--socket", str(sock), "--tap", "vtpb", "--netns", netns,
                            "--control", ""], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("vhostd: error: "), r.stderr
        assert link(netns, "vtpb") is None, r.stderr
        if other is not None:  # the live socket was probed without counting as a frontend there
            assert "frontend connected" not in other.log(), other.log()
    finally:
        if other is not None:
            assert other.stop() == 0
    # a TAP the operator made stays, whatever fails
    ip(netns, "tuntap", "add", "dev", "vtpk", "mode", "tap", "multi_queue", "vnet_hdr")
    (tmp_path / "plain2").write_text("x")
    r = subprocess.run([sys.executable, "-m", "vhostd", "--socket", str(tmp_path / "plain2"), "--tap", "vtpk",
                        "--netns", netns, "--control", ""], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert r.returncode == 1 and link(netns, "vtpk") is not None
