"""CLI fuzz: every option of every ``av-lens`` subcommand, given bad values, exits with status 2 and one
``av-lens <command>: <problem>. Fix: <fix>`` line on stderr, no traceback, within seconds, and before any model
loads (``HookedAVTransformer.from_pretrained`` is patched to fail the test if it is reached).

The options are enumerated from the argparse parser itself (:func:`av_lens.cli.build_parser`), so a new option
without an entry in :data:`BAD` fails :func:`test_every_option_has_bad_values`: add its bad values there (keyed by
the option, or by ``(command, option)`` where commands differ). A value is an argument list to put after the
command; ``{tmp}``, ``{file}`` and ``{dir}`` are replaced by a scratch folder, an existing plain file and an
existing folder.
"""

from __future__ import annotations

import argparse
import os
import time
from unittest import mock

import pytest

from av_lens.cli import build_parser, main

#: option (or (command, option)) -> bad argument lists
BAD: dict[str | tuple[str, str], list[list[str]]] = {
    "--model": [["--model", "./no/such/model"], ["--model", "not a hub id"], ["--model", ""]],
    "--base": [["--base", "./no/such/base"], ["--base", "a/b/c"]],
    "--out": [["--out", "{dir}"], ["--out", "{file}/report.html"], ["--out", "{tmp}/missing/dir/report.html"],
              ["--out", ""]],
    ("sweep", "--out"): [["--out", "{file}"], ["--out", "{file}/sub"], ["--out", ""]],
    "--quiet": [["--quiet=yes"]],
    "--video": [["--video", "{tmp}/missing.mp4"], ["--video", "{file}"], ["--video", "{dir}"]],
    "--audio": [["--audio", "{tmp}/missing.wav"], ["--audio", "{tmp}/missing.wav", "--video", "{tmp}/missing.mp4"]],
    "--counterfactual-audio": [["--counterfactual-audio", "{tmp}/missing.wav"]],
    "--fps": [["--fps", "0"], ["--fps", "-2"], ["--fps", "nan"], ["--fps", "inf"], ["--fps", "fast"]],
    "--max-side": [["--max-side", "0"], ["--max-side", "1.5"], ["--max-side", "-4"]],
    "--pairs": [["--pairs", "0"], ["--pairs", "-3"], ["--pairs", "many"]],
    "--seed": [["--seed", "-1"], ["--seed", "x"]],
    "--question": [["--question", "smell"], ["--question", ""]],
    "--manifest": [["--manifest", "{tmp}/missing.jsonl"], ["--manifest", "{dir}"]],
    "--windows": [["--windows", "0-3"], ["--windows", "3:1"], ["--windows", "a:b"], ["--windows", "0:2,"],
                  ["--windows", "0:4:2"]],
    "--knockouts": [["--knockouts", "generated:vidoe"], ["--knockouts", "generated"], ["--knockouts", ":video"],
                    ["--knockouts", "generated:video,last_prompt:imgae"]],
    "--conditions": [["--conditions", "factual,fake"], ["--conditions", ""]],
    "--max-new-tokens": [["--max-new-tokens", "0"], ["--max-new-tokens", "2.5"]],
    "--dtype": [["--dtype", "int8"], ["--dtype", "fp64x"]],
    "--device": [["--device", "gpu"], ["--device", "cuda:x"]],
    "--gpus-per-rank": [["--gpus-per-rank", "0"], ["--gpus-per-rank", "two"]],
    "--analysis": [["--analysis", "ablation"], ["--analysis", ""], ["--analysis", "atp", "--windows", "0:2"]],
    "--components": [["--analysis", "atp", "--components", "resid_pre,hook_z"], ["--analysis", "atp", "--components", ""],
                     ["--analysis", "atp", "--components", "z,,mlp_out"]],
    "--atp-metric": [["--atp-metric", "accuracy"], ["--atp-metric", ""]],
    "--atp-star": [["--atp-star=yes"]],
    ("demo", "--dtype"): [["--dtype", "int8"], ["--dtype", "float64"]],
    ("report", "--dtype"): [["--dtype", "int8"], ["--dtype", "float64"]],
    ("demo", "--device"): [["--device", "gpu"], ["--device", "cuda:x"], ["--device", ""]],
    ("report", "--device"): [["--device", "gpu"], ["--device", "cuda:x"]],
    "--threads": [["--threads", "0"], ["--threads", "-2"], ["--threads", "two"]],
    "--no-probes": [["--no-probes=yes"]],
    "--sae": [["--sae", "{tmp}/missing"], ["--sae", "{dir}"], ["--sae", "{file}"], ["--sae", ""]],
    "--start": [["--start", "-1"], ["--start", "soon"], ["--start", "inf"]],
    "--duration": [["--duration", "-4"], ["--duration", "long"], ["--duration", "nan"]],
}

#: arguments a command needs besides the option under test (the option's own value replaces them)
BASE_ARGS = {"sweep": ["--out", "{tmp}/sweep-out"], "report": ["--out", "{tmp}/r.html"], "demo": ["--out", "{tmp}/d.html"]}

SKIP = {"-h", "--help", "--version"}  # --help and --version exit 0 by design


def options() -> list[tuple[str, str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for cmd, p in sub.choices.items():
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and longs[0] not in SKIP:
                out.append((cmd, longs[0]))
    return out


def bad_values(cmd: str, opt: str) -> list[list[str]] | None:
    return BAD.get((cmd, opt), BAD.get(opt))


def test_every_option_has_bad_values():
    found = options()
    assert {c for c, _ in found} >= {"demo", "report", "sweep"}
    missing = [f"av-lens {c} {o}" for c, o in found if not bad_values(c, o)]
    assert not missing, f"add bad values for {missing} to BAD in tests/test_cli_fuzz.py"


CASES = [(c, o, i) for c, o in options() for i in range(len(bad_values(c, o) or []))]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "plain.txt").write_text("not media, not a folder\n")
    (tmp / "folder").mkdir()
    return {"tmp": str(tmp), "file": str(tmp / "plain.txt"), "dir": str(tmp / "folder")}


def _fill(args: list[str], scratch: dict) -> list[str]:
    return [a.format(**scratch) for a in args]


@pytest.mark.parametrize("cmd,opt,i", CASES, ids=[f"{c}{o}-{i}" for c, o, i in CASES])
def test_bad_value_exits_2_with_a_fix(cmd, opt, i, scratch, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = _fill(bad_values(cmd, opt)[i], scratch)
    base = _fill(BASE_ARGS.get(cmd, []), scratch)
    if base and base[0] in bad:  # the bad value replaces the default one
        base = []
    argv = [cmd, *base, *bad]

    def no_model(*a, **k):
        raise AssertionError(f"a model was loaded before the bad value in {argv} was refused")

    t0 = time.monotonic()
    with mock.patch("av_lens.HookedAVTransformer.from_pretrained", side_effect=no_model):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert status == 2, f"{argv}: exit status {status}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith(f"av-lens {cmd}: ")]
    assert len(lines) == 1, f"{argv}: expected one 'av-lens {cmd}: ...' line, got:\n{err}"
    assert lines[0].count("Fix:") == 1 and len(lines[0].split("Fix:")[1].strip()) >= 10, lines[0]
    assert took < 20, f"{argv} took {took:.1f} s to be refused"
    assert not os.path.exists(os.path.join(scratch["tmp"], "sweep-out")), "a refused sweep created its folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders, so there is nothing to refuse")
def test_read_only_out_folder(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for argv in (["report", "--out", str(ro / "r.html")], ["sweep", "--out", str(ro / "sweep")]):
            assert main(argv) == 2
            assert "cannot write to" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)
