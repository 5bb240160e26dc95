"""The control socket vhostctl talks to: one JSON request per line, one JSON reply per line.

Served by the daemon's event loop (asyncio streams are fine here: no fds travel).
Mode 0660 by default: its owner and group may operate the daemon (owner, group
and mode follow --socket-owner/--socket-group/--socket-mode, mode --control-mode).

Requests ("cmd"): ports [port] | stats [port] | rings [port] | metrics |
add-port {port fields} | del-port {name} | reload | capture {port, queue,
direction, count, snaplen}. Replies: {"ok": true, ...} or {"ok": false, "error":
"..."}; a refused request is also logged (one line). `reload` answers ok with
"failed": {port: reason} when the file was fine but ports could not be set up.
`capture` turns the connection into a pcap stream (wire format in capture.py)
until the count is reached or the client closes it. A new command: a branch in
ControlServer.handle, its verb in ctl.py (parser, printer) and this list.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

from vhostd import tap as taplib
from vhostd.capture import BACKLOG_LIMIT, DRAIN_INTERVAL_S, MAX_SNAPLEN, Capture, pcap_header
from vhostd.config import port_from_dict
from vhostd.errors import SetupError, VhostError
from vhostd.metrics import dirty_log, render_async
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
    return {"port": port.name, "connected": port.session is not None, "totals": totals(queues), "queues": queues,
            "dirty_log": dirty_log(port)}


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


def _block(data: bytes) -> bytes:
    """One block of the capture stream: u32 length (little-endian) + bytes."""
    return len(data).to_bytes(4, "little") + data


def _select(ports: dict, name) -> list:
    """One named port, or all of them when no name is given."""
    if name is None:
        return list(ports.values())
    if name not in ports:
        raise SetupError(f"no port named {name!r} (ports: {', '.join(ports) or 'none'})")
    return [ports[name]]


class ControlServer:
    def __init__(self, daemon, path: str, mode: int = CONTROL_MODE, uid: int | None = None,
                 gid: int | None = None, listener=None):
        """`listener`: the control socket systemd passed (socket activation), served
        instead of binding `path`; its path is systemd's, not unlinked at stop."""
        self.daemon = daemon
        self.listener = listener
        self.path = path
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.server: asyncio.AbstractServer | None = None
        self.active = 0
        self.capturing: set = set()   # QueuePair objects with a capture attached (one each)

    async def start(self) -> None:
        if self.listener is not None:
            self.server = await asyncio.start_unix_server(self._client, sock=self.listener, limit=MAX_REQUEST)
            return
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
            if self.listener is not None:
                return  # systemd's socket: it stays, for the next start
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
                    if req.get("cmd") == "capture":
                        await self.capture(req, reader, writer)
                        return  # the stream ends the connection
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
            return {"ok": True, "text": await render_async(self.daemon)}
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

    # --- capture ----------------------------------------------------------------------

    def _start_capture(self, req: dict) -> tuple:
        """Checks a capture request and attaches its rings. Raises SetupError."""
        name, queue = req.get("port"), req.get("queue")
        direction = req.get("direction") or "both"
        count, snaplen = req.get("count") or 0, req.get("snaplen") or MAX_SNAPLEN
        if not isinstance(name, str):
            raise SetupError("capture: a port name is required")
        for key, value in (("queue", queue), ("count", count), ("snaplen", snaplen)):
            if value is not None and type(value) is not int:
                raise SetupError(f"capture: {key} must be a number")
        if not isinstance(direction, str):
            raise SetupError("capture: direction must be rx, tx or both")
        port = _select(self.daemon.ports, name)[0]
        if port.device is None:
            raise SetupError(f"port {name} has no device")
        qps = port.device.qps if queue is None else port.device.qps[queue:queue + 1] if 0 <= queue else []
        busy = [qp.index for qp in qps if qp in self.capturing]
        if busy:
            raise SetupError(f"port {name} queue pair {busy[0]} is already being captured "
                             "(one capture per queue pair at a time)")
        cap = Capture.start(name, port.device.qps, queue, direction, snaplen, count)
        self.capturing.update(cap.queues)
        return port, cap

    async def capture(self, req: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Streams one capture to this connection (format: capture.py). Ends when
        `count` frames went out, the client closes the connection, or the port
        closes; the rings are detached and freed in every case. A client that
        reads slower than the frames come leaves the rings undrained (its unsent
        backlog above BACKLOG_LIMIT): the datapath then drops capture records,
        counted, and never waits for us."""
        try:
            port, cap = self._start_capture(req)
        except VhostError as exc:  # SetupError; or a worker that would not pause (WorkerStuck)
            log.warning("control: capture refused: %s", exc)
            writer.write(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT_S)
            return
        qps = ",".join(str(qp.index) for qp in cap.queues)
        port.log.info("capture started (queue pair %s, %s)", qps, req.get("direction", "both"))
        end = "stopped by the client"
        eof = asyncio.ensure_future(reader.read(1))  # anything or EOF from the client ends it
        try:
            writer.write(json.dumps({"ok": True, "capture": {"port": port.name, "queues": [q.index for q in cap.queues],
                                                              "snaplen": cap.snaplen}}).encode() + b"\n")
            writer.write(_block(pcap_header(cap.snaplen)))
            while not cap.done:
                if self.daemon.ports.get(port.name) is not port or port.device is None:
                    end = "port closed"
                    break
                more = False
                if writer.transport.get_write_buffer_size() < BACKLOG_LIMIT:
                    data, more = cap.drain()
                    if data:
                        writer.write(_block(data))
                # `more`: a ring had more than one wake-up's share; come back at
                # once, but only after the loop has run everything else that is ready.
                await asyncio.wait({eof}, timeout=0 if more else DRAIN_INTERVAL_S)
                if eof.done() or writer.is_closing():
                    break
            else:
                end = "count reached"
        finally:
            eof.cancel()
            await asyncio.gather(eof, return_exceptions=True)
            dropped = cap.dropped
            cap.stop()
            self.capturing.difference_update(cap.queues)
            port.log.info("capture stopped: %s; %d frame(s), %d dropped (reader too slow or ring full)",
                          end, cap.frames, dropped)
        # The end marker and the totals, also to a client that only half-closed
        # (vhostctl on Ctrl-C); one that is gone does not care.
        try:
            writer.write(_block(b"") + json.dumps({"frames": cap.frames, "dropped": dropped,
                                                    "end": end}).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            pass
