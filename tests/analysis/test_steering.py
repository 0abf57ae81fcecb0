"""Steering: the hooks against hand-written hooks and transformers' thinker, in prefill and generation;
direction builders against full caches and autograd; the sweep; refusals."""

import pytest
import torch

from av_lens.analysis.probes import LinearProbe
from av_lens.analysis.steering import (mean_difference, probe_direction, random_direction_like, steer,
                                       steering_hooks, steering_sweep)
from av_lens.errors import InputError
from conftest import cases, padded_batch


def _dir(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.n_layers + 1, model.cfg.d_model, generator=g)


def test_prefill_steering_matches_transformers_with_a_pre_hook(model, reference, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    d = _dir(model)
    l, c = 1, 0.7
    ours = model.run_with_hooks(inp, fwd_hooks=steering_hooks(model, d, "audio", layers=[l], coeff=c))
    m = inp.layout.mask("audio")
    assert m.any()

    def pre(mod, args, kwargs):  # HF decoder layer l's input hidden states, edited by hand
        h = args[0] if args else kwargs["hidden_states"]
        h = h + c * m[..., None].float() * d[l]
        if args:
            return (h,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = h
        return args, kwargs

    handle = reference.model.language_model.layers[l].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = reference(**inp.hf_kwargs()).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours - model(inp)).abs().max() > 1e-3


def test_resid_post_steering_equals_a_hand_written_hook(model, media):
    inp = padded_batch(model, media)
    d = _dir(model, 1)
    ours = model.run_with_hooks(inp, fwd_hooks=steering_hooks(model, d, "video", layers=[0], coeff=-2.0,
                                                               point="resid_post"))
    m = inp.layout.mask("video") & inp.attention_mask.bool()

    def by_hand(resid, hook):
        return resid + (-2.0) * m[..., None].float() * d[1]

    ref = model.run_with_hooks(inp, fwd_hooks=[("blocks.0.hook_resid_post", by_hand)])
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_generated_steering_equals_recomputing_without_cache(model, media):
    """Under KV caching, steering "generated" edits each new token once; a no-cache greedy loop that steers
    every generated position in a full forward must pick the same tokens with the same logits."""
    inp = model.prepare(**cases(media)["audio"])
    d = _dir(model, 2) * 3
    hooks = steering_hooks(model, d, "generated", layers=[0, 1], coeff=1.0)
    gen = model.generate(inp, max_new_tokens=4, fwd_hooks=hooks, return_logits=True, stop_at_eos=False)
    assert hooks.n_steered == 3 * 2  # steps 2..4 query one generated position each, in 2 layers
    x = inp
    toks = []
    for _ in range(4):
        m = x.layout.mask("generated")

        def by_hand(resid, hook, m=m):
            return resid + m[..., None].float() * d[int(hook.name.split(".")[1])]

        logits = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.hook_resid_pre", by_hand) for l in (0, 1)])
        t = logits[:, -1].argmax(-1)
        toks.append(int(t))
        x = x.extend(t[:, None])
    assert gen.new_tokens[0].tolist() == toks
    torch.testing.assert_close(gen.logits[-1][0], logits[0, -1], atol=1e-4, rtol=1e-4)
    plain = model.generate(inp, max_new_tokens=4, stop_at_eos=False, return_logits=True)
    assert (plain.logits[-1] - gen.logits[-1]).abs().max() > 1e-3  # the steering did something


def test_mean_difference_matches_a_full_cache(model, media):
    a = model.prepare(**cases(media)["audio"])
    b = padded_batch(model, media)
    d = mean_difference(model, a, [b], at="audio")
    assert d.shape == (model.cfg.n_layers + 1, model.cfg.d_model)
    _, ca = model.run_with_cache(a)
    _, cb = model.run_with_cache(b)
    for l in range(model.cfg.n_layers + 1):
        name = "blocks.0.hook_resid_pre" if l == 0 else f"blocks.{l - 1}.hook_resid_post"
        ma, mb = a.layout.mask("audio"), b.layout.mask("audio") & b.attention_mask.bool()
        mean_a = torch.stack([ca[name][i][ma[i]].mean(0) for i in range(ma.shape[0])]).mean(0)
        mean_b = torch.stack([cb[name][i][mb[i]].mean(0) for i in range(mb.shape[0])]).mean(0)
        torch.testing.assert_close(d[l], mean_a - mean_b, atol=1e-5, rtol=1e-5)


def test_probe_direction_is_the_logit_gradient():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0])
    y = torch.arange(60) % 3
    X[y == 1, 0] += 2
    p = LinearProbe(3).fit(X, y)
    x = X[0].double().clone().requires_grad_(True)
    lg = p.logits(x[None])[0]
    (lg[1] - lg[2]).backward()
    torch.testing.assert_close(probe_direction(p, 1, 2).double(), x.grad, atol=1e-6, rtol=1e-6)
    x.grad = None
    lg = p.logits(x[None])[0]
    (lg[1] - (lg[0] + lg[2]) / 2).backward()
    torch.testing.assert_close(probe_direction(p, 1).double(), x.grad, atol=1e-6, rtol=1e-6)


def test_random_direction_has_the_same_norms():
    d = torch.randn(4, 16) * torch.arange(1, 5)[:, None]
    r = random_direction_like(d, seed=3)
    torch.testing.assert_close(r.norm(dim=-1), d.norm(dim=-1))
    assert (torch.nn.functional.cosine_similarity(r, d, dim=-1).abs() < 0.9).all()


def test_sweep_shape_baseline_and_cells_equal_single_runs(model, media):
    inp = model.prepare(**cases(media)["audio"])
    d = _dir(model, 4)
    tok = 5
    metric = lambda logits, _: logits[:, -1, tok]  # noqa: E731
    sw = steering_sweep(model, inp, d, "audio", layers=[0, 1], coeffs=[0.5, 2.0], metric=metric, progress=False)
    assert sw.values.shape == (2, 2, 1)
    torch.testing.assert_close(sw.baseline, model(inp)[:, -1, tok])
    one = steer(model, inp, d, "audio", layers=[1], coeff=2.0)[:, -1, tok]
    torch.testing.assert_close(sw.values[1, 1], one, atol=1e-5, rtol=1e-5)
    assert "layer" in sw.table() and "<svg" in sw.view()._repr_html_()


def test_refusals(model, media):
    inp = model.prepare(**cases(media)["audio"])
    with pytest.raises(InputError, match="matched no position"):
        steer(model, inp, _dir(model), "video", layers=[0])
    with pytest.raises(InputError, match="shape"):
        steering_hooks(model, torch.zeros(3), layers=[0])
    with pytest.raises(InputError, match="NaN"):
        steering_hooks(model, torch.full((model.cfg.d_model,), float("nan")), layers=[0])
    with pytest.raises(InputError, match="layers"):
        steering_hooks(model, _dir(model), layers=[99])
    with pytest.raises(InputError, match="matches no position"):
        steering_sweep(model, inp, _dir(model), "image", layers=[0], coeffs=[1], metric=lambda l, i: l.sum(),
                       progress=False)
    with pytest.raises(InputError, match="point"):
        steering_hooks(model, _dir(model), layers=[0], point="attn_out")
