"""Gemma-3n: parity with transformers' Gemma3nForConditionalGeneration on a tiny random config (fp32 logits and
every layer's full AltUp state for text, audio, image, image+audio and a left-padded batch; greedy generation with
per-step logits, with prompts longer than the sliding window so that windows and KV sharing act in the cache);
the 1-D layout (token counts vs the processor's expansion, markers, positions vs transformers' generate, audio time
stamps); the hook mapping onto the AltUp streams; KV sharing; the published configs vs the YAMLs; bad inputs; and a
smoke run of the analysis tools with a property each."""

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens.adapters.gemma3n import _to_av_config
from av_lens.analysis import (attention_flow, head_effect_table, knockout_hooks, logit_lens, patch_by_modality,
                              pooled_residuals)
from av_lens.errors import InputError, LayoutError
from av_lens.registry import get_spec
from av_lens.testing.tiny_gemma3n import TinyGemma3nSpec, save_tiny_gemma3n

TOL = 1e-4
SPEC = TinyGemma3nSpec()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import Gemma3nForConditionalGeneration

    folder = save_tiny_gemma3n(tmp_path_factory.mktemp("tiny_gemma3n") / "g3n", SPEC)
    ref = Gemma3nForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return HookedAVTransformer.from_pretrained(folder), ref


@pytest.fixture(scope="module")
def media():
    rng = np.random.default_rng(1)
    return {"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            "image2": rng.integers(0, 255, (96, 160, 3), dtype=np.uint8),
            "wav2": (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32),
            "wav1": (0.1 * rng.standard_normal(16000)).astype(np.float32)}


def cases(m):
    return {
        "text": dict(text="Hello world, what is in this video? The quick brown fox jumps over the lazy dog."),
        "audio": dict(text="What sound do you hear?", audio=[m["wav2"]]),
        "image": dict(text="What do you see?", images=[m["image"]]),
        "image_audio": dict(text="Describe what you see and hear.", images=[m["image"]], audio=[m["wav2"]]),
    }


PAD_TEXTS = ["<audio_soft_token>What sound?", "<image_soft_token><audio_soft_token>Describe it please, in detail."]


@pytest.fixture(scope="module")
def padded(pair, media):
    return pair[0].prepare(PAD_TEXTS, images=[media["image2"]], audio=[media["wav1"], media["wav2"]])


def assert_stream_parity(ours, ref, inp, tol=TOL):
    """Logits and the full AltUp state before layer 0 and after every layer (transformers' hidden_states are
    [n_streams, batch, pos, d_model]) at the real positions; returns (max logit diff, max state diff)."""
    with torch.no_grad():
        logits, cache = ours.run_with_cache(inp)
        out = ref(**ours.reference_kwargs(inp), output_hidden_states=True)
    real = inp.attention_mask.bool()
    dl = (logits - out.logits)[real].abs().max().item()
    assert dl <= tol, f"logits differ by {dl}"
    names = ["blocks.0.hook_streams_pre"] + [f"blocks.{l}.hook_streams_post" for l in range(ours.cfg.n_layers)]
    ds = 0.0
    for name, theirs in zip(names, out.hidden_states, strict=True):
        d = (cache[name] - theirs.permute(1, 2, 0, 3))[real].abs().max().item()
        assert d <= tol, f"{name} differs by {d}"
        ds = max(ds, d)
    assert torch.equal(cache["stream.hook_streams_in"], cache["blocks.0.hook_streams_pre"])
    return dl, ds


@pytest.mark.parametrize("case", ["text", "audio", "image_audio"])  # image alone: covered by image_audio
def test_forward_parity(pair, media, case):
    ours, ref = pair
    inp = ours.prepare(**cases(media)[case])
    assert inp.shape[1] > SPEC.sliding_window  # the local layers' window cuts
    assert_stream_parity(ours, ref, inp)


def test_padded_batch_parity(pair, padded):
    ours, ref = pair
    assert not padded.attention_mask[0, 0] and padded.attention_mask[1].all()
    assert_stream_parity(ours, ref, padded)


@pytest.mark.parametrize("case", ["image_audio", "padded_batch"])
def test_greedy_generate_matches(pair, media, padded, case):
    ours, ref = pair
    inp = padded if case == "padded_batch" else ours.prepare(**cases(media)[case])
    gen = ours.generate(inp, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    kw = {k: v for k, v in ours.reference_kwargs(inp).items() if k != "position_ids"}  # generate derives its own
    with torch.no_grad():
        out = ref.generate(**kw, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
    assert torch.equal(gen.new_tokens, out.sequences[:, inp.shape[1]:])
    assert (torch.stack(gen.logits, 1) - torch.stack(out.logits, 1)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------ layout
def test_layout_counts_match_the_processor_expansion(pair, padded):
    ours, _ = pair
    hf, tok = ours.hf_config, ours.tokenizer
    items = padded.layout.items
    assert [it.n_tokens for it in items if it.modality.name == "IMAGE"] == [hf.vision_soft_tokens_per_image]
    assert [it.n_tokens for it in items if it.modality.name == "AUDIO"] == [hf.audio_soft_tokens_per_image] * 2
    for b in range(2):
        ids = padded.input_ids[b]
        assert padded.layout.count("image", b) == int((ids == hf.image_token_id).sum())
        assert padded.layout.count("audio", b) == int((ids == hf.audio_token_id).sum())
        for marker in ("<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>"):
            where = (ids == tok.convert_tokens_to_ids(marker)).nonzero().flatten()
            assert all(padded.layout.modality[b, int(i)] == 4 for i in where)  # SPECIAL
    # the processor's own token types agree with the layout's image / audio tags
    proc_types = ours.processor(text=[t for t in PAD_TEXTS], images=[[], [np.zeros((64, 64, 3), np.uint8)]],
                                audio=[np.zeros(16000, np.float32), np.zeros(16000, np.float32)], return_tensors="pt",
                                padding=True, padding_side="left")["token_type_ids"]
    assert int((proc_types == 1).sum()) == padded.layout.count("image", 1)  # mm_token_type_ids: 1 image, 3 audio
    assert int((proc_types == 3).sum()) == sum(padded.layout.count("audio", b) for b in range(2))


def test_positions_are_what_transformers_uses(pair, padded):
    ours, ref = pair
    theirs = ref._prepare_position_ids_for_generation(padded.input_ids, {"attention_mask": padded.attention_mask})
    assert torch.equal(padded.layout.position_ids[0], theirs.cpu())
    assert padded.layout.extend(1).position_ids[0, :, -1].tolist() == padded.attention_mask.sum(-1).tolist()


def test_audio_time_stamps(pair, media):
    ours, _ = pair
    L = ours.prepare(**cases(media)["audio"]).layout
    t = L.time[0, L.positions("audio")]
    assert t[1].item() == pytest.approx(0.16)  # 10 ms hop x 4 (subsampling convs) x 4 (conformer reduction)
    assert torch.isnan(L.time[0, L.positions("text")]).all()


# ------------------------------------------------------------------------------------------------ hooks
def test_altup_hook_mapping(pair, media):
    ours, _ = pair
    inp = ours.prepare(**cases(media)["audio"])
    with torch.no_grad():
        logits, cache = ours.run_with_cache(inp)
    n = ours.cfg.n_layers
    assert cache["blocks.0.hook_streams_pre"].shape == (*inp.shape, 4, ours.cfg.d_model)
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])
    for l in range(n):
        b = f"blocks.{l}."
        assert torch.equal(cache[b + "hook_resid_post"], cache[b + "hook_streams_post"][:, :, 0])
        assert torch.equal(cache[b + "hook_resid_in"], cache[b + "hook_predicted"][:, :, 0])
        torch.testing.assert_close(cache[b + "hook_resid_mid"], (cache[b + "hook_resid_in"] + cache[b + "hook_attn_out"]
                                                                 + cache[b + "hook_laurel_out"]) / 2 ** 0.5)
        torch.testing.assert_close(cache[b + "hook_activated"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"])
        # the per-layer term goes to streams 1.. only
        torch.testing.assert_close(cache[b + "hook_streams_post"][:, :, 1:] - cache[b + "hook_corrected"][:, :, 1:],
                                   cache[b + "hook_per_layer_out"][:, :, None].expand(-1, -1, 3, -1))
        if l + 1 < n:
            assert torch.equal(cache[b + "hook_resid_post"], cache[f"blocks.{l + 1}.hook_resid_pre"])
    # sparse layers: the gate keeps only what exceeds its gaussian cutoff (~5 % of units)
    kept = (cache["blocks.0.mlp.hook_pre"] > 0).float().mean().item()
    assert 0 < kept < 0.2 and (cache["blocks.2.mlp.hook_pre"] == cache["blocks.2.mlp.hook_pre_dense"]).all()
    # editing resid_pre changes stream 0 only; editing streams_pre reaches every stream
    seen = {}
    with torch.no_grad():
        ours.run_with_hooks(inp, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: t * 0),
                                            ("blocks.1.hook_predicted", lambda t, hook: seen.setdefault("p", t))])
    state = cache["blocks.1.hook_streams_pre"].clone()
    state[:, :, 0] = 0
    want = ours.blocks[1].altup.predict(state.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)
    torch.testing.assert_close(seen["p"], want)
    # stop_at_layer returns the AltUp state entering that layer (the cached run took the explicit attention path)
    with torch.no_grad():
        torch.testing.assert_close(ours(inp, stop_at_layer=2), cache["blocks.2.hook_streams_pre"], atol=1e-5, rtol=0)
    # soft-capping
    cap = ours.stream.softcap
    torch.testing.assert_close(logits, cap * torch.tanh(cache["stream.hook_logits_uncapped"] / cap))


def test_kv_sharing(pair, media):
    """Layers 2 and 3 attend with the keys/values of layers 0 (sliding) and 1 (full); they have no k/v weights."""
    ours, ref = pair
    assert [b.attn.kv_mode for b in ours.blocks] == ref.config.text_config.kv_sharing_modes == \
        ["store", "store", "reuse", "reuse"]
    assert not hasattr(ours.blocks[2].attn, "k_proj") and hasattr(ours.blocks[1].attn, "k_proj")
    inp = ours.prepare(**cases(media)["text"])
    with torch.no_grad():
        _, cache = ours.run_with_cache(inp, names_filter=lambda n: "hook_rot_k" in n or "hook_v" in n
                                       or "hook_pattern" in n)
    for src, dst in ((0, 2), (1, 3)):
        assert torch.equal(cache[f"blocks.{src}.attn.hook_rot_k"], cache[f"blocks.{dst}.attn.hook_rot_k"])
        assert torch.equal(cache[f"blocks.{src}.attn.hook_v"], cache[f"blocks.{dst}.attn.hook_v"])
    # the sliding layers see at most `window` keys; the full ones all earlier keys
    P = inp.shape[1]
    for l, width in ((0, SPEC.sliding_window), (1, P)):
        nz = (cache[f"blocks.{l}.attn.hook_pattern"][0, 0] > 0).sum(-1)
        assert int(nz.max()) == width


def test_published_configs_match_the_yamls():
    from transformers import Gemma3nConfig

    for name, layers, d_mlp, shared in (("google/gemma-3n-E2B-it", 30, 8192, 10), ("google/gemma-3n-E4B-it", 35, 16384, 15)):
        types = (["sliding_attention"] * 4 + ["full_attention"]) * (layers // 5)
        hf = Gemma3nConfig(text_config=dict(num_hidden_layers=layers, intermediate_size=d_mlp, layer_types=types,
                                            num_kv_shared_layers=shared, activation_sparsity_pattern=
                                            [0.95] * 10 + [0.0] * (layers - 10)))
        cfg = _to_av_config(hf)
        get_spec(name).check(cfg, "published config")
        assert cfg.extra["kv_sharing_modes"].count("reuse") == shared


def test_bad_inputs_are_refused(pair, media):
    ours, _ = pair
    with pytest.raises(InputError, match="takes no video"):
        ours.prepare("What happens?", videos=[np.zeros((2, 56, 56, 3), np.uint8)])
    with pytest.raises(InputError, match="image placeholders"):
        ours.prepare("<image_soft_token>What?", images=[media["image"], media["image"]])
    with pytest.raises(LayoutError, match="audio"):
        ours(ours.to_tokens("<audio_soft_token><audio_soft_token>Hi"))  # placeholders without their audio
    with pytest.raises(InputError, match="cannot be spread"):
        ours.place({"embed": "cpu"})
    with pytest.raises(InputError, match="method='pattern'"):
        attention_flow(ours, ours.prepare(**cases(media)["text"]), "last_prompt")


# ------------------------------------------------------------------------------------------------ analysis
def test_every_analysis_tool_runs(pair, media):
    ours, _ = pair
    inp = ours.prepare(**cases(media)["audio"])
    n, H = ours.cfg.n_layers, ours.cfg.n_heads
    flow = attention_flow(ours, inp, "last_prompt", keys={"audio": "audio", "rest": "text|special"}, method="pattern")
    torch.testing.assert_close(flow.mass.sum(-1), torch.ones_like(flow.mass.sum(-1)), atol=1e-5, rtol=0)
    lens = logit_lens(ours, inp, "audio", k=3)
    assert lens.top_ids.shape[1] == inp.layout.count("audio")
    with torch.no_grad():
        clean = ours(inp)
        knocked = ours.run_with_hooks(inp, fwd_hooks=knockout_hooks(ours, "last_prompt", "audio", range(n)))
    assert not torch.allclose(clean[:, -1], knocked[:, -1])
    last_tok = int(clean[0, -1].argmax())
    other = ours.prepare(**{**cases(media)["audio"], "audio": [media["wav2"][::-1].copy()]})
    metric = lambda logits: logits[0, -1, last_tok]
    res = patch_by_modality(ours, inp, other, metric, sets=("audio", "text"), progress=False)
    # text positions hold the same tokens in both runs before layer 0, so patching them there changes nothing
    assert abs(float(res["resid_pre"][0, 1]) - res.corrupted) < 1e-4
    assert abs(float(res["resid_pre"][0, 0]) - res.corrupted) > 1e-6  # audio stream 0 matters
    effects = head_effect_table(ours, inp, metric, progress=False)
    assert effects.shape == (n, H) and effects.abs().max() > 0
    assert pooled_residuals(ours, inp, "audio").shape == (n + 1, 1, ours.cfg.d_model)
