"""The daemon: its ports, signals, config reload, systemd notify and watchdog.

- SIGTERM / SIGINT: close every port and exit 0. TAPs stay (persistent, with
  their addresses and MTU) unless a port has remove_tap and vhostd created its TAP;
  the same holds for `vhostctl del-port` and a port dropped from the config file.
- SIGHUP (with --config): re-read the file; ports that vanished are closed,
  new ones opened, changed ones reopened; the others are not touched. Ports
  added at run time with `vhostctl add-port` are not managed by the file.
- systemd: READY=1 / STATUS= / RELOADING=1 / STOPPING=1 on $NOTIFY_SOCKET, and
  WATCHDOG=1 keep-alives from the event loop at half of $WATCHDOG_USEC.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

from vhostd.config import RUNTIME_DIR, DaemonConfig, PortConfig, load_config
from vhostd.control import ControlServer
from vhostd.errors import SetupError, WorkerStuck
from vhostd.metrics import MetricsServer
from vhostd.device import reap_stuck
from vhostd.port import Port
from vhostd.unixsock import Activated, systemd_listeners

log = logging.getLogger("vhostd")

HOUSEKEEPING_S = 5.0


def sd_notify(state: str) -> None:
    """systemd's notify protocol: one datagram to $NOTIFY_SOCKET (no-op without it)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), path)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, if it asked this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


class Daemon:
    def __init__(self, config: DaemonConfig, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.ports: dict[str, Port] = {}
        self.from_file: set[str] = set()  # names of ports the config file manages
        self.failed: dict[str, tuple[PortConfig, str]] = {}  # failed ports (set-up, stuck worker): why
        self.stuck_workers = 0  # ports failed because a worker did not park
        self.last_reload_ok: bool | None = None  # None: no reload yet (metrics)
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._reload_lock = asyncio.Lock()
        # Sockets systemd passed (socket activation), kept open for the daemon's
        # life: a port gets a dup, so a port reopened by a reload finds it again.
        self.activated: list[Activated] = []

    # --- ports ------------------------------------------------------------------------

    def socket_dirs(self) -> list[str]:
        """Where a control-socket client (`vhostctl add-port`) may have the daemon
        create (and unlink a stale) socket: the runtime directory, the control
        socket's directory, the directories of the ports the operator configured
        (command line, config file) and the configured socket_dirs."""
        dirs = {RUNTIME_DIR, *self.config.socket_dirs}
        if self.config.control:
            dirs.add(os.path.dirname(os.path.abspath(self.config.control)))
        for cfg in self.config.ports:
            if cfg.socket:
                dirs.add(os.path.dirname(os.path.abspath(cfg.socket)))
        return sorted(dirs)

    def check_socket_path(self, path: str) -> None:
        """add-port: the socket must be an absolute path inside socket_dirs() (its
        directory resolved, so neither '..' nor a symlinked directory leads out)."""
        if not os.path.isabs(path):
            raise SetupError(f"socket path {path!r} is relative: give an absolute path")
        parent = os.path.realpath(os.path.dirname(path))
        for d in self.socket_dirs():
            d = os.path.realpath(d)
            if parent == d or parent.startswith(d.rstrip("/") + "/"):
                return
        raise SetupError(f"socket path {path} is outside the socket directories "
                         f"({', '.join(self.socket_dirs())}): add its directory to socket_dirs "
                         "(config file) or --socket-dir")

    async def add_port(self, cfg: PortConfig, from_file: bool = False) -> Port:
        if cfg.name in self.ports:
            raise SetupError(f"port {cfg.name} already exists")
        for other in self.ports.values():
            if cfg.socket and other.config.socket == cfg.socket:
                raise SetupError(f"socket {cfg.socket} is already used by port {other.name}")
            if (other.config.tap, other.config.netns) == (cfg.tap, cfg.netns):
                raise SetupError(f"TAP {cfg.tap} is already used by port {other.name}")
        port = Port(cfg, self._activated_listener(cfg))
        try:
            await port.open()
        except BaseException:
            port.close()
            raise
        self.failed.pop(cfg.name, None)
        self.ports[cfg.name] = port
        if from_file:
            self.from_file.add(cfg.name)
        port.task = asyncio.create_task(self._serve(port), name=f"port-{cfg.name}")
        return port

    def _activated_listener(self, cfg: PortConfig):
        """A dup of the socket systemd passed for this port: the one named like the
        port (FileDescriptorName=) or bound to its socket path. None if none is."""
        if cfg.client or cfg.fd is not None:
            return None
        path = os.path.abspath(cfg.socket) if cfg.socket else ""
        for a in self.activated:
            if a.name == cfg.name or (path and a.path == path):
                a.used = True
                return a.sock.dup()
        return None

    async def _serve(self, port: Port) -> None:
        try:
            await port.serve()
        except asyncio.CancelledError:
            raise
        except WorkerStuck as exc:
            # One frontend's worker will not park: that port fails, nothing else.
            self.stuck_workers += 1
            port.log.error("%s: port failed, frontend dropped", exc)
            await self.remove_port(port.name, from_task=True)
            self.failed[port.name] = (port.config, str(exc))
        except Exception:
            port.log.exception("port failed; closing it")
            await self.remove_port(port.name, from_task=True)
            self.failed[port.name] = (port.config, "internal error (see the log)")

    async def remove_port(self, name: str, from_task: bool = False, remove_tap: bool = True) -> None:
        """Closes a port. `remove_tap`: the port goes for good (stop, del-port, dropped
        from the file), so its TAP is deleted if its remove_tap setting asks for it;
        False when it is reopened at once (changed in the file) or failed."""
        port = self.ports.pop(name, None)
        if port is None:
            if self.failed.pop(name, None) is not None:
                self.from_file.discard(name)
                log.info("port %s: failed port forgotten", name)
                return
            raise SetupError(f"no port named {name!r}")
        self.from_file.discard(name)
        if port.task is not None and not from_task:
            port.task.cancel()
            try:
                await port.task
            except asyncio.CancelledError:
                pass
        port.close(remove_tap=remove_tap and not from_task)
        port.log.info("removed")

    async def reload(self) -> str:
        """Makes the file's ports match the file; returns a one-line summary."""
        if not self.config_path:
            raise SetupError("no config file to reload (start with --config)")
        async with self._reload_lock:
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            self.last_reload_ok = False  # until it got through
            try:
                new = load_config(self.config_path)
                wanted = {p.name: p for p in new.ports}
                self.config.ports, self.config.socket_dirs = new.ports, new.socket_dirs
                removed = [n for n in self.from_file if n not in wanted or self.ports[n].config != wanted[n]]
                added = [p for n, p in wanted.items() if n not in self.ports or n in removed]
                clash = [p.name for p in added if p.name in self.ports and p.name not in self.from_file]
                if clash:
                    raise SetupError(f"config port {clash[0]} clashes with a port added at run time")
                for n in removed:
                    await self.remove_port(n, remove_tap=n not in wanted)
                failed = []
                for p in added:
                    try:
                        await self.add_port(p, from_file=True)
                    except SetupError as exc:
                        log.error("port %s: %s", p.name, exc)
                        self.failed[p.name] = (p, str(exc))
                        failed.append(p.name)
                for n in list(self.failed):
                    if n not in wanted and n not in self.ports:
                        del self.failed[n]  # gone from the file: no longer failed
                summary = (f"reloaded {self.config_path}: {len(added) - len(failed)} opened, "
                           f"{len(removed)} closed, {len(self.ports)} serving")
                if failed:
                    summary += f", failed: {' '.join(failed)}"
                log.info("%s", summary)
                self.last_reload_ok = not failed
                return summary
            finally:
                sd_notify(f"READY=1\nSTATUS=serving {len(self.ports)} port(s)")

    def describe_failed(self) -> list[dict]:
        """`vhostctl ports` rows of the ports that failed, with the reason."""
        return [{"name": name, "state": "failed", "error": why, "socket": cfg.socket or f"fd {cfg.fd}",
                 "mode": "client" if cfg.client else "server", "tap": cfg.tap, "netns": cfg.netns,
                 "queues": cfg.queues, "connected": False, "connections": 0, "uptime_s": 0.0,
                 "connected_for_s": None}
                for name, (cfg, why) in self.failed.items()]

    # --- lifecycle --------------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            if self.config_path:
                asyncio.get_running_loop().create_task(self._reload_logged())
            else:
                log.info("SIGHUP ignored: no config file")
            return
        log.info("received %s", signal.Signals(sig).name)
        self.stopping.set()

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except SetupError as exc:
            log.error("reload failed, ports unchanged: %s", exc)

    async def _housekeeping(self) -> None:
        interval = watchdog_interval()
        tick = min(interval, HOUSEKEEPING_S) if interval else HOUSEKEEPING_S
        while True:
            if interval:
                sd_notify("WATCHDOG=1")
            for port in list(self.ports.values()):
                port.report_drops()
            for line in reap_stuck():
                log.warning("%s", line)
            await asyncio.sleep(tick)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        servers = []
        try:
            self.activated = systemd_listeners()
            failed = []
            for cfg in self.config.ports:
                try:
                    await self.add_port(cfg, from_file=self.config_path is not None)
                except SetupError as exc:
                    if not self.config_path:
                        raise  # a command-line port: failing to set it up is fatal
                    # With a config file one bad port (TAP busy, namespace not there yet)
                    # must not take every other VM's network down; SIGHUP retries it.
                    log.error("port %s: %s", cfg.name, exc)
                    self.failed[cfg.name] = (cfg, str(exc))
                    failed.append(cfg.name)
            if self.config.control:
                path = os.path.abspath(self.config.control)
                control = None
                for a in self.activated:
                    if a.name == "control" or a.path == path:
                        a.used, control = True, a.sock.dup()
                        break
                servers.append(ControlServer(self, self.config.control, self.config.control_mode,
                                             self.config.control_uid, self.config.control_gid, listener=control))
            for a in self.activated:
                if not a.used:
                    log.warning("systemd passed socket %s (%s) that no port uses: kept for a port added later",
                                a.path or "(unnamed)", a.name)
            if self.config.metrics_listen:
                servers.append(MetricsServer(self, self.config.metrics_listen))
            for server in servers:
                await server.start()
            self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
            status = f"serving {len(self.ports)} port(s)" + (f", failed: {' '.join(failed)}" if failed else "")
            log.info("started: %s", status)
            sd_notify(f"READY=1\nSTATUS={status}")
            await self.stopping.wait()
            log.info("stopping")
        finally:
            sd_notify("STOPPING=1")
            for t in self._tasks:
                t.cancel()
            for name in list(self.ports):
                await self.remove_port(name)
            for server in servers:
                await server.stop()
            for a in self.activated:
                a.sock.close()
