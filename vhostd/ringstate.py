"""A diagnostic snapshot of each vring: what the device holds, what guest memory
says, and what is pending in the kick and call eventfds (`vhostctl rings`).

Reading a stuck queue (the hints spell these out):
- TX: guest avail ahead of the device's last_avail, and a kick pending in the
  kick eventfd: the worker is not reading its kicks;
- TX: guest avail ahead, no kick pending, device not asking for one (split: used
  flags NO_NOTIFY, or avail_event behind; packed: device event DISABLE): a lost
  notification request on our side;
- RX: buffers available (that is normal) but the TAP not watched;
- the device's used ahead of the guest's used_event, and a call pending in the
  call eventfd: the frontend is not reading its calls;
- everything consumed and nothing pending: the guest has stopped adding buffers.

Nothing here pauses the worker (a stuck one must not hang the command), so a
snapshot of a running ring can be a burst stale. Guest memory is read with
pread from the region files, never through the mapping.
"""
from __future__ import annotations

import struct

from vhostd.fds import eventfd_count
from vhostd.native import BROKEN_REASONS, ffi, lib
from vhostd.virtio_net import F_EVENT_IDX

VRING_USED_F_NO_NOTIFY = 1                          # virtio 1.1 §2.6.7 (not in the cdef)
PACKED_EVENT_FLAGS = {0: "enable", 1: "disable", 2: "desc"}


def _u16s(mem, uva: int, count: int) -> tuple[int, ...] | None:
    data = mem.pread(uva, 2 * count)
    return struct.unpack(f"<{count}H", data) if data is not None else None


def _split_guest(mem, v) -> dict:
    """avail flags/idx, used_event; used flags/idx, avail_event (virtio 1.1 §2.6)."""
    a, u, n = v.addr.avail, v.addr.used, v.num
    out: dict = {}
    avail = _u16s(mem, a, 2)
    used = _u16s(mem, u, 2)
    used_event = _u16s(mem, a + 4 + 2 * n, 1)
    avail_event = _u16s(mem, u + 4 + 8 * n, 1)
    if avail:
        out["avail_flags"], out["avail_idx"] = avail
    if used:
        out["used_flags"], out["used_idx"] = used
    if used_event:
        out["used_event"] = used_event[0]
    if avail_event:
        out["avail_event"] = avail_event[0]
    return out


def _packed_guest(mem, v, last_avail: int) -> dict:
    """Flags of the descriptor at the device's next avail slot; both event areas (§2.7)."""
    out: dict = {}
    slot = last_avail & 0x7FFF
    if slot < v.num:
        flags = _u16s(mem, v.addr.desc + 16 * slot + 14, 1)
        if flags:
            out["next_desc_flags"] = flags[0]
    for key, uva in (("driver_event", v.addr.avail), ("device_event", v.addr.used)):
        ev = _u16s(mem, uva, 2)
        if ev:
            out[key] = {"off_wrap": ev[0], "flags": PACKED_EVENT_FLAGS.get(ev[1], ev[1])}
    return out


PACKED_F_AVAIL, PACKED_F_USED = 1 << 7, 1 << 15


def _waiting_and_asks(row: dict) -> tuple[int | None, bool]:
    """(chains available past the device's position, the device asks for a kick
    there). Packed rings tell only whether one chain is there (0 or 1)."""
    g, d = row.get("guest", {}), row["device"]
    if row["layout"] == "split":
        if "avail_idx" not in g:
            return None, True
        waiting = (g["avail_idx"] - d["last_avail"]) & 0xFFFF
        asks = (g.get("avail_event") == d["last_avail"] if row["event_idx"]
                else not g.get("used_flags", 0) & VRING_USED_F_NO_NOTIFY)
        return waiting, asks
    if "next_desc_flags" not in g:
        return None, True
    wrap, flags = bool(d["last_avail"] >> 15), g["next_desc_flags"]
    waiting = int(bool(flags & PACKED_F_AVAIL) == wrap and bool(flags & PACKED_F_USED) != wrap)
    ev = g.get("device_event", {})
    asks = ev.get("flags") == "enable" or (ev.get("flags") == "desc" and ev.get("off_wrap") == d["last_avail"])
    return waiting, asks


def _hints(row: dict) -> list[str]:
    g, d = row.get("guest", {}), row["device"]
    if not row["ready"]:
        return ["not serviced (not started, not mapped, or broken)"]
    hints = []
    waiting, asks = _waiting_and_asks(row)
    if waiting is not None:
        if row["dir"] == "tx" and waiting:
            what = f"{waiting} chain(s)" if row["layout"] == "split" else "a chain (or more)"
            hints.append(f"{what} available that the device has not taken")
            if row["kick_pending"]:
                hints.append("a kick is pending that the worker has not read")
            elif not asks:
                hints.append("the device has not asked for a kick at its position")
        elif row["dir"] == "rx" and not waiting:
            hints.append("no receive buffers: frames wait in the TAP")
            if not asks:
                hints.append("the device has not asked for a kick when buffers come")
        elif row["dir"] == "rx" and not row["tap_watched"] and not row["tap_dead"]:
            hints.append("receive buffers available but the worker is not watching the TAP")
        if g.get("used_idx") is not None and g["used_idx"] != d.get("published_used"):
            hints.append("used idx in guest memory differs from the device's")
    if row["call_pending"]:
        hints.append("a call is pending that the frontend has not read")
    return hints


def vring_state(session, device, v) -> dict:
    """One vring of a connected port, as a JSON-able dict."""
    qp = device.qps[v.qp]
    st = ffi.new("struct vr_vq_state *")
    lib.vr_qp_vq_state(qp.ptr, v.which, st)
    packed = session.packed
    stats = lib.vr_qp_stats(qp.ptr, v.which)
    row: dict = {
        "vring": v.index,
        "dir": "rx" if v.which == 0 else "tx",
        "queue_pair": v.qp,
        "layout": "packed" if packed else "split",
        "event_idx": bool(session.features & (1 << F_EVENT_IDX)),
        "num": v.num,
        "started": v.started,
        "enabled": v.enabled,
        "ready": bool(st.ready),
        "broken": BROKEN_REASONS.get(stats.broken, stats.broken) if stats.broken else None,
        "device": {
            "last_avail": st.last_avail,
            "used": st.used,
            **({"device_event_flags": PACKED_EVENT_FLAGS.get(st.device_event_flags, st.device_event_flags)}
               if packed else {"published_used": st.published_used,
                               "signalled_used": st.signalled_used if st.signalled_valid else None}),
        },
        "kick_pending": eventfd_count(v.kick.fd) if v.kick is not None else None,
        "call_pending": eventfd_count(v.call.fd) if v.call is not None else None,
        "kick_watched": bool(st.kick_watched),
        "tap_watched": bool(st.tap_watched),
        "tap_dead": bool(st.tap_dead),
        "idle_waits": int(st.idle_waits),
    }
    if v.addr is not None and v.num:
        row["guest"] = _packed_guest(device.mem, v, st.last_avail) if packed else _split_guest(device.mem, v)
    row["hints"] = _hints(row)
    return row


def port_rings(port) -> dict:
    """Every vring of a port; an empty list while no frontend is connected."""
    session, device = port.session, port.device
    rings = []
    if session is not None and device is not None:
        rings = [vring_state(session, device, v) for v in session.vrings if v.num or v.started]
    return {"port": port.name, "connected": session is not None, "rings": rings}
