"""The README's demo command runs offline on the embedded organism and prints the study in miniature."""

import subprocess
import sys


def test_demo_runs_offline_on_the_organism():
    out = subprocess.run([sys.executable, "-m", "av_lens.cli", "demo", "--max-new-tokens", "3"],
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model: av-lens/organism" in out.stdout
    assert "video 0" in out.stdout and "audio 0" in out.stdout
    assert "factual         see -> dog" in out.stdout
    assert "attention from the last prompt token" in out.stdout
    assert "logit lens at the 25 audio positions" in out.stdout
    assert sum(line.strip().startswith("from layer ") for line in out.stdout.splitlines()) == 4


def test_demo_refuses_a_missing_model_clearly():
    out = subprocess.run([sys.executable, "-m", "av_lens.cli", "demo", "--model", "/nonexistent/folder"],
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode != 0
    assert "Fix:" in out.stderr
