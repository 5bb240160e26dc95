"""A deterministic all-pairs (pairwise) covering set over boolean options: every
value pair of every two options appears in at least one row.

Base: the Kleitman-Spencer construction. With n rows, row 0 all off and each
option's column in rows 1..n-1 a distinct subset of size ceil(n/2) (any two such
subsets intersect, neither contains the other), every pair of options shows
off/off, on/on, on/off and off/on; n = 7 covers up to 15 options. Rows `allowed`
rejects are dropped, and greedy rows (started from the first uncovered pair,
completed with the value covering most uncovered pairs) fill what they covered;
pairs no allowed row can hold are reported."""
from __future__ import annotations

from itertools import combinations, product
from typing import Callable


def all_pairs(names: list[str], allowed: Callable[[dict[str, bool]], bool] = lambda row: True
              ) -> tuple[list[dict[str, bool]], set]:
    """(rows, pairs left uncovered because every row holding them is not allowed)."""
    todo = {((a, va), (b, vb)) for a, b in combinations(names, 2) for va, vb in product((False, True), repeat=2)}
    rows: list[dict[str, bool]] = []
    impossible: set = set()
    n = 2
    while len(list(combinations(range(n - 1), -(-n // 2)))) < len(names):
        n += 1
    subsets = list(combinations(range(1, n), -(-n // 2)))
    for r in range(n):
        row = {name: r in subsets[i] for i, name in enumerate(names)}
        if allowed(row):
            rows.append(row)
            todo -= {((x, row[x]), (y, row[y])) for x, y in combinations(names, 2)}
    while todo - impossible:
        (a, va), (b, vb) = min(todo - impossible)
        row = {a: va, b: vb}
        for n in names:
            if n in row:
                continue
            def gain(v: bool) -> int:
                return sum(1 for m, vm in row.items()
                           if (((m, vm), (n, v)) if names.index(m) < names.index(n) else ((n, v), (m, vm))) in todo)
            row[n] = max((True, False), key=gain)
        row = {n: row[n] for n in names}
        if not allowed(row):
            impossible.add(((a, va), (b, vb)))
            continue
        rows.append(row)
        todo -= {((x, row[x]), (y, row[y])) for x, y in combinations(names, 2)}
    return rows, impossible
