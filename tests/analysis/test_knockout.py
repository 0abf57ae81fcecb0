"""Attention knockout against transformers' thinker run with an explicit 4-D additive attention mask."""

import pytest
import torch

from av_lens.analysis.knockout import (from_layer_windows, knockout_hooks, knockout_sweep, sliding_windows)
from av_lens.errors import InputError
from conftest import cases, padded_batch


def hf_knockout_logits(reference, inputs, query, keys, layers):
    """transformers' model, with the layers in ``layers`` given a hand-built 4-D additive mask
    (causal + padding + the blocked query->key edges) instead of their own."""
    L = inputs.layout
    B, T = L.shape
    lo = torch.finfo(torch.float32).min
    real = L.attention_mask.bool()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & real[:, None, :]
    block = (L.mask(query) & real)[:, :, None] & (L.mask(keys) & real)[:, None, :]
    mask4 = torch.zeros(B, 1, T, T).masked_fill(~(allowed & ~block)[:, None], lo)
    handles = []
    for l in layers:
        def pre(mod, args, kwargs):
            kwargs["attention_mask"] = mask4
            return args, kwargs
        handles.append(reference.model.language_model.layers[l].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return reference(**inputs.hf_kwargs()).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("query,keys,layers", [
    ("last_prompt", "video", [0, 1]), ("text", "audio", [1]), ("last_prompt|text", "audio|video", [0]),
])
def test_prefill_knockout_matches_hf_4d_mask(model, reference, media, query, keys, layers):
    inp = model.prepare(**cases(media)["video_with_audio"])
    ours = model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, query, keys, layers))
    ref = hf_knockout_logits(reference, inp, query, keys, layers)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours - model(inp)).abs().max() > 1e-4  # the knockout changed something


def test_padded_batch_knockout_matches_hf(model, reference, media):
    inp = padded_batch(model, media)
    ours = model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, "text", "audio", [0, 1]))
    ref = hf_knockout_logits(reference, inp, "text", "audio", [0, 1])
    real = inp.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_generate_knockout_every_step_matches_hf_full_forward(model, reference, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    hooks = knockout_hooks(model, "generated", "video", [1])
    gen = model.generate(inp, max_new_tokens=5, stop_at_eos=False, fwd_hooks=hooks, return_logits=True)
    full = inp.extend(gen.new_tokens[:, :-1])
    ref = hf_knockout_logits(reference, full, "generated", "video", [1])
    P = inp.shape[1]
    for k, step in enumerate(gen.logits):
        torch.testing.assert_close(step[0], ref[0, P - 1 + k], atol=1e-4, rtol=1e-4)
    plain = model.generate(inp, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    torch.testing.assert_close(plain.logits[0], gen.logits[0])  # the prefill has no generated query
    assert max((a - b).abs().max() for a, b in zip(plain.logits[1:], gen.logits[1:])) > 1e-4


def test_sweep_windows_and_encoder_runs_once(model, media, monkeypatch):
    inp = model.prepare(**cases(media)["video_with_audio"])
    tok = int(model(inp)[0, -1].argmax())
    metric = lambda logits, _: logits[0, -1].log_softmax(-1)[tok]
    windows = sliding_windows(model.cfg.n_layers, 1)
    calls = {"n": 0}
    orig = model.encode
    monkeypatch.setattr(model, "encode", lambda x: (calls.__setitem__("n", calls["n"] + 1), orig(x))[1])
    res = knockout_sweep(model, inp, "last_prompt", "video", windows, metric, progress=False)
    assert calls["n"] == 1
    for w, v in zip(windows, res.values):
        direct = metric(model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, "last_prompt", "video", w)), inp)
        torch.testing.assert_close(v, direct.float())
    torch.testing.assert_close(res.baseline, metric(model(inp), inp).float())
    gen_res = knockout_sweep(model, inp, "generated", "video", from_layer_windows(model.cfg.n_layers),
                             lambda g, _: float(len(g.new_tokens[0])), generate=dict(max_new_tokens=3, stop_at_eos=False),
                             progress=False)
    assert gen_res.values.tolist() == [3.0] * model.cfg.n_layers
    assert "window" in res.table()


def test_bad_arguments(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    with pytest.raises(InputError, match="outside the model's blocks"):
        knockout_hooks(model, "text", "video", [0, 9])
    with pytest.raises(InputError, match="does not fit"):
        sliding_windows(model.cfg.n_layers, 7)
    with pytest.raises(InputError, match="matches no position"):
        knockout_sweep(model, inp, "text", "image", [range(0, 1)], lambda l, i: 0.0, progress=False)
    with pytest.raises(InputError, match="no key to attend to"):
        model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, "text", "all", [0]))
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())  # nothing left attached after the error


def test_fast_path_equals_explicit_path(model, media):
    """The kernel + recomputed-rows path and the explicit-attention path give the same knocked-out logits."""
    inp = padded_batch(model, media)
    ko = knockout_hooks(model, "text", "audio", [0, 1])
    fast = model.run_with_hooks(inp, fwd_hooks=ko)
    explicit = model.run_with_hooks(inp, fwd_hooks=ko + [("blocks.0.attn.hook_pattern", lambda p, hook: p),
                                                          ("blocks.1.attn.hook_pattern", lambda p, hook: p)])
    real = inp.attention_mask.bool()
    torch.testing.assert_close(fast[real], explicit[real], atol=1e-5, rtol=1e-5)
