"""Every analysis tool refuses a selector that matches no position (in the prefill or during generation), so an
analysis never runs as a silent no-op; a selector empty for only some samples of a batch warns (docs/analysis.md,
"Selectors that match nothing")."""

from __future__ import annotations

import warnings

import pytest
import torch

from av_lens import AVLensWarning
from av_lens.analysis import (AttentionFlow, LogitLens, attention_flow, head_ablation_hooks, head_effect_table,
                              knockout_hooks, knockout_sweep, logit_lens, patch_by_modality, path_patch,
                              path_patch_hooks, pooled_residuals)
from av_lens.errors import InputError
from conftest import cases, padded_batch

NOTHING = "matches no position"


@pytest.fixture(scope="module")
def audio(model, media):
    return model.prepare(**cases(media)["audio"])


def _clean(model):
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    assert model.run_state is None


def _metric(logits):
    return logits[0, -1, 0]


# ------------------------------------------------------------------------------------------- knockout
def test_knockout_hooks_keys_absent_in_prefill(model, audio):
    with pytest.raises(InputError, match="knockout key selector 'image' matches no position of the running input"):
        model.run_with_hooks(audio, fwd_hooks=knockout_hooks(model, "text", "image", [0]))
    _clean(model)


def test_knockout_hooks_generated_query_outside_generate(model, audio):
    with pytest.raises(InputError, match="exist only inside generate"):
        model.run_with_hooks(audio, fwd_hooks=knockout_hooks(model, "generated", "audio", [0]))
    _clean(model)


def test_knockout_hooks_keys_absent_in_generation(model, audio):
    with pytest.raises(InputError, match="knockout key selector 'video' " + NOTHING):
        model.generate(audio, max_new_tokens=2, fwd_hooks=knockout_hooks(model, "generated", "video", [0]))
    _clean(model)


def test_knockout_hooks_generated_query_inside_generate_is_fine(model, audio):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AVLensWarning)
        cut = model.generate(audio, max_new_tokens=3, stop_at_eos=False, return_logits=True,
                             fwd_hooks=knockout_hooks(model, "generated", "audio"))
    plain = model.generate(audio, max_new_tokens=3, stop_at_eos=False, return_logits=True)
    assert torch.equal(cut.logits[0], plain.logits[0])  # the prefill has no generated query
    assert max(float((a - b).abs().max()) for a, b in zip(cut.logits[1:], plain.logits[1:])) > 1e-5


def test_knockout_hooks_batch_with_keys_in_some_samples_warns(model, media):
    batch = padded_batch(model, media)  # sample 0 has no video
    with pytest.warns(AVLensWarning, match=r"knockout key selector 'video' matches no position in sample\(s\) \[0\]"):
        model.run_with_hooks(batch, fwd_hooks=knockout_hooks(model, "text", "video", [0, 1]))
    _clean(model)


def test_knockout_sweep_query_absent_with_generate(model, audio):
    with pytest.raises(InputError, match="query selector 'video' " + NOTHING):
        knockout_sweep(model, audio, "video", "audio", [range(0, 1)], lambda g, i: 0.0,
                       generate=dict(max_new_tokens=1), progress=False)
    with pytest.raises(InputError, match="key selector 'image' " + NOTHING):
        knockout_sweep(model, audio, "generated", "image", [range(0, 1)], lambda g, i: 0.0,
                       generate=dict(max_new_tokens=1), progress=False)


# ------------------------------------------------------------------------------------------- ablation
def test_head_ablation_query_absent_prefill_and_generation(model, audio):
    with pytest.raises(InputError, match="head-ablation query selector Sel\\(image\\) " + NOTHING):
        model.run_with_hooks(audio, fwd_hooks=head_ablation_hooks(model, [(0, 0)], query="image"))
    with pytest.raises(InputError, match="head-ablation keys selector Sel\\(video\\) " + NOTHING):
        model.generate(audio, max_new_tokens=2, fwd_hooks=head_ablation_hooks(model, [(0, 0)], keys="video"))
    with pytest.raises(InputError, match="exist only inside generate"):
        model.run_with_hooks(audio, fwd_hooks=head_ablation_hooks(model, [(0, 0)], query="generated"))
    _clean(model)


def test_head_effect_table_query_absent(model, audio):
    with pytest.raises(InputError, match="query selector 'image' " + NOTHING):
        head_effect_table(model, audio, _metric, query="image", progress=False)


# ------------------------------------------------------------------------------------------- attention flow
def test_attention_flow_query_absent(model, audio):
    with pytest.raises(InputError, match="query selector 'image' " + NOTHING):
        attention_flow(model, audio, "image")
    flow = AttentionFlow(model, "video")  # hook form: nothing seen, in the prefill or in generation
    model.generate(audio, max_new_tokens=2, fwd_hooks=flow.hooks())
    with pytest.raises(InputError, match="no position matched the query selector 'video'"):
        flow.result()


def test_attention_flow_key_group_absent_warns(model, audio):
    with pytest.warns(AVLensWarning, match="key group 'pic' \\('image'\\) matches no position"):
        res = attention_flow(model, audio, "last_prompt", keys={"pic": "image", "sound": "audio"})
    assert float(res.mass[..., 0].abs().max()) == 0.0 and float(res.mass[..., 1].max()) > 0


# ------------------------------------------------------------------------------------------- logit lens
def test_logit_lens_selector_absent(model, audio):
    with pytest.raises(InputError, match="logit-lens selector 'video' " + NOTHING):
        logit_lens(model, audio, "video")
    lens = LogitLens(model, "generated")  # the lens reads prompt positions: generated ones never match
    model.generate(audio, max_new_tokens=2, fwd_hooks=lens.hooks())
    with pytest.raises(InputError, match="the selector 'generated' matched no position"):
        lens.result()


# ------------------------------------------------------------------------------------------- patching
def test_patching_sets_absent(model, audio):
    with pytest.raises(InputError, match="patching set 'pic' selector 'image' " + NOTHING):
        patch_by_modality(model, audio, audio, _metric, sets={"pic": "image"}, progress=False)
    with pytest.raises(InputError, match="sender selector 'video' " + NOTHING):
        path_patch(model, audio, audio, _metric, "video", "text")
    _, cache = model.run_with_cache(audio, names_filter=lambda n: n.startswith("blocks.0.attn"))
    with pytest.raises(InputError, match="receiver selector 'image' " + NOTHING):
        model.run_with_hooks(audio, fwd_hooks=path_patch_hooks(model, cache, 0, "audio", "image"))
    _clean(model)


# ------------------------------------------------------------------------------------------- probes
def test_pooled_residuals_selector_absent_and_partial(model, audio, media):
    with pytest.raises(InputError, match="selector 'video' " + NOTHING):
        pooled_residuals(model, audio, "video")
    with pytest.warns(AVLensWarning, match=r"selector 'video' matches no position in sample\(s\) \[0\]"):
        X = pooled_residuals(model, padded_batch(model, media), "video")
    assert X.shape[1] == 1  # only sample 1's video is pooled
