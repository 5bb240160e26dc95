"""Prometheus text exposition (format 0.0.4) of the daemon's counters, and a tiny
HTTP endpoint serving it (`--metrics-listen ADDR:PORT`, loopback by default).

Names follow Prometheus conventions: `vhostd_<dir>_<counter>_total{port,queue}`
for the per-queue datapath counters, gauges for per-port state.
"""
from __future__ import annotations

import asyncio
import logging

from vhostd.config import listen_url, parse_listen
from vhostd.errors import SetupError
from vhostd.stats import BATCH_BUCKETS, HELP, VQ_COUNTERS

log = logging.getLogger("vhostd.metrics")

def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(daemon) -> str:
    lines: list[str] = []
    ports = list(daemon.ports.values())
    rows = [(p, q) for p in ports if p.device for q in p.device.counters()]
    for direction in ("rx", "tx"):
        for name in VQ_COUNTERS:
            metric = f"vhostd_{direction}_{name}_total"
            lines.append(f"# HELP {metric} {HELP[name]} ({direction.upper()}).")
            lines.append(f"# TYPE {metric} counter")
            for p, q in rows:
                if q["dir"] == direction:
                    lines.append(f'{metric}{{port="{_esc(p.name)}",queue="{q["queue_pair"]}"}} {q[name]}')
        metric = f"vhostd_{direction}_burst_size"
        lines.append(f"# HELP {metric} Descriptor chains handled per burst ({direction.upper()}).")
        lines.append(f"# TYPE {metric} histogram")
        for p, q in rows:
            if q["dir"] != direction:
                continue
            cumulative = 0
            labels = f'port="{_esc(p.name)}",queue="{q["queue_pair"]}"'
            for bucket in BATCH_BUCKETS:
                cumulative += q["batch_hist"][bucket]
                upper = "+Inf" if bucket.endswith("+") else bucket.split("-")[-1]
                lines.append(f'{metric}_bucket{{{labels},le="{upper}"}} {cumulative}')
            if not BATCH_BUCKETS[-1].endswith("+"):
                lines.append(f'{metric}_bucket{{{labels},le="+Inf"}} {cumulative}')
            lines.append(f"{metric}_count{{{labels}}} {cumulative}")
    gauges = [
        ("vhostd_port_connected", "1 if a frontend is connected", lambda p: int(p.session is not None)),
        ("vhostd_port_connections_total", "Frontend connections accepted", lambda p: p.connections),
        ("vhostd_port_queue_pairs", "Queue pairs configured", lambda p: p.config.queues),
        ("vhostd_port_queue_pairs_enabled", "Queue pairs the frontend enabled",
         lambda p: p.session.describe()["queue_pairs_enabled"] if p.session else 0),
        ("vhostd_port_memory_bytes", "Guest memory mapped", lambda p: p.device.mem.total_size if p.device else 0),
        ("vhostd_port_request_errors_total", "Frontend requests refused",
         lambda p: p.session.errors if p.session else 0),
    ]
    for metric, help_, fn in gauges:
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines.append(f"# HELP {metric} {help_}.")
        lines.append(f"# TYPE {metric} {kind}")
        for p in ports:
            lines.append(f'{metric}{{port="{_esc(p.name)}"}} {fn(p)}')
    # Per port, serving or failed: a port whose set-up failed (namespace not there
    # yet, TAP busy) has no counters but must still show, with up 0 and failed 1.
    failed = getattr(daemon, "failed", {})
    lines.append("# HELP vhostd_port_up 1 if the port is set up and serving (listening or connecting).")
    lines.append("# TYPE vhostd_port_up gauge")
    lines += [f'vhostd_port_up{{port="{_esc(p.name)}"}} 1' for p in ports]
    lines += [f'vhostd_port_up{{port="{_esc(name)}"}} 0' for name in failed]
    lines.append("# HELP vhostd_port_failed 1 if the port failed (set-up, or a worker that did not stop); "
                 "`vhostctl ports` gives the reason.")
    lines.append("# TYPE vhostd_port_failed gauge")
    lines += [f'vhostd_port_failed{{port="{_esc(p.name)}"}} 0' for p in ports]
    lines += [f'vhostd_port_failed{{port="{_esc(name)}"}} 1' for name in failed]
    lines.append("# HELP vhostd_ports Ports configured.")
    lines.append("# TYPE vhostd_ports gauge")
    lines.append(f"vhostd_ports {len(ports)}")
    lines.append("# HELP vhostd_ports_failed Ports that failed (set-up, or a worker that did not stop).")
    lines.append("# TYPE vhostd_ports_failed gauge")
    lines.append(f"vhostd_ports_failed {len(getattr(daemon, 'failed', {}))}")
    lines.append("# HELP vhostd_stuck_workers_total Ports failed because a queue pair's worker did not stop.")
    lines.append("# TYPE vhostd_stuck_workers_total counter")
    lines.append(f"vhostd_stuck_workers_total {getattr(daemon, 'stuck_workers', 0)}")
    return "\n".join(lines) + "\n"


MAX_CLIENTS = 16          # connections served at once; more are closed at once
REQUEST_DEADLINE_S = 5.0  # the whole request (line and headers) must arrive within this
MAX_HEADER_LINES = 100
MAX_LINE = 8192


class MetricsServer:
    """GET /metrics over HTTP/1.0; anything else 404. One request per connection.

    Bounded for slow or flooding clients: at most MAX_CLIENTS connections at once
    (each holds an fd), one deadline for the whole request, a line length and a
    header count limit."""

    def __init__(self, daemon, listen: str):
        self.daemon = daemon
        self.host, self.port = parse_listen(listen)
        self.server: asyncio.AbstractServer | None = None
        self.active = 0
        self.refused = 0

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_LINE)
        except OSError as exc:
            raise SetupError(f"metrics endpoint {self.host}:{self.port}: {exc.strerror}") from None
        log.info("metrics on %s", listen_url(self.host, self.port))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bytes:
        request = await reader.readline()
        for _ in range(MAX_HEADER_LINES):
            if await reader.readline() in (b"\r\n", b"\n", b""):
                return request  # headers are not needed
        raise ValueError("too many header lines")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CLIENTS:
            self.refused += 1
            writer.close()
            return
        self.active += 1
        try:
            request = await asyncio.wait_for(self._read_request(reader), REQUEST_DEADLINE_S)
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = render(self.daemon).encode(), "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), REQUEST_DEADLINE_S)
        except (asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.active -= 1
            writer.close()
