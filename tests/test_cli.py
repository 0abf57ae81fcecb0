"""The README's demo command runs offline and says plainly what model it used."""

import subprocess
import sys


def test_demo_runs_offline():
    out = subprocess.run([sys.executable, "-m", "av_lens.cli", "demo", "--max-new-tokens", "3"],
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RANDOM-weight" in out.stdout
    assert "attention mass from the last prompt token" in out.stdout
    assert "video 0" in out.stdout and "audio 0" in out.stdout
    assert "greedy continuation (3 tokens)" in out.stdout
