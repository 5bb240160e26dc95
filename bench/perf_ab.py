#!/usr/bin/env python3
"""A/B of vhostd builds (and DPDK) with bench/run.py's harness, for docs/notes/perf-changes.md.

    python3 bench/perf_ab.py --variant base=/tmp/snap-base \\
        --variant new=/tmp/snap-new --variant new-sys=/tmp/snap-new:--tap-io=syscall \\
        [--dpdk] [--dirs tx] [--sizes 64] [--reps 4] [--seconds 5]
    python3 bench/perf_ab.py --variant off=.:sink=vufront --variant log=.:sink=vufront-log \
        --dirs rx --sizes 64,1500          # dirty logging's cost (live migration)
    python3 bench/perf_ab.py --variant off=. --variant capture=.:capture --dirs tx,rx
                                           # `vhostctl capture` running vs not

Each variant is a source tree with its C extension built (e.g. `git archive REV |
tar -x -C DIR && cd DIR && python3 vhostd/_build_ffi.py`) plus optional
settings after the colon, comma separated: K=V environment variables (for old
trees), --options given to that variant's vhostd, `capture` (a `vhostctl capture`
of the port into /dev/null runs through every point, on the backend's CPU; its
CPU is reported as ours, not the backend's), or sink=vufront|vufront-log
(the TAP->guest sink: bench/vufront.c rx, with --log a dirty log and LOG_ALL on,
as during a live migration; default DPDK's testpmd); vhostd is started from that tree (`env -C DIR python3 -m
vhostd ...`), so editing the working tree during a run changes nothing. Every
repetition measures every variant once, in a rotating order; the summary gives
per variant the median rate, the median backend CPU microseconds per packet and
the median of the per-repetition ratios against the first variant (pairs
measured within a minute of each other, which is what survives this machine's
noise). Windows, retries and foreign-load accounting are run.py's.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("vhbench", os.path.join(HERE, "run.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class ABBench(bench.Bench):
    def __init__(self, args, variants):
        super().__init__(args)
        self.variants = variants

    def start_backend(self, kind, sock):
        if kind == "dpdk":
            return super().start_backend(kind, sock)
        tree, settings = self.variants[kind]
        env = [e for e in settings if not e.startswith("--") and not e.startswith("sink=") and e != "capture"]
        opts = [e for e in settings if e.startswith("--")]
        self.seq += 1
        tap, ctl = f"vhbv{self.seq}", os.path.join(self.tmp, f"ctl{self.seq}")
        argv = ["taskset", "-c", str(bench.BACKEND_CPU), "env", "-C", tree, *env, sys.executable, "-m", "vhostd",
                "--socket", sock, "--tap", tap, "--netns", self.ns, "--control", ctl, *opts,
                *self.args.vhostd_arg]
        p = self.start(f"vhostd-{kind}", argv)
        deadline = bench.time.monotonic() + 30
        while not (os.path.exists(sock) and self.tap_exists(tap)):
            if not p.alive():
                raise bench.BenchError(f"{kind} backend exited:\n{p.tail()}")
            if bench.time.monotonic() > deadline:
                raise bench.BenchError(f"{kind}: no socket/TAP after 30 s:\n{p.tail()}")
            bench.time.sleep(0.1)
        bench.run(["ip", "-n", self.ns, "link", "set", "dev", tap, "mtu", str(bench.TAP_MTU), "up"])
        self.capture = None
        if "capture" in settings:
            # `vhostctl capture` of both directions into /dev/null for the whole point,
            # on the backend's CPU: the daemon's drain and the reader are both paid there
            code = ("import sys; from vhostd.cli import vhostctl_main; "
                    "sys.exit(vhostctl_main(sys.argv[1:]))")
            self.capture = self.start("capture", ["taskset", "-c", str(bench.BACKEND_CPU), "env", "-C", tree,
                                                  sys.executable, "-c", code, "--control", ctl, "capture", tap,
                                                  "-s", "128", "-w", "/dev/null"])
        return p, tap, ctl

    def add_drain(self, tap, procs, pids, getters):
        super().add_drain(tap, procs, pids, getters)
        if getattr(self, "capture", None) is not None:
            procs.append(self.capture)
            pids["capture"] = self.capture.pid
            self.capture = None


    def rx_sink(self, who):
        """sink=vufront or sink=vufront-log (dirty logging on: the live migration
        A/B) in a variant's settings; DPDK's testpmd otherwise."""
        sink = next((e[5:] for e in self.variants.get(who, ("", []))[1] if e.startswith("sink=")), "testpmd")
        if sink not in ("testpmd", "vufront", "vufront-log"):
            raise bench.BenchError(f"sink={sink}: testpmd, vufront or vufront-log")
        return ("vufront", ("--log",)) if sink == "vufront-log" else (sink, ())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=DIR[:K=V|--opt=V,...]")
    ap.add_argument("--dpdk", action="store_true", help="measure DPDK's forwarder as one more variant")
    ap.add_argument("--dirs", default="tx")
    ap.add_argument("--sizes", default="64")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--max-foreign", type=float, default=0.15)
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--max-wait", type=float, default=30.0)
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write every window to FILE")
    ap.add_argument("--vhostd-arg", action="append", default=[], help="extra vhostd argument (repeatable)")
    args = ap.parse_args()
    variants = {}
    for v in args.variant:
        name, _, rest = v.partition("=")
        tree, _, env = rest.partition(":")
        variants[name] = (os.path.abspath(tree), [e for e in env.split(",") if e])
    kinds = list(variants) + (["dpdk"] if args.dpdk else [])

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)

    b = ABBench(args, variants)
    results = []
    try:
        b.setup()
        for rep in range(args.reps):
            for d in args.dirs.split(","):
                for size in (int(x) for x in args.sizes.split(",")):
                    order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                    for kind in order:
                        b.wait_quiet()
                        try:
                            r = b.run_tx(kind, size) if d == "tx" else b.run_rx(kind, size)
                        except bench.BenchError as exc:
                            bench.log(f"{d} {size} {kind} rep {rep + 1}: FAILED: {str(exc).splitlines()[0]}")
                            continue
                        r["rep"], r["backend"] = rep, kind
                        results.append(r)
                        bench.log(f"{d} {size}B {kind} rep {rep + 1}: {r['pps'] / 1e6:.3f} Mpps, "
                                  f"cpu {r['backend_cpu'] * 100:.0f}%, "
                                  f"{r['backend_cpu'] / r['pps'] * 1e6:.3f} us CPU/pkt, "
                                  f"foreign {r['foreign_cpu']:.2f}"
                                  + (f", capture reader cpu {r['cpu']['capture'] * 100:.0f}%"
                                     if "capture" in r["cpu"] else "")
                                  + (f", offered {r['offered_pps'] / 1e6:.3f}" if d == "rx" else ""))
    except KeyboardInterrupt:
        bench.log("interrupted")
    finally:
        b.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            bench.json.dump(results, f, indent=1)

    print(f"\n{'dir':3} {'size':>5} {'variant':12} {'n':>2} {'Mpps':>7} {'us CPU/pkt':>10} "
          f"{'Mpps ratio':>10} {'CPU/pkt ratio':>13}   (ratios: median of per-rep ratios vs {kinds[0]})")
    for d in args.dirs.split(","):
        for size in (int(x) for x in args.sizes.split(",")):
            pts = [r for r in results if r["dir"] == d and r["size"] == size and r["pps"] > 0]
            ref = {r["rep"]: r for r in pts if r["backend"] == kinds[0]}
            for kind in kinds:
                mine = [r for r in pts if r["backend"] == kind]
                if not mine:
                    continue
                cpp = [r["backend_cpu"] / r["pps"] * 1e6 for r in mine]
                pr = [r["pps"] / ref[r["rep"]]["pps"] for r in mine if r["rep"] in ref]
                cr = [(r["backend_cpu"] / r["pps"]) / (ref[r["rep"]]["backend_cpu"] / ref[r["rep"]]["pps"])
                      for r in mine if r["rep"] in ref]
                print(f"{d:3} {size:5} {kind:12} {len(mine):2} {statistics.median(r['pps'] for r in mine) / 1e6:7.3f} "
                      f"{statistics.median(cpp):10.3f} {statistics.median(pr) if pr else float('nan'):10.3f} "
                      f"{statistics.median(cr) if cr else float('nan'):13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
