"""Position maps in per-position patching and path patching: the identity map equals aligned patching bit for
bit; across layouts (audio+video -> audio only) both equal hand-written hooks that move the clean activations
(or the clean sender contributions) to the mapped positions."""

import numpy as np
import pytest
import torch

from av_lens.analysis.patching import patch_per_position, path_patch, path_patch_hooks
from av_lens.analysis.position_map import position_map
from av_lens.errors import InputError
from conftest import cases
from test_attribution import _metric, _pair


def _av_to_audio_only(model, media):
    wav = media["wav5"]
    other = (0.8 * np.sin(2 * np.pi * 440 * np.arange(len(wav)) / 16000)).astype(np.float32)
    clean = model.prepare(**cases(media)["video_with_audio"])
    corrupted = model.prepare(text="What sound do you hear?", audio=[other])
    return clean, corrupted, position_map(clean, corrupted, unmatched="skip")


def test_identity_maps_equal_aligned_per_position_and_path_patching(model, media):
    clean, corrupted = _pair(model, media)
    pm = position_map(clean, corrupted)
    a = patch_per_position(model, clean, corrupted, _metric, progress=False)
    b = patch_per_position(model, clean, corrupted, _metric, progress=False, position_map=pm)
    assert torch.equal(a, b)
    for send, recv in (("audio", "last_prompt"), ("video", "text")):
        x = path_patch(model, clean, corrupted, _metric, send, recv, heads_per_layer=True)
        y = path_patch(model, clean, corrupted, _metric, send, recv, heads_per_layer=True, position_map=pm)
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_per_position_patching_across_layouts_equals_hand_written_hooks(model, media):
    clean, corrupted, pm = _av_to_audio_only(model, media)
    res = patch_per_position(model, clean, corrupted, _metric, progress=False, position_map=pm)
    assert res.shape == (model.cfg.n_layers, corrupted.layout.shape[1])
    unmapped = (~pm.mapped[0]).nonzero()[:, 0]
    assert len(unmapped) and torch.isnan(res[:, unmapped]).all()
    _, cc = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    audio = corrupted.layout.positions("audio")
    for l, j in ((0, int(audio[0])), (1, int(audio[-1])), (1, corrupted.layout.shape[1] - 1)):
        src = int(pm.src[0, j, 0])
        assert int(pm.n_src[0, j]) == 1

        def put(act, hook, j=j, src=src, l=l):
            act = act.clone()
            act[0, j] = cc[f"blocks.{l}.hook_resid_pre"][0, src]
            return act
        with torch.no_grad():
            want = float(_metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.hook_resid_pre", put)])))
        assert float(res[l, j]) == pytest.approx(want, abs=1e-5)


def test_path_patching_across_layouts_equals_hand_written_hooks(model, media):
    clean, corrupted, pm = _av_to_audio_only(model, media)
    l, rep = 1, model.cfg.n_rep
    last = corrupted.layout.shape[1] - 1
    assert bool(pm.mapped[0, last])
    got = path_patch(model, clean, corrupted, _metric, "audio", "last_prompt", layers=[l], heads_per_layer=True,
                     position_map=pm)[0]
    names = lambda n: n in (f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_v")  # noqa: E731
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=names)
        base, kc = model.run_with_cache(corrupted, names_filter=names)
    S_clean = clean.layout.positions("audio").tolist()
    S_corr = corrupted.layout.positions("audio").tolist()
    src = int(pm.src[0, last, 0])
    for h in range(model.cfg.n_heads):
        def contrib(cache, q, keys):
            p, v = cache[f"blocks.{l}.attn.hook_pattern"][0, h, q], cache[f"blocks.{l}.attn.hook_v"][0, :, h // rep]
            return sum(p[k] * v[k] for k in keys)
        delta = contrib(cc, src, S_clean) - contrib(kc, last, S_corr)

        def move(z, hook, h=h, delta=delta):
            z = z.clone()
            z[0, last, h] += delta
            return z
        with torch.no_grad():
            want = float(_metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.attn.hook_z", move)])))
        assert float(got[h]) == pytest.approx(want, abs=1e-5)
    assert (got - float(_metric(base))).abs().max() > 1e-5


def test_position_map_refusals_in_path_and_per_position_patching(model, media):
    clean, corrupted, pm = _av_to_audio_only(model, media)
    with pytest.raises(InputError, match="layout"):
        path_patch_hooks(model, {}, 0, "audio", "last_prompt", position_map=pm)
    with pytest.raises(InputError, match="position map"):
        path_patch(model, corrupted, clean, _metric, "audio", "last_prompt", position_map=pm)
    with pytest.raises(InputError, match="position"):
        patch_per_position(model, clean, corrupted, _metric, progress=False)          # not aligned, no map
    none = position_map(clean, corrupted, unmatched="skip")
    none.n_src[:] = 0
    with pytest.raises(InputError, match="mapped"):
        patch_per_position(model, clean, corrupted, _metric, progress=False, position_map=none)
    with pytest.raises(InputError, match="mapped"):
        path_patch(model, clean, corrupted, _metric, "audio", "last_prompt", position_map=none)
