"""Organism design v2 (the shipped one): the real model's proportions (8 video tokens per audio token, 6 s clips
over three TMRoPE chunks, 8 LM layers), checked on a random-weight v2 thinker against transformers; the retired
v1 design stays reachable by name."""

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens.organism import world
from av_lens.organism.build import DESIGNS, build_processor, build_tokenizer, design, design_of, thinker_config
from av_lens.organism.evaluate import clip_inputs


@pytest.fixture(scope="module")
def v2_folder(tmp_path_factory):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(tok, design_name="v2")).eval()
    folder = tmp_path_factory.mktemp("v2") / "organism"
    model.save_pretrained(folder)
    build_processor(tok, "v2").save_pretrained(folder)
    (folder / "organism.json").write_text('{"curriculum": {"design": "v2"}}')
    return folder


def test_v2_clips_span_three_chunks():
    g = design("v2").geometry
    assert g is world.DEFAULT and design().name == "v2"           # the shipped design is v2
    fact, cf = world.eval_pairs(1)[0]
    assert fact.frames.shape == (12, world.SIDE, world.SIDE, 3) and fact.fps == world.FPS == 2.0
    assert fact.audio.shape == (6 * world.SAMPLE_RATE,) and g.seconds == world.SECONDS == 6.0
    assert np.array_equal(fact.frames, cf.frames) and cf.sound != cf.look
    v1 = world.eval_pairs(1, design("v1").geometry)[0][0]       # the retired design's 1 s clips
    assert v1.frames.shape[0] == 4 and v1.audio.shape == (world.SAMPLE_RATE,) and v1.fps == 4.0


def test_v2_layout_has_eight_video_tokens_per_audio_token(v2_folder):
    model = HookedAVTransformer.from_pretrained(v2_folder)
    assert model.cfg.n_layers == 8 and design_of(v2_folder).name == "v2"
    cf = world.eval_pairs(2, design("v2").geometry)[0][1]
    inp = clip_inputs(model, [cf], "hear", "av")
    lay = inp.layout
    n_audio, n_video = len(lay.positions("audio")), len(lay.positions("video"))
    # 6 s at 8 mel frames/s = 48 frames -> 12 audio tokens; 12 frames at 2x2 temporal/spatial merge of 8x8 patches
    assert (n_audio, n_video) == (12, 96)
    # interleaved in 2-second chunks: 32 video tokens (2 temporal grids) then 4 audio tokens, three times
    ids = inp.input_ids[0].tolist()
    vid, aud = model.tokenizer.convert_tokens_to_ids(["<|VIDEO|>", "<|AUDIO|>"])
    runs, prev = [], None
    for t in ids:
        if t in (vid, aud):
            if t == prev:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        prev = t
    assert runs == [[vid, 32], [aud, 4]] * 3, runs


def test_v2_thinker_matches_transformers(v2_folder):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = HookedAVTransformer.from_pretrained(v2_folder)
    ref = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(v2_folder, attn_implementation="eager").eval()
    clips = [p[1] for p in world.eval_pairs(2, design("v2").geometry)]
    for mode in ("av", "audio", "video"):
        inp = clip_inputs(model, clips, "describe", mode)
        with torch.no_grad():
            assert (model(inp) - ref(**inp.hf_kwargs()).logits).abs().max() < 1e-4, mode


def test_designs_are_registered_and_refused_by_name():
    assert set(DESIGNS) == {"v1", "v2"} and DESIGNS["v2"].arch["n_layers"] == 8
    with pytest.raises(Exception, match="unknown organism design"):
        design("v3")


def test_presets_name_their_design_and_design_of_refuses_a_non_organism(tmp_path):
    from av_lens.errors import InputError
    from av_lens.organism.train import Curriculum

    assert Curriculum() == Curriculum.preset("v2") and Curriculum().design == "v2"
    v1 = Curriculum.preset("v1")
    assert v1.design == "v1" and v1.stage0_steps == 0 and v1.stage1_steps == 1200
    assert thinker_config(build_tokenizer(), design_name=v1.design).text_config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="unknown organism design"):
        Curriculum.preset("v9")
    assert design_of("av-lens/organism").name == "v2"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no organism.json"):
        design_of(tmp_path)
