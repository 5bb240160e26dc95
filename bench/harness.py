"""The benchmark's measurement points: which processes run where for one point,
what is counted, and the namespace/temp dir/DPDK prefixes they live in.

A point is (kind, frame size, queue pairs, contender):

  kind "tx"   guest -> TAP. Guest side: dpdk-testpmd virtio-user --forward-mode=txonly
              (CPU 0). Counted: the TAP's rx_packets/rx_bytes (frames the contender
              wrote into the kernel; with --tx-drain pktsrc drain also consumes them).
  kind "rx"   TAP -> guest. Host side: pktsrc floods the TAP (CPU 0). Guest side:
              dpdk-testpmd virtio-user --forward-mode=rxonly (CPU 0; or vufront rx
              with --rx-sink vufront). Counted: the sink's RX-packets/RX-bytes.
  kind "gso"  guest -> TAP with 64 KB TCP GSO frames: vufront gso (CPU 0). Counted:
              the TAP's rx counters; reported in Gbit/s.
  kind "lat"  round trip host -> guest -> host: pinger (CPU 0) sends a 64-byte frame
              into the TAP, vufront echo (CPU 0) returns it through the backend.

Contenders, always alone on CPU 1: "vhostd" (python -m vhostd), "dpdk"
(dpdk-testpmd net_vhost0 + net_tap0, io forwarding) and "raw" (tapraw: its own TAP,
one writev/readv per frame, no guest — for tx/gso it is its own generator, for rx
it reads what pktsrc floods, for lat it is the echo).

Everything lives in one network namespace created here, a temp dir under /run and
unique DPDK --file-prefix values; cleanup() removes all of it.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time

from util import CLK_TCK, HELPERS, REPO, BenchError, Proc, TestPmd, cpu_times, log, proc_stat_cpus, read_u64s, run

GEN_CPU, BACKEND_CPU = 0, 1
TAP_MTU = 9000          # room for every frame size; GSO frames are not bound by it
QUEUE_SIZE = 1024
GSO_QUEUE_SIZE = 256
GSO_FRAME = 14 + 20 + 20 + 45 * 1448      # frames.h BENCH_GSO_FRAME
CONTENDERS = ("vhostd", "dpdk", "raw")
C_HELPERS = ("pktsrc", "tapraw", "vufront", "pinger")


def vhostd_python() -> str:
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.access(venv, os.X_OK) else sys.executable


def ksoftirqd_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="vhbench-", dir="/run" if os.path.isdir("/run") else None)
        os.chmod(self.tmp, 0o755)
        self.tag = f"{os.getpid():x}{random.randrange(16**4):04x}"
        self.ns = f"vhb-{self.tag}"
        self.procs: list[Proc] = []
        self.prefixes: list[str] = []
        self.ns_made = False
        self.seq = 0
        self.bin: dict[str, str] = {}
        self.ksoftirqd = ksoftirqd_pids()
        self.retries = args.retries      # per point; run.py sets 0 when behind schedule

    # ------------------------------------------------------------ setup / cleanup

    def setup(self) -> None:
        run(["ip", "netns", "add", self.ns])
        self.ns_made = True
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        for key in ("all", "default"):      # no IPv6 autoconf chatter on the TAPs
            run(["ip", "netns", "exec", self.ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"],
                check=False)
        for name in C_HELPERS:
            out = os.path.join(self.tmp, name)
            run(["gcc", "-O2", "-Wall", "-pthread", "-I", HELPERS, "-o", out, os.path.join(HELPERS, f"{name}.c")])
            self.bin[name] = out

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(signal.SIGTERM, timeout=5)
            except Exception as exc:  # keep cleaning up
                log(f"cleanup: {p.name}: {exc}")
        self.procs.clear()
        if self.ns_made:
            # anything still inside our namespace was started by us
            r = run(["ip", "netns", "pids", self.ns], check=False)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", self.ns], check=False)
            self.ns_made = False
        for prefix in self.prefixes:
            shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
        if not self.args.keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"logs kept in {self.tmp}")

    # ------------------------------------------------------------ processes

    def start(self, name: str, argv: list[str], stdin_pipe: bool = False) -> Proc:
        p = Proc(f"{self.seq:03d}-{name}", argv, self.tmp, stdin_pipe)
        self.procs.append(p)
        return p

    def stop(self, p: Proc | None, sig: int = signal.SIGTERM) -> None:
        if p is None:
            return
        p.stop(sig)
        if p in self.procs:
            self.procs.remove(p)

    def prefix(self, role: str) -> str:
        p = f"vhb{self.tag}{role}{self.seq}"
        self.prefixes.append(p)
        return p

    def in_ns(self, cpu: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, "taskset", "-c", str(cpu)] + argv

    def tap_stats(self, tap: str) -> dict:
        r = run(["ip", "-n", self.ns, "-s", "-j", "link", "show", "dev", tap])
        s = json.loads(r.stdout)[0]["stats64"]
        return {"rx_packets": s["rx"]["packets"], "rx_bytes": s["rx"]["bytes"],
                "rx_dropped": s["rx"]["dropped"], "tx_packets": s["tx"]["packets"],
                "tx_bytes": s["tx"]["bytes"], "tx_dropped": s["tx"]["dropped"]}

    def tap_exists(self, tap: str) -> bool:
        return run(["ip", "-n", self.ns, "link", "show", "dev", tap], check=False).returncode == 0

    def wait_tap(self, p: Proc, tap: str, sock: str | None) -> None:
        deadline = time.monotonic() + 30
        while not ((sock is None or os.path.exists(sock)) and self.tap_exists(tap)):
            if not p.alive():
                raise p.died()
            if time.monotonic() > deadline:
                raise BenchError(f"{p.name}: no socket/TAP after 30 s:\n{p.tail()}")
            time.sleep(0.05)
        run(["ip", "-n", self.ns, "link", "set", "dev", tap, "mtu", str(TAP_MTU), "up"])

    def backend(self, kind: str, sock: str, queues: int) -> tuple[Proc, str, str | None]:
        # subclasses written against the one-queue harness override start_backend(kind, sock)
        return self.start_backend(kind, sock) if queues == 1 else self.start_backend(kind, sock, queues)

    def start_backend(self, kind: str, sock: str, queues: int = 1) -> tuple[Proc, str, str | None]:
        """vhostd or DPDK's forwarder; returns (process, TAP, vhostd control path) once socket and TAP exist."""
        if kind == "vhostd":
            tap, ctl = f"vhbv{self.seq}", os.path.join(self.tmp, f"ctl{self.seq}")
            argv = ["taskset", "-c", str(BACKEND_CPU), vhostd_python(), "-m", "vhostd",
                    "--socket", sock, "--tap", tap, "--netns", self.ns, "--control", ctl,
                    "--queues", str(queues)] + shlex.split(self.args.vhostd_args or "")
            p = self.start("vhostd", argv)
        else:
            tap, ctl = f"vhbd{self.seq}", None
            argv = self.in_ns(BACKEND_CPU, [
                "dpdk-testpmd", "--lcores", f"0@{BACKEND_CPU},1@{BACKEND_CPU}",
                "--no-huge", "-m", "1024", "--no-pci", f"--file-prefix={self.prefix('r')}",
                "--vdev", f"net_vhost0,iface={sock},queues={queues}", "--vdev", f"net_tap0,iface={tap}",
                "--", "--forward-mode=io", "--auto-start", "--total-num-mbufs=16384",
                f"--rxq={queues}", f"--txq={queues}"])
            p = self.start("dpdk-backend", argv, stdin_pipe=True)     # EOF on stdin = quit
        self.wait_tap(p, tap, sock)
        return p, tap, ctl

    def start_raw(self, mode: str, queues: int, size: int) -> tuple[Proc, str, str]:
        tap, st = f"vhbr{self.seq}", os.path.join(self.tmp, f"raw{self.seq}.st")
        p = self.start("tapraw", self.in_ns(BACKEND_CPU, [self.bin["tapraw"], mode, tap, str(queues),
                                                          str(min(size, 9018)), st]))
        self.wait_tap(p, tap, None)
        return p, tap, st

    def start_testpmd_front(self, role: str, sock: str, queues: int, mode: str, size: int) -> TestPmd:
        """DPDK's virtio-user frontend (the guest side), both lcores on the generator's CPU."""
        cq = ",cq=1" if queues > 1 else ""
        argv = ["taskset", "-c", str(GEN_CPU), "stdbuf", "-o0", "dpdk-testpmd",
                "--lcores", f"0@{GEN_CPU},1@{GEN_CPU}", "--no-huge", "-m", "1024", "--no-pci",
                f"--file-prefix={self.prefix('g')}",
                "--vdev", (f"net_virtio_user0,path={sock},queues={queues},queue_size={QUEUE_SIZE},"
                           f"mrg_rxbuf=0,in_order=0,packed_vq=0{cq}"),
                "--", "-i", f"--forward-mode={mode}", f"--txpkts={size}", "--auto-start",
                "--total-num-mbufs=16384", f"--rxq={queues}", f"--txq={queues}"]
        p = TestPmd(f"{self.seq:03d}-{role}", argv, self.tmp)
        self.procs.append(p)
        p.prompt(60)
        return p

    def start_vufront(self, mode: str, sock: str, queues: int, qsize: int,
                      options: tuple[str, ...] = ()) -> tuple[Proc, str]:
        st = os.path.join(self.tmp, f"vf{self.seq}.st")
        p = self.start(f"vufront-{mode}", ["taskset", "-c", str(GEN_CPU), self.bin["vufront"], *options, mode,
                                           sock, st, str(queues), str(qsize)])
        deadline = time.monotonic() + 20
        while read_u64s(st, 1)[0] != 1:
            if not p.alive() or time.monotonic() > deadline:
                raise p.died("did not connect")
            time.sleep(0.05)
        return p, st

    def start_pktsrc(self, tap: str, size: int) -> tuple[Proc, str]:
        st = os.path.join(self.tmp, f"src{self.seq}.st")
        return self.start("pktsrc", self.in_ns(GEN_CPU, [self.bin["pktsrc"], tap, str(size), st])), st

    def add_drain(self, tap: str, procs: list[Proc], pids: dict, getters: dict) -> None:
        """--tx-drain: pktsrc drain consumes what reaches the TAP's host side (CPU 0)."""
        if not getattr(self.args, "tx_drain", False):
            return
        st = os.path.join(self.tmp, f"drain{self.seq}.st")
        p = self.start("drain", self.in_ns(GEN_CPU, [self.bin["pktsrc"], tap, "64", st, "drain"]))
        procs.append(p)
        pids["drain"] = p.pid
        getters["drain"] = lambda: read_u64s(st, 3)

    def drain_result(self, r: dict, a: dict, b: dict, dt: float) -> None:
        if "drain" in a["v"]:
            r["drain_pps"] = (b["v"]["drain"][0] - a["v"]["drain"][0]) / dt
            r["drain_gbps"] = (b["v"]["drain"][2] - a["v"]["drain"][2]) * 8 / dt / 1e9

    def vhostd_stats(self, ctl: str | None) -> list | None:
        """`vhostctl --control CTL stats --json`, the documented interface."""
        if not ctl:
            return None
        code = ("import sys; from vhostd.cli import vhostctl_main; "
                f"sys.exit(vhostctl_main(['--control', {ctl!r}, 'stats', '--json']))")
        r = run([vhostd_python(), "-c", code], check=False, cwd=REPO)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    # ------------------------------------------------------------ windows

    def sample(self, pids: dict[str, int], getters: dict) -> dict:
        t0 = time.monotonic()
        s = {"v": {k: g() for k, g in getters.items()}, "cpu": {k: cpu_times(v) for k, v in pids.items()},
             "stat": proc_stat_cpus(), "ksoftirqd": [cpu_times(p) for p in self.ksoftirqd]}
        s["t"] = (t0 + time.monotonic()) / 2
        return s

    def window(self, pids: dict[str, int], getters: dict, procs: list[Proc]) -> tuple[dict, dict, float]:
        """One window, retried while other people's load ate more than --max-foreign CPUs.

        foreign = (busy time of all CPUs - CPU time of our own processes) / window.
        Keeps the cleanest attempt; its foreign share and attempt count go into the
        result so noisy points stay visible.
        """
        best = None
        for attempt in range(1, self.retries + 2):
            a = self.sample(pids, getters)
            time.sleep(self.args.seconds)
            b = self.sample(pids, getters)
            for p in procs:
                if not p.alive():
                    raise p.died("died during the window")
            dt = b["t"] - a["t"]
            busy = sum(b["stat"][c][0] - a["stat"][c][0] for c in b["stat"]) / CLK_TCK
            # ksoftirqd runs the TAPs' deferred receive work: ours too
            ours = sum(b["cpu"][k] - a["cpu"][k] for k in pids) + \
                sum(b["ksoftirqd"][i] - a["ksoftirqd"][i] for i in range(len(self.ksoftirqd)))
            foreign = max(0.0, (busy - ours) / dt)
            if best is None or foreign < best[3]:
                best = (a, b, dt, foreign, attempt)
            if foreign <= self.args.max_foreign:
                break
            log(f"  window {attempt}: foreign load {foreign:.2f} CPU > {self.args.max_foreign}: again")
        a, b, dt, foreign, attempt = best
        a["foreign"], a["attempts"] = foreign, attempt
        return a, b, dt

    def wait_quiet(self) -> float:
        """Before a point (none of our processes run): wait up to --max-wait for < --max-foreign busy CPUs."""
        deadline = time.monotonic() + self.args.max_wait
        busy = 0.0
        while time.monotonic() < deadline:
            a = proc_stat_cpus()
            time.sleep(0.5)
            b = proc_stat_cpus()
            total = sum(b[c][1] - a[c][1] for c in b) / max(1, len(b))
            busy = sum(b[c][0] - a[c][0] for c in b) / total if total else 0.0   # in CPUs
            if busy <= self.args.max_foreign:
                break
        return busy

    def wait_rising(self, what: str, get, procs: list[Proc], timeout: float = 30.0) -> None:
        v0 = get()
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(0.1)
            if get() > v0 + 1000:
                return
            for p in procs:
                if not p.alive():
                    raise p.died(f"exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise BenchError(f"no {what} after {timeout:.0f} s:\n" +
                                 "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs))

    @staticmethod
    def cpu_busy(a: dict, b: dict, cpu: int) -> float:
        busy = b["stat"][cpu][0] - a["stat"][cpu][0]
        total = b["stat"][cpu][1] - a["stat"][cpu][1]
        return busy / total if total else 0.0

    def result(self, kind: str, who: str, size: int, queues: int, a: dict, b: dict, dt: float,
               packets: int, nbytes: int, pids: dict[str, int]) -> dict:
        cpu = {k: (b["cpu"][k] - a["cpu"][k]) / dt for k in pids}
        mpk = packets / 1e6
        return {"dir": kind, "backend": who, "size": size, "queues": queues, "seconds": dt,
                "packets": packets, "bytes": nbytes, "pps": packets / dt, "gbps": nbytes * 8 / dt / 1e9,
                "backend_cpu": cpu["backend"],          # the one-queue harness's keys
                "pps_per_cpu": packets / dt / cpu["backend"] if cpu["backend"] > 0 else None,
                "cpu": cpu, "cpu_s_per_mpkt": {k: (b["cpu"][k] - a["cpu"][k]) / mpk if mpk else None
                                               for k in pids},
                "cpu0_busy": self.cpu_busy(a, b, GEN_CPU), "cpu1_busy": self.cpu_busy(a, b, BACKEND_CPU),
                "foreign_cpu": a["foreign"], "attempts": a["attempts"]}

    # ------------------------------------------------------------ points

    def point(self, kind: str, who: str, size: int, queues: int) -> dict:
        self.seq += 1
        started = list(self.procs)
        sock = os.path.join(self.tmp, f"s{self.seq}.sock")
        try:
            return getattr(self, f"_{kind}")(who, size, queues, sock)
        finally:
            for p in reversed([p for p in self.procs if p not in started]):
                self.stop(p, signal.SIGINT if "dpdk" in p.name or "gen" in p.name or "sink" in p.name
                          else signal.SIGTERM)
            if os.path.exists(sock):
                os.unlink(sock)

    def run_tx(self, kind: str, size: int) -> dict:
        """The one-queue harness's entry points (bench/perf_ab.py-style callers)."""
        return self.point("tx", kind, size, 1)

    def run_rx(self, kind: str, size: int) -> dict:
        return self.point("rx", kind, size, 1)

    def _tx(self, who: str, size: int, queues: int, sock: str) -> dict:
        if who == "raw":
            raw, tap, _ = self.start_raw("tx", queues, size)
            procs, pids, getters = [raw], {"backend": raw.pid}, {}
        else:
            backend, tap, _ = self.backend(who, sock, queues)
            gen = self.start_testpmd_front("gen", sock, queues, "txonly", size)
            procs, pids = [backend, gen], {"backend": backend.pid, "gen": gen.pid}
            getters = {"gen": gen.port_stats}
        getters["tap"] = lambda: self.tap_stats(tap)
        self.add_drain(tap, procs, pids, getters)
        self.wait_rising("frames on the TAP", lambda: self.tap_stats(tap)["rx_packets"], procs)
        time.sleep(self.args.warmup)
        a, b, dt = self.window(pids, getters, procs)
        ta, tb = a["v"]["tap"], b["v"]["tap"]
        r = self.result("tx", who, size, queues, a, b, dt, tb["rx_packets"] - ta["rx_packets"],
                        tb["rx_bytes"] - ta["rx_bytes"], pids)
        r["tap_rx_dropped"] = tb["rx_dropped"] - ta["rx_dropped"]
        if "gen" in a["v"]:
            r["gen_tx_pps"] = (b["v"]["gen"][2] - a["v"]["gen"][2]) / dt
        self.drain_result(r, a, b, dt)
        return r

    def _gso(self, who: str, size: int, queues: int, sock: str) -> dict:
        if who == "raw":
            raw, tap, _ = self.start_raw("gso", queues, 64)
            procs, pids = [raw], {"backend": raw.pid}
        elif who == "vhostd":
            backend, tap, _ = self.backend(who, sock, queues)
            front, _ = self.start_vufront("gso", sock, queues, GSO_QUEUE_SIZE)
            procs, pids = [backend, front], {"backend": backend.pid, "gen": front.pid}
        else:
            raise BenchError("gso: DPDK's virtio-user cannot send GSO frames; vhostd and raw only")
        getters = {"tap": lambda: self.tap_stats(tap)}
        self.add_drain(tap, procs, pids, getters)
        self.wait_rising("GSO frames on the TAP", lambda: self.tap_stats(tap)["rx_bytes"] // 1000, procs)
        time.sleep(self.args.warmup)
        a, b, dt = self.window(pids, getters, procs)
        ta, tb = a["v"]["tap"], b["v"]["tap"]
        r = self.result("gso", who, size, queues, a, b, dt, tb["rx_packets"] - ta["rx_packets"],
                        tb["rx_bytes"] - ta["rx_bytes"], pids)
        self.drain_result(r, a, b, dt)
        return r

    def rx_sink(self, who: str) -> tuple[str, tuple[str, ...]]:
        """The TAP->guest sink of a contender: "testpmd" or "vufront", and vufront's
        options (A/B drivers override it, e.g. --log for dirty logging on)."""
        return getattr(self.args, "rx_sink", "testpmd"), ()

    def _rx(self, who: str, size: int, queues: int, sock: str) -> dict:
        if who == "raw":
            raw, tap, st = self.start_raw("rx", queues, size)
            procs, pids = [raw], {"backend": raw.pid}

            def count():
                v = read_u64s(st, 1 + 2 * queues)
                return sum(v[1::2]), sum(v[2::2])
        else:
            backend, tap, _ = self.backend(who, sock, queues)
            sink_kind, sink_options = self.rx_sink(who)
            if sink_kind == "testpmd":
                sink = self.start_testpmd_front("sink", sock, queues, "rxonly", size)

                def count():
                    return sink.port_stats()[:2]
            else:
                sink, st = self.start_vufront("rx", sock, queues, QUEUE_SIZE, sink_options)

                def count():
                    return read_u64s(st, 3)[1:3]
            time.sleep(0.3)     # DPDK: the device becomes ready once all rings are enabled
            procs, pids = [backend, sink], {"backend": backend.pid, "sink": sink.pid}
        src, src_st = self.start_pktsrc(tap, size)
        procs.append(src)
        pids["src"] = src.pid
        getters = {"count": count, "tap": lambda: self.tap_stats(tap), "src": lambda: read_u64s(src_st, 1)[0]}
        self.wait_rising("frames at the sink", lambda: count()[0], procs)
        time.sleep(self.args.warmup)
        a, b, dt = self.window(pids, getters, procs)
        (pa, ba), (pb, bb) = a["v"]["count"], b["v"]["count"]
        r = self.result("rx", who, size, queues, a, b, dt, pb - pa, bb - ba, pids)
        dropped = b["v"]["tap"]["tx_dropped"] - a["v"]["tap"]["tx_dropped"]
        r["tap_tx_dropped"] = dropped
        # offered: frames the source got into the TAP + the ones the TAP dropped (its queue was full)
        r["offered_pps"] = (b["v"]["src"] - a["v"]["src"] + dropped) / dt
        return r

    def _lat(self, who: str, size: int, queues: int, sock: str) -> dict:
        if who == "raw":
            raw, tap, _ = self.start_raw("echo", 1, 64)
            procs = [raw]
        else:
            backend, tap, _ = self.backend(who, sock, 1)
            echo, _ = self.start_vufront("echo", sock, 1, 256)
            procs = [backend, echo]
            time.sleep(0.3)
        pings = getattr(self.args, "pings", 5000)
        count, warm = pings, max(50, pings // 20)
        pinger = self.start("pinger", self.in_ns(GEN_CPU, [self.bin["pinger"], tap, str(count), str(warm)]))
        rc = pinger.wait(60 + count / 1000)
        for p in procs:
            if not p.alive():
                raise p.died("died during the pings")
        line = pinger.tail(1).strip()
        try:
            lat = json.loads(line)
        except ValueError:
            raise BenchError(f"pinger (rc {rc}) gave no result:\n{pinger.tail()}") from None
        if rc != 0 or not lat.get("n"):
            raise BenchError(f"pinger failed (rc {rc}): {line}")
        return {"dir": "lat", "backend": who, "size": 64, "queues": 1, **lat,
                "foreign_cpu": 0.0, "attempts": 1}
