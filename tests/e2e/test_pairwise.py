"""The all-pairs generator the guest option matrix uses covers every pair."""
from itertools import combinations, product

from tests.e2e.pairwise import all_pairs

OPTIONS = ["csum", "guest_csum", "host_tso4", "host_tso6", "guest_tso4", "guest_tso6", "guest_ecn",
           "host_ecn", "guest_ufo", "host_ufo", "mrg_rxbuf", "event_idx", "indirect_desc", "packed"]


def test_every_pair_covered_in_few_rows():
    rows, impossible = all_pairs(OPTIONS)
    assert not impossible
    for a, b in combinations(OPTIONS, 2):
        for va, vb in product((False, True), repeat=2):
            assert any(r[a] == va and r[b] == vb for r in rows), (a, va, b, vb)
    assert len(rows) == 7  # 7 rows cover up to 15 boolean options
    assert rows == all_pairs(OPTIONS)[0]  # deterministic


def test_rejected_rows_are_not_emitted():
    rows, impossible = all_pairs(["a", "b", "c"], allowed=lambda r: not (r["a"] and not r["b"]))
    assert all(not (r["a"] and not r["b"]) for r in rows)
    assert ((("a", True), ("b", False))) in impossible
