"""The tutorial notebooks run top to bottom, offline, on the embedded model organism.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (this interpreter's environment), from
the ``tutorials/`` folder, with a 120 s limit per cell. Before the notebook's first cell the test injects a
guard that refuses any connection or name lookup outside this machine, and after the last cell it checks that
nothing tried one — so "offline" is asserted, not assumed. The notebooks are committed executed; the run
must reproduce their outputs exactly. A second test checks that the committed notebooks' cells are exactly what
``tutorials/make_notebooks.py`` writes (no hand edits) and that they carry their outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401 - the test extra installs it; the notebooks run in its kernel
import nbclient
import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 120

NETWORK_GUARD = '''\
import socket as _socket

_AV_LENS_NET_ATTEMPTS = []
_av_lens_getaddrinfo, _av_lens_connect = _socket.getaddrinfo, _socket.socket.connect

def _av_lens_local(host):
    host = host.decode() if isinstance(host, bytes) else host
    return host in (None, "", "localhost", "::1", "0.0.0.0") or str(host).startswith("127.")

def _av_lens_guarded_getaddrinfo(host, *args, **kwargs):
    if not _av_lens_local(host):
        _AV_LENS_NET_ATTEMPTS.append(str(host))
        raise OSError(f"network access is blocked in the tutorial tests (lookup of {host!r})")
    return _av_lens_getaddrinfo(host, *args, **kwargs)

def _av_lens_guarded_connect(self, address):
    if self.family in (_socket.AF_INET, _socket.AF_INET6) and not _av_lens_local(address[0]):
        _AV_LENS_NET_ATTEMPTS.append(str(address[0]))
        raise OSError(f"network access is blocked in the tutorial tests (connection to {address!r})")
    return _av_lens_connect(self, address)

_socket.getaddrinfo = _av_lens_guarded_getaddrinfo
_socket.socket.connect = _av_lens_guarded_connect
'''

REPORT = '''\
import json as _json, sys as _sys
print(_json.dumps({"prefix": _sys.prefix, "network_attempts": _AV_LENS_NET_ATTEMPTS}))
'''


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


_NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


class _Approx(float):
    """A printed decimal that compares equal to another within 0.01 (float sums differ between CPUs)."""

    def __eq__(self, other):
        return isinstance(other, float) and abs(self - other) <= 0.01 + 1e-9  # one unit in the 2nd decimal

    __hash__ = float.__hash__


def _comparable(outputs) -> list:
    """Outputs with printed decimals made approximate and image bytes replaced by their mime type: the
    committed notebooks were executed on one CPU, and the last digits of a float (or a plot's pixels) may
    differ on another; every word, integer and the structure must still match exactly."""
    def text(t: str) -> list:
        parts = _NUMBER.split(t)
        nums = [_Approx(float(x)) for x in _NUMBER.findall(t)]
        return [x for pair in zip(parts, nums + [None]) for x in pair if x is not None]

    out = []
    for o in outputs:
        o = dict(o)
        if "text" in o:
            o["text"] = text(o["text"])
        if "data" in o:
            o["data"] = {k: (text(v) if k.startswith("text/") and isinstance(v, str) else k)
                         for k, v in o["data"].items()}
        out.append(o)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The organism is tiny: one thread per kernel is as fast, and much faster when the CPUs are shared.
    if "OMP_NUM_THREADS" not in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.insert(0, nbformat.v4.new_code_cell(NETWORK_GUARD))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # names the cell and shows its traceback
        pytest.fail(f"{name}: a cell failed\n{str(e)[-4000:]}", pytrace=False)
    elapsed = time.perf_counter() - t0
    errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: cell {errors[0][0]} errored: {errors[0][1].get('ename')}: {errors[0][1].get('evalue')}"
    report = json.loads("".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream"))
    assert report["network_attempts"] == [], f"{name} tried to reach the network: {report['network_attempts']}"
    assert Path(report["prefix"]).resolve() == Path(sys.prefix).resolve(), "the kernel ran another Python environment"
    # deterministic: the outputs are the committed ones (stderr, widgets and timings cleaned as the generator does)
    nb.cells = nb.cells[1:-1]
    ran = _generator().clean_outputs(nb)
    committed = nbformat.read(TUTORIALS / name, as_version=4)
    for i, (a, b) in enumerate(zip(ran.cells, committed.cells)):
        if a.cell_type == "code":
            assert _comparable(a.outputs) == _comparable(b.outputs), (
                f"{name}: cell {i}'s outputs differ from the committed ones; rerun "
                "python tutorials/make_notebooks.py if the change is intended")
    print(f"{name}: {n_cells} cells in {elapsed:.1f} s")


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", TUTORIALS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_match_their_generator():
    gen = _generator()
    assert sorted(gen.NOTEBOOKS) == NOTEBOOKS, "run: python tutorials/make_notebooks.py"
    for name, cells in gen.NOTEBOOKS.items():
        expected = gen.render(name, cells)
        actual = (TUTORIALS / name).read_text(encoding="utf-8")
        nb = nbformat.reads(actual, as_version=4)
        stripped = nbformat.reads(actual, as_version=4)
        for c in stripped.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
        assert gen._text(stripped) == expected, f"{name} differs from tutorials/make_notebooks.py; regenerate it"
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert 'MODEL = "av-lens/organism"' in first_code.source and "HF_HUB_OFFLINE" in first_code.source
        code = [c for c in nb.cells if c.cell_type == "code"]
        # committed executed, so that a code host shows them: outputs present, clean, numbered in order
        assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{name} is committed without its outputs"
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), name
        assert not any(o.get("name") == "stderr" or o.get("output_type") == "error" for c in code for o in c.outputs)
        assert "IProgress not found" not in actual, name


def test_output_comparison_forgives_float_digits_only():
    out = lambda text: [{"output_type": "stream", "name": "stdout", "text": text}]  # noqa: E731
    assert _comparable(out("acc 0.964 n 19")) == _comparable(out("acc 0.961 n 19"))
    assert _comparable(out("acc 0.964 n 19")) != _comparable(out("acc 0.990 n 19"))
    assert _comparable(out("acc 0.964 n 19")) != _comparable(out("acc 0.964 n 18"))
    assert _comparable(out("auroc 0.964")) != _comparable(out("AUROC 0.964"))
