"""The benchmark harness (bench/run.py) works: `--quick` runs every kind of
point once — guest->TAP and TAP->guest with vhostd, DPDK's vhost+TAP forwarder and
the raw TAP loop at 1 and 2 queue pairs, 64 KB GSO, round-trip latency — and
produces a complete JSON document, a valid PNG and a results section that
--update-doc splices into a copy of docs/benchmarks.md.

Structure only: every planned point is present with numbers > 0. No timing or
ratio is asserted (the CI machine is shared and noisy). The quick figures are
printed (`pytest -s` shows them). Needs root, 2 CPUs, gcc and dpdk-testpmd.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "run.py"
BEGIN = "<!-- bench:results:begin"
END = "<!-- bench:results:end -->"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP devices)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    for tool in ("dpdk-testpmd", "gcc", "stdbuf", "taskset"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    tmp = tmp_path_factory.mktemp("bench")
    doc = tmp / "benchmarks.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", doc)
    out_json, png = tmp / "quick.json", tmp / "quick.png"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out_json), "--plot", str(png),
                        "--update-doc", "--doc", str(doc)],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    wall = time.monotonic() - t0
    print(f"\n--- bench/run.py --quick ({wall:.0f} s, exit {r.returncode}) ---\n{r.stdout}")
    assert r.returncode == 0, f"bench/run.py --quick exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    with open(out_json) as f:
        data = json.load(f)
    return {"json": data, "png": png, "doc": doc, "stdout": r.stdout}


def test_every_planned_point_has_positive_numbers(quick):
    data = quick["json"]
    plan = data["config"]["plan"]
    assert {p[0] for p in plan} == {"tx", "gso", "rx", "lat"}
    assert {p[3] for p in plan} == {"vhostd", "dpdk", "raw"}
    assert {p[2] for p in plan} == {1, 2}
    assert data["failures"] == []
    runs = {(r["dir"], r["size"], r["queues"], r["backend"]): r for r in data["runs"]}
    for kind, size, queues, who in plan:
        r = runs.get((kind, size, queues, who))
        assert r is not None, f"point {kind} {size} q{queues} {who} missing"
        if kind == "lat":
            assert r["n"] > 0 and 0 < r["min_us"] <= r["p50_us"] <= r["p99_us"], r
            continue
        assert r["packets"] > 0 and r["pps"] > 0 and r["gbps"] > 0 and r["seconds"] > 0, r
        assert r["cpu"]["backend"] > 0 and r["cpu_s_per_mpkt"]["backend"] > 0, r
        roles = {"tx": {"gen"}, "gso": {"gen"}, "rx": {"sink", "src"}}[kind] if who != "raw" else \
            ({"src"} if kind == "rx" else set())
        for role in roles:
            assert r["cpu_s_per_mpkt"][role] is not None, (role, r)
            # vufront gso sleeps in read() between ~100 wake-ups a second: over a quick
            # 1 s window it can stay under one clock tick (10 ms) of CPU, read as 0.
            floor = 0 if (kind, role) == ("gso", "gen") else 1e-12
            assert r["cpu_s_per_mpkt"][role] >= floor, (role, r)


def test_summary_has_ratios_and_latency(quick):
    s = quick["json"]["summary"]
    for row in s["throughput"]:
        assert row["vhostd/raw"] > 0, row
        if row["dir"] != "gso":
            assert row["vhostd/dpdk"] > 0, row
    lat = {x["backend"]: x for x in s["latency"]}
    assert set(lat) == {"vhostd", "dpdk", "raw"}
    assert lat["vhostd"]["vhostd/dpdk"]["p50_us"] > 0 and lat["vhostd"]["vhostd/raw"]["p99_us"] > 0
    m = quick["json"]["machine"]
    assert m["ncpu"] >= 2 and m["kernel"] and m["dpdk"]


def test_plot_is_a_valid_png(quick):
    data = quick["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")


def test_update_doc_rewrites_only_the_results_section(quick):
    before = (ROOT / "docs" / "benchmarks.md").read_text()
    after = quick["doc"].read_text()
    assert after.count(BEGIN) == 1 and after.count(END) == 1
    assert before[:before.index(BEGIN)] == after[:after.index(BEGIN)]
    assert before[before.index(END):] == after[after.index(END):]
    section = after[after.index(BEGIN):after.index(END)]
    assert "vhostd / DPDK" in section and "![benchmark plot](" in section and "Machine:" in section
