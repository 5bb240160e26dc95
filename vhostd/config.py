"""Port configuration: the command line's single port, or a TOML file of many.

    control = "/run/vhostd/control.sock"     # optional
    metrics_listen = "127.0.0.1:9712"         # optional Prometheus endpoint
    socket_dirs = ["/run/vms"]                # optional: where add-port may create sockets
    socket_owner = "root"                     # optional: owner, group and mode of the
    socket_group = "kvm"                      #   sockets vhostd creates (vhost-user and
    socket_mode = "0660"                      #   control); default: ours, ours, 0660

    [[port]]
    name = "vm1"                              # optional, defaults to the TAP name
    socket = "/run/vhostd/vm1.sock"
    tap = "vm1"
    netns = "tenant1"                         # optional
    mac = "02:00:00:00:00:01"                 # optional, host-side TAP MAC
    mtu = 1500                                # optional
    queues = 1                                # optional, 1..16
    client = false                            # optional: connect to QEMU's server=on socket
    remove_tap = false                        # optional: delete the TAP on a clean stop or
                                              #   del-port if vhostd created it
    socket_owner / socket_group / socket_mode # optional: this port's socket (default: the
                                              #   top-level keys)
    busy_poll_us = 0                          # optional: busy-poll window after traffic, 0 = off
    cpu_affinity = [2, 3]                     # optional: CPU of queue pair 0, 1, ... (round robin)
    tap_io = "auto"                           # optional: "auto" (io_uring where it works) or "syscall"
    tx_copy_max = 512                         # optional: TX frames up to this size are copied (0..512)

Every error names the file, the port and the key, in one line.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field, replace

from vhostd.errors import SetupError
from vhostd.tap import check_name

MAX_QUEUE_PAIRS = 16
MIN_MTU = 68        # IPv4's minimum
MAX_TAP_MTU = 65521  # Linux tun: 65535 - the largest header a TAP may prepend
DEFAULT_SOCKET_MODE = 0o660
MAX_BUSY_POLL_US = 1_000_000  # csrc/vhostd.h VR_MAX_BUSY_POLL_US
TX_COPY_LIMIT = 512  # csrc/vhostd.h VR_TX_COPY_LIMIT
TAP_IO_MODES = ("auto", "syscall")
RUNTIME_DIR = "/run/vhostd"
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
    remove_tap: bool = False  # clean stop / del-port deletes the TAP if vhostd created it
    socket_uid: int | None = None  # owner of the socket vhostd binds (None: ours)
    socket_gid: int | None = None  # group of it (None: our primary group)
    socket_mode: int = DEFAULT_SOCKET_MODE
    busy_poll_us: int = 0  # busy-poll window of each worker after traffic (0: sleep at once)
    cpu_affinity: tuple[int, ...] = ()  # queue pair i's worker runs on cpu_affinity[i % len]
    tap_io: str = "auto"  # "auto": TX bursts through io_uring where it works; "syscall": one per frame
    tx_copy_max: int = TX_COPY_LIMIT  # TX frames (vnet header included) up to this size are copied

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.tap)


@dataclass
class DaemonConfig:
    ports: list[PortConfig] = field(default_factory=list)
    control: str | None = None
    control_mode: int = DEFAULT_SOCKET_MODE
    control_uid: int | None = None
    control_gid: int | None = None
    metrics_listen: str | None = None
    # socket_uid/socket_gid/socket_mode for ports without their own (add-port too)
    socket_defaults: dict = field(default_factory=dict)
    # directories (besides RUNTIME_DIR, the control socket's and the configured
    # ports') where `vhostctl add-port` may have the daemon create sockets
    socket_dirs: list[str] = field(default_factory=list)


def parse_owner(value, what: str = "socket owner") -> int:
    """A user name or a numeric uid."""
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.isdigit():
        uid = int(value)
        if not 0 <= uid < 2**32 - 1:
            raise SetupError(f"{what} {value} is not a valid uid")
        return uid
    if not isinstance(value, str) or not value:
        raise SetupError(f"{what} must be a user name or uid")
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise SetupError(f"{what}: unknown user {value!r}") from None


def parse_group(value, what: str = "socket group") -> int:
    """A group name or a numeric gid."""
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.isdigit():
        gid = int(value)
        if not 0 <= gid < 2**32 - 1:
            raise SetupError(f"{what} {value} is not a valid gid")
        return gid
    if not isinstance(value, str) or not value:
        raise SetupError(f"{what} must be a group name or gid")
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise SetupError(f"{what}: unknown group {value!r}") from None


def parse_mode(value, what: str = "socket mode") -> int:
    """Permission bits: an octal string ("0660", "660", "0o660") or an integer (TOML 0o660)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value):
        mode = int(value.removeprefix("0o"), 8)
    else:
        raise SetupError(f"{what} {value!r} is not an octal permission mode (e.g. 0660)")
    if not 0 <= mode <= 0o777:
        raise SetupError(f"{what} {mode:#o} is not a permission mode (0..0777, no setuid/sticky bits)")
    return mode


def socket_access(d: dict, where: str = "") -> dict:
    """socket_owner/socket_group/socket_mode keys -> PortConfig's socket_uid/socket_gid/socket_mode."""
    at = f"{where}: " if where else ""
    out: dict = {}
    if "socket_owner" in d:
        out["socket_uid"] = parse_owner(d["socket_owner"], f"{at}socket_owner")
    if "socket_group" in d:
        out["socket_gid"] = parse_group(d["socket_group"], f"{at}socket_group")
    if "socket_mode" in d:
        out["socket_mode"] = parse_mode(d["socket_mode"], f"{at}socket_mode")
    return out


def check_port(p: PortConfig, where: str = "") -> PortConfig:
    """Value checks shared by the command line, the config file and add-port."""
    at = f"{where}: " if where else ""
    if not _NAME.match(p.name):
        raise SetupError(f"{at}port name {p.name!r} is invalid (letters, digits, _.:@-)")
    check_name(p.tap)
    if not p.socket and p.fd is None:
        raise SetupError(f"{at}a socket path is required")
    if not 1 <= p.queues <= MAX_QUEUE_PAIRS:
        raise SetupError(f"{at}queues {p.queues} out of range (1..{MAX_QUEUE_PAIRS})")
    if p.mtu is not None and not MIN_MTU <= p.mtu <= MAX_TAP_MTU:
        raise SetupError(f"{at}mtu {p.mtu} out of range ({MIN_MTU}..{MAX_TAP_MTU}, a TAP's limits)")
    if p.mac is not None:
        p = replace(p, mac=check_mac(p.mac, f"{at}mac"))
    if not 0 <= p.busy_poll_us <= MAX_BUSY_POLL_US:
        raise SetupError(f"{at}busy_poll_us {p.busy_poll_us} out of range (0..{MAX_BUSY_POLL_US})")
    if p.tap_io not in TAP_IO_MODES:
        raise SetupError(f"{at}tap_io {p.tap_io!r} is not one of {', '.join(TAP_IO_MODES)}")
    if not 0 <= p.tx_copy_max <= TX_COPY_LIMIT:
        raise SetupError(f"{at}tx_copy_max {p.tx_copy_max} out of range (0..{TX_COPY_LIMIT})")
    if p.cpu_affinity:
        usable = os.sched_getaffinity(0)
        for cpu in p.cpu_affinity:
            if cpu not in usable:
                raise SetupError(f"{at}cpu_affinity: CPU {cpu} is not available to vhostd "
                                 f"(usable: {format_cpus(usable)})")
        if len(set(p.cpu_affinity)) != len(p.cpu_affinity):
            raise SetupError(f"{at}cpu_affinity lists a CPU twice")
    return p


def check_mac(text: str, what: str = "mac") -> str:
    """A unicast, non-zero MAC address in xx:xx:xx:xx:xx:xx form, lower case."""
    if not _MAC.match(text):
        raise SetupError(f"{what} {text!r} is not xx:xx:xx:xx:xx:xx")
    octets = bytes.fromhex(text.replace(":", ""))
    if octets[0] & 1:
        raise SetupError(f"{what} {text} is a multicast address (the first octet is odd): use a unicast one, "
                         "e.g. 02:00:00:00:00:01")
    if not any(octets):
        raise SetupError(f"{what} {text} is all zeros")
    return text.lower()


def format_cpus(cpus) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_cpus(text: str) -> tuple[int, ...]:
    """'2,3' or '0-3,6' -> a tuple of CPU numbers, in the order given."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise SetupError(f"cpu_affinity {text!r} is not a CPU list like 2,3 or 0-3") from None
        if a < 0 or b < a:
            raise SetupError(f"cpu_affinity {text!r} is not a CPU list like 2,3 or 0-3")
        cpus.extend(range(a, b + 1))
    return tuple(cpus)


_PORT_KEYS = {"name": str, "socket": str, "tap": str, "netns": str, "mac": str, "mtu": int, "queues": int,
              "client": bool, "remove_tap": bool, "busy_poll_us": int, "cpu_affinity": list, "tap_io": str,
              "tx_copy_max": int}
_ACCESS_KEYS = ("socket_owner", "socket_group", "socket_mode")


def port_from_dict(d: dict, where: str, defaults: dict | None = None) -> PortConfig:
    """A port from a config table or add-port; `defaults` are resolved socket_* fields."""
    unknown = set(d) - set(_PORT_KEYS) - set(_ACCESS_KEYS)
    if unknown:
        raise SetupError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                         f"(known: {', '.join([*_PORT_KEYS, *_ACCESS_KEYS])})")
    for key, kind in _PORT_KEYS.items():
        if key in d and (type(d[key]) is not kind):
            raise SetupError(f"{where}: {key} must be a {kind.__name__}")
    for key in ("socket", "tap"):
        if key not in d:
            raise SetupError(f"{where}: {key} is required")
    fields = {k: v for k, v in d.items() if k in _PORT_KEYS}
    if "cpu_affinity" in fields:
        cpus = fields["cpu_affinity"]
        if not cpus or any(type(c) is not int or c < 0 for c in cpus):
            raise SetupError(f"{where}: cpu_affinity must be a non-empty list of CPU numbers, e.g. [2, 3]")
        fields["cpu_affinity"] = tuple(cpus)
    fields.update(defaults or {})
    fields.update(socket_access(d, where))
    return check_port(PortConfig(**fields), where)


def load_config(path: str, errors: list[str] | None = None) -> DaemonConfig:
    """The daemon configuration in a TOML file. Raises SetupError at the first error;
    with `errors` (vhostd --check-config) a port's error is appended there and the
    other ports are still checked (an error in the file's structure still raises)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SetupError(f"config file {path} not found") from None
    except PermissionError:
        raise SetupError(f"no permission to read config file {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"config file {path}: {exc}") from None
    unknown = set(data) - {"port", "control", "metrics_listen", "socket_dirs", *_ACCESS_KEYS}
    if unknown:
        raise SetupError(f"config file {path}: unknown key {sorted(unknown)[0]!r}")
    cfg = DaemonConfig(control=data.get("control"), metrics_listen=data.get("metrics_listen"))
    dirs = data.get("socket_dirs", [])
    if not isinstance(dirs, list) or any(not isinstance(d, str) or not os.path.isabs(d) for d in dirs):
        raise SetupError(f"config file {path}: socket_dirs must be a list of absolute directory paths")
    cfg.socket_dirs = list(dirs)
    cfg.socket_defaults = socket_access(data, f"config file {path}")
    apply_control_access(cfg)
    ports = data.get("port", [])
    if not isinstance(ports, list):
        raise SetupError(f"config file {path}: use [[port]] tables for ports")
    seen: dict[str, str] = {}
    for i, d in enumerate(ports, 1):
        if not isinstance(d, dict):
            raise SetupError(f"config file {path}: use [[port]] tables for ports")
        where = f"config file {path}: port {d.get('name') or d.get('tap') or i}"
        try:
            p = port_from_dict(d, where, cfg.socket_defaults)
            for kind, value in (("name", p.name), ("socket", p.socket), ("tap", f"{p.netns}/{p.tap}")):
                key = f"{kind}:{value}"
                if key in seen:
                    raise SetupError(f"{where}: {kind} {value!r} is already used by port {seen[key]}")
            for kind, value in (("name", p.name), ("socket", p.socket), ("tap", f"{p.netns}/{p.tap}")):
                seen[f"{kind}:{value}"] = p.name
        except SetupError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
            continue
        cfg.ports.append(p)
    if cfg.metrics_listen is not None:
        try:
            parse_listen(cfg.metrics_listen)
        except SetupError as exc:
            if errors is None:
                raise
            errors.append(f"config file {path}: {exc}")
    return cfg


def check_config(path: str) -> list[str]:
    """Every error `vhostd --config path` would stop at, one line each ([] if none)."""
    errors: list[str] = []
    try:
        load_config(path, errors)
    except SetupError as exc:
        errors.append(str(exc))
    return errors


def apply_control_access(cfg: DaemonConfig) -> None:
    """The control socket gets the daemon-wide socket owner, group and mode."""
    d = cfg.socket_defaults
    cfg.control_uid = d.get("socket_uid")
    cfg.control_gid = d.get("socket_gid")
    cfg.control_mode = d.get("socket_mode", DEFAULT_SOCKET_MODE)


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT (IPv6 as [ADDR]:PORT)."""
    m = re.match(r"^(\[[^\]]*\]|[^\[\]:]*):(\d+)$", text)
    if not m:
        raise SetupError(f"metrics listen address {text!r} is not ADDR:PORT (IPv6: [ADDR]:PORT)")
    if not 0 < int(m.group(2)) < 65536:
        raise SetupError(f"metrics listen address {text!r}: port {m.group(2)} out of range (1..65535)")
    return m.group(1).strip("[]") or "127.0.0.1", int(m.group(2))


def listen_url(host: str, port: int, path: str = "/metrics") -> str:
    """http://HOST:PORT/path, an IPv6 host in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
