"""Determinism: the same inputs and seed give identical tables, figures and report files."""

import pytest

from av_lens import HookedAVTransformer
from av_lens.organism.study import run_study
from av_lens.report import build_report, builtin_pair


@pytest.fixture(scope="module")
def organism():
    return HookedAVTransformer.from_pretrained("av-lens/organism"), HookedAVTransformer.from_pretrained("av-lens/organism-base")


@pytest.mark.slow
def test_study_tables_are_identical_on_rerun(organism):
    model, base = organism
    assert run_study(model, base, n_pairs=12) == run_study(model, base, n_pairs=12)


@pytest.mark.slow
def test_report_file_is_identical_on_rerun(organism, tmp_path):
    model, base = organism
    a = build_report(model, *builtin_pair(), base=base, out=tmp_path / "a.html", progress=False, probe_clips=16)
    b = build_report(model, *builtin_pair(), base=base, out=tmp_path / "b.html", progress=False, probe_clips=16)
    assert a.text().replace("a.html", "") == b.text().replace("b.html", "")
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()
