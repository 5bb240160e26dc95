"""Counter names over the C per-vq counters (struct vr_vq_stats in csrc/vhostd.h).

The datapath increments plain u64 fields with no locks; this module only names
and reads them. Totals carry over from one frontend connection to the next.
"""
from __future__ import annotations

VQ_COUNTERS = (
    "packets",
    "bytes",
    "drop_ring_full",
    "drop_tap_busy",
    "drop_tap_error",
    "drop_bad_desc",
    "drop_bad_hdr",
    "drop_disabled",
    "kicks",
    "calls",
    "calls_suppressed",
)

BATCH_BUCKETS = ("1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128+")


def vq_counters(st) -> dict:
    """A dict of one struct vr_vq_stats (read racily; u64 loads are atomic on our targets)."""
    out = {name: int(getattr(st, name)) for name in VQ_COUNTERS}
    out["batch_hist"] = {b: int(st.batch_hist[i]) for i, b in enumerate(BATCH_BUCKETS)}
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
