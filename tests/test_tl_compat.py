"""TransformerLens's ActivationCache helpers and patching functions on audio-visual inputs."""

import numpy as np
import pytest
import torch
from transformer_lens import patching

from av_lens import AVActivationCache
from conftest import cases

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(model, media):
    kw = cases(media)["video_with_audio"]
    clean = model.prepare(**kw)
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(len(media["wav5"])) / 16000)).astype(np.float32)
    other = {**kw, "video_audio": [tone]}  # counterfactual: another sound of the same length
    corrupt = model.prepare(**other)
    assert torch.equal(clean.input_ids, corrupt.input_ids)
    return clean, corrupt


@pytest.fixture(scope="module")
def clean_run(model, pair):
    with torch.no_grad():
        return model.run_with_cache(pair[0])


def test_cache_is_activation_cache_with_layout(clean_run, pair):
    _, cache = clean_run
    assert isinstance(cache, AVActivationCache)
    assert cache.layout is pair[0].layout
    assert cache["resid_pre", 0].shape == (1, pair[0].shape[1], cache.model.cfg.d_model)


def test_accumulated_resid_with_final_norm_is_logit_lens(model, clean_run):
    logits, cache = clean_run
    acc = cache.accumulated_resid(apply_ln=True)  # [n_layers + 1, batch, pos, d_model]
    assert acc.shape[0] == model.cfg.n_layers + 1
    assert (model.unembed(acc[-1]) - logits).abs().max() <= TOL


def test_decompose_resid_sums_to_final_residual(model, clean_run):
    _, cache = clean_run
    parts = cache.decompose_resid()  # embed + attn_out/mlp_out of each layer
    assert parts.shape[0] == 1 + 2 * model.cfg.n_layers
    assert (parts.sum(0) - cache["resid_post", -1]).abs().max() <= TOL


def test_stack_head_results_sum_to_attn_out(model, clean_run):
    _, cache = clean_run
    heads = cache.stack_head_results(layer=1)  # layer 0's heads
    assert heads.shape[0] == model.cfg.n_heads
    assert (heads.sum(0) - cache["attn_out", 0]).abs().max() <= TOL


def test_logit_attrs_sum_to_logits(model, clean_run):
    """TL's convention: the directions are W_U's columns, the norm weight is not in them. On unprocessed
    weights the attributions sum to the logit once the parts carry the final norm's weight (as TL with
    fold_ln=False); a fold_ln=True model needs nothing (tests/test_weights.py)."""
    logits, cache = clean_run
    token = int(logits[0, -1].argmax())
    parts = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(parts * model.ln_final.w, tokens=torch.tensor([token]), pos_slice=-1)
    assert attrs.sum(0).item() == pytest.approx(logits[0, -1, token].item(), abs=1e-3)
    plain = cache.logit_attrs(parts, tokens=torch.tensor([token]), pos_slice=-1)
    assert abs(plain.sum(0).item() - logits[0, -1, token].item()) > 1e-3  # the weight is not hidden anywhere


def test_apply_ln_to_stack_matches_final_norm_without_weight(model, clean_run):
    _, cache = clean_run
    final = cache["resid_post", -1][None]
    scaled = cache.apply_ln_to_stack(final, layer=-1)
    assert (scaled[0] * model.ln_final.w - model.ln_final(cache["resid_post", -1])).abs().max() <= TOL


def metric_for(model, clean_logits):
    token = int(clean_logits[0, -1].argmax())
    return lambda logits: logits[0, -1, token]


def test_patching_every_position_of_a_layer_reproduces_clean(model, pair, clean_run):
    clean, corrupt = pair
    clean_logits, cache = clean_run
    metric = metric_for(model, clean_logits)
    result = patching.generic_activation_patch(
        model, corrupt, cache, metric, patch_setter=lambda act, index, clean_act: clean_act.clone(),
        activation_name="resid_pre", index_axis_names=("layer",))
    assert result.shape == (model.cfg.n_layers,)
    assert torch.allclose(result, metric(clean_logits).expand(model.cfg.n_layers), atol=TOL)
    assert abs(metric(model(corrupt)).item() - metric(clean_logits).item()) > 1e-4  # the runs do differ


def test_get_act_patch_resid_pre_matches_manual_hook(model, pair, clean_run):
    clean, corrupt = pair
    clean_logits, cache = clean_run
    metric = metric_for(model, clean_logits)
    res = patching.get_act_patch_resid_pre(model, corrupt, cache, metric)
    assert res.shape == (model.cfg.n_layers, corrupt.shape[1])
    layer, p = 1, int(corrupt.layout.positions("audio")[10])

    def hook(act, hook):
        act = act.clone()
        act[:, p] = cache[hook.name][:, p]
        return act

    manual = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)]))
    assert res[layer, p].item() == pytest.approx(manual.item(), abs=TOL)


def test_head_patching_helpers_run_on_av_inputs(model, pair, clean_run):
    clean, corrupt = pair
    clean_logits, cache = clean_run
    metric = metric_for(model, clean_logits)
    out = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric)
    assert out.shape == (model.cfg.n_layers, model.cfg.n_heads)
    # patching every head of every layer at once gives back the clean run
    every = patching.generic_activation_patch(
        model, corrupt, cache, metric, patch_setter=lambda act, index, clean_act: clean_act.clone(),
        activation_name="z", index_axis_names=("layer",))
    assert every.shape == (model.cfg.n_layers,)
    k = patching.get_act_patch_attn_head_k_all_pos(model, corrupt, cache, metric)
    assert k.shape == (model.cfg.n_layers, model.cfg.n_key_value_heads)
