"""Attention flow against brute force over full cached patterns."""

import pytest
import torch

from av_lens.analysis.attention_flow import DEFAULT_GROUPS, AttentionFlow, attention_flow
from av_lens.errors import InputError
from conftest import cases, padded_batch


def brute_force(model, inputs, query, groups=DEFAULT_GROUPS, per_token=False):
    """[batch, layer, head, group] from run_with_cache's full patterns."""
    L = inputs.layout
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    real = L.attention_mask.bool()
    qm = L.mask(query) & real
    G = torch.stack([(L.mask(s) & real).float() for s in groups.values()])  # [g, b, k]
    B, T = L.shape
    out = torch.zeros(B, model.cfg.n_layers, model.cfg.n_heads, len(groups))
    for l in range(model.cfg.n_layers):
        pat = cache[f"blocks.{l}.attn.hook_pattern"]
        for b in range(B):
            for q in qm[b].nonzero().squeeze(-1).tolist():
                for gi in range(len(groups)):
                    m = G[gi, b].clone()
                    m[q + 1:] = 0
                    val = (pat[b, :, q] * m).sum(-1)
                    if per_token:
                        val = val / m.sum() if m.sum() > 0 else val * 0
                    out[b, l, :, gi] += val
            out[b, l] /= max(int(qm[b].sum()), 1)
    return out


@pytest.mark.parametrize("case", ["video_with_audio", "image_video_audio"])
@pytest.mark.parametrize("query", ["last_prompt", "text", "audio|video"])
def test_rows_and_pattern_match_brute_force(model, media, case, query):
    inp = model.prepare(**cases(media)[case])
    ref = brute_force(model, inp, query)
    for method in ("rows", "pattern"):
        res = attention_flow(model, inp, query, method=method)
        assert res.mass.shape == (1, model.cfg.n_layers, model.cfg.n_heads, len(DEFAULT_GROUPS))
        torch.testing.assert_close(res.mass, ref, atol=1e-5, rtol=1e-4)
    # a partition of the visible keys: masses sum to one per layer and head
    torch.testing.assert_close(res.mass.sum(-1), torch.ones_like(res.mass.sum(-1)), atol=1e-5, rtol=0)


def test_per_token_and_padded_batch(model, media):
    inp = padded_batch(model, media)
    ref = brute_force(model, inp, "last_prompt|text", per_token=True)
    res = attention_flow(model, inp, "last_prompt|text", per_token=True)
    torch.testing.assert_close(res.mass, ref, atol=1e-5, rtol=1e-4)
    assert res.mass[0, ..., list(DEFAULT_GROUPS).index("video")].abs().max() == 0  # sample 0 has no video


def test_generation_steps_equal_one_teacher_forced_forward(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    flow = AttentionFlow(model, "generated")
    gen = model.generate(inp, max_new_tokens=5, stop_at_eos=False, fwd_hooks=flow.hooks())
    # the 5th token is sampled but never run: 4 decoding steps, each one generated query
    assert flow.result().n_queries.tolist() == [4.0]
    full = inp.extend(gen.new_tokens[:, :-1])
    ref = brute_force(model, full, "generated")
    torch.testing.assert_close(flow.result().mass, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attention_flow(model, full, "generated").mass, ref, atol=1e-5, rtol=1e-4)


def test_rows_method_keeps_sdpa_path(model, media):
    """The rows method must not make the model materialise patterns (that is the memory point)."""
    inp = model.prepare(**cases(media)["video_with_audio"])
    flow = AttentionFlow(model, "last_prompt")
    with model.hooks(fwd_hooks=flow.hooks()):
        assert not any(b.attn.hook_pattern.has_hooks() or b.attn.hook_attn_scores.has_hooks() for b in model.blocks)


def test_bad_arguments(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    with pytest.raises(InputError, match="matches no position"):
        attention_flow(model, inp, "image")
    with pytest.raises(InputError, match="outside the model's blocks"):
        attention_flow(model, inp, layers=[0, 7])
    with pytest.raises(InputError, match="method"):
        AttentionFlow(model, method="fast")
    flow = AttentionFlow(model, "generated")
    model.run_with_hooks(inp, fwd_hooks=flow.hooks())
    with pytest.raises(InputError, match="no position matched"):
        flow.result()


def test_rows_method_refuses_edited_masks_and_pattern_method_sees_them(model, media):
    from av_lens.analysis.knockout import knockout_hooks

    inp = model.prepare(**cases(media)["video_with_audio"])
    ko = knockout_hooks(model, "last_prompt", "video", [0, 1])
    with pytest.raises(InputError, match="method='pattern'"):
        model.run_with_hooks(inp, fwd_hooks=ko + AttentionFlow(model, "last_prompt").hooks())
    flow = AttentionFlow(model, "last_prompt", method="pattern")
    model.run_with_hooks(inp, fwd_hooks=ko + flow.hooks())
    assert flow.result().group("video").abs().max() < 1e-6  # the knocked-out edges carry no attention
