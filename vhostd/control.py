"""The control socket vhostctl talks to: one JSON request per line, one JSON reply per line.

Served by the daemon's event loop (asyncio streams are fine here: no fds travel).
Requests: {"cmd": "ports"}, {"cmd": "stats", "port": NAME|null}.
Replies: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket

from vhostd.errors import SetupError
from vhostd.stats import totals

log = logging.getLogger("vhostd.control")

DEFAULT_CONTROL_PATH = "/run/vhostd/control.sock"
CONTROL_MODE = 0o660


class ControlServer:
    def __init__(self, daemon, path: str):
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.lexists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise SetupError(f"control socket {self.path} is in use by another vhostd")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)
            finally:
                probe.close()
        self.server = await asyncio.start_unix_server(self._client, path=self.path)
        os.chmod(self.path, CONTROL_MODE)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = self.handle(json.loads(line))
                except (ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        ports = self.daemon.ports
        if cmd == "ports":
            return {"ok": True, "ports": [p.describe() for p in ports.values()]}
        if cmd == "stats":
            name = req.get("port")
            if name is not None and name not in ports:
                return {"ok": False, "error": f"no port named {name!r} (ports: {', '.join(ports) or 'none'})"}
            selected = [ports[name]] if name is not None else list(ports.values())
            out = []
            for p in selected:
                queues = p.device.counters() if p.device else []
                out.append({"port": p.name, "connected": p.session is not None, "totals": totals(queues), "queues": queues})
            return {"ok": True, "stats": out}
        return {"ok": False, "error": f"unknown command {cmd!r}"}
