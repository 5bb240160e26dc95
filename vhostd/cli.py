"""Command lines: `vhostd` (the daemon, also `python -m vhostd`) and `vhostctl`."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import sys

from vhostd import __version__
from vhostd.errors import ControlError, SetupError, VhostError

MAX_QUEUE_PAIRS = 16
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _queues(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_QUEUE_PAIRS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_QUEUE_PAIRS}")
    return n


def _mac(text: str) -> str:
    if not _MAC.match(text):
        raise argparse.ArgumentTypeError("expected xx:xx:xx:xx:xx:xx")
    return text.lower()


def _mtu(text: str) -> int:
    n = int(text)
    if not 68 <= n <= 65535:
        raise argparse.ArgumentTypeError("must be 68..65535")
    return n


def vhostd_parser() -> argparse.ArgumentParser:
    from vhostd.control import DEFAULT_CONTROL_PATH

    p = argparse.ArgumentParser(
        prog="vhostd",
        description="vhost-user network backend: serves a QEMU guest's virtio-net through a host TAP device.",
        epilog="QEMU side: -chardev socket,id=c0,path=SOCKET -netdev vhost-user,id=n0,chardev=c0 "
        "-device virtio-net-pci,netdev=n0 (guest RAM must be shared: memory-backend-memfd,share=on).",
    )
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="vhost-user Unix socket (listened on; with --client, connected to)")
    p.add_argument("--tap", required=True, metavar="IFNAME",
                   help="host TAP device: created, or attached if a persistent TAP of that name exists")
    p.add_argument("--netns", metavar="NAME", help="network namespace the TAP lives in (from `ip netns add`)")
    p.add_argument("--mac", type=_mac, metavar="MAC", help="MAC address of the host-side TAP interface")
    p.add_argument("--mtu", type=_mtu, metavar="N", help="MTU of the TAP interface")
    p.add_argument("--queues", type=_queues, default=1, metavar="N",
                   help=f"queue pairs (1..{MAX_QUEUE_PAIRS}, default 1)")
    p.add_argument("--client", action="store_true",
                   help="connect to QEMU's server=on chardev instead of listening (retries until it can)")
    p.add_argument("--control", metavar="PATH", default=None,
                   help=f"control socket for vhostctl (default {DEFAULT_CONTROL_PATH}; '' disables it)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: every request)")
    p.add_argument("--version", action="version", version=f"vhostd {__version__}")
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)  # INFO by default, DEBUG with -v
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    if verbose < 3:  # pyroute2 logs every netlink message at DEBUG
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith("pyroute2"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def _run(coro) -> None:
    """uvloop when installed; VHOSTD_EVENT_LOOP=asyncio picks the stdlib loop (tests run both)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        uvloop = None
    if uvloop is None or os.environ.get("VHOSTD_EVENT_LOOP") == "asyncio":
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def vhostd_main(argv: list[str] | None = None) -> int:
    from vhostd.control import DEFAULT_CONTROL_PATH
    from vhostd.daemon import Daemon, PortConfig

    args = vhostd_parser().parse_args(argv)
    _setup_logging(args.verbose)
    control = args.control
    if control is None:
        control = DEFAULT_CONTROL_PATH
        if _control_alive(control):
            logging.getLogger("vhostd").warning(
                "default control socket %s belongs to another vhostd: running without one (use --control)", control)
            control = ""
    port = PortConfig(socket=args.socket, tap=args.tap, netns=args.netns, mac=args.mac, mtu=args.mtu,
                      queues=args.queues, client=args.client)
    try:
        _run(Daemon([port], control_path=control or None).run())
    except SetupError as exc:
        print(f"vhostd: error: {exc}", file=sys.stderr)
        return 1
    except VhostError as exc:
        print(f"vhostd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _control_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# --- vhostctl ----------------------------------------------------------------------


def control_request(path: str, req: dict, timeout: float = 5.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"vhostd is not running (no control socket at {path})") from None
        except PermissionError:
            raise ControlError(f"no permission to use {path}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError("vhostd closed the control connection")
            data += chunk
    finally:
        s.close()
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return reply


def _print_ports(reply: dict) -> None:
    print(f"{'PORT':<16} {'MODE':<7} {'STATE':<13} {'QUEUES':>6}  SOCKET")
    for p in reply["ports"]:
        state = "connected" if p["connected"] else "waiting"
        print(f"{p['name']:<16} {p['mode']:<7} {state:<13} {p['queues']:>6}  {p['socket']}")


def _print_stats(reply: dict) -> None:
    cols = ("packets", "bytes", "kicks", "calls", "calls_suppressed")
    drops = ("drop_ring_full", "drop_tap_busy", "drop_tap_error", "drop_bad_desc", "drop_bad_hdr", "drop_disabled")
    for port in reply["stats"]:
        print(f"port {port['port']} ({'connected' if port['connected'] else 'waiting'})")
        print(f"  {'QUEUE':<8}" + "".join(f"{c:>17}" for c in cols) + f"{'drops':>12}")
        for q in port["queues"]:
            label = f"{q['dir']}{q['queue_pair']}"
            print(f"  {label:<8}" + "".join(f"{q[c]:>17}" for c in cols) + f"{sum(q[d] for d in drops):>12}")
            nonzero = [f"{d}={q[d]}" for d in drops if q[d]]
            if nonzero:
                print(f"  {'':<8}  drops: {' '.join(nonzero)}")


def vhostctl_main(argv: list[str] | None = None) -> int:
    from vhostd.control import DEFAULT_CONTROL_PATH

    p = argparse.ArgumentParser(prog="vhostctl", description="Query a running vhostd.")
    p.add_argument("--control", metavar="PATH", default=DEFAULT_CONTROL_PATH,
                   help=f"the daemon's control socket (default {DEFAULT_CONTROL_PATH})")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("ports", help="list ports and their frontends")
    sp.add_argument("--json", action="store_true")
    ss = sub.add_parser("stats", help="per-queue counters")
    ss.add_argument("port", nargs="?", help="one port (default: all)")
    ss.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "ports":
            reply = control_request(args.control, {"cmd": "ports"})
            print(json.dumps(reply["ports"], indent=2)) if args.json else _print_ports(reply)
        else:
            reply = control_request(args.control, {"cmd": "stats", "port": args.port})
            print(json.dumps(reply["stats"], indent=2)) if args.json else _print_stats(reply)
    except ControlError as exc:
        print(f"vhostctl: {exc}", file=sys.stderr)
        return 1
    return 0
