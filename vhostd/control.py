"""The control socket vhostctl talks to: one JSON request per line, one JSON reply per line.

Served by the daemon's event loop (asyncio streams are fine here: no fds travel).
Mode 0660 by default: its owner and group may operate the daemon (owner, group
and mode follow --socket-owner/--socket-group/--socket-mode, mode --control-mode).

Requests ("cmd"): ports [port] | stats [port] | rings [port] | metrics |
add-port {port fields} | del-port {name} | reload. Replies: {"ok": true, ...} or
{"ok": false, "error": "..."}; a refused request is also logged (one line).
`reload` answers ok with "failed": {port: reason} when the file was fine but
ports could not be set up. A new command: a branch in ControlServer.handle, its
verb in ctl.py (parser, printer) and this list.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

from vhostd import tap as taplib
from vhostd.config import port_from_dict
from vhostd.errors import SetupError
from vhostd.metrics import render
from vhostd.ringstate import port_rings
from vhostd.stats import totals
from vhostd.unixsock import bind_unix

log = logging.getLogger("vhostd.control")

CONTROL_MODE = 0o660
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 64          # connections at once; vhostctl opens one per request
IDLE_TIMEOUT_S = 10.0     # a connection that sends no complete request for this long is closed


def port_stats(port) -> dict:
    queues = port.device.counters() if port.device else []
    return {"port": port.name, "connected": port.session is not None, "totals": totals(queues), "queues": queues}


async def describe_port(port) -> dict:
    """A `ports` row: the port's own description plus its TAP's link (MAC, MTU, the
    kernel's counters), read in a thread since netlink blocks."""
    out = port.describe()
    try:
        out["link"] = await asyncio.to_thread(taplib.link_info, port.config.tap, port.config.netns)
    except (SetupError, OSError) as exc:  # the row stays; the link part says what went wrong
        out["link"] = None
        out["link_error"] = str(exc)
    return out


def _select(ports: dict, name) -> list:
    """One named port, or all of them when no name is given."""
    if name is None:
        return list(ports.values())
    if name not in ports:
        raise SetupError(f"no port named {name!r} (ports: {', '.join(ports) or 'none'})")
    return [ports[name]]


class ControlServer:
    def __init__(self, daemon, path: str, mode: int = CONTROL_MODE, uid: int | None = None,
                 gid: int | None = None):
        self.daemon = daemon
        self.path = path
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.server: asyncio.AbstractServer | None = None
        self.active = 0

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        sock = bind_unix(self.path, self.uid, self.gid, self.mode, what="control socket")
        try:
            self.server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            os.unlink(self.path)
            raise

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests until EOF. Bounded like any socket a less trusted
        peer reaches: MAX_CLIENTS at once (each holds an fd), IDLE_TIMEOUT_S without
        a complete request closes it, MAX_REQUEST bytes per request."""
        if self.active >= MAX_CLIENTS:
            log.warning("control: %d connections open, refusing another", self.active)
            writer.write(json.dumps({"ok": False, "error": "too many control connections"}).encode() + b"\n")
            writer.close()
            return
        self.active += 1
        try:
            while line := await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S):
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request must be a JSON object")
                    reply = await self.handle(req)
                except (ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                    log.warning("control: refused a request: %s", reply["error"])
                writer.write(json.dumps(reply).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT_S)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                asyncio.TimeoutError):
            pass
        finally:
            self.active -= 1
            writer.close()

    async def handle(self, req: dict) -> dict:
        """One request; a refusal is logged here, once, naming the command."""
        cmd = req.get("cmd")
        try:
            return await self._handle(cmd, req)
        except SetupError as exc:
            if cmd == "reload":
                log.error("reload (vhostctl) failed, ports unchanged: %s", exc)
            else:
                log.warning("control: %s refused: %s", cmd, exc)
            return {"ok": False, "error": str(exc)}

    async def _handle(self, cmd, req: dict) -> dict:
        ports = self.daemon.ports
        if cmd == "ports":
            name = req.get("port")
            rows = [await describe_port(p) for p in ports.values() if name is None or p.name == name]
            rows += [f for f in self.daemon.describe_failed() if name is None or f["name"] == name]
            if name is not None and not rows:
                raise SetupError(f"no port named {name!r} (ports: {', '.join(ports) or 'none'})")
            return {"ok": True, "ports": rows}
        if cmd == "stats":
            return {"ok": True, "stats": [port_stats(p) for p in _select(ports, req.get("port"))]}
        if cmd == "rings":
            return {"ok": True, "rings": [port_rings(p) for p in _select(ports, req.get("port"))]}
        if cmd == "metrics":
            return {"ok": True, "text": render(self.daemon)}
        if cmd == "add-port":
            fields = {k: v for k, v in (req.get("port") or {}).items() if v is not None}
            cfg = port_from_dict(fields, "add-port", self.daemon.config.socket_defaults)
            self.daemon.check_socket_path(cfg.socket)
            port = await self.daemon.add_port(cfg)
            log.info("port %s added at run time", port.name)
            return {"ok": True, "port": port.describe()}
        if cmd == "del-port":
            await self.daemon.remove_port(str(req.get("name")))
            return {"ok": True}
        if cmd == "reload":
            summary = await self.daemon.reload()
            failed = {name: why for name, (_cfg, why) in self.daemon.failed.items()}
            return {"ok": True, "summary": summary, "failed": failed}
        raise SetupError(f"unknown command {cmd!r}")
