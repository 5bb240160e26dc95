"""The per-vq counters: the one table of their names, help texts and which count
drops, over the C counters (struct vr_vq_stats in csrc/vhostd.h).

The datapath increments plain u64 fields with no locks; this module only names
and reads them. vhostctl (ctl.py), the Prometheus exposition (metrics.py) and the
port's drop summary (port.py) all take the names from COUNTERS. A new counter: a
field in struct vr_vq_stats, a row here (tests/test_stats.py checks they agree).
The one other list is C's own: worker.c's vr_work_count sums the counters that
mean "a burst found work" for busy polling.
Totals carry over from one frontend connection to the next (device.QueuePair).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counter:
    name: str   # the struct vr_vq_stats field, and the key in every report
    help: str   # one line, for the metrics' HELP
    drop: bool = False  # a frame or chain lost: summed as drops, summarized in the log


COUNTERS = (
    Counter("packets", "Frames moved through the queue"),
    Counter("bytes", "Frame bytes moved through the queue (vnet header excluded)"),
    Counter("drop_ring_full", "Frames dropped: no guest buffer large enough", drop=True),
    Counter("drop_tap_busy", "Frames dropped: TAP write would block", drop=True),
    Counter("drop_tap_error", "Frames dropped: TAP write failed", drop=True),
    Counter("drop_bad_desc", "Descriptor chains rejected as malformed", drop=True),
    Counter("drop_bad_hdr", "Frames dropped: invalid virtio-net header", drop=True),
    Counter("drop_disabled", "Frames dropped: ring started but disabled", drop=True),
    Counter("kicks", "Guest notifications (kicks) received"),
    Counter("calls", "Guest interrupts (calls) sent"),
    Counter("calls_suppressed", "Guest interrupts skipped because the guest suppressed them"),
)

VQ_COUNTERS = tuple(c.name for c in COUNTERS)
DROP_COUNTERS = tuple(c.name for c in COUNTERS if c.drop)
HELP = {c.name: c.help for c in COUNTERS}

BATCH_BUCKETS = ("1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128+")


def vq_counters(st) -> dict:
    """A dict of one struct vr_vq_stats (read racily; u64 loads are atomic on our targets)."""
    out = {name: int(getattr(st, name)) for name in VQ_COUNTERS}
    out["batch_hist"] = {b: int(st.batch_hist[i]) for i, b in enumerate(BATCH_BUCKETS)}
    out["batch_sum"] = int(st.batch_sum)
    out["broken"] = int(st.broken)
    return out


def totals(rows: list[dict]) -> dict:
    """Sums per-vq rows into per-direction totals (rx_packets, tx_bytes, ...)."""
    out: dict = {}
    for row in rows:
        for name in VQ_COUNTERS:
            key = f"{row['dir']}_{name}"
            out[key] = out.get(key, 0) + row[name]
    return out
