"""``av-lens sweep --analysis atp``: one attribution row per organism pair, equal to attribution_patch called
directly; resumable like knockout sweeps; the caption metric is the teacher-forced caption; AtP* adds GradDrop
magnitudes; knockout-only options are refused."""

from __future__ import annotations

import json

import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens import sweeps as S
from av_lens.analysis.attribution import attribution_patch, teacher_forced
from av_lens.cli import main


@pytest.fixture(scope="module")
def organism():
    return HookedAVTransformer.from_pretrained("av-lens/organism")


def _table(out):
    return [json.loads(line) for line in (out / "table.jsonl").read_text().splitlines()]


def test_atp_sweep_rows_equal_direct_attribution_and_resume(organism, tmp_path, capsys):
    out = tmp_path / "atp"
    args = ["sweep", "--analysis", "atp", "--pairs", "2", "--question", "hear", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    rows = _table(out)
    assert [r["key"] for r in rows] == ["0/atp", "1/atp"]
    samples = S.organism_samples(organism, 2, seed=0, question="hear")
    for r, pair in zip(rows, samples):
        ta, tb = organism.word_token(pair.meta["sound"]), organism.word_token(pair.meta["counterfactual_sound"])
        res = attribution_patch(organism, pair.factual, pair.counterfactual,
                                lambda logits: (logits[:, -1, ta] - logits[:, -1, tb]).mean(),
                                components=S.ATP_COMPONENTS, sets=("audio", "video", "text"))
        assert r["sets"] == ["audio", "video", "text"] and r["method"] == "AtP"
        assert r["clean"] == pytest.approx(res.clean, abs=1e-5)
        for c in S.ATP_COMPONENTS:
            torch.testing.assert_close(torch.tensor(r["effects"][c]), res.effect(c), atol=1e-5, rtol=1e-4)
        assert torch.tensor(r["effects"]["resid_pre"])[0, 0].abs() > 1e-3   # layer 0's audio carries the swap
    err = capsys.readouterr().err
    assert "sweep rank 0" in err and "2/2" in err                             # the progress bar
    # resume: drop the last row; a rerun computes only it
    f = out / "rows-rank0.jsonl"
    f.write_text(f.read_text().splitlines(keepends=True)[0])
    (out / "table.jsonl").unlink()
    assert main(args + ["--quiet"]) == 0
    assert _table(out) == rows
    # another analysis in the same folder is refused
    assert main(["sweep", "--pairs", "2", "--question", "hear", "--device", "cpu", "--out", str(out), "--quiet"]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_atp_sweep_caption_metric_and_atp_star(organism, tmp_path):
    out = tmp_path / "cap"
    assert main(["sweep", "--analysis", "atp", "--pairs", "1", "--device", "cpu", "--atp-metric", "caption",
                 "--components", "resid_pre,q", "--atp-star", "--max-new-tokens", "2", "--out", str(out),
                 "--quiet"]) == 0
    (row,) = _table(out)
    assert row["method"] == "AtP*" and "caption" in row["metric"]
    pair = S.organism_samples(organism, 1, seed=0)[0]
    gen = organism.generate(organism.encode(pair.factual), max_new_tokens=2)
    cx, kx, metric = teacher_forced(organism.encode(pair.factual), organism.encode(pair.counterfactual), gen)
    res = attribution_patch(organism, cx, kx, metric, components=("resid_pre", "q"), recompute_qk=True,
                            grad_drop=True)
    for c in ("resid_pre", "q"):
        torch.testing.assert_close(torch.tensor(row["effects"][c]), res.effect(c), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(row["grad_drop"][c]), res.magnitude(c), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra, words", [
    (["--windows", "0:2"], "--windows is a knockout option"),
    (["--components", "resid_pre,hook_z"], "unknown --components"),
])
def test_atp_sweep_refusals(tmp_path, capsys, extra, words):
    assert main(["sweep", "--analysis", "atp", "--pairs", "1", "--out", str(tmp_path / "x"), *extra]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
