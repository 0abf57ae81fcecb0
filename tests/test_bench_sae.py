"""benchmarks/bench_sae.py runs end to end at tiny dims and writes its rows (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_sae_quick(tmp_path):
    out = tmp_path / "sae.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sae.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["ratio"] is None or r["ratio"] > 0 for r in rows)
