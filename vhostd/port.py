"""One port: a vhost-user socket + a TAP + a virtio-net device, and its frontends.

In server mode (the default) the port listens and QEMU connects
(`-chardev socket,path=...`); with `client` it connects to QEMU's `server=on`
chardev and retries until it can. One frontend at a time: after a disconnect
every mapping and fd of that frontend is released and the port waits for the
next one; the TAP stays. Datapath problems reach the log here, rate-limited.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from vhostd import unixsock
from vhostd import tap as taplib
from vhostd.config import RUNTIME_DIR, PortConfig
from vhostd.connection import Connection
from vhostd.device import NetDevice, io_mode_line
from vhostd.dispatch import serve
from vhostd.saved_rings import state_path
from vhostd.session import Session
from vhostd.stats import DROP_COUNTERS, totals

log = logging.getLogger("vhostd")

CLIENT_RETRY_S = 1.0
DROP_REPORT_INTERVAL_S = 60.0  # at most one drop summary per port per minute


class PortLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"port {self.extra['port']}: {msg}", kwargs


class Port:
    def __init__(self, config: PortConfig, listener: socket.socket | None = None):
        """`listener`: a listening socket to serve instead of binding config.socket
        (socket activation); the port closes it, its path is not ours to unlink."""
        self.config = config
        self.log = PortLog(log, {"port": config.name})
        self.device: NetDevice | None = None
        self.session: Session | None = None
        self.listener: socket.socket | None = listener
        self.activated = listener is not None
        self.task: asyncio.Task | None = None
        self.connections = 0
        self.opened_at = time.time()
        self.connected_at: float | None = None
        self._owns_socket_path = False
        self._drops_reported: dict[str, int] = {}
        self._drops_logged_at = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    async def open(self) -> None:
        """Set-up that can fail: TAP, device, socket. Raises SetupError with one clear line."""
        c = self.config
        if c.fd is not None:  # checked first: a wrong --fd must not leave a TAP behind
            self.listener = unixsock.inherited_listener(c.fd)
        tap = await asyncio.to_thread(taplib.open_tap, c.tap, c.netns, c.queues)
        try:
            mtu = await asyncio.to_thread(taplib.configure_link, tap, c.mtu, c.mac)
            self.device = NetDevice(self.name, tap, c.queues, mtu, mtu_configured=c.mtu is not None,
                                    tap_io=c.tap_io, saved_path=state_path(
                                        os.environ.get("VHOSTD_STATE_DIR") or RUNTIME_DIR, self.name,
                                        c.socket or f"fd-{c.fd}"))
        except BaseException:
            tap.close(remove=tap.created)  # a TAP this failed attempt created goes again
            raise
        # From here on a failure undoes everything this attempt did, the TAP
        # included when this attempt created it: otherwise the next try would
        # find it and say "existing, attached" for a TAP nobody asked for.
        loop = asyncio.get_running_loop()
        watched = []
        try:
            self.device.configure_workers(c.busy_poll_us, c.cpu_affinity, c.tx_copy_max)
            for qp in self.device.qps:
                loop.add_reader(qp.event_fd, self._on_datapath_event)
                watched.append(qp.event_fd)
            if self.listener is None and not c.client:
                self.listener = unixsock.bind_unix(c.socket, c.socket_uid, c.socket_gid, c.socket_mode)
                self._owns_socket_path = True
        except BaseException:
            for fd in watched:
                loop.remove_reader(fd)
            if tap.created:
                tap.unpersist()  # the device goes with its last fd, closed by device.close()
            self.device.close()
            self.device = None
            raise
        where = f" in netns {c.netns}" if c.netns else ""
        state = "created, persistent" if tap.created else "existing, attached"
        self.log.info(
            "TAP %s%s (%s), %d queue pair(s), %s %s%s", c.tap, where, state, c.queues,
            "connecting to" if c.client else "listening on", c.socket or f"fd {c.fd}",
            " (socket from systemd)" if self.activated else "",
        )
        self.log.info("%s", io_mode_line(self.device.qps))

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
                peer = unixsock.peer_pid(sock)
            self.connections += 1
            self.connected_at = time.time()
            self.log.info("frontend connected%s", f" ({peer})" if peer else "")
            self.session = Session(self.device, Connection(sock), self.log, peer)
            if self.listener is not None:
                loop.add_reader(self.listener.fileno(), self._note_waiting)
            try:
                await serve(self.session)
            finally:
                if self.listener is not None:
                    loop.remove_reader(self.listener.fileno())
                self.session = None
                self.connected_at = None

    def _note_waiting(self) -> None:
        """A vhost-user socket serves one frontend at a time: a second one stays in
        the listen backlog until the current one leaves (said once, not refused, so
        a frontend that reconnects quickly is never turned away)."""
        self.log.warning("another frontend is waiting: this port serves one at a time")
        asyncio.get_running_loop().remove_reader(self.listener.fileno())

    def close(self, remove_tap: bool = False) -> None:
        """Releases everything of the port. The TAP stays (persistent) unless
        `remove_tap` and the port's remove_tap setting ask to delete it and vhostd
        created it (now or in an earlier run): a TAP the operator made is kept."""
        if self.device is not None:
            loop = asyncio.get_running_loop()
            for qp in self.device.qps:
                loop.remove_reader(qp.event_fd)
            if self.session is not None:
                self.session.close()
            tap = self.device.tap
            if remove_tap and self.config.remove_tap and tap.ours:
                tap.unpersist()  # the device goes with the last fd, closed just below
                self.log.info("TAP %s removed", tap.name)
            self.device.close()
            self.device = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self._owns_socket_path:
                try:
                    os.unlink(self.config.socket)
                except FileNotFoundError:
                    pass

    def report_drops(self, now: float | None = None) -> None:
        """One summary line when frames were dropped since the last one, at most once
        per DROP_REPORT_INTERVAL_S: the datapath only counts, it never logs."""
        if self.device is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._drops_logged_at < DROP_REPORT_INTERVAL_S:
            return
        t = totals(self.device.counters())
        current = {k: v for k, v in t.items() if k.split("_", 1)[1] in DROP_COUNTERS}
        grown = {k: v - self._drops_reported.get(k, 0) for k, v in current.items()
                 if v > self._drops_reported.get(k, 0)}
        if grown:
            self.log.warning("dropped frames since last report: %s",
                             " ".join(f"{k}={v}" for k, v in sorted(grown.items())))
            self._drops_logged_at = now
        self._drops_reported = current

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "socket": self.config.socket or f"fd {self.config.fd}",
            "mode": "client" if self.config.client else "server",
            "tap": self.config.tap,
            "netns": self.config.netns,
            "queues": self.config.queues,
            "state": "connected" if self.session is not None else "waiting",
            "connected": self.session is not None,
            "connections": self.connections,
            "uptime_s": round(time.time() - self.opened_at, 1),
            "connected_for_s": round(time.time() - self.connected_at, 1) if self.connected_at else None,
        }
        if self.session is not None:
            out["frontend"] = self.session.describe()
        return out
