"""Qwen2.5-VL (the base VLM): parity with transformers' Qwen2_5_VLForConditionalGeneration on tiny random
configs (fp32 logits and every layer's residual stream, padded batches, greedy generation), its M-RoPE layout
against transformers' get_rope_index fed by the processor's own mm_token_type_ids, both checkpoint key layouts,
the published config format, and a smoke run of every analysis tool (token shift against a tiny Omni thinker
with the same vocabulary)."""

import json

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer, InputError
from av_lens.analysis import (attention_flow, head_effect_table, knockout_hooks, knockout_sweep, logit_lens,
                              patch_by_modality, path_patch, pooled_residuals, probe_layers, sliding_windows,
                              token_shift)
from av_lens.layout import Modality
from av_lens.testing.parity import assert_parity
from av_lens.processing import chat_prompt, placeholders
from av_lens.registry import get_spec
from av_lens.testing.tiny import TinySpec, save_tiny_qwen2_5_vl

TOL = 1e-4
VL_SPECS = {
    "gqa2_untied": TinySpec(),
    "mqa_tied_3layers": TinySpec(n_layers=3, n_kv_heads=1, tie=True, seed=5),
}


@pytest.fixture(scope="module")
def vl_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vl")
    return {name: save_tiny_qwen2_5_vl(root / name, spec) for name, spec in VL_SPECS.items()}


def load_vl_reference(folder):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def vl_pairs(vl_dirs):
    return {name: (HookedAVTransformer.from_pretrained(d), load_vl_reference(d)) for name, d in vl_dirs.items()}


@pytest.fixture(scope="module")
def vl(vl_pairs):
    return vl_pairs["gqa2_untied"][0]


def vl_cases(media):
    odd = media["video"][:6]  # 6 frames at 3 fps: 3 temporal grid steps of 2/3 s (fractional time positions)
    return {
        "text": dict(text="Hello world, what is in this video?"),
        "image": dict(text="What do you see?", images=[media["image"]]),
        "video": dict(text="Describe the video.", videos=[media["video"]]),
        "video_3fps": dict(text="Describe the video.", videos=[odd], fps=3.0),
        "video_image": dict(text="Describe.", videos=[media["video"]], images=[media["image"]]),
    }


PAD_1 = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
PAD_2 = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
         "Describe it please, in detail.<|im_end|>\n<|im_start|>assistant\n")


def vl_padded_batch(model, media):
    return model.prepare([PAD_1, PAD_2], images=[media["image"], media["image"][::-1].copy()],
                         videos=[media["video"]], chat=False)


def check_parity(ours, ref, inp):
    return assert_parity(ours, ref, inp, TOL)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("spec", list(VL_SPECS))
@pytest.mark.parametrize("case", ["text", "image", "video", "video_3fps", "video_image"])
def test_forward_parity(vl_pairs, media, spec, case):
    ours, ref = vl_pairs[spec]
    check_parity(ours, ref, ours.prepare(**vl_cases(media)[case]))


@pytest.mark.parametrize("spec", list(VL_SPECS))
def test_padded_batch_parity(vl_pairs, media, spec):
    ours, ref = vl_pairs[spec]
    inp = vl_padded_batch(ours, media)
    assert not inp.attention_mask[0, 0] and inp.attention_mask[1].all()  # sample 0 is left-padded
    check_parity(ours, ref, inp)
    with torch.no_grad():
        alone = ours(ours.prepare(PAD_1, images=[media["image"]], chat=False))
        batched = ours(inp)
    assert (batched[0, inp.attention_mask[0].bool()] - alone[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["image", "video_image", "padded_batch"])
def test_greedy_generate_matches(vl_pairs, media, case):
    ours, ref = vl_pairs["gqa2_untied"]
    inp = vl_padded_batch(ours, media) if case == "padded_batch" else ours.prepare(**vl_cases(media)[case])
    gen = ours.generate(inp, max_new_tokens=8, stop_at_eos=False, return_logits=True)
    with torch.no_grad():
        out = ref.generate(**ours.reference_kwargs(inp), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    assert torch.equal(gen.new_tokens, out.sequences[:, inp.shape[1]:])
    assert (torch.stack(gen.logits, 1) - torch.stack(out.logits, 1)).abs().max().item() <= TOL
    assert gen.layout.count("generated") == 8


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("case", ["image", "video", "video_3fps", "video_image"])
def test_layout_matches_get_rope_index_with_processor_token_types(vl_pairs, media, case):
    """Positions from av_lens's layout equal transformers' get_rope_index driven by the processor's own
    mm_token_type_ids (not by anything av_lens computed)."""
    ours, ref = vl_pairs["gqa2_untied"]
    kw = vl_cases(media)[case]
    inp = ours.prepare(**kw)
    text = chat_prompt(kw["text"], n_images=len(kw.get("images", [])), n_videos=len(kw.get("videos", [])),
                       media_placeholders=placeholders(ours))
    n_frames = len(kw.get("videos", [[]])[0])
    fps = kw.get("fps", 2.0)
    vk = {"do_sample_frames": False, "size": {"shortest_edge": 28 * 28, "longest_edge": 56 * 56},
          "video_metadata": [{"fps": fps, "total_num_frames": n_frames, "frames_indices": list(range(n_frames)),}]}
    data = ours.processor(text=[text], images=kw.get("images"), videos=kw.get("videos"), return_tensors="pt",
                          videos_kwargs=vk if n_frames else {}, images_kwargs={"size": vk["size"]})
    assert torch.equal(data["input_ids"], inp.input_ids)
    pos, delta = ref.model.get_rope_index(data["input_ids"], data["mm_token_type_ids"], data.get("image_grid_thw"),
                                          data.get("video_grid_thw"), data.get("second_per_grid_ts"),
                                          data["attention_mask"])
    assert torch.equal(pos, inp.layout.position_ids)
    assert torch.equal(delta.view(-1), inp.layout.rope_deltas.view(-1))
    L = inp.layout
    assert torch.equal((L.modality == int(Modality.IMAGE)).int() + 2 * (L.modality == int(Modality.VIDEO)).int(),
                       data["mm_token_type_ids"].int())


def test_text_after_video_resumes_at_start_plus_extent(vl, media):
    """The Qwen2.5-VL rule (unlike Omni): after a 4-step video of 2x2 merged patches at 1 s per step, video time
    positions reach start + 6 (2 per second) but the end marker sits at start + max(h, w) = start + 2."""
    inp = vl.prepare(**vl_cases(media)["video"])
    L = inp.layout
    vid = L.positions("video")
    start = int(L.position_ids[1, 0, vid[0]])  # h of the first patch = the block's start
    assert L.position_ids[0, 0, vid].max().item() == start + 6
    end = int(vid[-1]) + 1
    assert int(L.position_ids[0, 0, end]) == start + 2
    assert torch.equal(L.time[0, vid].unique(), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_modalities_and_hook_points(vl, media):
    assert vl.cfg.modalities == ("image", "video") and vl.cfg.rope_rules == "qwen2_5_vl"
    assert {"image_encoder.blocks.1.hook_out", "video_encoder.hook_out"} <= set(vl.hook_dict)
    assert not any(n.startswith("audio_encoder.") for n in vl.hook_dict)
    _, cache = vl.run_with_cache(vl.prepare(**vl_cases(media)["video"]), names_filter="video_encoder.hook_out")
    assert cache["video_encoder.hook_out"].shape == (16, vl.cfg.d_model)
    inp = vl.prepare(**vl_cases(media)["video_image"])
    assert inp.layout.count("video") == 16 and inp.layout.count("image") == 4 and inp.layout.count("audio") == 0
    with pytest.raises(InputError, match="takes no audio"):
        vl.prepare("What do you hear?", audio=[np.zeros(16000, np.float32)])


# ------------------------------------------------------------------------------------------------ loading
def test_transformers5_key_layout_loads_to_the_same_model(tmp_path, vl, media):
    d = save_tiny_qwen2_5_vl(tmp_path / "internal", VL_SPECS["gqa2_untied"], internal_keys=True)
    from safetensors import safe_open

    with safe_open(str(next(d.glob("*.safetensors"))), "pt") as h:
        keys = list(h.keys())
    assert any(k.startswith("model.language_model.layers.") for k in keys)
    assert any(k.startswith("model.visual.") for k in keys)
    other = HookedAVTransformer.from_pretrained(d)
    inp = vl.prepare(**vl_cases(media)["video_image"])
    with torch.no_grad():
        assert torch.equal(other(inp), vl(inp))


def published_vl_config(n_layers, d_model, n_heads, n_kv, d_mlp, vocab, tie):
    """A config.json in the flat format of the published Qwen2.5-VL checkpoints (sizes passed in)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": d_model, "intermediate_size": d_mlp, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "vocab_size": vocab,
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "hidden_act": "silu", "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "sliding_window": 32768,
        "use_sliding_window": False, "max_window_layers": 70, "tie_word_embeddings": tie,
        "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "torch_dtype": "bfloat16",
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": d_model, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    }


@pytest.mark.parametrize("name,dims", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", (36, 2048, 16, 2, 11008, 151936, True)),
    ("Qwen/Qwen2.5-VL-7B-Instruct", (28, 3584, 28, 4, 18944, 152064, False)),
])
def test_published_config_format_matches_its_model_config(tmp_path, name, dims):
    """The flat published config.json converts to an AVConfig that passes the YAML check, and a wrong size fails it."""
    from transformers import AutoConfig

    from av_lens.adapters import adapter_for
    from av_lens.errors import CheckpointError

    raw = published_vl_config(*dims)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    adapter = adapter_for(raw, str(tmp_path))
    assert adapter.name == "qwen2_5_vl"
    hf = AutoConfig.from_pretrained(tmp_path)
    cfg = adapter.to_av_config(adapter.thinker_config(hf))
    spec = get_spec(name)
    spec.check(cfg, str(tmp_path))
    assert cfg.position_id_per_seconds == 2 and cfg.rope_rules == "qwen2_5_vl"
    raw["num_hidden_layers"] = dims[0] - 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="n_layers"):
        spec.check(adapter.to_av_config(AutoConfig.from_pretrained(tmp_path)), str(tmp_path))


# ------------------------------------------------------------------------------------------------ analyses
def test_every_analysis_tool_runs(vl, media):
    """A smoke run of each analysis tool on the base VLM, each checked for a property that could fail."""
    inp = vl.prepare(**vl_cases(media)["video_image"])
    n, H = vl.cfg.n_layers, vl.cfg.n_heads
    flow = attention_flow(vl, inp, "last_prompt", keys={"video": "video", "image": "image", "text": "text|special"})
    assert flow.mass.shape[1:] == (n, H, 3)
    torch.testing.assert_close(flow.mass.sum(-1), torch.ones_like(flow.mass.sum(-1)), atol=1e-5, rtol=0)
    lens = logit_lens(vl, inp, "video", k=3)
    assert lens.top_ids.shape[1:] == (16, 3) and len(lens.layers) == lens.top_ids.shape[0]
    with torch.no_grad():
        clean = vl(inp)
        knocked = vl.run_with_hooks(inp, fwd_hooks=knockout_hooks(vl, "last_prompt", "video", range(n)))
    assert not torch.allclose(clean[:, -1], knocked[:, -1])
    last_tok = int(clean[0, -1].argmax())
    sweep = knockout_sweep(vl, inp, "last_prompt", "video", sliding_windows(n, 1),
                           lambda logits, _: logits[0, -1].log_softmax(-1)[last_tok], progress=False)
    assert sweep.values.shape[0] == n
    other = vl.prepare(**{**vl_cases(media)["video_image"], "videos": [media["video"][::-1].copy()]})
    metric = lambda logits: logits[0, -1, last_tok]
    res = patch_by_modality(vl, inp, other, metric, sets=("video", "image", "text"), progress=False)
    # the two inputs differ only in the video, so patching layer 0's residual at the video positions restores
    # the clean metric, and at the text positions changes nothing there
    assert res.clean != res.corrupted
    assert abs(float(res["resid_pre"][0, 0]) - res.clean) < 1e-4
    assert abs(float(res["resid_pre"][0, 2]) - res.corrupted) < 1e-4
    pp = path_patch(vl, inp, other, metric, senders="video", receivers="last_prompt", layers=[0, 1])
    assert pp.shape == (2,) and torch.isfinite(pp).all()
    effects = head_effect_table(vl, inp, metric, progress=False)
    assert effects.shape == (n, H) and torch.isfinite(effects).all() and effects.abs().max() > 0
    feats = pooled_residuals(vl, inp, "video")
    assert feats.shape == (n + 1, 1, vl.cfg.d_model)


def test_probe_reads_an_image_property_from_image_positions(vl):
    """Linear probes on image positions (pooled per image) tell bright from dark images far above chance, and the
    shuffled-label control does not."""
    rng = np.random.default_rng(3)
    images, labels = [], []
    for i in range(20):
        bright = i % 2
        base = 200 if bright else 40
        images.append(np.clip(base + rng.integers(-30, 30, (56, 56, 3)), 0, 255).astype(np.uint8))
        labels.append(bright)
    inp = vl.prepare([PAD_1] * len(images), images=images, chat=False)
    feats = pooled_residuals(vl, inp, "image")
    assert feats.shape == (vl.cfg.n_layers + 1, 20, vl.cfg.d_model)
    res = probe_layers(feats, torch.tensor(labels), test_fraction=0.4, seed=0)
    assert float(res.accuracy.max()) >= 0.9
    assert float(res.control_accuracy.max()) < float(res.accuracy.max())


def test_token_shift_against_the_vl_base(vl, model, media):
    """Teacher-force a tiny Omni thinker's answer into the tiny VL base (same text vocabulary and ids): the result
    equals a brute-force recomputation from both models' full-sequence logits."""
    inp = model.prepare("Describe what you see and hear.", videos=[media["video"]], video_audio=[media["wav5"]])
    base_inp = vl.prepare("Describe what you see and hear.", videos=[media["video"]])
    gen = model.generate(inp, max_new_tokens=5, stop_at_eos=False)
    tokens = gen.new_tokens[0]
    res = token_shift(model, vl, inp, base_inp, output_tokens=tokens, eos_token_ids=())
    assert res.tokens.tolist() == tokens.tolist()
    with torch.no_grad():
        lb = vl(base_inp.extend(tokens[None]))[0, base_inp.shape[1] - 1: base_inp.shape[1] - 1 + len(tokens)]
    ranks = torch.tensor([int((lb[j] > lb[j, tokens[j]]).sum()) + 1 for j in range(len(tokens))])
    assert res.ranks.tolist() == ranks.tolist()
