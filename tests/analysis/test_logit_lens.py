"""Logit lens against a brute-force computation from a full residual cache."""

import pytest
import torch

from av_lens.analysis.logit_lens import LogitLens, logit_lens
from av_lens.errors import InputError
from conftest import cases, padded_batch


def brute(model, inputs, sel, apply_ln):
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_post") or n == "blocks.0.hook_resid_pre")
    m = inputs.layout.mask(sel) & inputs.layout.attention_mask.bool()
    idx = m.nonzero()
    out = []
    for l in range(model.cfg.n_layers):
        x = cache[f"blocks.{l}.hook_resid_post"][idx[:, 0], idx[:, 1]]
        if apply_ln:
            x = model.ln_final(x[None])[0]  # the model's own module, not the lens's arithmetic
        out.append(model.unembed(x[None])[0].softmax(-1))
    return torch.stack(out), idx  # [layer, n, vocab]


@pytest.mark.parametrize("apply_ln", [True, False])
def test_topk_and_ranks_match_brute_force(model, media, apply_ln):
    inp = model.prepare(**cases(media)["video_with_audio"])
    targets = [20, 33, 101]
    res = logit_lens(model, inp, "audio", k=5, targets=targets, apply_ln=apply_ln)
    probs, idx = brute(model, inp, "audio", apply_ln)
    assert res.positions == [tuple(p) for p in idx.tolist()]
    v, i = probs.topk(5, dim=-1)
    torch.testing.assert_close(res.top_probs, v, atol=1e-6, rtol=1e-5)
    assert torch.equal(res.top_ids, i)
    pt = probs[..., targets]
    ranks = (probs[..., None, :] > pt[..., None]).sum(-1) + 1
    # the lens and the brute force compute the probabilities in different orders: a token within float
    # error of the target's probability may fall on either side, so the rank must lie between the counts
    # of tokens surely above it and of tokens possibly above it (equal to the exact count off ties)
    eps = 1e-6
    lo = (probs[..., None, :] > pt[..., None] + eps).sum(-1) + 1
    hi = (probs[..., None, :] > pt[..., None] - eps).sum(-1)
    hi = torch.maximum(hi, lo)
    assert ((res.target_rank >= lo) & (res.target_rank <= hi)).all()
    assert (res.target_rank == ranks).float().mean() >= 0.99
    torch.testing.assert_close(res.target_prob, pt, atol=1e-6, rtol=1e-5)
    # a target whose brute-force rank is <= k is a hit, and only those
    assert torch.equal(res.hits(3), (ranks <= 3).any(-1))


def test_raw_and_normed_lens_differ_and_last_layer_normed_equals_model(model, media):
    inp = model.prepare(**cases(media)["audio"])
    normed = logit_lens(model, inp, "last_prompt", k=3)
    raw = logit_lens(model, inp, "last_prompt", k=3, apply_ln=False)
    assert not torch.allclose(normed.top_probs, raw.top_probs)
    logits = model(inp)[0, -1]
    torch.testing.assert_close(normed.top_probs[-1, 0], logits.softmax(-1).topk(3).values, atol=1e-6, rtol=1e-5)


def test_padded_batch_per_sample_hits_and_embed_layer(model, media):
    inp = padded_batch(model, media)
    tok = int(model(inp)[1, -1].argmax())
    res = logit_lens(model, inp, "last_prompt", k=1, targets=[tok], include_embed=True)
    assert res.layers[0] == -1 and len(res.layers) == model.cfg.n_layers + 1
    assert res.per_sample_hit(2)[1]  # the final layer's top-1 of sample 1 is its argmax
    assert model.cfg.n_layers - 1 in res.hit_layers()
    assert len(res.top_tokens(model.cfg.n_layers - 1, 0)) == 1


def test_lens_inside_generate_reads_prompt_only(model, media):
    inp = model.prepare(**cases(media)["audio"])
    lens = LogitLens(model, "audio", k=2)
    model.generate(inp, max_new_tokens=3, fwd_hooks=lens.hooks())
    ref = logit_lens(model, inp, "audio", k=2)
    torch.testing.assert_close(lens.result().top_probs, ref.top_probs)


def test_bad_arguments(model, media):
    inp = model.prepare(**cases(media)["audio"])
    with pytest.raises(InputError, match="matches no position"):
        logit_lens(model, inp, "video")
    with pytest.raises(InputError, match="outside the vocabulary"):
        logit_lens(model, inp, "audio", targets=[10 ** 7])
    with pytest.raises(InputError, match="outside the model's blocks"):
        logit_lens(model, inp, "audio", layers=[5])
    with pytest.raises(InputError, match="no targets"):
        logit_lens(model, inp, "audio").hits()
