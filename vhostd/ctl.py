"""vhostctl: query and operate a running vhostd over its control socket.

    vhostctl ports [PORT] [--json]
    vhostctl stats [PORT] [--json] [--watch [--interval S] [--count N]]
    vhostctl top [--interval S] [--count N]
    vhostctl rings [PORT] [--json]
    vhostctl metrics
    vhostctl add-port --socket PATH --tap IFNAME [--netns NS] [--mac MAC] [--mtu N] [--queues N] [--client]
                      [--remove-tap] [--name NAME]
    vhostctl del-port NAME
    vhostctl reload
    vhostctl capture PORT [--queue N] [--direction rx|tx|both] [-c COUNT] [-s SNAPLEN] -w FILE

The daemon: --control PATH or --instance NAME (anywhere on the line), else
$VHOSTCTL_CONTROL, else /run/vhostd/control.sock.

Exit status: 0 ok, 1 the daemon refused, failed or is not running, 2 usage;
141 (128 + SIGPIPE, as a C tool killed by SIGPIPE) when the reader of the
output went away (`vhostctl ... | head`). Every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import signal
import socket
import sys
import time

from vhostd import __version__
from vhostd.config import DEFAULT_CONTROL_PATH, RUNTIME_DIR
from vhostd.errors import ControlError
from vhostd.stats import DROP_COUNTERS


def control_request(path: str, req: dict, timeout: float = 10.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        _connect(s, path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ControlError("vhostd closed the control connection")
            data += chunk
    except socket.timeout:
        raise ControlError(f"vhostd did not answer within {timeout:g}s") from None
    except OSError as exc:  # the daemon went away mid-request (EPIPE, ECONNRESET)
        raise ControlError(f"control connection to {path} failed: {exc.strerror or exc}") from None
    finally:
        s.close()
    return _reply(data)


def _connect(s: socket.socket, path: str) -> None:
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"vhostd is not running (no control socket at {path})") from None
    except PermissionError:
        raise ControlError(f"no permission to use {path} (root or the socket's group)") from None
    except OSError as exc:
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None


def _reply(line: bytes) -> dict:
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError("vhostd sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError("vhostd sent a reply that is not a JSON object")
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
        link = p.get("link")
        where = f"TAP {p.get('tap')}" + (f" in netns {p['netns']}" if p.get("netns") else "")
        if link:
            print(f"{'':<16} {where}: {'up' if link['up'] else 'DOWN'}, mac {link['mac']}, mtu {link['mtu']}")
            # The kernel's view of the TAP: its rx is what vhostd wrote (the guest's TX).
            print(f"{'':<16} TAP rx {link['rx_packets']} pkt {link['rx_bytes']} B "
                  f"(errors {link['rx_errors']}, dropped {link['rx_dropped']}); "
                  f"tx {link['tx_packets']} pkt {link['tx_bytes']} B "
                  f"(errors {link['tx_errors']}, dropped {link['tx_dropped']})")
        elif p.get("link_error"):
            print(f"{'':<16} {where}: {p['link_error']}")
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


def watch(path: str, port: str | None, interval: float, count: int | None, top: bool,
          as_json: bool = False) -> None:
    """Rates per second every `interval` s: a refreshing table, or (as_json) one
    JSON object per line: {"time": UNIX seconds, "interval": s, "rates": [rows]}."""
    screen = None if as_json else _Screen()
    try:
        prev, t0 = control_request(path, {"cmd": "stats", "port": port})["stats"], time.monotonic()
        n = 0
        while count is None or n < count:
            if screen is None:
                time.sleep(interval)
            elif not screen.wait(interval):
                return
            cur, t1 = control_request(path, {"cmd": "stats", "port": port})["stats"], time.monotonic()
            dt = t1 - t0
            rows = rates(prev, cur, dt)
            prev, t0 = cur, t1
            n += 1
            if screen is None:
                print(json.dumps({"time": round(time.time(), 3), "interval": round(dt, 3), "rates": rows}),
                      flush=True)
                continue
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
    finally:
        if screen is not None:
            screen.close()


# --- capture ----------------------------------------------------------------------


class _OutputGone(Exception):
    """The reader of the pcap output went away (tcpdump quit)."""


def capture(path: str, req: dict, out) -> dict:
    """Runs a capture: writes the pcap stream (capture.py's wire format) to the
    binary file `out` as it arrives and returns the daemon's totals. Ctrl-C (or
    SIGTERM) asks the daemon to stop: we half-close the connection, the daemon
    detaches the rings and sends its totals."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    stop = {"asked": False}

    def ask_stop(*_):
        if not stop["asked"]:
            stop["asked"] = True
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    try:
        _connect(s, path)
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        _reply(f.readline())
        s.settimeout(None)  # frames may be rare: wait as long as it takes
        old = {sig: signal.signal(sig, ask_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                head = f.read(4)
                if len(head) < 4:
                    raise ControlError("vhostd closed the capture stream early")
                n = int.from_bytes(head, "little")
                if n == 0:
                    break
                block = f.read(n)
                if len(block) < n:
                    raise ControlError("vhostd closed the capture stream early")
                try:
                    out.write(block)
                    out.flush()
                except BrokenPipeError:
                    raise _OutputGone from None
            tail = f.readline()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
    except _OutputGone:
        s.close()  # the daemon sees the connection go and stops the capture
        raise BrokenPipeError from None
    except OSError as exc:
        raise ControlError(f"capture: {exc.strerror or exc}") from None
    finally:
        s.close()
    try:
        return json.loads(tail)
    except ValueError:
        return {}


# --- entry point ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return v


def _int_from(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} out of range ({lo}..{hi if hi is not None else ''})")
        return v
    return parse


_INSTANCE = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


def _instance(text: str) -> str:
    if not _INSTANCE.match(text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not an instance name (the NAME of vhostd@NAME)")
    return text


def _target_options(p: argparse.ArgumentParser, top: bool) -> None:
    """--control/--instance, on the main parser and on every verb, so they work
    before or after the verb. On the verbs the default is SUPPRESS: an option
    given before the verb is not overwritten by the verb's default."""
    g = p.add_mutually_exclusive_group()
    default = None if top else argparse.SUPPRESS
    g.add_argument("--control", metavar="PATH", default=default,
                   help="the daemon's control socket (default: $VHOSTCTL_CONTROL, else "
                   f"{DEFAULT_CONTROL_PATH})")
    g.add_argument("--instance", metavar="NAME", type=_instance, default=default,
                   help=f"the daemon of the unit vhostd@NAME (control socket {RUNTIME_DIR}/NAME.ctl)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vhostctl", description="Query and operate a running vhostd over its control socket.",
                epilog="Exit status: 0 ok, 1 the daemon refused or failed or is not running, 2 usage, "
                "141 the output's reader went away.")
    p.add_argument("--version", action="version", version=f"vhostctl {__version__}")
    _target_options(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="what to do (COMMAND --help for its options)")

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        sp_ = sub.add_parser(name, help=help_, description=help_)
        _target_options(sp_, top=False)
        return sp_

    json_help = "machine-readable output (JSON)"
    sp = verb("ports", "ports: mode, state, TAP (namespace, MAC, MTU, link counters), frontend and features")
    sp.add_argument("port", nargs="?", metavar="PORT", help="one port (default: all)")
    sp.add_argument("--json", action="store_true", help=json_help)
    ss = verb("stats", "per-queue counters, or rates per second with --watch")
    ss.add_argument("port", nargs="?", metavar="PORT", help="one port (default: all)")
    ss.add_argument("--json", action="store_true", help=json_help + "; with --watch one JSON object per line")
    ss.add_argument("--watch", action="store_true", help="print rates per second every --interval seconds")
    for sp_ in (ss, verb("top", "live view of the busiest queues (q quits)")):
        sp_.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                         help="seconds between refreshes (more than 0, default 1)")
        sp_.add_argument("--count", type=_int_from(1), default=None, metavar="N", help="stop after N refreshes")
    sr = verb("rings", "ring positions, pending kicks and calls: for a stuck queue")
    sr.add_argument("port", nargs="?", metavar="PORT", help="one port (default: all)")
    sr.add_argument("--json", action="store_true", help=json_help)
    verb("metrics", "the daemon's metrics in Prometheus text format")
    sa = verb("add-port", "open a port at run time")
    sa.add_argument("--socket", required=True, metavar="PATH",
                    help="vhost-user socket; a relative path is taken from vhostctl's working directory")
    sa.add_argument("--tap", required=True, metavar="IFNAME", help="TAP device (created, or attached if it exists)")
    sa.add_argument("--name", metavar="NAME", help="port name (default: the TAP name)")
    sa.add_argument("--netns", metavar="NS", help="network namespace of the TAP")
    sa.add_argument("--mac", metavar="MAC", help="MAC address of the TAP interface")
    sa.add_argument("--mtu", type=_int_from(1), metavar="N", help="MTU of the TAP, also offered to the guest")
    sa.add_argument("--queues", type=_int_from(1), metavar="N", help="queue pairs (default 1)")
    sa.add_argument("--client", action="store_true", default=None,
                    help="connect to QEMU's server=on chardev instead of listening")
    sa.add_argument("--remove-tap", action="store_true", default=None,
                    help="delete the TAP when the port is removed, if vhostd created it")
    sd = verb("del-port", "close a port (its TAP stays unless it has remove_tap)")
    sd.add_argument("name", metavar="NAME", help="the port's name")
    verb("reload", "re-read the daemon's config file (like SIGHUP) and wait for the result: exit 1 if the file "
         "is broken or a port could not be set up")
    sc = verb("capture", "write a port's frames as a pcap file (taken in the datapath)")
    sc.add_argument("port", metavar="PORT", help="the port")
    sc.add_argument("-w", "--write", required=True, metavar="FILE", dest="file",
                    help="pcap file to write; - for standard output (| tcpdump -r -)")
    sc.add_argument("--queue", type=_int_from(0), metavar="N", help="only queue pair N (default: all)")
    sc.add_argument("--direction", choices=("rx", "tx", "both"), default="both",
                    help="rx: to the guest, tx: from the guest, both (default)")
    sc.add_argument("-c", "--count", type=_int_from(1), metavar="COUNT", help="stop after COUNT frames")
    sc.add_argument("-s", "--snaplen", type=_int_from(1, 65535 + 18), metavar="N",
                    help="keep at most N bytes of each frame (default: all)")
    return p


def control_path(args: argparse.Namespace) -> str:
    """--control, --instance, $VHOSTCTL_CONTROL, the default: the first given."""
    control, instance = getattr(args, "control", None), getattr(args, "instance", None)
    if control is not None and instance is not None:
        raise ControlError("--control and --instance are exclusive")
    if control:
        return control
    if instance:
        return os.path.join(RUNTIME_DIR, f"{instance}.ctl")
    return os.environ.get("VHOSTCTL_CONTROL") or DEFAULT_CONTROL_PATH


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except ControlError as exc:
        print(f"vhostctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        # A reply without the fields this vhostctl expects (another version of
        # the daemon, or not a vhostd at all): one line, not a traceback.
        print(f"vhostctl: unexpected reply from vhostd ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output went away (`vhostctl ... | head`): stop quietly.
        # Python would report the pipe again when it flushes stdout at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    path = control_path(args)
    if args.cmd == "ports":
        ports = control_request(path, {"cmd": "ports", "port": args.port})["ports"]
        print(json.dumps(ports, indent=2)) if args.json else print_ports(ports)
    elif args.cmd == "stats" and args.watch:
        watch(path, args.port, args.interval, args.count, top=False, as_json=args.json)
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
        reply = control_request(path, {"cmd": "reload"}, timeout=60)
        print(reply["summary"])
        failed = reply.get("failed") or {}
        if failed:
            print("vhostctl: reload: port(s) not set up: "
                  + "; ".join(f"{name}: {why}" for name, why in sorted(failed.items())), file=sys.stderr)
            return 1
    elif args.cmd == "capture":
        req = {"cmd": "capture", "port": args.port, "queue": args.queue, "direction": args.direction,
               "count": args.count, "snaplen": args.snaplen}
        if args.file == "-":
            totals = capture(path, req, sys.stdout.buffer)
        else:
            try:
                out = open(args.file, "wb")
            except OSError as exc:
                raise ControlError(f"cannot write {args.file}: {exc.strerror}") from None
            with out:
                totals = capture(path, req, out)
        print(f"vhostctl: {totals.get('frames', '?')} frame(s) captured, {totals.get('dropped', '?')} dropped"
              + (f" ({totals['end']})" if totals.get("end") else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
