"""stats.py: the one counter table names exactly the counters of struct
vr_vq_stats (csrc/vhostd.h), and its users take their names from it."""
from vhostd import stats
from vhostd._native import ffi

NOT_COUNTERS = {"batch_hist", "batch_sum", "broken", "broken_detail"}   # histogram and ring state


def test_counter_table_matches_the_c_struct():
    fields = [name for name, _ in ffi.typeof("struct vr_vq_stats").fields if name not in NOT_COUNTERS]
    assert list(stats.VQ_COUNTERS) == fields


def test_drops_are_the_drop_counters():
    assert stats.DROP_COUNTERS == tuple(n for n in stats.VQ_COUNTERS if n.startswith("drop_"))
    assert all(stats.HELP[n] for n in stats.VQ_COUNTERS)


def test_totals_sum_per_direction():
    row = dict.fromkeys(stats.VQ_COUNTERS, 1)
    t = stats.totals([{**row, "dir": "rx"}, {**row, "dir": "rx"}, {**row, "dir": "tx"}])
    assert t["rx_packets"] == 2 and t["tx_drop_disabled"] == 1
