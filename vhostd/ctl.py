"""vhostctl: query and operate a running vhostd over its control socket.

    vhostctl [--control PATH] ports [--json]
    vhostctl stats [PORT] [--json] [--watch [--interval S] [--count N]]
    vhostctl top [--interval S] [--count N]
    vhostctl rings [PORT] [--json]
    vhostctl metrics
    vhostctl add-port --socket PATH --tap IFNAME [--netns NS] [--mac MAC] [--mtu N] [--queues N] [--client]
                      [--remove-tap] [--name NAME]
    vhostctl del-port NAME
    vhostctl reload

Exit status: 0 ok, 1 the daemon refused or is not running, 2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time

from vhostd.config import DEFAULT_CONTROL_PATH
from vhostd.errors import ControlError
from vhostd.stats import DROP_COUNTERS


def control_request(path: str, req: dict, timeout: float = 10.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"vhostd is not running (no control socket at {path})") from None
        except PermissionError:
            raise ControlError(f"no permission to use {path} (root or the socket's group)") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ControlError("vhostd closed the control connection")
            data += chunk
    except socket.timeout:
        raise ControlError(f"vhostd did not answer within {timeout:g}s") from None
    finally:
        s.close()
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return reply


# --- formatting -------------------------------------------------------------------


def _si(v: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}{unit}"
    return f"{v:.0f}{unit}"


def print_ports(ports: list[dict]) -> None:
    print(f"{'PORT':<16} {'MODE':<7} {'STATE':<10} {'QUEUES':>6} {'UPTIME':>9}  SOCKET")
    for p in ports:
        state = p.get("state") or ("connected" if p["connected"] else "waiting")
        print(f"{p['name']:<16} {p['mode']:<7} {state:<10} {p['queues']:>6} {p['uptime_s']:>8.0f}s  {p['socket']}")
        if state == "failed":
            print(f"{'':<16} {p.get('error', '')}")
        fe = p.get("frontend")
        if fe:
            print(f"{'':<16} frontend {fe['peer'] or '?'}: {' '.join(fe['feature_names'])}; "
                  f"{fe['queue_pairs_enabled']} queue pair(s) enabled, {fe['memory_regions']} memory region(s)")
            dl = fe.get("dirty_log") or {}
            if dl.get("logging"):
                print(f"{'':<16} dirty logging on (migrating): {dl['pages_marked']} pages marked, "
                      f"{dl['log_bytes']} byte log")


def print_stats(stats: list[dict]) -> None:
    cols = ("packets", "bytes", "kicks", "calls", "calls_suppressed")
    for port in stats:
        print(f"port {port['port']} ({'connected' if port['connected'] else 'waiting'})")
        dl = port.get("dirty_log")
        if dl and (dl["logging"] or dl["pages_marked"]):
            print(f"  dirty logging {'on' if dl['logging'] else 'off'}: {dl['pages_marked']} pages marked"
                  + (f", {dl['marks_beyond_log']} beyond the log" if dl["marks_beyond_log"] else ""))
        print(f"  {'QUEUE':<6}" + "".join(f"{c:>17}" for c in cols) + f"{'drops':>12}")
        for q in port["queues"]:
            label = f"{q['dir']}{q['queue_pair']}"
            print(f"  {label:<6}" + "".join(f"{q[c]:>17}" for c in cols) + f"{sum(q[d] for d in DROP_COUNTERS):>12}")
            nonzero = [f"{d}={q[d]}" for d in DROP_COUNTERS if q[d]]
            if nonzero:
                print(f"  {'':<6}  drops: {' '.join(nonzero)}")


def print_rings(ports: list[dict]) -> None:
    """Per vring: the device's positions, guest memory's, eventfds, and hints."""
    for port in ports:
        print(f"port {port['port']} ({'connected' if port['connected'] else 'waiting'})")
        dl = port.get("dirty_log")
        if dl and (dl["logging"] or dl["pages_marked"]):
            print(f"  dirty logging {'on' if dl['logging'] else 'off'}: {dl['pages_marked']} pages marked"
                  + (f", {dl['marks_beyond_log']} beyond the log" if dl["marks_beyond_log"] else ""))
        for r in port["rings"]:
            d, g = r["device"], r.get("guest", {})
            state = "ready" if r["ready"] else ("broken: " + str(r["broken"]) if r["broken"] else "not serviced")
            print(f"  vring {r['vring']} {r['dir']}{r['queue_pair']} {r['layout']} num {r['num']}"
                  f"{' event_idx' if r['event_idx'] else ''}: {state}")
            dev = " ".join(f"{k}={v}" for k, v in d.items() if v is not None)
            print(f"    device: {dev}")
            if g:
                print(f"    guest:  {' '.join(f'{k}={v}' for k, v in g.items())}")
            print(f"    kick pending={r['kick_pending']} watched={'yes' if r['kick_watched'] else 'no'}; "
                  f"call pending={r['call_pending']}"
                  + (f"; tap watched={'yes' if r['tap_watched'] else 'no'}" if r["dir"] == "rx" else "")
                  + ("; tap hung up" if r["tap_dead"] else "") + f"; worker sleeps={r['idle_waits']}")
            for h in r["hints"]:
                print(f"    ! {h}")


def rates(prev: list[dict], cur: list[dict], dt: float) -> list[dict]:
    """Per-queue rates per second between two `stats` replies."""
    before = {(p["port"], q["vring"]): q for p in prev for q in p["queues"]}
    out = []
    for p in cur:
        for q in p["queues"]:
            b = before.get((p["port"], q["vring"]))
            if b is None:
                continue
            r = {k: max(0, q[k] - b[k]) / dt for k in ("packets", "bytes", "kicks", "calls", *DROP_COUNTERS)}
            r["drops"] = sum(r[d] for d in DROP_COUNTERS)
            out.append({"port": p["port"], "queue": f"{q['dir']}{q['queue_pair']}", **r})
    return out


def print_rates(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'PORT':<16} {'QUEUE':<6} {'pkt/s':>10} {'bit/s':>10} {'kick/s':>9} {'call/s':>9} {'drop/s':>9}")
    for r in rows:
        print(f"{r['port']:<16} {r['queue']:<6} {_si(r['packets']):>10} {_si(r['bytes'] * 8):>10} "
              f"{_si(r['kicks']):>9} {_si(r['calls']):>9} {_si(r['drops']):>9}")


class _Screen:
    """Refreshing output: redraws in place on a terminal, appends blocks otherwise; 'q' quits."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.keys = sys.stdin.isatty()
        self._saved = None
        if self.keys:
            import termios
            import tty

            self._saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin.fileno())

    def clear(self) -> None:
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[2J")

    def wait(self, seconds: float) -> bool:
        """Sleeps; False if the user pressed q."""
        sys.stdout.flush()
        if not self.keys:
            time.sleep(seconds)
            return True
        ready, _, _ = select.select([sys.stdin], [], [], seconds)
        return not (ready and os.read(sys.stdin.fileno(), 1) in (b"q", b"Q"))

    def close(self) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self._saved)


def watch(path: str, port: str | None, interval: float, count: int | None, top: bool) -> None:
    screen = _Screen()
    try:
        prev, t0 = control_request(path, {"cmd": "stats", "port": port})["stats"], time.monotonic()
        n = 0
        while count is None or n < count:
            if not screen.wait(interval):
                return
            cur, t1 = control_request(path, {"cmd": "stats", "port": port})["stats"], time.monotonic()
            rows = rates(prev, cur, t1 - t0)
            prev, t0 = cur, t1
            screen.clear()
            stamp = time.strftime("%H:%M:%S")
            if top:
                ports = control_request(path, {"cmd": "ports"})["ports"]
                up = sum(1 for p in ports if p["connected"])
                total = sum(r["packets"] for r in rows)
                rows.sort(key=lambda r: (r["packets"], r["bytes"]), reverse=True)
                print_rates(rows, f"vhostd top - {stamp}  ports {len(ports)} ({up} connected)  "
                                  f"{_si(total)} pkt/s total  (q quits)")
            else:
                print_rates(rows, f"every {interval:g}s - {stamp}")
            if not screen.tty:
                print()
            n += 1
    finally:
        screen.close()


# --- entry point ------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostctl", description="Query and operate a running vhostd.")
    p.add_argument("--control", metavar="PATH", default=DEFAULT_CONTROL_PATH,
                   help=f"the daemon's control socket (default {DEFAULT_CONTROL_PATH})")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("ports", help="ports, their frontends and negotiated features")
    sp.add_argument("--json", action="store_true")
    ss = sub.add_parser("stats", help="per-queue counters, or rates with --watch")
    ss.add_argument("port", nargs="?", help="one port (default: all)")
    ss.add_argument("--json", action="store_true")
    ss.add_argument("--watch", action="store_true", help="refresh rates per second")
    for sp_ in (ss, sub.add_parser("top", help="live view of the busiest queues")):
        sp_.add_argument("--interval", type=float, default=1.0, metavar="S")
        sp_.add_argument("--count", type=int, default=None, metavar="N", help="stop after N refreshes")
    sr = sub.add_parser("rings", help="ring positions, pending kicks and calls: for a stuck queue")
    sr.add_argument("port", nargs="?", help="one port (default: all)")
    sr.add_argument("--json", action="store_true")
    sub.add_parser("metrics", help="Prometheus text format")
    sa = sub.add_parser("add-port", help="open a port at run time")
    sa.add_argument("--socket", required=True)
    sa.add_argument("--tap", required=True)
    sa.add_argument("--name")
    sa.add_argument("--netns")
    sa.add_argument("--mac")
    sa.add_argument("--mtu", type=int)
    sa.add_argument("--queues", type=int)
    sa.add_argument("--client", action="store_true", default=None)
    sa.add_argument("--remove-tap", action="store_true", default=None,
                    help="delete the TAP when the port is removed, if vhostd created it")
    sd = sub.add_parser("del-port", help="close a port")
    sd.add_argument("name")
    sub.add_parser("reload", help="re-read the daemon's config file (like SIGHUP)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = args.control
    try:
        if args.cmd == "ports":
            ports = control_request(path, {"cmd": "ports"})["ports"]
            print(json.dumps(ports, indent=2)) if args.json else print_ports(ports)
        elif args.cmd == "stats" and args.watch:
            watch(path, args.port, args.interval, args.count, top=False)
        elif args.cmd == "stats":
            stats = control_request(path, {"cmd": "stats", "port": args.port})["stats"]
            print(json.dumps(stats, indent=2)) if args.json else print_stats(stats)
        elif args.cmd == "top":
            watch(path, None, args.interval, args.count, top=True)
        elif args.cmd == "rings":
            rings = control_request(path, {"cmd": "rings", "port": args.port})["rings"]
            print(json.dumps(rings, indent=2)) if args.json else print_rings(rings)
        elif args.cmd == "metrics":
            sys.stdout.write(control_request(path, {"cmd": "metrics"})["text"])
        elif args.cmd == "add-port":
            fields = {k: getattr(args, k) for k in ("socket", "tap", "name", "netns", "mac", "mtu", "queues", "client",
                                                 "remove_tap")}
            fields["socket"] = os.path.abspath(args.socket)  # relative to the caller, not to the daemon
            port = control_request(path, {"cmd": "add-port", "port": fields}, timeout=30)["port"]
            print(f"port {port['name']} added ({port['mode']} on {port['socket']})")
        elif args.cmd == "del-port":
            control_request(path, {"cmd": "del-port", "name": args.name}, timeout=30)
            print(f"port {args.name} removed")
        elif args.cmd == "reload":
            print(control_request(path, {"cmd": "reload"}, timeout=60)["summary"])
    except ControlError as exc:
        print(f"vhostctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
