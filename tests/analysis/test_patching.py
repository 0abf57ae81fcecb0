"""Activation and path patching: full-position patches reproduce the clean run; set patches equal manual hooks."""

import numpy as np
import pytest
import torch

from av_lens.analysis.patching import (check_aligned, patch_by_modality, patch_per_position, path_patch,
                                       path_patch_cache_filter, path_patch_hooks)
from av_lens.errors import InputError


@pytest.fixture(scope="module")
def pair(model, media):
    t = np.arange(len(media["wav5"])) / 16000
    other = (0.5 * np.sign(np.sin(2 * np.pi * 300 * t))).astype(np.float32)  # a loud square wave vs quiet noise
    kw = dict(text="Describe what you see and hear.", videos=[media["video"]], use_audio_in_video=True)
    return model.prepare(video_audio=[media["wav5"]], **kw), model.prepare(video_audio=[other], **kw)


def metric_fn(model, clean):
    """A fixed random read-out of the last position's logits (sensitive to any change)."""
    r = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(0))
    return lambda logits: (logits[0, -1] * r).sum()


def test_patching_every_position_reproduces_clean(model, pair):
    clean, corrupt = pair
    metric = metric_fn(model, clean)
    res = patch_by_modality(model, clean, corrupt, metric, components=("resid_pre", "resid_post"), sets={"all": "all"})
    assert abs(res.clean - res.corrupted) > 1e-4
    torch.testing.assert_close(res["resid_post"][:, 0], torch.full((model.cfg.n_layers,), res.clean), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["resid_pre"][:, 0], torch.full((model.cfg.n_layers,), res.clean), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.recovered("resid_post"), torch.ones(model.cfg.n_layers, 1), atol=1e-4, rtol=0)


def test_set_patch_equals_manual_hook(model, pair):
    clean, corrupt = pair
    metric = metric_fn(model, clean)
    res = patch_by_modality(model, clean, corrupt, metric, components=("attn_out", "mlp_out", "z"),
                            sets=("audio", "video"))
    _, cache = model.run_with_cache(clean)
    for comp, name in [("attn_out", "blocks.{l}.hook_attn_out"), ("mlp_out", "blocks.{l}.hook_mlp_out")]:
        for l in range(model.cfg.n_layers):
            for si, sel in enumerate(("audio", "video")):
                m = clean.layout.mask(sel)
                def hook(act, hook, m=m, n=name.format(l=l)):
                    out = act.clone()
                    out[m] = cache[n][m]
                    return out
                direct = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name.format(l=l), hook)]))
                torch.testing.assert_close(res[comp][l, si], direct.float(), atol=1e-5, rtol=0)
    assert res["z"].shape == (model.cfg.n_layers, model.cfg.n_heads, 2)
    # the per-head z patches of a layer, all at once, equal the attn_out patch at the same positions
    for l in range(model.cfg.n_layers):
        m = clean.layout.mask("audio")
        hooks = [(f"blocks.{l}.attn.hook_z", lambda z, hook, m=m: torch.where(m[..., None, None], cache[hook.name], z))]
        torch.testing.assert_close(metric(model.run_with_hooks(corrupt, fwd_hooks=hooks)), res["attn_out"][l, 0],
                                   atol=1e-5, rtol=0)


def test_per_position_patch_sums_to_clean_at_all_positions(model, pair):
    clean, corrupt = pair
    metric = metric_fn(model, clean)
    per_pos = patch_per_position(model, clean, corrupt, metric, "resid_pre")
    assert per_pos.shape == (model.cfg.n_layers, clean.shape[1])
    # at layer 0, only the audio positions differ between the runs: patching any other position does nothing
    corrupted = float(metric(model(corrupt)))
    non_audio = ~clean.layout.mask("audio")[0]
    torch.testing.assert_close(per_pos[0, non_audio], torch.full((int(non_audio.sum()),), corrupted), atol=1e-5, rtol=0)


def test_path_patch_all_edges_equals_z_patch(model, pair):
    clean, corrupt = pair
    metric = metric_fn(model, clean)
    for l in range(model.cfg.n_layers):
        _, cache = model.run_with_cache(clean, names_filter=lambda n: path_patch_cache_filter(l)(n) or n == f"blocks.{l}.attn.hook_z")
        hooks = path_patch_hooks(model, cache, l, "all", "all")
        a = metric(model.run_with_hooks(corrupt, fwd_hooks=hooks))
        b = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{l}.attn.hook_z", lambda z, hook: cache[hook.name].clone())]))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_path_patch_sender_receiver_brute_force(model, pair):
    clean, corrupt = pair
    metric = metric_fn(model, clean)
    l = 1
    names = lambda n: n.startswith(f"blocks.{l}.attn.") and n.split(".")[-1] in ("hook_pattern", "hook_v", "hook_z")
    _, cc = model.run_with_cache(clean, names_filter=names)
    _, kc = model.run_with_cache(corrupt, names_filter=names)
    S, R = clean.layout.mask("audio")[0], clean.layout.mask("last_prompt")[0]
    n_rep = model.cfg.n_rep
    z = kc[f"blocks.{l}.attn.hook_z"].clone()
    for h in range(model.cfg.n_heads):
        for q in R.nonzero().squeeze(-1).tolist():
            for k in S.nonzero().squeeze(-1).tolist():
                z[0, q, h] += (cc[f"blocks.{l}.attn.hook_pattern"][0, h, q, k] * cc[f"blocks.{l}.attn.hook_v"][0, k, h // n_rep]
                               - kc[f"blocks.{l}.attn.hook_pattern"][0, h, q, k] * kc[f"blocks.{l}.attn.hook_v"][0, k, h // n_rep])
    want = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{l}.attn.hook_z", lambda a, hook: z)]))
    got = path_patch(model, clean, corrupt, metric, "audio", "last_prompt", layers=[l])
    torch.testing.assert_close(got[0], want.float(), atol=1e-5, rtol=0)
    per_head = path_patch(model, clean, corrupt, metric, "audio", "last_prompt", layers=[l], heads_per_layer=True)
    assert per_head.shape == (1, model.cfg.n_heads)


def test_misaligned_and_bad_arguments(model, media, pair):
    clean, _ = pair
    short = model.prepare(text="Describe what you see and hear.", videos=[media["video"]],
                          video_audio=[media["wav3"]], use_audio_in_video=True)
    with pytest.raises(InputError, match="positions"):
        check_aligned(clean, short)
    with pytest.raises(InputError, match="unknown patching components"):
        patch_by_modality(model, clean, clean, lambda x: x[0, -1, 0], components=("resid",))
    with pytest.raises(InputError, match="matches no position"):
        patch_by_modality(model, clean, clean, lambda x: x[0, -1, 0], sets=("image",))
    with pytest.raises(InputError, match="outside the model's blocks"):
        path_patch(model, clean, clean, lambda x: x[0, -1, 0], "audio", "text", layers=[3])
