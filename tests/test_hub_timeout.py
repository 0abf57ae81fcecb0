"""An endpoint that accepts TCP connections and never answers must not hang ``from_pretrained``: the hub lookup
fails with a CheckpointError naming the endpoint and the fix within the hub timeout (``AV_LENS_HUB_TIMEOUT``,
default 30 s; lowered here to keep the test short). The load runs in a subprocess so that ``HF_ENDPOINT`` is read
fresh by huggingface_hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from av_lens.errors import CheckpointError
from av_lens.loading import HUB_TIMEOUT, hub_timeout

LOAD = """
import sys
from av_lens import HookedAVTransformer
try:
    HookedAVTransformer.from_pretrained("someone/never-answers")
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
    sys.exit(3)
"""


@pytest.fixture
def silent_endpoint():
    """A 127.0.0.1 socket that accepts every connection and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    th.join(2)
    for c in held:
        c.close()
    srv.close()


def test_silent_hub_endpoint_fails_within_the_timeout(silent_endpoint, tmp_path):
    # a fresh, empty hub cache: nothing cached can answer for the endpoint
    env = {**os.environ, "HF_ENDPOINT": silent_endpoint, "AV_LENS_HUB_TIMEOUT": "3", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf_home")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert took < 60
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("CheckpointError: "), out
    assert f"the model hub ({silent_endpoint}) did not answer within 3 s" in out
    assert "Fix:" in out and "AV_LENS_HUB_TIMEOUT" in out.split("Fix:")[1]


def test_hub_timeout_setting(monkeypatch):
    monkeypatch.delenv("AV_LENS_HUB_TIMEOUT", raising=False)
    assert hub_timeout() == HUB_TIMEOUT <= 60
    monkeypatch.setenv("AV_LENS_HUB_TIMEOUT", "2.5")
    assert hub_timeout() == 2.5
    monkeypatch.setenv("AV_LENS_HUB_TIMEOUT", "soon")
    with pytest.raises(CheckpointError, match="AV_LENS_HUB_TIMEOUT='soon' is not a positive number"):
        hub_timeout()
