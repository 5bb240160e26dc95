"""End to end: virtio-net device options of a QEMU guest against vhostd.

Each test starts vhostd in a fresh network namespace (IPv6 off there, so the
counters only see the test's own traffic), boots the busybox guest with
``-netdev vhost-user`` and checks both what the guest sees (pings, sha256 of
transferred data) and what vhostd reports through ``vhostctl``
(negotiated features while the guest is connected, per-queue counters after).

* feature matrix: packed x mrg_rxbuf x event_idx, each a ping + 20 MB download;
  the negotiated feature set must follow the device options;
* bulk TCP: 50 MB host->guest (wget) and 50 MB guest->host, the latter twice:
  pulled by the host from the guest's busybox httpd (sendfile: the rate that
  says something about vhostd) and pushed with busybox nc to a Python listener
  in the namespace (guest-initiated; nc's small writes bound its rate); all
  content checked by sha256 on both ends. With the default offloads GSO frames
  must cross vhostd; with every offload off the average frame stays <= 1514
  bytes. The rates go to stderr (pytest -s) and to record_property;
* MTU 9000: host_mtu=9000 + ``--mtu 9000``; DF-set 8972-byte pings from the
  namespace while the guest is up, guest->host 8972-byte pings, and the
  counters must show whole 9014-byte frames (no fragments);
* multiqueue: ``--queues 2`` + ``queues=2,mq=on`` + ``-smp 2``, parallel
  downloads and uploads pinned to each vCPU: every queue of both pairs moves.

The guest waits for the host at fixed points ("go" files served over HTTP, or a
TCP connection to a ``nc -l`` in the guest), so the test can read vhostctl
while the frontend is connected and take counter snapshots between phases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

import guest as g
from test_guest_vhostd import Vhostd

TAP = "vhdfeat0"
HOST = g.HOST_IP
GUEST = g.GUEST_IP
HTTP_PORT = 8080
SINK_PORT = 9100
MiB = 1024 * 1024
BULK_SIZE = 50 * MiB + 4321          # >= 50 MB each direction
ETH_HLEN = 14
MAX_PLAIN_FRAME = 1500 + ETH_HLEN    # an MTU-sized Ethernet frame (counters exclude the vnet header)

# every offload QEMU 7.2 lets a virtio-net-pci turn off (no USO properties in 7.2)
OFFLOADS_OFF = ["csum=off", "guest_csum=off", "host_tso4=off", "host_tso6=off",
                "guest_tso4=off", "guest_tso6=off", "host_ecn=off", "guest_ecn=off",
                "host_ufo=off", "guest_ufo=off"]

_VHOSTCTL = "import sys; from vhostd.cli import vhostctl_main; sys.exit(vhostctl_main(sys.argv[1:]))"


# --------------------------------------------------------------------------- #
# host side helpers


def vhostctl(control: str, *args: str):
    """Runs ``vhostctl --control CONTROL ARGS --json`` and returns the parsed JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(g.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", _VHOSTCTL, "--control", control, *args, "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30,
                       env=env, cwd=str(g.REPO_ROOT))
    assert r.returncode == 0, f"vhostctl {' '.join(args)} failed rc={r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


class Counters:
    """One ``vhostctl stats --json`` snapshot of the (single) port, by (dir, queue pair)."""

    DROPS = ("drop_ring_full", "drop_tap_busy", "drop_tap_error", "drop_bad_desc",
             "drop_bad_hdr", "drop_disabled")

    def __init__(self, control: str):
        stats = vhostctl(control, "stats")
        assert len(stats) == 1, stats
        self.raw = stats[0]
        self.rows = {(q["dir"], q["queue_pair"]): q for q in stats[0]["queues"]}

    def get(self, direction: str, key: str, qp: int | None = None) -> int:
        rows = [r for (d, p), r in self.rows.items() if d == direction and (qp is None or p == qp)]
        if key == "drops":
            return sum(r[k] for r in rows for k in self.DROPS)
        return sum(r[key] for r in rows)

    def delta(self, before: "Counters", direction: str, key: str, qp: int | None = None) -> int:
        return self.get(direction, key, qp) - before.get(direction, key, qp)

    def frames(self, before: "Counters", direction: str) -> tuple[int, int]:
        """(packets, bytes) that crossed ``direction`` since ``before``."""
        return (self.delta(before, direction, "packets"), self.delta(before, direction, "bytes"))

    def table(self) -> str:
        return "\n".join(f"  {d}{p}: packets={r['packets']} bytes={r['bytes']} kicks={r['kicks']} "
                         f"calls={r['calls']} drops={sum(r[k] for k in self.DROPS)}"
                         for (d, p), r in sorted(self.rows.items(), key=lambda kv: (kv[0][1], kv[0][0])))


class Env:
    """vhostd + its namespace for one test."""

    def __init__(self, netns: str, sock_dir: str):
        self.ns = g.NetNS(netns)
        self.sock_dir = sock_dir
        self.sock = os.path.join(sock_dir, "vhostd.sock")
        self.control = os.path.join(sock_dir, "vhostd.ctl")
        self.daemon: Vhostd | None = None
        self.procs: list[g.BackgroundProcess] = []

    def start(self, *extra: str, address: bool = True) -> Vhostd:
        """Starts vhostd on TAP in the namespace; gives the TAP 198.18.0.1/24
        (``address``) or only waits for it to be up."""
        # no IPv6 in the namespace: no router solicitations / MLD reports in the counters
        self.ns.exec(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                      "net.ipv6.conf.default.disable_ipv6=1"])
        self.daemon = Vhostd(self.sock, self.ns.name, tap=TAP, control=self.control,
                             extra=tuple(extra), logdir=self.sock_dir)
        self.daemon.start()
        g.wait_for_socket(self.sock, timeout=30, proc=self.daemon)
        if address:
            self.ns.configure_tap(TAP, timeout=20, proc=self.daemon)
        else:
            self.ns.wait_link(TAP, timeout=20, proc=self.daemon)
            self.ns.exec(["ip", "link", "set", "dev", TAP, "up"])
        return self.daemon

    def tap_stats(self) -> dict:
        """The TAP's kernel counters (``ip -s -j link``): {"rx": {...}, "tx": {...}}."""
        r = self.ns.exec(["ip", "-s", "-j", "link", "show", "dev", TAP])
        return json.loads(r.stdout)[0]["stats64"]

    def counters(self) -> Counters:
        return Counters(self.control)

    def frontend(self) -> dict:
        ports = vhostctl(self.control, "ports")
        assert len(ports) == 1, ports
        fe = ports[0].get("frontend")
        assert fe, f"no frontend connected according to vhostctl: {ports}"
        return fe

    def qemu(self, guest_image, **kw) -> g.Qemu:
        """A guest on this port whose wait() records the rings if it times out."""
        q = g.Qemu(guest_image, self.sock, **kw)
        q.on_timeout = self.rings
        return q

    def rings(self) -> str:
        """``vhostctl rings``: positions, pending kicks and calls, hints."""
        r = subprocess.run([sys.executable, "-c", _VHOSTCTL, "--control", self.control, "rings"],
                           capture_output=True, text=True, timeout=30, cwd=str(g.REPO_ROOT),
                           env=dict(os.environ, PYTHONPATH=str(g.REPO_ROOT)))
        return "--- vhostctl rings ---\n" + (r.stdout or r.stderr)

    def idle_rings(self, timeout: float = 3.0) -> dict:
        """``vhostctl rings --json`` of the port's first queue pair once it shows
        an idle ring pair: no hint but a call not yet read (the guest's polling
        may have a frame in flight in one snapshot, so up to `timeout` of them)."""
        deadline = time.monotonic() + timeout
        while True:
            [port] = vhostctl(self.control, "rings")
            rings = {r["dir"]: r for r in port["rings"] if r["queue_pair"] == 0}
            if all(h.startswith("a call is pending") for r in rings.values() for h in r["hints"]):
                return rings
            assert time.monotonic() < deadline, f"rings never idle: {json.dumps(rings, indent=1)}"
            time.sleep(0.05)

    def context(self, qemu: g.Qemu | None = None) -> str:
        parts = []
        if qemu is not None:
            parts.append("--- qemu: " + " ".join(getattr(qemu, "cmd", []) or []))
            parts.append("--- guest console (last 40 lines) ---\n" + g.tail(qemu.log, 40))
            if qemu.stderr.strip():
                parts.append("--- qemu stderr ---\n" + g.tail(qemu.stderr, 20))
        if self.daemon is not None:
            parts.append(self.daemon.describe())
            try:
                parts.append("--- vhostctl stats ---\n" + self.counters().table())
                parts.append(self.rings())
            except Exception as e:  # diagnostics must not raise
                parts.append(f"--- vhostctl stats/rings failed: {e}")
        for p in self.procs:
            parts.append(p.describe(20))
        parts.append(self.ns.diagnostics(TAP))
        return "\n".join(parts)

    def sink(self, connections: int, port: int = SINK_PORT) -> "UploadSink":
        s = UploadSink(self.ns, connections, port=port, logdir=self.sock_dir)
        self.procs.append(s.proc)
        return s.start()

    def cleanup(self) -> None:
        for p in self.procs:
            p.kill()
        if self.daemon is not None:
            self.daemon.kill()


@pytest.fixture
def env(netns, sock_dir):
    e = Env(netns, sock_dir)
    try:
        yield e
    finally:
        e.cleanup()


_SINK = r"""
import hashlib, json, socket, sys, threading, time
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port))
ls.listen(16)
print("SINK-LISTENING", flush=True)
lock = threading.Lock()

def serve(c, peer):
    h, n, t0, buf = hashlib.sha256(), 0, None, bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        if t0 is None:
            t0 = time.monotonic()
        h.update(view[:k])
        n += k
    t1 = time.monotonic()
    c.sendall(f"{h.hexdigest()}:{n}\n".encode())
    c.close()
    with lock:
        print("SINK-RESULT " + json.dumps({"peer": peer[0], "sha256": h.hexdigest(), "bytes": n,
              "seconds": (t1 - t0) if t0 else 0.0}), flush=True)

threads = []
for _ in range(count):
    c, peer = ls.accept()
    t = threading.Thread(target=serve, args=(c, peer))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
print("SINK-DONE", flush=True)
"""


class UploadSink:
    """A TCP listener in the namespace: for each of ``connections`` connections it
    reads to EOF, replies ``<sha256>:<bytes>`` and logs a SINK-RESULT json line
    (with the seconds from first byte to EOF)."""

    def __init__(self, ns: g.NetNS, connections: int, port: int = SINK_PORT,
                 logdir: str | None = None):
        self.proc = g.BackgroundProcess([sys.executable, "-u", "-c", _SINK, HOST, str(port),
                                         str(connections)], netns=ns,
                                        name=f"upload-sink-{port}", logdir=logdir)

    def start(self, timeout: float = 15) -> "UploadSink":
        self.proc.start()
        deadline = time.monotonic() + timeout
        while "SINK-LISTENING" not in self.proc.output():
            if not self.proc.alive() or time.monotonic() > deadline:
                raise AssertionError("upload sink did not start\n" + self.proc.describe())
            time.sleep(0.05)
        return self

    def results(self, expect: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [json.loads(m) for m in re.findall(r"^SINK-RESULT (.*)$", self.proc.output(), re.M)]
            if len(found) >= expect or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def go(srv: g.HttpFileServer, name: str) -> None:
    """Lets a guest blocked in ``wait_go NAME`` continue."""
    (srv.directory / name).write_text("go\n")


def mbps(nbytes: float, seconds: float) -> float:
    return nbytes * 8 / max(seconds, 1e-3) / 1e6


# --------------------------------------------------------------------------- #
# guest side


GUEST_LIB = rf"""#!/bin/sh
HOST={HOST}
up() {{ cut -d' ' -f1 /proc/uptime; }}
secs() {{ awk "BEGIN {{ d = $2 - $1; if (d <= 0) d = 0.01; printf \"%.2f\", d }}"; }}
fail() {{ rc=$1; shift; echo "T: FAIL $*"; cat /proc/net/dev; exit $rc; }}
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
# every 15 s, for a stalled test: the virtio interrupt count and eth0's counters
(while sleep 15; do echo "MON t=$(up) irq:$(grep -i virtio /proc/interrupts | tr -s ' ' | cut -c1-60)" \
    "eth0:$(grep eth0: /proc/net/dev | tr -s ' ' | cut -d: -f2)"; done) &
wait_host() {{
    i=0
    while [ $i -lt 30 ]; do
        ping -c 1 -W 1 $HOST >/dev/null 2>&1 && return 0
        i=$((i+1))
    done
    ip addr; ip neigh; fail 10 "no reply from $HOST"
}}
# blocks until the host creates the file NAME in the HTTP server's directory
wait_go() {{
    echo "VHOSTD-WAIT=$1"
    i=0
    while ! wget -q -O /dev/null http://$HOST:{HTTP_PORT}/$1 2>/dev/null; do
        i=$((i+1)); [ $i -gt 600 ] && fail 20 "host never said $1"
        usleep 100000
    done
}}
"""


def body(script: str) -> str:
    """A generated /test.sh without its shebang line, to append to GUEST_LIB."""
    return script.split("\n", 1)[1] if script.startswith("#!") else script


# --------------------------------------------------------------------------- #
# 1. packed x mrg_rxbuf x event_idx


@pytest.mark.parametrize("event_idx", ["on", "off"], ids=["evidx", "noevidx"])
@pytest.mark.parametrize("mrg_rxbuf", ["on", "off"], ids=["mrg", "nomrg"])
@pytest.mark.parametrize("packed", ["on", "off"], ids=["packed", "split"])
def test_feature_matrix(guest_image, env, http_server, packed, mrg_rxbuf, event_idx):
    env.start()
    srv = http_server()
    script = GUEST_LIB + "wait_host\nwait_go go\n" + body(g.net_test_script(srv.url, srv.sha256, srv.size))
    opts = [f"packed={packed}", f"mrg_rxbuf={mrg_rxbuf}", f"event_idx={event_idx}"]
    q = env.qemu(guest_image, test_script=script, device_opts=opts)
    try:
        q.start()
        assert q.wait_for(r"VHOSTD-WAIT=go", 60), "guest never got ready\n" + env.context(q)
        fe = env.frontend()
        # vhostctl rings over a real guest: its layout, and guest memory read where QEMU put the rings
        rings = env.idle_rings()
        assert {r["layout"] for r in rings.values()} == {"packed" if packed == "on" else "split"}, rings
        assert all(r["event_idx"] == (event_idx == "on") and r["ready"] and r["kick_watched"]
                   for r in rings.values()), rings
        assert rings["rx"]["tap_watched"], rings                # the guest posted receive buffers
        if packed == "off":
            assert rings["rx"]["guest"]["avail_idx"] != rings["rx"]["device"]["last_avail"], rings
            assert rings["tx"]["guest"]["used_idx"] == rings["tx"]["device"]["published_used"], rings
        go(srv, "go")
        result = q.wait(90)
    finally:
        q.cleanup()
    result.assert_ok(env.context(q))
    assert result.value("VHOSTD-SHA256") == srv.sha256

    names = set(fe["feature_names"])
    expected = {"RING_PACKED": packed == "on", "MRG_RXBUF": mrg_rxbuf == "on",
                "EVENT_IDX": event_idx == "on"}
    got = {k: k in names for k in expected}
    assert got == expected, (f"negotiated features {sorted(names)} do not follow the device "
                             f"options {opts}\n" + env.context())
    assert "VERSION_1" in names, sorted(names)
    c = env.counters()
    assert c.get("rx", "packets") > 20 * MiB / 65536 and c.get("rx", "bytes") >= srv.size, c.table()
    assert c.get("rx", "drops") == 0 and c.get("tx", "drops") == 0, c.table()
    assert env.daemon.alive(), env.context()
    print(f"\n[e2e] features {','.join(opts)}: download "
          f"{result.value('VHOSTD-DOWNLOAD-MBPS')} Mbit/s, guest run {result.elapsed:.1f}s",
          file=sys.stderr)


# --------------------------------------------------------------------------- #
# 2. bulk TCP, offloads on and off


GUEST_HTTPD_PORT = 8081

_PULL = r"""
import hashlib, json, sys, time, urllib.request
t0 = time.monotonic()
h, n = hashlib.sha256(), 0
with urllib.request.urlopen(sys.argv[1], timeout=60) as r:
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "seconds": time.monotonic() - t0}))
"""


def bulk_script(url: str, sha256: str, size: int, up_mib: int) -> str:
    """host->guest: wget to tmpfs (timed), sha256. guest->host: a file of random
    data, served by busybox httpd (sendfile) for the host to pull (go1 -> go2),
    then pushed with busybox nc to the host's upload sink, which replies with the
    sha256 and byte count it received."""
    return GUEST_LIB + f"""
wait_host
wait_go go1
t0=$(up)
wget -q -O /tmp/dl {url} || fail 12 "wget {url}"
t1=$(up)
echo "VHOSTD-DL-SECONDS=$(secs $t0 $t1)"
bytes=$(wc -c </tmp/dl)
echo "VHOSTD-DL-BYTES=$bytes"
[ "$bytes" = "{size}" ] || fail 13 "download size $bytes != {size}"
sum=$(sha256sum /tmp/dl | cut -d' ' -f1)
echo "VHOSTD-DL-SHA256=$sum"
[ "$sum" = "{sha256}" ] || fail 14 "download sha256 $sum != {sha256}"
rm -f /tmp/dl
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/www/up bs=1M count={up_mib} 2>/dev/null || fail 16 "dd"
upsum=$(sha256sum /tmp/www/up | cut -d' ' -f1)
upbytes=$(wc -c </tmp/www/up)
echo "VHOSTD-UP-SHA256=$upsum"
echo "VHOSTD-UP-BYTES=$upbytes"
httpd -p {GUEST_HTTPD_PORT} -h /tmp/www || fail 17 "httpd"
wait_go go2
t0=$(up)
reply=$(nc $HOST {SINK_PORT} </tmp/www/up)
t1=$(up)
echo "VHOSTD-UP-SECONDS=$(secs $t0 $t1)"
echo "VHOSTD-UP-REPLY=$reply"
[ "$reply" = "$upsum:$upbytes" ] || fail 15 "host received $reply, sent $upsum:$upbytes"
echo "T: PASS"
exit 0
"""


@pytest.mark.parametrize("offloads", ["on", "off"], ids=["offloads", "nooffloads"])
def test_bulk_tcp(guest_image, env, http_server, offloads, record_property):
    """50 MB each way with content checks. Phases, with counter snapshots between:
    c0 | wget host->guest | c1 | host pulls from the guest's httpd | c2 |
    guest pushes with nc | c3. The pull (sendfile in the guest) gives the
    guest->host rate; busybox nc's small writes make the push much slower."""
    env.start()
    srv = http_server(size=BULK_SIZE)
    sink = env.sink(1)
    up_mib = 50
    script = bulk_script(srv.url, srv.sha256, srv.size, up_mib)
    opts = OFFLOADS_OFF if offloads == "off" else []
    q = env.qemu(guest_image, test_script=script, device_opts=opts, mem_mb=512)
    try:
        q.start()
        assert q.wait_for(r"VHOSTD-WAIT=go1", 60), "guest never got ready\n" + env.context(q)
        fe = env.frontend()
        c0 = env.counters()
        go(srv, "go1")
        assert q.wait_for(r"VHOSTD-WAIT=go2", 120), "download phase failed\n" + env.context(q)
        c1 = env.counters()
        r = env.ns.exec([sys.executable, "-c", _PULL, f"http://{GUEST}:{GUEST_HTTPD_PORT}/up"],
                        check=False, timeout=120)
        c2 = env.counters()
        assert r.returncode == 0, f"pull from the guest failed: {r.stderr}\n" + env.context(q)
        pull = json.loads(r.stdout)
        go(srv, "go2")
        result = q.wait(120)
    finally:
        q.cleanup()
    ctx = env.context(q)
    result.assert_ok(ctx)
    c3 = env.counters()
    names = set(fe["feature_names"])

    # content, both directions (the guest compared too: rc 14 / 15)
    up_sha = result.value("VHOSTD-UP-SHA256")
    assert result.value("VHOSTD-DL-SHA256") == srv.sha256, ctx
    assert int(result.value("VHOSTD-UP-BYTES")) == up_mib * MiB
    assert (pull["sha256"], pull["bytes"]) == (up_sha, up_mib * MiB), (pull, ctx)
    res = sink.results(1)
    assert len(res) == 1, "upload sink saw no connection\n" + ctx
    assert (res[0]["sha256"], res[0]["bytes"]) == (up_sha, up_mib * MiB), (res, ctx)

    dl_p, dl_b = c1.frames(c0, "rx")      # host -> guest data frames
    pull_p, pull_b = c2.frames(c1, "tx")  # guest -> host, sendfile
    push_p, push_b = c3.frames(c2, "tx")  # guest -> host, nc
    assert dl_b >= srv.size and pull_b >= up_mib * MiB and push_b >= up_mib * MiB, c3.table()
    dl_avg, pull_avg, push_avg = dl_b / dl_p, pull_b / pull_p, push_b / push_p
    for d in ("rx", "tx"):
        assert c3.get(d, "drops") == 0, f"{d} drops\n{c3.table()}"

    dl_rate = mbps(srv.size, float(result.value("VHOSTD-DL-SECONDS")))
    pull_rate = mbps(pull["bytes"], pull["seconds"])
    push_rate = mbps(res[0]["bytes"], res[0]["seconds"])
    label = "offloads on" if offloads == "on" else "offloads off"
    msg = (f"\n[e2e] TCP host->guest ({label}): {srv.size} bytes in "
           f"{result.value('VHOSTD-DL-SECONDS')}s = {dl_rate:.1f} Mbit/s "
           f"(wget, guest-timed), {dl_p} rx frames, avg {dl_avg:.0f} B"
           f"\n[e2e] TCP guest->host ({label}): {pull['bytes']} bytes in "
           f"{pull['seconds']:.2f}s = {pull_rate:.1f} Mbit/s (host pulls from guest httpd/sendfile), "
           f"{pull_p} tx frames, avg {pull_avg:.0f} B"
           f"\n[e2e] TCP guest->host ({label}): {res[0]['bytes']} bytes in "
           f"{res[0]['seconds']:.2f}s = {push_rate:.1f} Mbit/s (busybox nc push, host-timed), "
           f"{push_p} tx frames, avg {push_avg:.0f} B")
    print(msg, file=sys.stderr)
    record_property(f"tcp_host_to_guest_offloads_{offloads}_mbps", f"{dl_rate:.1f}")
    record_property(f"tcp_guest_to_host_offloads_{offloads}_mbps", f"{pull_rate:.1f}")
    record_property(f"tcp_guest_to_host_nc_offloads_{offloads}_mbps", f"{push_rate:.1f}")

    if offloads == "on":
        for f in ("CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4"):
            assert f in names, f"{f} not negotiated: {sorted(names)}"
        assert dl_avg > MAX_PLAIN_FRAME, f"no GSO frames reached the guest: {msg}\n{c3.table()}"
        assert pull_avg > MAX_PLAIN_FRAME, f"no TSO frames came from the guest: {msg}\n{c3.table()}"
        # (no bound for the nc push: busybox nc writes small chunks, its frames vary)
    else:
        for f in ("CSUM", "GUEST_CSUM", "HOST_TSO4", "HOST_TSO6", "GUEST_TSO4", "GUEST_TSO6",
                  "HOST_UFO", "GUEST_UFO", "HOST_ECN", "GUEST_ECN"):
            assert f not in names, f"{f} negotiated with offloads off: {sorted(names)}"
        for what, avg in (("reached the guest", dl_avg), ("came from the guest (pull)", pull_avg),
                          ("came from the guest (nc)", push_avg)):
            assert avg <= MAX_PLAIN_FRAME, f"frames above the MTU {what}: {msg}"
    assert env.daemon.alive(), ctx


# --------------------------------------------------------------------------- #
# 3. MTU 9000


JUMBO_PAYLOAD = 8972                       # + 8 ICMP + 20 IP = 9000
JUMBO_FRAME = 9000 + ETH_HLEN
RELEASE_PORT = 7777


def assert_jumbo_frames(before: Counters, after: Counters, direction: str, count: int,
                        what: str) -> None:
    """``count`` whole JUMBO_FRAME frames crossed ``direction``, plus at most a few
    small ones (ARP, a TCP handshake). A fragmented ping would be >= 7 frames each."""
    p, b = after.frames(before, direction)
    small = p - count
    ok = (0 <= small <= 12 and b >= count * JUMBO_FRAME
          and b - count * JUMBO_FRAME <= small * 128)
    assert ok, (f"{what}: expected {count} frames of {JUMBO_FRAME} bytes on {direction}, "
                f"counters moved by {p} packets / {b} bytes\n{after.table()}")


def test_mtu_9000(guest_image, env):
    if g.ensure_apt_packages({"ping": "iputils-ping"}):
        pytest.fail("iputils ping is needed (ping -M do) and could not be installed")
    env.start("--mtu", "9000")
    link = json.loads(env.ns.exec(["ip", "-j", "link", "show", "dev", TAP]).stdout)[0]
    assert link["mtu"] == 9000, f"vhostd --mtu 9000 left the TAP at mtu {link['mtu']}"
    # busybox ping cannot set DF; the counters prove the frames were not fragmented
    script = GUEST_LIB + f"""
wait_host
echo "VHOSTD-GUEST-MTU=$(cat /sys/class/net/eth0/mtu)"
echo "VHOSTD-WAIT=release"
nc -l -p {RELEASE_PORT} </dev/null >/dev/null || fail 21 "nc -l"
ping -c 3 -i 0.2 -W 2 -s {JUMBO_PAYLOAD} $HOST || fail 22 "guest ping -s {JUMBO_PAYLOAD}"
echo "T: PASS"
exit 0
"""
    q = env.qemu(guest_image, test_script=script, device_opts=["host_mtu=9000"],
               cmdline="vhostd.mtu=9000")
    release = ("import socket,sys\n"
               "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
               "s.close()\n")
    try:
        q.start()
        assert q.wait_for(r"VHOSTD-WAIT=release", 60), "guest never got ready\n" + env.context(q)
        fe = env.frontend()
        assert "MTU" in fe["feature_names"], fe["feature_names"]
        c0 = env.counters()
        r = env.ns.exec(["ping", "-M", "do", "-s", str(JUMBO_PAYLOAD), "-c", "3", "-i", "0.2",
                         "-W", "2", GUEST], check=False)
        c1 = env.counters()
        assert r.returncode == 0, (f"ping -M do -s {JUMBO_PAYLOAD} {GUEST} failed:\n{r.stdout}"
                                   f"{r.stderr}\n" + env.context(q))
        assert ", 3 received" in r.stdout, r.stdout
        # let the guest go on: it pings back with 8972-byte payloads
        for _ in range(50):
            rr = env.ns.exec([sys.executable, "-c", release, GUEST, str(RELEASE_PORT)], check=False)
            if rr.returncode == 0:
                break
            time.sleep(0.1)
        result = q.wait(60)
    finally:
        q.cleanup()
    ctx = env.context(q)
    result.assert_ok(ctx)
    c2 = env.counters()
    assert result.value("VHOSTD-GUEST-MTU") == "9000", ctx
    assert_jumbo_frames(c0, c1, "rx", 3, "host ping requests to the guest")
    assert_jumbo_frames(c0, c1, "tx", 3, "guest ping replies")
    assert_jumbo_frames(c1, c2, "tx", 3, "guest ping requests to the host")
    assert_jumbo_frames(c1, c2, "rx", 3, "host ping replies")
    for d in ("rx", "tx"):
        assert c2.get(d, "drops") == 0, c2.table()
    print(f"\n[e2e] MTU 9000: 3 DF pings of {JUMBO_FRAME}-byte frames each way crossed whole "
          f"({c1.frames(c0, 'rx')} rx, {c2.frames(c1, 'tx')} tx packets/bytes)", file=sys.stderr)


# --------------------------------------------------------------------------- #
# 4. multiqueue


MQ_DL_SIZE = 8 * MiB + 777
MQ_UP_MIB = 8


def mq_script(url: str, sha256: str) -> str:
    return GUEST_LIB + f"""
wait_host
echo "VHOSTD-CPUS=$(nproc)"
ls /sys/class/net/eth0/queues/
for i in 0 1; do
    dd if=/dev/urandom of=/tmp/up$i bs=1M count={MQ_UP_MIB} 2>/dev/null || fail 16 dd
    sha256sum /tmp/up$i | cut -d' ' -f1 >/tmp/up$i.sum
done
t0=$(up)
jobs=""
for i in 0 1 2 3; do
    cpu=$((i % 2))
    ( taskset -c $cpu wget -q -O - {url} | sha256sum | cut -d' ' -f1 >/tmp/dl$i.sum ) &
    jobs="$jobs $!"
done
for i in 0 1; do
    ( taskset -c $i nc $HOST {SINK_PORT} </tmp/up$i >/tmp/up$i.reply ) &
    jobs="$jobs $!"
done
wait $jobs   # not the monitor loop
t1=$(up)
echo "VHOSTD-MQ-SECONDS=$(secs $t0 $t1)"
rc=0
for i in 0 1 2 3; do
    s=$(cat /tmp/dl$i.sum)
    echo "VHOSTD-DL$i-SHA256=$s"
    [ "$s" = "{sha256}" ] || {{ echo "T: FAIL download $i sha256 $s"; rc=14; }}
done
for i in 0 1; do
    want="$(cat /tmp/up$i.sum):$(wc -c </tmp/up$i)"
    got=$(cat /tmp/up$i.reply)
    echo "VHOSTD-UP$i=$want"
    [ "$got" = "$want" ] || {{ echo "T: FAIL upload $i: host got '$got', sent $want"; rc=15; }}
done
cat /proc/interrupts | grep -i virtio
[ $rc = 0 ] && echo "T: PASS"
exit $rc
"""


def test_multiqueue(guest_image, env, http_server):
    env.start("--queues", "2")
    srv = http_server(size=MQ_DL_SIZE)
    sink = env.sink(2)
    script = mq_script(srv.url, srv.sha256)
    q = env.qemu(guest_image, test_script=script, queues=2, smp=2, mem_mb=384)
    try:
        q.start()
        assert q.wait_for(r"VHOSTD-CPUS=", 60), "guest never got ready\n" + env.context(q)
        fe = env.frontend()
        result = q.wait(150)
    finally:
        q.cleanup()
    ctx = env.context(q)
    result.assert_ok(ctx)
    c = env.counters()
    assert "MQ" in fe["feature_names"], fe["feature_names"]
    assert fe["queue_pairs_enabled"] == 2, f"guest enabled {fe['queue_pairs_enabled']} pairs\n{ctx}"
    assert result.value("VHOSTD-CPUS") == "2", ctx
    res = sink.results(2)
    assert len(res) == 2, f"upload sink results {res}\n{ctx}"
    ups = sorted(f"{r['sha256']}:{r['bytes']}" for r in res)
    assert ups == sorted(result.value(f"VHOSTD-UP{i}") for i in (0, 1)), (ups, ctx)
    moved = {f"{d}{qp}": c.get(d, "packets", qp) for d in ("rx", "tx") for qp in (0, 1)}
    print(f"\n[e2e] multiqueue: 4 downloads of {MQ_DL_SIZE} + 2 uploads of {MQ_UP_MIB} MiB in "
          f"{result.value('VHOSTD-MQ-SECONDS')}s; packets per queue {moved}", file=sys.stderr)
    assert all(v > 0 for v in moved.values()), f"a queue carried nothing: {moved}\n{c.table()}\n{ctx}"
    assert c.get("rx", "bytes") >= 4 * srv.size and c.get("tx", "bytes") >= 2 * MQ_UP_MIB * MiB, c.table()
    for d in ("rx", "tx"):
        assert c.get(d, "drops") == 0, c.table()
    assert env.daemon.alive(), ctx
