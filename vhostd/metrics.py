"""The daemon's metrics in Prometheus text format (prometheus_client's exposition,
from a collector that reads the daemon at each scrape), and a small HTTP endpoint
serving it (`--metrics-listen ADDR:PORT`, loopback by default).

Names (docs: README "Metrics"):
- per queue, labels port, queue, direction (rx: to the guest, tx: from it):
  vhostd_packets_total, vhostd_bytes_total, vhostd_kicks_total,
  vhostd_calls_total, vhostd_calls_suppressed_total,
  vhostd_dropped_packets_total (also reason: ring_full, tap_busy, ...), and the
  histogram vhostd_burst_size (descriptor chains per burst);
- per port, label port: vhostd_port_info (tap, netns, mtu, mac, mode, value 1;
  mac is the TAP's address as the kernel reports it at the scrape, "" if the
  TAP cannot be read),
  vhostd_port_up, vhostd_port_failed, vhostd_port_connected,
  vhostd_port_connections_total, vhostd_port_queue_pairs(_enabled),
  vhostd_port_memory_bytes, vhostd_port_request_errors_total,
  vhostd_port_dirty_logging, vhostd_port_dirty_log_pages_total,
  vhostd_port_dirty_log_beyond_total (live migration);
- daemon: vhostd_build_info{version}, vhostd_ports, vhostd_ports_failed,
  vhostd_stuck_workers_total, vhostd_config_last_reload_successful and the
  standard process_* metrics.
Every counter and the histogram carry over across frontend connections
(device.QueuePair): they never go down while the port exists.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from vhostd import __version__
from vhostd import tap as taplib
from vhostd.config import listen_url, parse_listen
from vhostd.errors import SetupError
from vhostd.stats import BATCH_BUCKETS, DROP_COUNTERS, HELP

log = logging.getLogger("vhostd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUEUE_COUNTERS = ("packets", "bytes", "kicks", "calls", "calls_suppressed")  # vhostd_<name>_total
DIRECTION_HELP = "direction rx: to the guest (TAP to guest), tx: from the guest (guest to TAP)"


def _le(bucket: str) -> str:
    """Upper bound of a BATCH_BUCKETS label ("4-7" -> "7", "128+" -> "+Inf")."""
    return "+Inf" if bucket.endswith("+") else bucket.split("-")[-1]


def dirty_log(port) -> dict:
    """Live migration's dirty logging: on while the frontend has LOG_ALL negotiated;
    pages marked (and marks beyond the log's end) for the life of the port."""
    counters = port.device.log_counters() if port.device else {"pages_marked": 0, "marks_beyond_log": 0}
    return {"logging": bool(port.session and port.session.dirty_logging), **counters}


class DaemonCollector:
    """Reads the daemon's ports at each scrape (no state of its own). `macs`: each
    port's TAP address as the kernel reported it for this scrape (kernel_macs)."""

    def __init__(self, daemon, macs: dict[str, str] | None = None):
        self.daemon = daemon
        self.macs = macs or {}

    def collect(self):
        d = self.daemon
        ports = list(d.ports.values())
        failed = getattr(d, "failed", {})
        rows = [(p, q) for p in ports if p.device for q in p.device.counters()]
        labels = ["port", "queue", "direction"]

        for name in QUEUE_COUNTERS:
            fam = CounterMetricFamily(f"vhostd_{name}", f"{HELP[name]}; {DIRECTION_HELP}", labels=labels)
            for p, q in rows:
                fam.add_metric([p.name, str(q["queue_pair"]), q["dir"]], q[name])
            yield fam
        reasons = ", ".join(f"{c.removeprefix('drop_')}: {HELP[c].split(': ', 1)[-1]}" for c in DROP_COUNTERS)
        fam = CounterMetricFamily("vhostd_dropped_packets", f"Frames or chains dropped, by reason ({reasons}); "
                                  f"{DIRECTION_HELP}", labels=[*labels, "reason"])
        for p, q in rows:
            for c in DROP_COUNTERS:
                fam.add_metric([p.name, str(q["queue_pair"]), q["dir"], c.removeprefix("drop_")], q[c])
        yield fam
        fam = HistogramMetricFamily("vhostd_burst_size", f"Descriptor chains handled per burst; {DIRECTION_HELP}",
                                    labels=labels)
        for p, q in rows:
            cumulative, buckets = 0, []
            for b in BATCH_BUCKETS:
                cumulative += q["batch_hist"][b]
                buckets.append((_le(b), cumulative))
            if buckets[-1][0] != "+Inf":
                buckets.append(("+Inf", cumulative))
            fam.add_metric([p.name, str(q["queue_pair"]), q["dir"]], buckets, q["batch_sum"])
        yield fam

        info = GaugeMetricFamily("vhostd_port_info", "A port's settings (value 1)",
                                 labels=["port", "tap", "netns", "mtu", "mac", "mode", "socket"])
        for p in ports:
            c = p.config
            mtu = p.device.mtu if p.device else (c.mtu or "")
            info.add_metric([p.name, c.tap, c.netns or "", str(mtu), self.macs.get(p.name, ""),
                             "client" if c.client else "server", c.socket or f"fd {c.fd}"], 1)
        for name, (c, _why) in failed.items():
            info.add_metric([name, c.tap, c.netns or "", str(c.mtu or ""), self.macs.get(name, ""),
                             "client" if c.client else "server", c.socket or f"fd {c.fd}"], 1)
        yield info
        up = GaugeMetricFamily("vhostd_port_up", "1 if the port is set up and serving (listening or connecting)",
                               labels=["port"])
        down = GaugeMetricFamily("vhostd_port_failed", "1 if the port failed (set-up, or a worker that did not "
                                 "stop); `vhostctl ports` gives the reason", labels=["port"])
        for p in ports:
            up.add_metric([p.name], 1)
            down.add_metric([p.name], 0)
        for name in failed:
            up.add_metric([name], 0)
            down.add_metric([name], 1)
        yield up
        yield down
        per_port = [
            ("vhostd_port_connected", "1 if a frontend is connected", lambda p: int(p.session is not None)),
            ("vhostd_port_connections", "Frontend connections accepted", lambda p: p.connections),
            ("vhostd_port_queue_pairs", "Queue pairs configured", lambda p: p.config.queues),
            ("vhostd_port_queue_pairs_enabled", "Queue pairs the frontend enabled",
             lambda p: p.session.describe()["queue_pairs_enabled"] if p.session else 0),
            ("vhostd_port_memory_bytes", "Guest memory mapped", lambda p: p.device.mem.total_size if p.device else 0),
            ("vhostd_port_request_errors", "Frontend requests refused",
             lambda p: p.session.errors if p.session else 0),
            ("vhostd_port_dirty_logging", "1 while the frontend has dirty logging on (live migration)",
             lambda p: int(dirty_log(p)["logging"])),
            ("vhostd_port_dirty_log_pages", "Guest pages marked in the dirty log (live migration)",
             lambda p: dirty_log(p)["pages_marked"]),
            ("vhostd_port_dirty_log_beyond", "Dirty log marks beyond the log's end (the frontend's log too small)",
             lambda p: dirty_log(p)["marks_beyond_log"]),
        ]
        counters = ("vhostd_port_connections", "vhostd_port_request_errors", "vhostd_port_dirty_log_pages",
                    "vhostd_port_dirty_log_beyond")
        for metric, help_, fn in per_port:
            kind = CounterMetricFamily if metric in counters else GaugeMetricFamily
            fam = kind(metric, help_, labels=["port"])
            for p in ports:
                fam.add_metric([p.name], fn(p))
            yield fam

        yield GaugeMetricFamily("vhostd_ports", "Ports serving", value=len(ports))
        yield GaugeMetricFamily("vhostd_ports_failed", "Ports that failed (set-up, or a worker that did not stop)",
                                value=len(failed))
        yield CounterMetricFamily("vhostd_stuck_workers", "Ports failed because a queue pair's worker did not stop",
                                  value=getattr(d, "stuck_workers", 0))
        ok = getattr(d, "last_reload_ok", None)
        if ok is not None:
            yield GaugeMetricFamily("vhostd_config_last_reload_successful",
                                    "1 if the last config reload succeeded (every port set up), 0 if not",
                                    value=int(ok))
        build = GaugeMetricFamily("vhostd_build_info", "vhostd's version (value 1)", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


def registry(daemon, macs: dict[str, str] | None = None) -> CollectorRegistry:
    """The daemon's collector and the standard process metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(daemon, macs))
    ProcessCollector(registry=reg)
    return reg


def kernel_macs(taps: list[tuple[str, str, str | None]]) -> dict[str, str]:
    """(port, tap, netns) -> the TAP's MAC as the kernel reports it now: the address
    the host side really uses (a configured --mac, or the kernel's random one, or
    one an operator set with `ip link` since), not the configuration. "" when the
    TAP cannot be read (a failed port's TAP may not exist). Blocking netlink: run
    it in a thread (render_async)."""
    out = {}
    for port, tap, netns in taps:
        try:
            out[port] = taplib.link_info(tap, netns)["mac"] or ""
        except (SetupError, OSError):
            out[port] = ""
    return out


def render(daemon, macs: dict[str, str] | None = None) -> str:
    """Prometheus text format 0.0.4 (a registry per scrape: it holds no state)."""
    return generate_latest(registry(daemon, macs)).decode()


async def render_async(daemon) -> str:
    """render() with the TAPs' MACs read from the kernel first, off the event loop."""
    taps = [(p.name, p.config.tap, p.config.netns) for p in daemon.ports.values()]
    taps += [(name, c.tap, c.netns) for name, (c, _why) in getattr(daemon, "failed", {}).items()]
    return render(daemon, await asyncio.to_thread(kernel_macs, taps))


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
                body, status = (await render_async(self.daemon)).encode(), "200 OK"
                ctype = CONTENT_TYPE
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
