"""Port and daemon settings refused up front with one line naming the setting
(vhostd/config.py, vhostd/cli.py): values a TAP, a MAC or a listen address cannot
take, instead of a raw errno from the kernel later."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vhostd.cli import daemon_config, vhostd_parser
from vhostd.config import PortConfig, check_port, listen_url, parse_listen
from vhostd.errors import SetupError

from tests.conftest import ROOT


@pytest.mark.parametrize("tap, ok", [("vm1", True), ("a" * 15, True), ("a" * 16, False), ("eth0:1", False),
                                     ("a/b", False), ("a b", False), (".", False), ("..", False), ("", False)])
def test_tap_names_as_the_kernel_takes_them(tap, ok):
    port = PortConfig(socket="/run/vhostd/x.sock", tap=tap, name="p")
    if ok:
        assert check_port(port).tap == tap
    else:
        with pytest.raises(SetupError, match="invalid interface name"):
            check_port(port)


@pytest.mark.parametrize("mtu, ok", [(68, True), (9000, True), (65521, True), (65522, False), (65535, False),
                                     (67, False)])
def test_mtu_within_a_taps_limits(mtu, ok):
    port = PortConfig(socket="/s", tap="t0", mtu=mtu)
    if ok:
        assert check_port(port).mtu == mtu
    else:
        with pytest.raises(SetupError, match=r"mtu .* out of range \(68\.\.65521"):
            check_port(port)
    if not 68 <= mtu <= 65521:
        with pytest.raises(SystemExit):
            vhostd_parser().parse_args(["--socket", "/s", "--tap", "t0", "--mtu", str(mtu)])


@pytest.mark.parametrize("mac, message", [
    ("02:00:00:00:00:01", None), ("52:54:00:AB:CD:EF", None),
    ("01:00:5e:00:00:01", "is a multicast address"), ("ff:ff:ff:ff:ff:ff", "is a multicast address"),
    ("00:00:00:00:00:00", "is all zeros"), ("02:00:00:00:00", "is not xx:xx:xx:xx:xx:xx"),
])
def test_mac_must_be_unicast_and_nonzero(mac, message):
    port = PortConfig(socket="/s", tap="t0", mac=mac)
    if message is None:
        assert check_port(port).mac == mac.lower()
    else:
        with pytest.raises(SetupError, match=message):
            check_port(port)


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9712", ("127.0.0.1", 9712)), ("[::1]:9712", ("::1", 9712)), (":9712", ("127.0.0.1", 9712)),
    ("localhost:80", ("localhost", 80)),
])
def test_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:70000", "port 70000 out of range"), ("[::1]:0", "port 0 out of range"),
    ("127.0.0.1", "is not ADDR:PORT"), ("::1:80", "is not ADDR:PORT"),
])
def test_bad_listen_addresses_say_what_is_wrong(text, message):
    with pytest.raises(SetupError, match=message):
        parse_listen(text)


def test_listen_url_brackets_ipv6():
    assert listen_url("::1", 9712) == "http://[::1]:9712/metrics"
    assert listen_url("127.0.0.1", 80) == "http://127.0.0.1:80/metrics"


def test_command_line_mac_and_name_checked_before_anything_is_created():
    for args, message in ((["--mac", "01:02:03:04:05:06"], "multicast"), (["--tap", "bad:name"], "interface name")):
        argv = ["--socket", "/tmp/vhd-never.sock", "--tap", "t0", "--control", "", *args]
        with pytest.raises(SetupError, match=message):
            daemon_config(vhostd_parser().parse_args(argv))


def check_config_cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostd", "--check-config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)


def test_check_config_accepts_a_good_file(tmp_path):
    cfg = tmp_path / "good.toml"
    cfg.write_text("[[port]]\nsocket = '/run/vhostd/a.sock'\ntap = 'a'\n"
                   "[[port]]\nsocket = '/run/vhostd/b.sock'\ntap = 'b'\nmtu = 9000\n")
    r = check_config_cli(cfg)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_check_config_names_every_bad_port_and_opens_nothing(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("metrics_listen = '127.0.0.1:70000'\n"
                   "[[port]]\nsocket = '/run/vhostd/a.sock'\ntap = 'a'\nmtu = 65535\n"
                   "[[port]]\nsocket = '/run/vhostd/b.sock'\ntap = 'b'\n"
                   "[[port]]\nsocket = '/run/vhostd/c.sock'\ntap = 'c'\nmac = '01:00:5e:00:00:01'\n"
                   "[[port]]\nsocket = '/run/vhostd/b.sock'\ntap = 'd'\n")
    r = check_config_cli(cfg)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 4, r.stderr
    assert all(line.startswith("vhostd: ") for line in lines)
    assert "port a: mtu 65535 out of range" in lines[0]
    assert "port c: mac" in lines[1] and "multicast" in lines[1]
    assert "port d: socket '/run/vhostd/b.sock' is already used by port b" in lines[2]
    assert "port 70000 out of range" in lines[3]
    assert not os.path.exists("/run/vhostd/b.sock")


@pytest.mark.parametrize("body, message", [(None, "not found"), ("port = [\n", "config file")])
def test_check_config_unreadable_file_is_one_line(tmp_path, body, message):
    cfg = tmp_path / "x.toml"
    if body is not None:
        cfg.write_text(body)
    r = check_config_cli(cfg)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
