"""Qwen3-Omni-MoE thinker: parity with transformers' Qwen3OmniMoeThinkerForConditionalGeneration on tiny random
configs (fp32 logits and every layer's residual stream for text, audio, image, video, video with its soundtrack,
all together, a padded batch and greedy generation); positions against transformers' get_rope_index (including
fractional video times); the MoE hooks (router logits equal transformers', ablating an expert through
``hook_expert_out`` equals zeroing its weights); the deepstack hook (zeroing it equals zeroing the deepstack
mergers); and a smoke run of the analysis tools."""

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens.analysis import (attention_flow, head_effect_table, knockout_hooks, knockout_sweep, logit_lens,
                              patch_by_modality, path_patch, pooled_residuals, token_shift)
from av_lens.layout import Modality
from av_lens.testing.parity import assert_parity
from av_lens.testing.tiny import TinyMoESpec, save_tiny_qwen3_omni

TOL = 1e-4
Q3_SPECS = {
    "moe_all": TinyMoESpec(),
    "dense_layer1_tied": TinyMoESpec(n_layers=3, mlp_only_layers=(1,), n_kv_heads=1, tie=True, deepstack=(1,), seed=3),
}


@pytest.fixture(scope="module")
def q3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_q3")
    return {name: save_tiny_qwen3_omni(root / name, spec) for name, spec in Q3_SPECS.items()}


def load_q3_reference(folder):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    return Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def q3_pairs(q3_dirs):
    return {name: (HookedAVTransformer.from_pretrained(d), load_q3_reference(d)) for name, d in q3_dirs.items()}


@pytest.fixture(scope="module")
def q3_media():
    rng = np.random.default_rng(1)
    return {
        "video": rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8),  # 4 s at 2 fps: 4 steps of 2x2 tokens
        "image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "wav4": (0.1 * rng.standard_normal(16000 * 4)).astype(np.float32),
        "wav3": (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32),
    }


def q3_cases(m):
    return {
        "text": dict(text="Hello world, what is in this video?"),
        "audio": dict(text="What sound do you hear?", audio=[m["wav3"]]),
        "image": dict(text="What do you see?", images=[m["image"]]),
        "video": dict(text="Describe the video.", videos=[m["video"]]),
        "video_3fps": dict(text="Describe the video.", videos=[m["video"][:6]], fps=3.0),  # fractional times
        "video_with_audio": dict(text="Describe what you see and hear.", videos=[m["video"]], video_audio=[m["wav4"]],
                                 use_audio_in_video=True),
        "everything": dict(text="Describe.", videos=[m["video"]], video_audio=[m["wav4"]], images=[m["image"]],
                           audio=[m["wav3"]], use_audio_in_video=True),
    }


PAD_A = "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>What sound?<|im_end|>\n<|im_start|>assistant\n"
PAD_V = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|audio_start|><|audio_pad|><|audio_end|>"
         "<|vision_start|><|video_pad|><|vision_end|>Describe it please.<|im_end|>\n<|im_start|>assistant\n")


def q3_padded_batch(model, m):
    return model.prepare([PAD_A, PAD_V], audio=[m["wav3"], m["wav4"]], images=[m["image"]], videos=[m["video"]],
                         chat=False, use_audio_in_video=False)


def check_parity(ours, ref, inp):
    return assert_parity(ours, ref, inp, TOL)


@pytest.mark.parametrize("spec", list(Q3_SPECS))
@pytest.mark.parametrize("case", ["text", "audio", "image", "video", "video_3fps", "video_with_audio", "everything"])
def test_forward_parity(q3_pairs, q3_media, spec, case):
    ours, ref = q3_pairs[spec]
    inp = ours.prepare(**q3_cases(q3_media)[case])
    cache = check_parity(ours, ref, inp)
    visual = inp.layout.mask("image|video")
    if visual.any():  # deepstack features land on the image and video positions only
        ds = cache[f"blocks.{ours.cfg.n_deepstack - 1}.hook_deepstack"]
        assert ds[visual].abs().sum() > 0 and ds[~visual].abs().sum() == 0


def test_padded_batch_parity(q3_pairs, q3_media):
    ours, ref = q3_pairs["moe_all"]
    inp = q3_padded_batch(ours, q3_media)
    assert not inp.attention_mask[0, 0] and inp.attention_mask[1].all()
    check_parity(ours, ref, inp)


@pytest.mark.parametrize("case", ["video_with_audio", "padded_batch"])
def test_greedy_generate_matches(q3_pairs, q3_media, case):
    ours, ref = q3_pairs["moe_all"]
    inp = q3_padded_batch(ours, q3_media) if case == "padded_batch" else ours.prepare(**q3_cases(q3_media)[case])
    gen = ours.generate(inp, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    with torch.no_grad():
        out = ref.generate(**ours.reference_kwargs(inp), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    assert torch.equal(gen.new_tokens, out.sequences[:, inp.shape[1]:])
    assert (torch.stack(gen.logits, 1) - torch.stack(out.logits, 1)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["audio", "image", "video", "video_3fps", "video_with_audio", "everything"])
def test_layout_matches_get_rope_index(q3_pairs, q3_media, case):
    ours, ref = q3_pairs["moe_all"]
    inp = ours.prepare(**q3_cases(q3_media)[case])
    k = ours.reference_kwargs(inp)
    fam = k.get("feature_attention_mask")
    pos, delta = ref.model.get_rope_index(k["input_ids"], k.get("image_grid_thw"), k.get("video_grid_thw"),
                                          k["attention_mask"], k["use_audio_in_video"],
                                          None if fam is None else fam.sum(-1), k.get("video_second_per_grid"))
    # (audio only: transformers falls back to 1-D positions, which av_lens's audio rule also gives)
    assert torch.equal(pos.float(), inp.layout.position_ids)
    assert torch.allclose(delta.float().view(-1), inp.layout.rope_deltas.view(-1))


def test_fractional_video_times_and_time_ordered_interleaving(q3_pairs, q3_media):
    ours, _ = q3_pairs["moe_all"]
    L = ours.prepare(**q3_cases(q3_media)["video_3fps"]).layout
    t = L.position_ids[0, 0, L.positions("video")]
    assert (t != t.round()).any()  # 2/3 s per step x 13 per second: fractional, kept as the reference keeps them
    L = ours.prepare(**q3_cases(q3_media)["video_with_audio"]).layout
    mod = L.modality[0]
    media = (mod == int(Modality.VIDEO)) | (mod == int(Modality.AUDIO))
    tpos = L.position_ids[0, 0, media]
    assert torch.all(tpos[1:] >= tpos[:-1])  # tokens come in time order within the block
    kinds = mod[media]
    assert (kinds[:-1] != kinds[1:]).sum() >= 2  # video and audio alternate (not one block after the other)
    assert L.count("video") == 16 and L.count("audio") > 0


# ------------------------------------------------------------------------------------------------ MoE / deepstack
def test_router_logits_equal_transformers(q3_pairs, q3_media):
    ours, ref = q3_pairs["moe_all"]
    inp = ours.prepare(**q3_cases(q3_media)["video_with_audio"])
    names = [f"blocks.{l}.mlp.hook_router_logits" for l in ours.cfg.moe_layers]
    with torch.no_grad():
        _, cache = ours.run_with_cache(inp, names_filter=names)
        out = ref(**ours.reference_kwargs(inp), output_router_logits=True)
    for l, theirs in zip(ours.cfg.moe_layers, out.router_logits):
        torch.testing.assert_close(cache[f"blocks.{l}.mlp.hook_router_logits"].reshape(theirs.shape), theirs,
                                   atol=1e-5, rtol=1e-4)
    top = cache[f"blocks.{ours.cfg.moe_layers[0]}.mlp.hook_router_logits"].topk(2, -1).indices
    assert top.unique().numel() > 1  # the routers really route (random, perturbed gates)


def test_expert_ablation_through_hooks_equals_zeroed_weights(q3_pairs, q3_media):
    """Zeroing expert e's output slots in layer 0 (keeping the routing) equals transformers with e's down_proj zeroed."""
    ours, ref = q3_pairs["moe_all"]
    inp = ours.prepare(**q3_cases(q3_media)["video"])
    e = 1
    chosen = {}

    def keep_experts(t, hook):
        chosen["i"] = t
        return t

    def ablate(t, hook):
        return t.masked_fill((chosen["i"] == e)[..., None], 0.0)

    with torch.no_grad():
        ablated = ours.run_with_hooks(inp, fwd_hooks=[("blocks.0.mlp.hook_topk_experts", keep_experts),
                                                      ("blocks.0.mlp.hook_expert_out", ablate)])
        clean = ours(inp)
        w = ref.model.language_model.layers[0].mlp.experts
        saved = w.down_proj.data[e].clone() if hasattr(w, "down_proj") else None
        w.down_proj.data[e] = 0
        try:
            theirs = ref(**ours.reference_kwargs(inp)).logits
        finally:
            w.down_proj.data[e] = saved
    assert (chosen["i"] == e).any()
    assert (ablated - clean).abs().max() > 1e-4
    assert (ablated - theirs).abs().max().item() <= TOL


def test_deepstack_hook_zeroed_equals_zeroed_mergers(q3_pairs, q3_media):
    ours, ref = q3_pairs["moe_all"]
    inp = ours.prepare(**q3_cases(q3_media)["image"])
    hooks = [(f"blocks.{l}.hook_deepstack", lambda t, hook: torch.zeros_like(t)) for l in range(ours.cfg.n_deepstack)]
    with torch.no_grad():
        ablated = ours.run_with_hooks(inp, fwd_hooks=hooks)
        mergers = ref.model.visual.merger_list
        saved = [(m.mlp[2].weight.data.clone(), m.mlp[2].bias.data.clone()) for m in mergers]
        for m in mergers:
            m.mlp[2].weight.data.zero_()
            m.mlp[2].bias.data.zero_()
        try:
            theirs = ref(**ours.reference_kwargs(inp)).logits
        finally:
            for m, (wt, b) in zip(mergers, saved):
                m.mlp[2].weight.data.copy_(wt)
                m.mlp[2].bias.data.copy_(b)
        clean = ours(inp)
    assert (ablated - clean).abs().max() > 1e-4
    assert (ablated - theirs).abs().max().item() <= TOL


def test_every_analysis_tool_runs(q3_pairs, q3_media):
    ours, _ = q3_pairs["moe_all"]
    inp = ours.prepare(**q3_cases(q3_media)["video_with_audio"])
    n, H = ours.cfg.n_layers, ours.cfg.n_heads
    flow = attention_flow(ours, inp, "last_prompt", keys={"audio": "audio", "video": "video", "rest": "text|special"})
    torch.testing.assert_close(flow.mass.sum(-1), torch.ones_like(flow.mass.sum(-1)), atol=1e-5, rtol=0)
    lens = logit_lens(ours, inp, "audio", k=3)
    assert lens.top_ids.shape[1] == inp.layout.count("audio")
    with torch.no_grad():
        clean = ours(inp)
        knocked = ours.run_with_hooks(inp, fwd_hooks=knockout_hooks(ours, "last_prompt", "audio", range(n)))
    assert not torch.allclose(clean[:, -1], knocked[:, -1])
    last_tok = int(clean[0, -1].argmax())
    other = ours.prepare(**{**q3_cases(q3_media)["video_with_audio"], "video_audio": [q3_media["wav4"][::-1].copy()]})
    metric = lambda logits: logits[0, -1, last_tok]
    res = patch_by_modality(ours, inp, other, metric, sets=("audio", "video", "text"), progress=False)
    assert abs(float(res["resid_pre"][0, 0]) - res.clean) < 1e-4  # audio positions carry the whole difference
    effects = head_effect_table(ours, inp, metric, progress=False)
    assert effects.shape == (n, H) and effects.abs().max() > 0
    pp = path_patch(ours, inp, other, metric, senders="audio", receivers="last_prompt", layers=[0, 1])
    assert pp.shape == (2,) and torch.isfinite(pp).all()
    # knockout during generation (KV cache, MoE routing and deepstack in the prefill): the sweep's window over
    # every layer equals generating with the same hooks by hand
    first = lambda gen, _: gen.new_tokens[0, :3].float()
    sweep = knockout_sweep(ours, inp, "generated", "audio", [range(n)], first, generate=dict(max_new_tokens=3,
                                                                                              stop_at_eos=False),
                           progress=False)
    by_hand = ours.generate(inp, max_new_tokens=3, stop_at_eos=False,
                            fwd_hooks=knockout_hooks(ours, "generated", "audio", range(n)))
    assert torch.equal(sweep.values[0], by_hand.new_tokens[0, :3].float())
    feats = pooled_residuals(ours, inp, "audio")
    assert feats.shape == (n + 1, 1, ours.cfg.d_model)
    shift = token_shift(ours, ours, inp, output_tokens=by_hand.new_tokens[0], eos_token_ids=())
    assert (shift.kl.abs() < 1e-5).all()  # a model against itself: no shift
