"""benchmarks/bench_attribution.py runs end to end at tiny dims and writes its rows (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_attribution_quick(tmp_path):
    out = tmp_path / "atp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attribution.py"), "--quick", "--json",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert any(k.startswith("AtP, every layer x head x set") for k in rows)
    assert any(k.startswith("exhaustive head patching") for k in rows)
    for r in rows.values():
        assert r["ratio"] is None or (r["ratio"] >= 0 and (r["min"] is None or r["min"] <= r["ratio"] <= r["max"]))
