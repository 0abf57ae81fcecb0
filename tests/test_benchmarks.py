"""benchmarks/run_all.py runs end to end (``--quick``: tiny dims) and writes a consistent table.

No timing is asserted here (speed lives in the benchmark's own output, docs/performance.md): the test checks
that every section produces its rows, that the timed models agree (parity), and that each row's ratio and
pass/miss verdict follow from its own recorded measurements."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick_writes_a_consistent_table(tmp_path):
    out = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["parity"]["ours vs HF sdpa"] <= 1e-4 and data["parity"]["ours hooked vs HF eager"] <= 1e-4
    rows = {r["row"]: r for r in data["rows"]}
    for prefix in ("forward 64 x 1, no hooks", "forward 128 x 2, every hook_pattern hooked",
                   "run_with_cache, one filtered hook", "knockout sweep", "generate 4 tokens",
                   "attention flow, query = text"):
        assert any(name.startswith(prefix) for name in rows), prefix
    for r in data["rows"]:
        if r["kind"] == "time":
            ratios = [o / b for o, b in zip(r["ours_times"], r["baseline_times"])]
            assert r["n"] == len(ratios) >= 3 and min(r["ours_times"] + r["baseline_times"]) > 0
            assert r["ratio"] == pytest.approx(statistics.median(ratios))
            assert (r["ratio_min"], r["ratio_max"]) == pytest.approx((min(ratios), max(ratios)))
        else:
            assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["baseline"])
        if r["target"] is None:
            assert r["status"] == "—"
        else:
            assert r["status"].startswith("pass" if r["ratio"] <= r["target"] else "miss")
            assert r["status"].endswith("crosses)") == (r["ratio_min"] <= r["target"] < r["ratio_max"])
    assert "| row | ours | baseline | ratio |" in data["markdown"]
