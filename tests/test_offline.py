"""Offline: importing av_lens, loading the organism and running the demo open no network connection."""

import subprocess
import sys

BLOCK = """
import socket
def _refuse(*a, **k):
    raise RuntimeError("NETWORK CALL: " + repr(a[:2]))
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _refuse
socket.create_connection = _refuse
"""


def run_blocked(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={"PATH": "", "HOME": str(tmp_path)})  # no HF_HUB_OFFLINE given


def test_import_and_load_without_network(tmp_path):
    r = run_blocked("import av_lens\nfrom av_lens import HookedAVTransformer\n"
                    "m = HookedAVTransformer.from_pretrained('av-lens/organism')\n"
                    "b = HookedAVTransformer.from_pretrained('av-lens/organism-base')\n"
                    "c = HookedAVTransformer.from_pretrained('av-lens/organism-control')\n"
                    "print('ok', m.cfg.n_layers, c.cfg.n_layers)", tmp_path)
    assert r.returncode == 0 and "ok 8 8" in r.stdout, r.stderr[-3000:]
    assert "NETWORK CALL" not in r.stderr


def test_demo_without_network(tmp_path):
    r = run_blocked("from av_lens.cli import main\nraise SystemExit(main(['demo', '--quiet', '--out', 'd.html']))", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NETWORK CALL" not in r.stdout + r.stderr
    assert (tmp_path / "d.html").stat().st_size > 100_000
