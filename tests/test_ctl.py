"""vhostctl's command line (vhostd/ctl.py) against a stand-in control socket: every
input ends in output or one line on stderr and an exit status, never a traceback.

The stand-in answers the control protocol (one JSON line per request) with canned
replies and records the requests; no daemon, no root."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT))
ENV.pop("VHOSTCTL_CONTROL", None)
CTL = [sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; sys.exit(vhostctl_main(sys.argv[1:]))"]

QUEUE = {"queue_pair": 0, "vring": 0, "dir": "rx", "packets": 0, "bytes": 0, "drop_ring_full": 0,
         "drop_tap_busy": 0, "drop_tap_error": 0, "drop_bad_desc": 0, "drop_bad_hdr": 0, "drop_disabled": 0,
         "kicks": 0, "calls": 0, "calls_suppressed": 0}


class FakeDaemon:
    """A control socket that answers `stats` with growing counters, `ports` with
    `nports` rows and anything in `replies` verbatim."""

    def __init__(self, path: str, nports: int = 1, replies: dict | None = None):
        self.path, self.nports, self.replies = path, nports, replies or {}
        self.requests: list[dict] = []
        self.n = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rwb")
                try:
                    for line in f:
                        req = json.loads(line)
                        self.requests.append(req)
                        f.write(self.reply(req) + b"\n")
                        f.flush()
                except OSError:
                    pass

    def reply(self, req: dict) -> bytes:
        cmd = req.get("cmd")
        if cmd in self.replies:
            r = self.replies[cmd]
            return r if isinstance(r, bytes) else json.dumps(r).encode()
        if cmd == "stats":
            self.n += 1
            q = dict(QUEUE, packets=100 * self.n, bytes=6400 * self.n)
            return json.dumps({"ok": True, "stats": [{"port": "vm1", "connected": True, "queues": [q]}]}).encode()
        if cmd == "ports":
            rows = [{"name": f"vm{i}", "mode": "server", "state": "waiting", "queues": 1, "uptime_s": 1.0,
                     "socket": f"/run/vhostd/vm{i}.sock", "tap": f"vm{i}", "netns": None, "connected": False}
                    for i in range(self.nports)]
            return json.dumps({"ok": True, "ports": rows}).encode()
        if cmd == "add-port":
            return json.dumps({"ok": True, "port": {"name": "p", "mode": "server",
                                                    "socket": req["port"]["socket"]}}).encode()
        return json.dumps({"ok": False, "error": f"unknown command {cmd!r}"}).encode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(name: str = "control.sock", **kw) -> FakeDaemon:
        d = FakeDaemon(str(tmp_path / name), **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def ctl(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    r = subprocess.run([*CTL, *args], capture_output=True, text=True, env=env or ENV, cwd=cwd, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], r.stderr


@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf", "x"])
def test_watch_interval_must_be_a_positive_number(fake, interval):
    d = fake()
    one_line_error(ctl("stats", "--watch", "--interval", interval, "--control", d.path), 2, "--interval")
    assert d.requests == []


def test_watch_json_prints_json_lines(fake):
    d = fake()
    r = ctl("stats", "--watch", "--json", "--interval", "0.05", "--count", "3", "--control", d.path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        obj = json.loads(line)
        assert obj["interval"] > 0 and obj["rates"][0]["port"] == "vm1" and obj["rates"][0]["packets"] > 0


def test_reader_going_away_is_a_quiet_exit(fake):
    d = fake(nports=5000)
    p = subprocess.Popen([*CTL, "ports", "--control", d.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=ENV, cwd=ROOT)
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait(30) == 141 and err == "", err
    p.stderr.close()


def test_control_anywhere_env_and_instance(fake, tmp_path, monkeypatch):
    d = fake()
    assert ctl("--control", d.path, "ports").returncode == 0
    assert ctl("ports", "--control", d.path).returncode == 0
    assert ctl("ports", env=dict(ENV, VHOSTCTL_CONTROL=d.path)).returncode == 0
    # --control wins over the environment
    one_line_error(ctl("ports", "--control", str(tmp_path / "none"), env=dict(ENV, VHOSTCTL_CONTROL=d.path)),
                   1, f"no control socket at {tmp_path / 'none'}")
    one_line_error(ctl("ports", "--instance", "vm7"), 1, "no control socket at /run/vhostd/vm7.ctl")
    one_line_error(ctl("--instance", "../etc", "ports"), 2, "is not an instance name")
    one_line_error(ctl("ports", "--instance", "a", "--control", d.path), 2, "not allowed with")


def test_version_and_help_texts():
    from vhostd import __version__
    from vhostd.ctl import parser

    r = ctl("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"vhostctl {__version__}"
    # Every option and positional of every verb says what it is for.
    p = parser()
    sub = next(a for a in p._actions if a.dest == "cmd")
    for name, sp in [("vhostctl", p), *sub.choices.items()]:
        for action in sp._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"


def test_relative_socket_is_resolved_by_vhostctl(fake, tmp_path):
    d = fake()
    r = ctl("add-port", "--socket", "vm9.sock", "--tap", "vm9", "--control", d.path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert d.requests[-1]["port"]["socket"] == str(tmp_path / "vm9.sock")


@pytest.mark.parametrize("reply", [b"not json", b"[1, 2]", b'{"ok": true}', b'{"ok": true, "ports": 5}'])
def test_a_strange_reply_is_one_line(fake, reply):
    d = fake(replies={"ports": reply})
    one_line_error(ctl("ports", "--control", d.path), 1, "vhostctl: ")


def test_refusal_and_usage_errors_are_one_line(fake):
    d = fake(replies={"stats": {"ok": False, "error": "no port named 'zz'"}})
    one_line_error(ctl("stats", "zz", "--control", d.path), 1, "vhostctl: no port named 'zz'")
    one_line_error(ctl("frobnicate"), 2, "invalid choice")
    one_line_error(ctl("stats", "--count", "0", "--watch"), 2, "--count")
    one_line_error(ctl("add-port", "--tap", "x"), 2, "--socket")


def test_reload_fails_when_a_port_could_not_be_set_up(fake):
    d = fake(replies={"reload": {"ok": True, "summary": "reloaded f: 0 opened, 0 closed, 1 serving, failed: vm2",
                                 "failed": {"vm2": "network namespace 'ns9' does not exist"}}})
    r = ctl("reload", "--control", d.path)
    assert r.returncode == 1 and "failed: vm2" in r.stdout
    assert "vm2: network namespace 'ns9' does not exist" in r.stderr
    d.replies["reload"] = {"ok": False, "error": "config file f: port vm2: unknown key 'x'"}
    one_line_error(ctl("reload", "--control", d.path), 1, "unknown key 'x'")
