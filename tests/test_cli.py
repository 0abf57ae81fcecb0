"""The README's demo command runs offline on the embedded organism: the report on the built-in pair."""

import subprocess
import sys


def test_demo_writes_the_report_and_prints_a_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "av_lens.cli", "demo", "--quiet", "--out", str(tmp_path / "d.html")],
                         capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"report: {tmp_path / 'd.html'}" in out.stdout
    assert "factual: what do you see ?" in out.stdout and "'dog'" in out.stdout
    assert "counterfactual: what do you hear ?" in out.stdout
    assert "attention of generated tokens by layer: L0 audio" in out.stdout
    assert "with last prompt ↛ video from layer l" in out.stdout and "token shift vs base" in out.stdout
    html = (tmp_path / "d.html").read_text()
    assert "CircuitsVis.render(" in html and "<svg" in html


def test_demo_refuses_a_missing_model_clearly():
    out = subprocess.run([sys.executable, "-m", "av_lens.cli", "demo", "--model", "/nonexistent/folder"],
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode != 0
    assert "Fix:" in out.stderr
