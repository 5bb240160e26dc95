#!/usr/bin/env python3
"""vhostd benchmark: vhostd vs DPDK 22.11's vhost-user + TAP forwarder vs the raw
TAP limit, guest->TAP and TAP->guest, in one invocation with the same traffic.

Run as root:   .venv/bin/python bench/run.py [--quick] [--update-doc] [--json PATH]

Contenders (each alone on CPU 1, started fresh for every point):
  vhostd  python -m vhostd --socket S --tap T --netns NS --queues Q [--vhostd-args ...]
  dpdk    dpdk-testpmd net_vhost0 (queues=Q) + net_tap0 (Q queues), --forward-mode=io
  raw     bench/tapraw.c: its own TAP, one writev/readv per frame, Q threads
Traffic (CPU 0):
  tx   guest->TAP: dpdk-testpmd virtio-user --forward-mode=txonly; counted at the TAP
  rx   TAP->guest: bench/pktsrc.c floods the TAP from inside the namespace;
       sink dpdk-testpmd virtio-user --forward-mode=rxonly (its RX-packets)
  gso  guest->TAP 64 KB TCP GSO frames: bench/vufront.c gso (vhostd, raw)
  lat  round trip: bench/pinger.c -> TAP -> backend -> vufront echo -> back
Frame sizes 64/512/1500 B, queue pairs 1 and 2. Reported: Mpps, Gbit/s, CPU seconds
per million packets of every process, vhostd/DPDK and vhostd/raw, latency median
and p99; a PNG plot; --update-doc rewrites the results section of docs/benchmarks.md.

Everything lives in a private network namespace, a temp dir under /run and unique
DPDK file prefixes; all of it is removed on exit, Ctrl-C or failure.
Modules: bench/util.py (plumbing), harness.py (points), report.py (output),
testpmd.py (the dpdk-testpmd prompt reader, shared with tests/e2e); see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its modules, also when loaded by perf_ab.py

import report
from harness import BACKEND_CPU, CONTENDERS, GEN_CPU, GSO_FRAME, QUEUE_SIZE, TAP_MTU, Bench
from util import REPO, BenchError, log, machine_info, native_fingerprint, run

# what scripts that load this file as a module (A/B drivers) use from it
__all__ = ["BACKEND_CPU", "GEN_CPU", "TAP_MTU", "Bench", "BenchError", "json", "log", "main", "run", "time"]

DOC = os.path.join(REPO, "docs", "benchmarks.md")
KINDS = ("tx", "gso", "rx", "lat")


def make_plan(args) -> list[tuple[int, str, int, int, str]]:
    """(rep, kind, size, queues, contender), contenders alternating between repetitions."""
    plan = []
    for rep in range(args.reps):
        for kind in args.dirs:
            sizes = [GSO_FRAME] if kind == "gso" else [64] if kind == "lat" else args.sizes
            queues = [1] if kind == "lat" else args.queues
            who = [w for w in args.backends if not (kind == "gso" and w == "dpdk")]
            if rep % 2:
                who.reverse()
            plan += [(rep, kind, s, q, w) for s in sizes for q in queues for w in who]
    return plan


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="prove the harness works: 1 rep, 1 s windows, 64 B, fewer pings (~1 min)")
    ap.add_argument("--sizes", help="frame sizes in bytes, comma separated (default 64,512,1500)")
    ap.add_argument("--queues", help="queue pairs, comma separated (default 1,2)")
    ap.add_argument("--dirs", default=",".join(KINDS), help="tx,gso,rx,lat (default: all)")
    ap.add_argument("--backends", default=",".join(CONTENDERS), help="vhostd,dpdk,raw (default: all)")
    ap.add_argument("--seconds", type=float, help="measurement window (default 3)")
    ap.add_argument("--warmup", type=float, help="seconds of traffic before each window (default 1)")
    ap.add_argument("--reps", type=int, help="repetitions per point (default 2)")
    ap.add_argument("--pings", type=int, help="round trips per latency point (default 5000)")
    ap.add_argument("--rx-sink", choices=("testpmd", "vufront"), default="testpmd",
                    help="TAP->guest sink: DPDK virtio-user rxonly (default, busy-polls) or vufront rx (sleeps)")
    ap.add_argument("--tx-drain", action="store_true",
                    help="guest->TAP: also consume the frames on the TAP's host side (pktsrc drain, CPU 0); "
                         "default: the kernel drops them after the TAP counted them")
    ap.add_argument("--vhostd-args", default="", help="extra vhostd options, one shell-quoted string")
    ap.add_argument("--max-foreign", type=float, default=0.15,
                    help="CPUs of other load tolerated in a window before it is retried (default 0.15)")
    ap.add_argument("--retries", type=int, help="extra windows when the machine is busy (default 1)")
    ap.add_argument("--max-wait", type=float, help="seconds to wait for a quiet machine before a point (default 5)")
    ap.add_argument("--budget", type=float, default=None,
                    help="minutes: waits and retries happen only while the run is ahead of this schedule "
                         "(default 13; 0 = no limit)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write every window + the summary as JSON to PATH (- or no PATH: stdout)")
    ap.add_argument("--plot", metavar="PNG", help="write the plot to PNG")
    ap.add_argument("--update-doc", action="store_true",
                    help="rewrite the results section of docs/benchmarks.md (between its markers) and write "
                         "the plot next to it as benchmarks.png (unless --plot)")
    ap.add_argument("--doc", default=DOC, help="the document --update-doc rewrites (default docs/benchmarks.md)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's log")
    ap.add_argument("--from-json", metavar="PATH",
                    help="measure nothing: re-render the tables/plot/doc from a previous run's --json output")
    args = ap.parse_args(argv)
    q = args.quick
    args.sizes = [int(s) for s in (args.sizes or ("64" if q else "64,512,1500")).split(",")]
    args.queues = [int(s) for s in (args.queues or "1,2").split(",")]
    args.seconds = args.seconds or (1.0 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if q else 1.0)
    args.reps = args.reps or (1 if q else 2)
    args.pings = args.pings or (500 if q else 5000)
    args.retries = args.retries if args.retries is not None else (0 if q else 1)
    args.max_wait = args.max_wait if args.max_wait is not None else (0.0 if q else 5.0)
    args.budget = args.budget if args.budget is not None else (0.0 if q else 13.0)
    args.dirs = [d for d in args.dirs.split(",") if d]
    args.backends = [b for b in args.backends.split(",") if b]
    if any(d not in KINDS for d in args.dirs) or any(b not in CONTENDERS for b in args.backends):
        ap.error(f"--dirs takes {','.join(KINDS)}; --backends takes {','.join(CONTENDERS)}")
    if any(not 60 <= s <= 9000 for s in args.sizes) or any(not 1 <= n <= 8 for n in args.queues):
        ap.error("sizes must be 60..9000, queue pairs 1..8")
    return args


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "run as root (network namespaces, TAP devices)"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs (traffic on CPU 0, the contender on CPU 1)"
    for tool in ("dpdk-testpmd", "gcc", "ip", "taskset", "stdbuf"):
        if not shutil.which(tool):
            return f"{tool} not found"
    return None


def invocation(argv: list[str] | None) -> str:
    exe = sys.executable
    py = os.path.relpath(exe, REPO) if exe.startswith(REPO + os.sep) else "python3"
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([py, "bench/run.py"] + [shlex.quote(a) for a in args])


def measure(args, argv) -> tuple[dict, int]:
    """Runs the plan; returns the JSON document and the exit status so far."""
    if not any(f.startswith("_native") and f.endswith(".so") for f in os.listdir(os.path.join(REPO, "vhostd"))):
        log("building vhostd's C extension (vhostd/_build_ffi.py)")
        subprocess.run([sys.executable, "vhostd/_build_ffi.py"], cwd=REPO, check=True)

    def on_signal(signum, frame):       # Ctrl-C / SIGTERM / SIGHUP: unwind through finally
        raise KeyboardInterrupt
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    t_start = time.monotonic()
    info = machine_info()
    bench = Bench(args)
    results: list[dict] = []
    failures: list[str] = []
    rc = 0
    plan = make_plan(args)
    try:
        bench.setup()
        for i, (rep, kind, size, q, who) in enumerate(plan, 1):
            label = f"{kind} {'64K GSO' if kind == 'gso' else f'{size}B'} q{q} {who} rep {rep + 1}/{args.reps}"
            # behind schedule: no waiting for a quiet machine, no retried windows
            on_time = not args.budget or time.monotonic() - t_start < args.budget * 60 * (i - 1) / len(plan)
            bench.retries = args.retries if on_time else 0
            if args.max_wait > 0 and on_time:
                busy = bench.wait_quiet()
                if busy > args.max_foreign:
                    log(f"machine busy ({busy:.2f} CPUs) after {args.max_wait:.0f} s: measuring anyway")
            try:
                r = bench.point(kind, who, size, q)
            except BenchError as exc:
                log(f"[{i}/{len(plan)}] {label}: FAILED: {exc}")
                failures.append(f"{label}: {str(exc).splitlines()[0]}")
                continue
            r["rep"] = rep
            results.append(r)
            if kind == "lat":
                log(f"[{i}/{len(plan)}] {label}: median {r['p50_us']:.1f} µs, p99 {r['p99_us']:.1f} µs "
                    f"({r['n']} pings, {r['lost']} lost)")
            else:
                cost = " ".join(f"{k} {v:.2f}" for k, v in r["cpu_s_per_mpkt"].items() if v is not None)
                log(f"[{i}/{len(plan)}] {label}: {r['pps'] / 1e6:.3f} Mpps {r['gbps']:.2f} Gbit/s, "
                    f"CPU s/Mpkt: {cost}; cpu0 {r['cpu0_busy'] * 100:.0f}% cpu1 {r['cpu1_busy'] * 100:.0f}%, "
                    f"foreign {r['foreign_cpu']:.2f}")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        rc = 130
    except BenchError as exc:
        log(f"error: {exc}")
        rc = 1
    finally:
        bench.cleanup()
    with open("/proc/loadavg") as f:
        info["loadavg_end"] = f.read().split()[:3]
    if native_fingerprint() != info["vhostd_native"]:
        info["vhostd_native_changed"] = True
        log("warning: vhostd's C extension was rebuilt during the run (figures may mix two builds)")
    doc = {"machine": info,
           "config": {"command": invocation(argv), "quick": args.quick, "sizes": args.sizes,
                      "queues": args.queues, "dirs": args.dirs, "backends": args.backends,
                      "seconds": args.seconds, "warmup": args.warmup, "reps": args.reps,
                      "budget_min": args.budget, "pings": args.pings, "rx_sink": args.rx_sink,
                      "tx_drain": args.tx_drain,
                      "vhostd_args": args.vhostd_args, "max_foreign": args.max_foreign,
                      "queue_size": QUEUE_SIZE, "tap_mtu": TAP_MTU,
                      "plan": [list(p[1:]) for p in plan if p[0] == 0]},
           "summary": report.summarize(results, args.max_foreign), "runs": results, "failures": failures,
           "wall_seconds": time.monotonic() - t_start}
    return doc, rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        doc["summary"] = report.summarize(doc["runs"], doc["config"]["max_foreign"])
        rc = 0
    else:
        why = preflight()
        if why:
            print(f"bench: {why}", file=sys.stderr)
            return 1
        doc, rc = measure(args, argv)
    info, summary, cfg = doc["machine"], doc["summary"], doc["config"]
    png = args.plot or (os.path.join(os.path.dirname(os.path.abspath(args.doc)), "benchmarks.png")
                        if args.update_doc else None)
    if png and rc != 130:
        try:
            report.plot(summary, info, png)
        except ImportError:
            log("matplotlib is not installed: no plot (pip install matplotlib, or .[test])")
            png = None
    if args.update_doc and rc == 0 and doc["runs"]:
        report.update_doc(args.doc, report.results_section(
            doc, os.path.relpath(png, os.path.dirname(os.path.abspath(args.doc))) if png else None))
        log(f"updated {args.doc}" + (f" and {png}" if png else ""))
    if args.json:
        if args.json == "-":
            json.dump(doc, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    if args.json != "-":
        print(f"\nvhostd vs DPDK vhost+TAP vs raw TAP — {info['date']}\n{report.machine_line(info)}\n"
              f"{cfg['reps']} x {cfg['seconds']:g} s windows; wall time {doc['wall_seconds']:.0f} s\n")
        print(report.markdown_tables(summary))
        for f in doc["failures"]:
            print(f"FAILED: {f}")
    if doc["failures"] and rc == 0:
        rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
