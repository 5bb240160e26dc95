"""Operations: a config file with many ports, vhostctl verbs against a daemon carrying
real traffic, Prometheus metrics, SIGHUP reload and add/del-port at run time."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import vhostd
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, packet_socket
from tests.driver import net_hdr
from tests.daemon.traffic import Guest, collect, frame

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def kernel_mac(netns: str, ifname: str) -> str:
    r = subprocess.run(["ip", "-n", netns, "-j", "link", "show", "dev", ifname], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)[0]["address"]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_toml(name, tmp: Path, netns: str, **extra) -> str:
    lines = ["[[port]]", f'name = "{name}"', f'socket = "{tmp / (name + ".sock")}"', f'tap = "{name}"',
             f'netns = "{netns}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class ConfigDaemon:
    def __init__(self, tmp: Path, netns: str, ports: list[str], loop: str, metrics: int | None = None):
        self.tmp, self.netns = tmp, netns
        self.control = str(tmp / "control.sock")
        self.config = tmp / "vhostd.toml"
        self.metrics = metrics
        self.write(ports)
        self.logfile = open(tmp / "vhostd.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "vhostd", "--config", str(self.config), "-v"],
                                     stdout=self.logfile, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(ENV, VHOSTD_EVENT_LOOP=loop))
        deadline = time.monotonic() + 20
        # "started:" comes after every listener (control, metrics) is up
        while not os.path.exists(self.control) or "INFO vhostd: started: " not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def write(self, ports: list[str]) -> None:
        head = f'control = "{self.control}"\n'
        if self.metrics:
            head += f'metrics_listen = "127.0.0.1:{self.metrics}"\n'
        self.config.write_text(head + "".join(port_toml(p, self.tmp, self.netns) for p in ports))

    def sock(self, name: str) -> str:
        return str(self.tmp / f"{name}.sock")

    def ctl(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; "
                               "sys.exit(vhostctl_main(sys.argv[1:]))", "--control", self.control, *args],
                              capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)

    def ctl_json(self, *args):
        r = self.ctl(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def log(self) -> str:
        self.logfile.flush()
        return (self.tmp / "vhostd.log").read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            self.logfile.close()


@pytest.fixture
def config_daemon(tmp_path, netns, loop_kind):
    started = []

    def start(ports, metrics=None):
        d = ConfigDaemon(tmp_path, netns, ports, loop_kind, metrics)
        started.append(d)
        return d

    yield start
    for d in started:
        assert d.stop() == 0, d.log()


QUEUE_KEYS = {"queue_pair", "vring", "dir", "packets", "bytes", "drop_ring_full", "drop_tap_busy", "drop_tap_error",
              "drop_bad_desc", "drop_bad_hdr", "drop_disabled", "kicks", "calls", "calls_suppressed", "batch_hist",
              "batch_sum", "broken"}
PORT_KEYS = {"name", "state", "socket", "mode", "tap", "netns", "queues", "connected", "connections", "uptime_s",
             "connected_for_s"}


def test_many_ports_stats_json_metrics_and_watch(config_daemon, netns):
    mport = free_tcp_port()
    d = config_daemon(["vop1", "vop2"], metrics=mport)
    g1, g2 = Guest(d.sock("vop1")).setup(), Guest(d.sock("vop2")).setup()
    try:
        s1, s2 = packet_socket(netns, "vop1"), packet_socket(netns, "vop2")
        f1 = [frame(i, 100 + i) for i in range(10)]
        f2 = [frame(i, 300) for i in range(5)]
        g1.send(f1)
        g2.send(f2)
        collect(s1, 10)
        collect(s2, 5)
        g1.post_rx(8)
        rx = [frame(i, 200, b"RXO") for i in range(4)]
        for f in rx:
            s1.send(f)
        g1.rx.wait_used(4)

        ports = d.ctl_json("ports")
        assert [p["name"] for p in ports] == ["vop1", "vop2"]
        for p in ports:
            assert PORT_KEYS <= set(p) and p["connected"] is True
            fe = p["frontend"]
            assert {"features", "feature_names", "protocol_features", "protocol_feature_names", "memory_regions",
                    "queue_pairs_enabled", "vrings"} <= set(fe)
            assert fe["memory_regions"] == 1 and fe["queue_pairs_enabled"] == 1

        stats = {s["port"]: s for s in d.ctl_json("stats")}
        for s in stats.values():
            assert len(s["queues"]) == 2
            for q in s["queues"]:
                assert set(q) == QUEUE_KEYS
        q1 = {q["dir"]: q for q in stats["vop1"]["queues"]}
        assert q1["tx"]["packets"] == 10 and q1["tx"]["bytes"] == sum(map(len, f1))
        assert q1["rx"]["packets"] == 4 and q1["rx"]["bytes"] == sum(map(len, rx))
        assert q1["tx"]["kicks"] >= 1 and q1["rx"]["calls"] >= 1
        q2 = {q["dir"]: q for q in stats["vop2"]["queues"]}
        assert q2["tx"]["packets"] == 5 and q2["rx"]["packets"] == 0
        one = d.ctl_json("stats", "vop2")
        assert [s["port"] for s in one] == ["vop2"]

        # metrics: the same numbers, through vhostctl and through HTTP, parsed by Prometheus' parser
        text = d.ctl("metrics").stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            http_text = resp.read().decode()
        for body in (text, http_text):
            samples = {}
            for fam in text_string_to_metric_families(body):
                for s in fam.samples:
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
            def q(port, direction):
                return (("direction", direction), ("port", port), ("queue", "0"))
            assert samples[("vhostd_packets_total", q("vop1", "tx"))] == 10
            assert samples[("vhostd_bytes_total", q("vop1", "rx"))] == sum(map(len, rx))
            assert samples[("vhostd_packets_total", q("vop2", "tx"))] == 5
            assert samples[("vhostd_dropped_packets_total", (*q("vop1", "tx")[:2], ("queue", "0"),
                                                             ("reason", "bad_hdr")))] == 0
            # the burst histogram: _count and _sum (chains over all bursts: 10 frames, 1 chain each)
            assert samples[("vhostd_burst_size_sum", q("vop1", "tx"))] == 10
            assert samples[("vhostd_burst_size_count", q("vop1", "tx"))] >= 1
            assert samples[("vhostd_port_connected", (("port", "vop2"),))] == 1
            assert samples[("vhostd_ports", ())] == 2
            assert samples[("vhostd_build_info", (("version", vhostd.__version__),))] == 1
            assert ("vhostd_port_up", (("port", "vop1"),)) in samples
            info = [k for k in samples if k[0] == "vhostd_port_info" and dict(k[1])["port"] == "vop1"]
            assert len(info) == 1 and {"tap", "netns", "mtu", "mac", "mode"} <= set(dict(info[0][1]))
            assert dict(info[0][1])["mac"] == kernel_mac(netns, "vop1")  # none configured: the kernel's
            assert any(name.startswith("process_") for name, _ in samples)  # the standard process metrics
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/other", timeout=5)

        # --watch: rates per second while traffic flows
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; "
                                 "sys.exit(vhostctl_main(sys.argv[1:]))", "--control", d.control, "stats", "--watch",
                                 "--interval", "0.5", "--count", "2"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env=ENV)
        for burst in range(6):
            g1.send([frame(1000 + burst * 10 + i) for i in range(10)])
            time.sleep(0.15)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "pkt/s" in out and "vop1" in out and "tx0" in out
        rates = [float(line.split()[2].rstrip("kMG")) for line in out.splitlines() if line.startswith("vop1") and " tx0 " in line]
        assert len(rates) == 2 and max(rates) > 0
        top = d.ctl("top", "--interval", "0.2", "--count", "1")
        assert top.returncode == 0 and "vhostd top" in top.stdout and "ports 2 (2 connected)" in top.stdout

        # vhostd_port_info's mac follows the kernel: an address set behind vhostd's back shows at the next scrape
        subprocess.run(["ip", "-n", netns, "link", "set", "dev", "vop2", "address", "02:00:00:00:be:ef"], check=True)
        assert kernel_mac(netns, "vop2") == "02:00:00:00:be:ef"
        infos = {dict(s.labels)["port"]: dict(s.labels) for fam in text_string_to_metric_families(d.ctl("metrics").stdout)
                 if fam.name == "vhostd_port_info" for s in fam.samples}
        assert infos["vop2"]["mac"] == "02:00:00:00:be:ef" and infos["vop1"]["mac"] == kernel_mac(netns, "vop1")
    finally:
        g1.close()
        g2.close()


def test_reload_adds_and_removes_ports_while_another_passes_traffic(config_daemon, netns):
    d = config_daemon(["vra", "vrb"])
    g = Guest(d.sock("vra")).setup()
    try:
        sa = packet_socket(netns, "vra")
        g.send([frame(i) for i in range(5)])
        collect(sa, 5)
        d.write(["vra", "vrc"])
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while os.path.exists(d.sock("vrb")) or not os.path.exists(d.sock("vrc")):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        # vra kept its frontend and keeps passing traffic
        g.send([frame(100 + i) for i in range(5)])
        got = collect(sa, 5)
        assert sorted(got) == list(range(100, 105))
        ports = {p["name"]: p for p in d.ctl_json("ports")}
        assert set(ports) == {"vra", "vrc"}
        assert ports["vra"]["connected"] and ports["vra"]["connections"] == 1
        assert "reloaded" in d.log() and "1 opened, 1 closed" in d.log()
        # the new port works
        g2 = Guest(d.sock("vrc")).setup()
        try:
            sc = packet_socket(netns, "vrc")
            g2.send([frame(7)])
            collect(sc, 1)
        finally:
            g2.close()
        # vhostctl reload with a broken file: clear error, ports untouched
        d.config.write_text("[[port]]\nsocket = 3\n")
        r = d.ctl("reload")
        assert r.returncode == 1 and "socket must be a str" in r.stderr
        assert {p["name"] for p in d.ctl_json("ports")} == {"vra", "vrc"}
        g.send([frame(200)])
        collect(sa, 1)
    finally:
        g.close()


def test_add_and_del_port_at_run_time(config_daemon, netns, tmp_path):
    d = config_daemon(["vad1"])
    sock = str(tmp_path / "dyn.sock")
    r = d.ctl("add-port", "--socket", sock, "--tap", "vdyn", "--netns", netns)
    assert r.returncode == 0, r.stderr
    assert "port vdyn added" in r.stdout
    g = Guest(sock).setup()
    try:
        s = packet_socket(netns, "vdyn")
        g.send([frame(3)])
        collect(s, 1)
    finally:
        g.close()
    r = d.ctl("add-port", "--socket", sock, "--tap", "vother", "--netns", netns)
    assert r.returncode == 1 and "already used by port vdyn" in r.stderr
    r = d.ctl("del-port", "vdyn")
    assert r.returncode == 0 and not os.path.exists(sock)
    assert [p["name"] for p in d.ctl_json("ports")] == ["vad1"]
    r = d.ctl("del-port", "vdyn")
    assert r.returncode == 1 and "no port named 'vdyn'" in r.stderr
    assert tap_exists(netns, "vdyn")                    # TAPs persist by default
    r = d.ctl("add-port", "--socket", str(tmp_path / "rm.sock"), "--tap", "vrm", "--netns", netns, "--remove-tap")
    assert r.returncode == 0 and tap_exists(netns, "vrm"), r.stderr
    assert d.ctl("del-port", "vrm").returncode == 0
    assert not tap_exists(netns, "vrm")                 # --remove-tap: vhostd made it, vhostd deletes it


def deliver(g: Guest, sock, n: int) -> None:
    """n frames guest -> TAP, seen on the host side and used; the call read."""
    g.send([frame(i) for i in range(n)])
    collect(sock, n)
    g.tx.wait_used(n)
    g.tx.drain_call()


def tap_exists(netns: str, name: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", name], capture_output=True).returncode == 0


def test_disabled_ring_drops_are_reported_once(config_daemon, netns):
    d = config_daemon(["vdr"])
    g = Guest(d.sock("vdr")).setup()
    try:
        g.fe.set_vring_enable(1, False)
        g.send([frame(i) for i in range(6)])
        g.tx.wait_used(6)
        deadline = time.monotonic() + 15
        while "dropped frames since last report" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        assert "tx_drop_disabled=6" in d.log()
        stats = {q["dir"]: q for q in d.ctl_json("stats")[0]["queues"]}
        assert stats["tx"]["drop_disabled"] == 6 and stats["tx"]["packets"] == 0
        g.send([frame(10 + i) for i in range(3)])
        g.tx.wait_used(3)
        time.sleep(6)  # more drops within the minute: no second line
        assert d.log().count("dropped frames since last report") == 1
    finally:
        g.close()


@pytest.mark.parametrize("body,message", [
    ("[[port]]\nsocket = '/tmp/x.sock'\n", "tap is required"),
    ("[[port]]\nsocket = '/tmp/x.sock'\ntap = 'a'\nsokcet = 1\n", "unknown key 'sokcet'"),
    ("[[port]]\nsocket = '/tmp/x.sock'\ntap = 'a'\n[[port]]\nsocket = '/tmp/x.sock'\ntap = 'b'\n",
     "socket '/tmp/x.sock' is already used by port a"),
    ("[[port]]\nsocket = '/tmp/x.sock'\ntap = 'a'\nqueues = 99\n", "queues 99 out of range"),
    ("port = [\n", "config file"),
])
def test_bad_config_exits_with_one_clear_line(tmp_path, body, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    r = subprocess.run([sys.executable, "-m", "vhostd", "--config", str(cfg), "--control", ""],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=30)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vhostd: error: ") and message in last, r.stderr


def test_vhostctl_without_daemon(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; "
                        "sys.exit(vhostctl_main(sys.argv[1:]))", "--control", str(tmp_path / "none"), "top",
                        "--count", "1"], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 1 and "vhostd is not running" in r.stderr


def test_rings_shows_positions_pending_chains_and_calls(config_daemon, netns):
    """vhostctl rings: the device's and guest memory's positions agree after traffic;
    chains published without a kick and a call the frontend did not read show up
    as such, in JSON and in the hints of the text output."""
    d = config_daemon(["vrg"])
    g = Guest(d.sock("vrg")).setup()
    try:
        s = packet_socket(netns, "vrg")
        deliver(g, s, 5)
        [port] = d.ctl_json("rings")
        assert port["port"] == "vrg" and port["connected"] is True
        rings = {r["dir"]: r for r in port["rings"]}
        tx = rings["tx"]
        assert tx["layout"] == "split" and tx["event_idx"] is True and tx["num"] == 256 and tx["ready"]
        assert tx["device"]["last_avail"] == 5 and tx["device"]["used"] == 5 == tx["device"]["published_used"]
        assert tx["guest"]["avail_idx"] == 5 and tx["guest"]["used_idx"] == 5
        assert tx["guest"]["avail_event"] == 5          # idle: kick me at the next chain
        assert tx["kick_pending"] == 0 and tx["kick_watched"] and tx["call_pending"] == 0
        assert tx["hints"] == []
        assert rings["rx"]["hints"] == ["no receive buffers: frames wait in the TAP"]   # none posted

        # a driver bug: chains published, no kick; and a call nobody read
        for i in range(2):
            g.tx.add_out([net_hdr() + frame(10 + i)])
        g.tx.publish()
        os.eventfd_write(g.tx.call_fd, 1)
        tx = {r["dir"]: r for r in d.ctl_json("rings", "vrg")[0]["rings"]}["tx"]
        assert tx["guest"]["avail_idx"] == 7 and tx["device"]["last_avail"] == 5 and tx["call_pending"] == 1
        assert tx["hints"] == ["2 chain(s) available that the device has not taken",
                               "a call is pending that the frontend has not read"]
        text = d.ctl("rings").stdout
        assert "vring 1 tx0 split num 256 event_idx: ready" in text
        assert "! 2 chain(s) available that the device has not taken" in text

        g.tx.kick()                                     # the device catches up
        collect(s, 2)
        g.tx.wait_used(2)
        tx = {r["dir"]: r for r in d.ctl_json("rings")[0]["rings"]}["tx"]
        assert tx["device"]["last_avail"] == 7 and tx["guest"]["used_idx"] == 7
        r = d.ctl("rings", "nosuch")
        assert r.returncode == 1 and "no port named 'nosuch'" in r.stderr
    finally:
        g.close()


def test_rings_packed_shows_positions_and_a_chain_not_taken(config_daemon, netns):
    """vhostctl rings on a packed ring: positions as slot | wrap << 15, the device's
    event area, and a chain published without a kick."""
    d = config_daemon(["vrp"])
    g = Guest(d.sock("vrp"), packed=True).setup()
    try:
        s = packet_socket(netns, "vrp")
        deliver(g, s, 3)
        rings = {r["dir"]: r for r in d.ctl_json("rings")[0]["rings"]}
        tx = rings["tx"]
        assert tx["layout"] == "packed" and tx["ready"]
        assert tx["device"]["last_avail"] == 0x8003 == tx["device"]["used"]      # slot 3, wrap counter 1
        assert tx["guest"]["device_event"] == {"off_wrap": 0x8003, "flags": "desc"}   # kick me at slot 3
        assert tx["hints"] == [] and tx["kick_pending"] == 0
        assert rings["rx"]["hints"] == ["no receive buffers: frames wait in the TAP"]

        g.tx.add_out([net_hdr() + frame(9)])
        g.tx.publish()                                  # no kick
        tx = {r["dir"]: r for r in d.ctl_json("rings")[0]["rings"]}["tx"]
        assert tx["hints"] == ["a chain (or more) available that the device has not taken"]
        g.tx.kick()
        collect(s, 1)
        g.tx.wait_used(1)
    finally:
        g.close()
