"""Command lines: `vhostd` (the daemon, also `python -m vhostd`) and `vhostctl` (ctl.py).

Follows the vhost-user spec's "Backend program conventions": --socket-path,
--fd, --print-capabilities; never daemonizes; exits promptly on SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from dataclasses import replace

from vhostd import __version__
from vhostd.config import (
    DEFAULT_CONTROL_PATH,
    MAX_QUEUE_PAIRS,
    DaemonConfig,
    PortConfig,
    apply_control_access,
    check_port,
    MAX_BUSY_POLL_US,
    MAX_TAP_MTU,
    MIN_MTU,
    TX_COPY_LIMIT,
    check_config,
    load_config,
    parse_group,
    parse_cpus,
    parse_listen,
    parse_mode,
    parse_owner,
)
from vhostd.errors import SetupError, VhostError


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be {lo}..{hi}")
        return n

    return parse


def vhostd_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostd",
        description="vhost-user network backend: serves QEMU guests' virtio-net through host TAP devices. "
        "One port from the command line (--socket + --tap), or many from --config.",
        epilog="QEMU side: -chardev socket,id=c0,path=SOCKET -netdev vhost-user,id=n0,chardev=c0 "
        "-device virtio-net-pci,netdev=n0 (guest RAM must be shared: memory-backend-memfd,share=on).",
    )
    p.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                   help="vhost-user Unix socket (listened on; with --client, connected to)")
    p.add_argument("--fd", type=_int_in(0, 1 << 20), metavar="N",
                   help="serve an inherited listening Unix socket on fd N instead of --socket")
    p.add_argument("--tap", metavar="IFNAME",
                   help="host TAP device: created, or attached if a persistent TAP of that name exists")
    p.add_argument("--netns", metavar="NAME", help="network namespace the TAP lives in (from `ip netns add`)")
    p.add_argument("--mac", metavar="MAC", help="MAC address of the host-side TAP interface")
    p.add_argument("--mtu", type=_int_in(MIN_MTU, MAX_TAP_MTU), metavar="N",
                   help=f"MTU of the TAP interface ({MIN_MTU}..{MAX_TAP_MTU})")
    p.add_argument("--queues", type=_int_in(1, MAX_QUEUE_PAIRS), default=1, metavar="N",
                   help=f"queue pairs (1..{MAX_QUEUE_PAIRS}, default 1)")
    p.add_argument("--busy-poll-us", type=_int_in(0, MAX_BUSY_POLL_US), default=0, metavar="N",
                   help="after traffic, workers poll for N microseconds before sleeping (lower latency, "
                   "more CPU under load; default 0 = off, an idle port uses no CPU either way)")
    p.add_argument("--cpu-affinity", metavar="CPUS",
                   help="pin queue-pair workers: queue pair i runs on the i-th CPU of the list, "
                   "round robin (e.g. 2,3 or 0-3)")
    p.add_argument("--tap-io", choices=("auto", "syscall"), default="auto",
                   help="TAP I/O of the workers: auto = TX bursts through io_uring where it works, else one "
                   "syscall per frame (default); syscall = always one readv/writev per frame")
    p.add_argument("--tx-copy-max", type=_int_in(0, TX_COPY_LIMIT), default=TX_COPY_LIMIT, metavar="N",
                   help=f"TX frames of at most N bytes (vnet header included) are copied and written as one "
                   f"buffer, larger ones go zero-copy (0..{TX_COPY_LIMIT}, default {TX_COPY_LIMIT}; 0 = never copy)")
    p.add_argument("--client", action="store_true",
                   help="connect to QEMU's server=on chardev instead of listening (retries until it can)")
    p.add_argument("--remove-tap", action="store_true",
                   help="on a clean stop delete the TAP if vhostd created it (default: keep it, persistent)")
    p.add_argument("--socket-owner", metavar="USER",
                   help="owner of the sockets vhostd creates (vhost-user and control; default: the daemon's user)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the sockets vhostd creates (default: the daemon's group)")
    p.add_argument("--socket-mode", metavar="OCTAL",
                   help="permissions of the sockets vhostd creates (default 0660)")
    p.add_argument("--config", metavar="FILE", help="TOML file of ports (see README); SIGHUP reloads it")
    p.add_argument("--socket-dir", metavar="DIR", action="append", default=[],
                   help="a directory where `vhostctl add-port` may create sockets, besides /run/vhostd, "
                   "the control socket's and the configured ports' directories (repeatable)")
    p.add_argument("--control", metavar="PATH", default=None,
                   help=f"control socket for vhostctl (default {DEFAULT_CONTROL_PATH}; '' disables it)")
    p.add_argument("--control-mode", metavar="OCTAL",
                   help="permissions of the control socket (default: --socket-mode; 0600 keeps it to its owner)")
    p.add_argument("--metrics-listen", metavar="ADDR:PORT",
                   help="serve Prometheus metrics over HTTP at ADDR:PORT (e.g. 127.0.0.1:9712)")
    p.add_argument("--check-config", metavar="FILE",
                   help="check a config file and exit: 0 if vhostd would start with it, else one line per "
                   "error on stderr and exit 1 (no port is opened)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the backend's capabilities as JSON (vhost-user backend conventions) and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: every request)")
    p.add_argument("--version", action="version", version=f"vhostd {__version__}")
    return p


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority
    (<3> error ... <7> debug), so `journalctl -p warning` filters by level."""

    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)  # INFO by default, DEBUG with -v
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if verbose < 3:  # pyroute2 logs every netlink message at DEBUG
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith("pyroute2"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # Every vhost-user request (dispatch.py's "vhostd.requests" logger) only with -vv.
    logging.getLogger("vhostd.requests").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


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


def _control_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def daemon_config(args: argparse.Namespace) -> tuple[DaemonConfig, str | None]:
    """The daemon's configuration from the command line (and --config). Raises SetupError."""
    access: dict = {}
    if args.socket_owner is not None:
        access["socket_uid"] = parse_owner(args.socket_owner, "--socket-owner")
    if args.socket_group is not None:
        access["socket_gid"] = parse_group(args.socket_group, "--socket-group")
    if args.socket_mode is not None:
        access["socket_mode"] = parse_mode(args.socket_mode, "--socket-mode")
    if args.config:
        if args.socket or args.tap or args.fd is not None:
            raise SetupError("--config and a command-line port (--socket/--fd/--tap) are exclusive")
        if args.remove_tap:
            raise SetupError("--remove-tap is for a command-line port; in a config file use remove_tap = true")
        if args.busy_poll_us or args.cpu_affinity or args.tap_io != "auto" or args.tx_copy_max != TX_COPY_LIMIT:
            raise SetupError("--busy-poll-us, --cpu-affinity, --tap-io and --tx-copy-max are for a command-line "
                             "port: use the busy_poll_us, cpu_affinity, tap_io and tx_copy_max keys of the "
                             "config file")
        cfg = load_config(args.config)
        if access:  # the command line wins over the file's top-level keys
            cfg.socket_defaults.update(access)
            cfg.ports = [replace(p, **access) for p in cfg.ports]
            apply_control_access(cfg)
    else:
        if args.tap is None or (args.socket is None and args.fd is None):
            raise SetupError("a port needs --tap and --socket (or --fd), or use --config FILE")
        if args.socket and args.fd is not None:
            raise SetupError("--socket and --fd are exclusive")
        if args.fd is not None and args.client:
            raise SetupError("--fd is a listening socket: it does not combine with --client")
        port = check_port(PortConfig(socket=args.socket or "", tap=args.tap, netns=args.netns, mac=args.mac,
                                     mtu=args.mtu, queues=args.queues, client=args.client, fd=args.fd,
                                     remove_tap=args.remove_tap, busy_poll_us=args.busy_poll_us,
                                     tap_io=args.tap_io, tx_copy_max=args.tx_copy_max,
                                     cpu_affinity=parse_cpus(args.cpu_affinity) if args.cpu_affinity else (),
                                     **access))
        cfg = DaemonConfig(ports=[port], socket_defaults=access)
        apply_control_access(cfg)
    for d in args.socket_dir:
        if not os.path.isabs(d):
            raise SetupError(f"--socket-dir {d!r} must be an absolute path")
    cfg.socket_dirs = [*cfg.socket_dirs, *args.socket_dir]
    if args.control_mode is not None:
        cfg.control_mode = parse_mode(args.control_mode, "--control-mode")
    if args.metrics_listen:
        parse_listen(args.metrics_listen)
        cfg.metrics_listen = args.metrics_listen
    if args.control is not None:
        cfg.control = args.control or None
    elif cfg.control is None:
        cfg.control = DEFAULT_CONTROL_PATH
        if _control_alive(cfg.control):
            logging.getLogger("vhostd").warning(
                "default control socket %s belongs to another vhostd: running without one (use --control)",
                cfg.control)
            cfg.control = None
    return cfg, args.config


def capabilities() -> dict:
    """vhost-user backend conventions: the device type; net defines no optional features."""
    return {"type": "net"}


def vhostd_main(argv: list[str] | None = None) -> int:
    from vhostd.daemon import Daemon

    args = vhostd_parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    if args.check_config is not None:
        errors = check_config(args.check_config)
        for line in errors:
            print(f"vhostd: {line}", file=sys.stderr)
        return 1 if errors else 0
    _setup_logging(args.verbose)
    try:
        cfg, path = daemon_config(args)
        _run(Daemon(cfg, path).run())
    except VhostError as exc:
        print(f"vhostd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def vhostctl_main(argv: list[str] | None = None) -> int:
    from vhostd.ctl import main

    return main(argv)
