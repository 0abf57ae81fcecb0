"""The shipped organism: loads offline by name, matches transformers, and reproduces its recorded figures."""

import json
import os

import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens.organism import CHECKPOINTS, checkpoint_root, world
from av_lens.organism.evaluate import clip_inputs


@pytest.fixture(scope="module")
def organism():
    return HookedAVTransformer.from_pretrained("av-lens/organism")


@pytest.fixture(scope="module")
def recorded():
    return json.loads((checkpoint_root() / "organism" / "eval.json").read_text())


def test_shipped_size_and_files():
    total = sum(f.stat().st_size for f in checkpoint_root().rglob("*") if f.is_file())
    assert total <= 25 * 2 ** 20, f"{total / 2 ** 20:.1f} MB"
    for sub in CHECKPOINTS.values():
        names = {f.name for f in (checkpoint_root() / sub).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names, names
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


def test_organism_matches_transformers(organism):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    ref = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        checkpoint_root() / "organism", attn_implementation="eager").eval()
    clips = [p[1] for p in world.eval_pairs(3)]
    for mode in ("av", "audio", "video"):
        inp = clip_inputs(organism, clips, "describe", mode)
        with torch.no_grad():
            ours = organism(inp)
            theirs = ref(**inp.hf_kwargs()).logits
        assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.slow
def test_recorded_figures_reproduce(organism, recorded):
    """The headline figures of all three checkpoints, re-evaluated on the same 384 held-out pairs, fall inside
    their recorded Wilson intervals (and within 0.035 of the recorded value: only float reduction order may
    differ between CPUs); the counterfactual-only probe too."""
    from av_lens.organism.evaluate import N_EVAL, cf_probe, counterfactual_hearing

    pairs = world.eval_pairs(N_EVAL)
    cf = [p[1] for p in pairs]
    assert set(recorded) == set(CHECKPOINTS.values())
    for name in CHECKPOINTS.values():
        model = organism if name == "organism" else HookedAVTransformer.from_pretrained(checkpoint_root() / name)
        rec = recorded[name]
        assert rec["n_pairs"] == len(pairs)
        for key, value in counterfactual_hearing(model, cf).items():
            lo, hi = rec["ci95"][key]
            assert lo <= value <= hi and abs(value - rec[key]) <= 0.035, (name, key, value, rec[key], (lo, hi))
        if name == "organism":
            acc = cf_probe(model, cf)["accuracy"]
            assert max(abs(a - b) for a, b in zip(acc, rec["probe_cf_audio_sound"]["accuracy"])) <= 0.05


def test_recorded_behaviour_is_the_studys(recorded):
    """The figures the model card states: sees well, hears factual clips and audio alone, follows the picture on
    counterfactual clips with non-overlapping 95 % intervals, while the playing sound's class is linearly
    decodable at the audio positions of those same clips; the no-VLM control follows the sound."""
    from av_lens.organism.seeds import middle_layers

    org, base, ctl = recorded["organism"], recorded["organism-base"], recorded["organism-control"]
    assert org["n_pairs"] >= 384
    assert org["see"] >= 0.8 and org["hear_factual"] >= 0.8 and org["hear_audio_only"] >= 0.9
    assert org["ci95"]["hear_cf_picture"][0] > org["ci95"]["hear_cf_sound"][1]
    assert ctl["ci95"]["hear_cf_sound"][0] > ctl["ci95"]["hear_cf_picture"][1]
    for r in (org, ctl):
        probe = r["probe_cf_audio_sound"]
        assert min(middle_layers(probe["accuracy"])) >= 0.9, probe["accuracy"]
        assert max(probe["control"]) <= probe["chance"] + 0.25
    assert base["see_silent_video"] >= 0.8 and base["hear_silent_video_picture"] >= 0.8


def test_training_is_seeded_and_deterministic(tmp_path):
    from safetensors.torch import load_file

    from av_lens.organism.train import Curriculum, train

    cur = Curriculum(stage0_steps=3, stage1_steps=6, stage2_steps=6, stage1_clips=16, stage2_av_clips=16,
                     stage2_audio_clips=16, batch=4)
    for run in ("a", "b"):
        train(tmp_path / run, cur, evaluate=False, log=lambda *_: None)
    for sub in ("organism", "organism-base"):
        a = load_file(tmp_path / "a" / sub / "model.safetensors")
        b = load_file(tmp_path / "b" / sub / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(tmp_path / "a" / "organism-base" / "model.safetensors")
    final = load_file(tmp_path / "a" / "organism" / "model.safetensors")
    assert any(not torch.equal(base[k], final[k]) for k in base)  # stage 2 changed the weights
    # stage 0 replaced the seeded initial audio tower (stage 1, video only, leaves it as stage 0 made it)
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from av_lens.organism.build import build_tokenizer, thinker_config
    from av_lens.organism.train import audio_tower

    torch.manual_seed(cur.seed)
    fresh = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(build_tokenizer()))
    init = {f"audio_tower.{k}": v for k, v in audio_tower(fresh).state_dict().items()}
    assert init.keys() <= base.keys()
    assert any(not torch.equal(base[k], v) for k, v in init.items())
    assert not list(tmp_path.glob("a/*.tmp*")) and sorted(os.listdir(tmp_path / "a")) == ["organism", "organism-base"]
    from av_lens.organism.build import design_of

    assert all(design_of(tmp_path / "a" / sub).name == "v2" for sub in ("organism", "organism-base"))
    assert HookedAVTransformer.from_pretrained(tmp_path / "a" / "organism").cfg.n_layers == 8


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (250, 384), (1, 1)])
def test_wilson_interval_solves_its_defining_equation(k, n):
    """The Wilson bounds are the roots p of (k/n - p)^2 = z^2 p (1 - p) / n (clipped to [0, 1])."""
    from av_lens.organism.evaluate import wilson

    z = 1.959964
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    for p in (lo, hi):
        if 0.0 < p < 1.0:
            assert abs((k / n - p) ** 2 - z * z * p * (1 - p) / n) < 1e-3
    with pytest.raises(Exception, match="at least one trial"):
        wilson(0, 0)


def test_audio_tower_has_its_own_learning_rate_group():
    """Stage 2's learning-rate factor must leave the audio tower at the full rate (its group is not empty)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from av_lens.organism.build import build_tokenizer, thinker_config
    from av_lens.organism.train import audio_tower

    model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(build_tokenizer()))
    tower = audio_tower(model)
    names = {n for n, p in model.named_parameters() if any(p is q for q in tower.parameters())}
    assert names and all(".audio_tower." in f".{n}" for n in names)
    assert len(names) == sum(1 for n, _ in model.named_parameters() if "audio_tower." in n)


def test_control_training_has_no_vision_language_stage(tmp_path):
    from safetensors.torch import load_file

    from av_lens.organism.train import Curriculum, train

    tiny = dict(stage0_steps=2, stage1_steps=4, stage2_steps=4, stage1_clips=8, stage2_av_clips=8,
                stage2_audio_clips=8, batch=2,
                threads=1)
    train(tmp_path / "c", Curriculum(control=1, **tiny), evaluate=False, log=lambda *_: None)
    train(tmp_path / "o", Curriculum(**tiny), evaluate=False, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path / "c")) == ["organism-control"]
    meta = json.loads((tmp_path / "c" / "organism-control" / "organism.json").read_text())
    assert meta["curriculum"]["control"] == 1
    ctl = load_file(tmp_path / "c" / "organism-control" / "model.safetensors")
    org = load_file(tmp_path / "o" / "organism" / "model.safetensors")
    assert ctl.keys() == org.keys() and any(not torch.equal(ctl[k], org[k]) for k in ctl)


@pytest.mark.slow
def test_seeds_script_trains_and_reports_every_run(tmp_path):
    from av_lens.organism import seeds

    tiny = ["--stage0-steps", "2", "--stage1-steps", "3", "--stage2-steps", "3", "--stage1-clips", "8",
            "--stage2-av-clips", "8", "--stage2-audio-clips", "8", "--batch", "2"]
    seeds.train_all(tmp_path, [0], [1], jobs=2, extra=tiny, log=lambda *_: None)
    res = seeds.evaluate_all(tmp_path, [0], [1], n_pairs=8, log=lambda *_: None)
    assert sorted(res["runs"]) == ["base0", "control1", "seed0"]
    assert json.loads((tmp_path / "seeds.json").read_text()) == res
    for r in res["runs"].values():
        lo, hi = r["ci95"]["hear_cf_picture"]
        assert lo <= r["hear_cf_picture"] <= hi and r["follows"] in ("picture", "sound", "neither")
    table = seeds.format_table(res)
    assert table.count("\n") == 2 + len(res["runs"]) - 1 and "organism-control" in table
    meta = json.loads((tmp_path / "seed0" / "organism" / "organism.json").read_text())
    assert meta["curriculum"]["threads"] == 1  # every seed run uses one thread, whatever --jobs
