"""Port configuration: the command line's single port, or a TOML file of many.

    control = "/run/vhostd/control.sock"     # optional
    metrics_listen = "127.0.0.1:9712"         # optional Prometheus endpoint

    [[port]]
    name = "vm1"                              # optional, defaults to the TAP name
    socket = "/run/vhostd/vm1.sock"
    tap = "vm1"
    netns = "tenant1"                         # optional
    mac = "02:00:00:00:00:01"                 # optional, host-side TAP MAC
    mtu = 1500                                # optional
    queues = 1                                # optional, 1..16
    client = false                            # optional: connect to QEMU's server=on socket

Every error names the file, the port and the key, in one line.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace

from vhostd.errors import SetupError

MAX_QUEUE_PAIRS = 16
DEFAULT_CONTROL_PATH = "/run/vhostd/control.sock"
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


@dataclass(frozen=True)
class PortConfig:
    socket: str
    tap: str
    netns: str | None = None
    mac: str | None = None
    mtu: int | None = None
    queues: int = 1
    client: bool = False
    name: str = ""
    fd: int | None = None  # an inherited listening socket (--fd), instead of binding `socket`

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.tap)


@dataclass
class DaemonConfig:
    ports: list[PortConfig] = field(default_factory=list)
    control: str | None = None
    control_mode: int = 0o660
    metrics_listen: str | None = None


def check_port(p: PortConfig, where: str = "") -> PortConfig:
    """Value checks shared by the command line, the config file and add-port."""
    at = f"{where}: " if where else ""
    if not _NAME.match(p.name):
        raise SetupError(f"{at}port name {p.name!r} is invalid (letters, digits, _.:@-)")
    if not p.socket and p.fd is None:
        raise SetupError(f"{at}a socket path is required")
    if not 1 <= p.queues <= MAX_QUEUE_PAIRS:
        raise SetupError(f"{at}queues {p.queues} out of range (1..{MAX_QUEUE_PAIRS})")
    if p.mtu is not None and not 68 <= p.mtu <= 65535:
        raise SetupError(f"{at}mtu {p.mtu} out of range (68..65535)")
    if p.mac is not None and not _MAC.match(p.mac):
        raise SetupError(f"{at}mac {p.mac!r} is not xx:xx:xx:xx:xx:xx")
    if p.mac is not None:
        p = replace(p, mac=p.mac.lower())
    return p


_PORT_KEYS = {"name": str, "socket": str, "tap": str, "netns": str, "mac": str, "mtu": int, "queues": int,
              "client": bool}


def port_from_dict(d: dict, where: str) -> PortConfig:
    unknown = set(d) - set(_PORT_KEYS)
    if unknown:
        raise SetupError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(_PORT_KEYS)})")
    for key, kind in _PORT_KEYS.items():
        if key in d and (type(d[key]) is not kind):
            raise SetupError(f"{where}: {key} must be a {kind.__name__}")
    for key in ("socket", "tap"):
        if key not in d:
            raise SetupError(f"{where}: {key} is required")
    return check_port(PortConfig(**d), where)


def load_config(path: str) -> DaemonConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SetupError(f"config file {path} not found") from None
    except PermissionError:
        raise SetupError(f"no permission to read config file {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"config file {path}: {exc}") from None
    unknown = set(data) - {"port", "control", "metrics_listen"}
    if unknown:
        raise SetupError(f"config file {path}: unknown key {sorted(unknown)[0]!r}")
    cfg = DaemonConfig(control=data.get("control"), metrics_listen=data.get("metrics_listen"))
    ports = data.get("port", [])
    if not isinstance(ports, list):
        raise SetupError(f"config file {path}: use [[port]] tables for ports")
    seen: dict[str, str] = {}
    for i, d in enumerate(ports, 1):
        where = f"config file {path}: port {d.get('name') or d.get('tap') or i}"
        p = port_from_dict(d, where)
        for kind, value in (("name", p.name), ("socket", p.socket), ("tap", f"{p.netns}/{p.tap}")):
            key = f"{kind}:{value}"
            if key in seen:
                raise SetupError(f"{where}: {kind} {value!r} is already used by port {seen[key]}")
            seen[key] = p.name
        cfg.ports.append(p)
    if cfg.metrics_listen is not None:
        parse_listen(cfg.metrics_listen)
    return cfg


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT (IPv6 as [ADDR]:PORT)."""
    m = re.match(r"^\[?([^\]]*)\]?:(\d+)$", text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise SetupError(f"metrics listen address {text!r} is not ADDR:PORT")
    return m.group(1) or "127.0.0.1", int(m.group(2))
