"""Ports, listeners, lifecycle, signals and sd_notify.

A port = one vhost-user socket + one TAP + one virtio-net device. In server mode
(the default) the daemon listens and QEMU connects (`-chardev socket,path=...`);
with `client` it connects to QEMU's `server=on` chardev and retries until it can.
One frontend at a time: after a disconnect every mapping and fd of that
frontend is released and the port waits for the next one; the TAP stays.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from dataclasses import dataclass

from vhostd import tap as taplib
from vhostd.connection import Connection
from vhostd.errors import SetupError
from vhostd.net import NetDevice
from vhostd.session import Session

log = logging.getLogger("vhostd")

CLIENT_RETRY_S = 1.0


@dataclass
class PortConfig:
    socket: str
    tap: str
    netns: str | None = None
    mac: str | None = None
    mtu: int | None = None
    queues: int = 1
    client: bool = False

    @property
    def name(self) -> str:
        return self.tap


class PortLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"port {self.extra['port']}: {msg}", kwargs


def _bind_listener(path: str) -> socket.socket:
    """A listening socket at `path`; refuses a path that a live server holds."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise SetupError(f"socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale socket from a previous run
        else:
            raise SetupError(f"socket path {path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot create socket {path}: {exc.strerror}") from None
    sock.listen(4)
    sock.setblocking(False)
    return sock


class Port:
    def __init__(self, config: PortConfig):
        self.config = config
        self.log = PortLog(log, {"port": config.name})
        self.device: NetDevice | None = None
        self.session: Session | None = None
        self.listener: socket.socket | None = None
        self.task: asyncio.Task | None = None
        self.connections = 0

    @property
    def name(self) -> str:
        return self.config.name

    async def open(self) -> None:
        """Set-up that can fail: TAP, device, socket. Raises SetupError with one clear line."""
        c = self.config
        tap = await asyncio.to_thread(taplib.open_tap, c.tap, c.netns, c.queues)
        try:
            await asyncio.to_thread(taplib.configure_link, tap, c.mtu, c.mac)
            self.device = NetDevice(self.name, tap, c.queues)
        except BaseException:
            tap.close()
            raise
        loop = asyncio.get_running_loop()
        for qp in self.device.qps:
            loop.add_reader(qp.event_fd, self._on_datapath_event)
        if not c.client:
            self.listener = _bind_listener(c.socket)
        where = f" in netns {c.netns}" if c.netns else ""
        self.log.info(
            "TAP %s%s, %d queue pair(s), %s %s", c.tap, where, c.queues,
            "connecting to" if c.client else "listening on", c.socket,
        )

    def _on_datapath_event(self) -> None:
        for line in self.device.check_events():
            self.log.warning("%s", line)

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        announced = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.config.socket)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if not announced:
                    self.log.info("waiting for %s (%s)", self.config.socket, exc.strerror)
                    announced = True
                await asyncio.sleep(CLIENT_RETRY_S)
            except BaseException:
                sock.close()
                raise

    async def serve(self) -> None:
        """Frontend after frontend, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            if self.config.client:
                sock, peer = await self._connect(), self.config.socket
            else:
                sock, _ = await loop.sock_accept(self.listener)
                peer = _peer_pid(sock)
            self.connections += 1
            self.log.info("frontend connected%s", f" ({peer})" if peer else "")
            self.session = Session(self.device, Connection(sock), self.log, peer)
            if self.listener is not None:
                loop.add_reader(self.listener.fileno(), self._note_waiting)
            try:
                await self.session.run()
            finally:
                if self.listener is not None:
                    loop.remove_reader(self.listener.fileno())
                self.session = None

    def _note_waiting(self) -> None:
        """A vhost-user socket serves one frontend at a time: a second one stays in
        the listen backlog until the current one leaves (said once, not refused, so
        a frontend that reconnects quickly is never turned away)."""
        self.log.warning("another frontend is waiting: this port serves one at a time")
        asyncio.get_running_loop().remove_reader(self.listener.fileno())

    def close(self) -> None:
        if self.device is not None:
            loop = asyncio.get_running_loop()
            for qp in self.device.qps:
                loop.remove_reader(qp.event_fd)
            if self.session is not None:
                self.session.close()
            self.device.close()
            self.device = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "socket": self.config.socket,
            "mode": "client" if self.config.client else "server",
            "tap": self.config.tap,
            "netns": self.config.netns,
            "queues": self.config.queues,
            "connected": self.session is not None,
            "connections": self.connections,
        }
        if self.session is not None:
            out["frontend"] = self.session.describe()
        return out


def _peer_pid(sock: socket.socket) -> str:
    try:
        import struct

        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f"pid {pid}" if pid else ""
    except OSError:
        return ""


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


class Daemon:
    def __init__(self, ports: list[PortConfig], control_path: str | None = None):
        self.configs = ports
        self.control_path = control_path
        self.ports: dict[str, Port] = {}
        self.stopping = asyncio.Event()

    def _on_signal(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self.stopping.set()

    async def run(self) -> None:
        from vhostd.control import ControlServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        control = None
        stop_wait: asyncio.Task | None = None
        try:
            for cfg in self.configs:
                port = Port(cfg)
                self.ports[port.name] = port
                await port.open()
            if self.control_path:
                control = ControlServer(self, self.control_path)
                await control.start()
            for port in self.ports.values():
                port.task = asyncio.create_task(port.serve(), name=f"port-{port.name}")
            sd_notify(f"READY=1\nSTATUS=serving {len(self.ports)} port(s)")
            stop_wait = asyncio.create_task(self.stopping.wait())
            tasks = [stop_wait] + [p.task for p in self.ports.values()]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop_wait:
                    if t.exception() is not None:
                        raise t.exception()
                    log.error("%s ended unexpectedly", t.get_name())
            log.info("stopping")
        finally:
            sd_notify("STOPPING=1")
            for port in self.ports.values():
                if port.task is not None:
                    port.task.cancel()
            for port in self.ports.values():
                if port.task is not None:
                    try:
                        await port.task
                    except asyncio.CancelledError:
                        pass
                port.close()
            if control is not None:
                await control.stop()
            if stop_wait is not None:
                stop_wait.cancel()
