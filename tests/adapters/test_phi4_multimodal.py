"""Phi-4-multimodal: parity with transformers' Phi4MultimodalForCausalLM on tiny random configs (fp32 logits and
every layer's residual stream for text, audio, image, image+audio, a left-padded batch, greedy generation), with
longrope short and long factors and partial rotary; the fused-weight split; the 1-D layout (token counts vs the
processor's expansion, positions vs what transformers uses, audio time stamps); the encoder hooks; the LoRA merge
against transformers' weights with the deltas added by hand; bad inputs; and a smoke run of the analysis tools."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from av_lens import HookedAVTransformer
from av_lens.adapters.phi4_multimodal import _to_av_config, merge_lora
from av_lens.analysis import (attention_flow, head_effect_table, knockout_hooks, logit_lens, patch_by_modality,
                              pooled_residuals)
from av_lens.errors import CheckpointError, InputError, LayoutError
from av_lens.registry import get_spec
from av_lens.testing.parity import assert_parity
from av_lens.testing.tiny_phi4 import TinyPhi4Spec, save_tiny_phi4

TOL = 1e-4
SPECS = {
    # short longrope factors (prompts < 4096), untied
    "short_rope": TinyPhi4Spec(),
    # 3 layers, MQA, tied, original_max_position 256: image prompts (> 256 tokens) rotate with the long factors
    "long_rope_tied": TinyPhi4Spec(n_layers=3, n_kv_heads=1, tie=True, original_max_position=256, seed=3),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_phi4")
    return {name: save_tiny_phi4(root / name, spec, lora={"vision": 4, "speech": 6} if name == "short_rope" else None)
            for name, spec in SPECS.items()}


def load_reference(folder):
    from transformers import Phi4MultimodalForCausalLM

    return Phi4MultimodalForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pairs(dirs):
    return {name: (HookedAVTransformer.from_pretrained(d), load_reference(d)) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def media():
    rng = np.random.default_rng(1)
    return {
        "image": rng.integers(0, 255, (448, 448, 3), dtype=np.uint8),  # one HD crop + the global view
        "wide": rng.integers(0, 255, (300, 700, 3), dtype=np.uint8),  # two crops, partly padded
        "wav2": (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32),
        "wav1": (0.1 * rng.standard_normal(16000)).astype(np.float32),
    }


def cases(m):
    return {
        "text": dict(text="Hello world, what is in this video?"),
        "audio": dict(text="What sound do you hear?", audio=[m["wav2"]]),
        "image": dict(text="What do you see?", images=[m["image"]]),
        "image_audio": dict(text="Describe what you see and hear.", images=[m["image"]], audio=[m["wav2"]]),
    }


# two samples, left-padded: text + audio, and a wide image (partly padded crops) + two adjacent audio clips (one run,
# split into items by their counts)
PAD_TEXTS = ["<|user|><|audio|>What sound?<|end|><|assistant|>",
             "<|user|><|image|><|audio|><|audio|>Describe it please.<|end|><|assistant|>"]


@pytest.fixture(scope="module")
def padded(pairs, media):
    return pairs["short_rope"][0].prepare(PAD_TEXTS, images=[media["wide"]], audio=[media["wav2"], media["wav1"], media["wav2"]],
                                          chat=False)


@pytest.mark.parametrize("spec,case", [(s, c) for s in SPECS for c in ("text", "audio", "image", "image_audio")
                                       if not (s == "short_rope" and c == "image")])
def test_forward_parity(pairs, media, spec, case):
    ours, ref = pairs[spec]
    inp = ours.prepare(**cases(media)[case])
    assert_parity(ours, ref, inp, TOL)


def test_long_factors_are_exercised(pairs, media):
    """The second spec's image prompts pass original_max_position, so transformers' longrope switches factors."""
    ours, _ = pairs["long_rope_tied"]
    inp = ours.prepare(**cases(media)["image"])
    assert inp.layout.position_ids.max() + 1 > SPECS["long_rope_tied"].original_max_position
    rot = ours._rotary.inner
    cos_long, _ = rot(torch.zeros(1), inp.layout.position_ids[0])
    cos_short, _ = rot(torch.zeros(1), inp.layout.position_ids[0][:, :10])
    assert cos_long.shape[-1] == ours.cfg.rotary_dim < ours.cfg.d_head
    assert (cos_long[:, :10] - cos_short).abs().max() > 1e-3


def test_padded_batch_parity(pairs, padded):
    ours, ref = pairs["short_rope"]
    inp = padded
    assert not inp.attention_mask[0, 0] and inp.attention_mask[1].all()
    assert_parity(ours, ref, inp, TOL)


@pytest.mark.parametrize("case", ["image_audio", "padded_batch"])
def test_greedy_generate_matches(pairs, media, padded, case):
    ours, ref = pairs["long_rope_tied" if case == "image_audio" else "short_rope"]
    inp = padded if case == "padded_batch" else ours.prepare(**cases(media)[case])
    gen = ours.generate(inp, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    kw = {k: v for k, v in ours.reference_kwargs(inp).items() if k != "position_ids"}  # generate derives its own
    with torch.no_grad():
        out = ref.generate(**kw, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
    assert torch.equal(gen.new_tokens, out.sequences[:, inp.shape[1]:])
    assert (torch.stack(gen.logits, 1) - torch.stack(out.logits, 1)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------ weights
def test_fused_projections_split_into_q_k_v_and_gate_up(pairs):
    ours, ref = pairs["long_rope_tied"]
    for l, layer in enumerate(ref.model.layers):
        b = ours.blocks[l]
        torch.testing.assert_close(torch.cat([b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight]),
                                   layer.self_attn.qkv_proj.weight, atol=0, rtol=0)
        torch.testing.assert_close(torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]),
                                   layer.mlp.gate_up_proj.weight, atol=0, rtol=0)
    assert ours.unembed.weight is None  # tied


def test_published_config_matches_the_yaml():
    """The published sizes (24 heads of 128, partial rotary 0.75, longrope with 48 factors) convert to what the
    YAML pins."""
    from transformers import Phi4MultimodalConfig

    hf = Phi4MultimodalConfig(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, max_position_embeddings=131072, original_max_position_embeddings=4096,
        tie_word_embeddings=True, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.75, "short_factor": [1.0] * 48,
                                                    "long_factor": [2.0] * 48})
    cfg = _to_av_config(hf)
    get_spec("microsoft/Phi-4-multimodal-instruct").check(cfg, "published config")
    assert cfg.rotary_dim == 96 and cfg.d_head == 128


# ------------------------------------------------------------------------------------------------ layout
def test_layout_counts_match_the_processor_expansion(pairs, media, padded):
    ours, _ = pairs["short_rope"]
    inp = padded
    proc = ours.processor
    n_img = proc.image_processor([media["wide"]])["num_img_tokens"]
    n_aud = proc.audio_processor([media["wav2"], media["wav1"], media["wav2"]], sampling_rate=16000)["audio_embed_sizes"]
    items = inp.layout.items
    assert [it.n_tokens for it in items if it.modality.name == "IMAGE"] == [int(n) for n in n_img]
    assert [it.n_tokens for it in items if it.modality.name == "AUDIO"] == [int(n) for n in n_aud]
    assert n_aud[1] != n_aud[2]  # the adjacent items are told apart by their counts
    assert n_img[0] != proc.image_processor([media["image"]])["num_img_tokens"][0]  # padded crops count less
    for b in range(2):
        assert inp.layout.count("image", b) == int((inp.input_ids[b] == ours.cfg.tokens.image).sum())
        assert inp.layout.count("audio", b) == int((inp.input_ids[b] == ours.cfg.tokens.audio).sum())
    assert [it.index for it in items if it.sample == 1 and it.modality.name == "AUDIO"] == [0, 1]


def test_positions_are_what_transformers_uses(pairs, media, padded):
    ours, ref = pairs["short_rope"]
    single = ours.prepare(**cases(media)["image_audio"])
    pos = single.layout.position_ids
    assert torch.equal(pos[0], torch.arange(single.shape[1])[None])  # forward's default (no pads)
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])
    batch = padded
    theirs = ref._prepare_position_ids_for_generation(batch.input_ids, {"attention_mask": batch.attention_mask})
    assert torch.equal(batch.layout.position_ids[0], theirs.cpu())  # generate's: cumsum of the mask, pads 0
    # the first generated token continues at the number of real tokens
    ext = batch.layout.extend(1)
    assert ext.position_ids[0, :, -1].tolist() == batch.attention_mask.sum(-1).tolist()


def test_audio_time_stamps(pairs, media):
    ours, _ = pairs["short_rope"]
    L = ours.prepare(**cases(media)["audio"]).layout
    t = L.time[0, L.positions("audio")]
    fe = ours.processor.audio_processor
    step = fe.hop_length / fe.sampling_rate * fe.audio_compression_rate
    assert step == pytest.approx(0.08)
    torch.testing.assert_close(t, torch.arange(len(t)) * step, atol=1e-6, rtol=0)
    assert L.items[0].duration_s == pytest.approx(len(t) * step)
    assert torch.isnan(L.time[0, L.positions("text")]).all()


def test_bad_inputs_are_refused(pairs, media):
    ours, _ = pairs["short_rope"]
    with pytest.raises(InputError, match="takes no video"):
        ours.prepare("What happens?", videos=[np.zeros((2, 56, 56, 3), np.uint8)])
    ids = ours.to_tokens("<|user|><|audio|><|audio|>Hi<|end|>")
    with pytest.raises(LayoutError, match="audio"):
        ours(ids)  # placeholders without their audio
    inp = ours.prepare(**cases(media)["audio"])
    with pytest.raises(LayoutError):
        ours.to_input({"input_ids": inp.input_ids[:, :-3].clone().fill_(ours.cfg.tokens.audio),
                       "audio_input_features": inp.input_features, "audio_embed_sizes": inp.extra["audio_embed_sizes"]})


# ------------------------------------------------------------------------------------------------ encoders
def test_encoder_hooks(pairs, media):
    ours, ref = pairs["short_rope"]
    inp = ours.prepare(**cases(media)["image_audio"])
    n_vis = ref.config.vision_config.num_hidden_layers
    assert len(ours.image_encoder.blocks) == n_vis - 1  # feature_layer -2: the last SigLIP layer feeds nothing
    with torch.no_grad():
        clean, cache = ours.run_with_cache(inp, names_filter=lambda n: "encoder" in n or n.endswith("_embed"))
    assert cache["image_encoder.hook_out"].shape == (inp.layout.count("image"), ours.cfg.d_model)
    assert cache["audio_encoder.hook_in"].shape == inp.input_features.shape
    assert torch.equal(cache["audio_encoder.hook_out"], cache["hook_audio_embed"])
    # editing the last used SigLIP layer changes the image features (the routing runs before transformers records
    # the hidden state it reads), and through them the logits
    last = f"image_encoder.blocks.{n_vis - 2}.hook_out"
    seen = {}

    def keep(t, hook):
        seen["feats"] = t.clone()

    with torch.no_grad():
        edited = ours.run_with_hooks(inp, fwd_hooks=[(last, lambda t, hook: t * 0.5), ("image_encoder.hook_out", keep)])
    assert (seen["feats"] - cache["image_encoder.hook_out"]).abs().max() > 1e-4
    assert (edited - clean).abs().max() > 1e-4
    # the audio projection follows transformers: "vision" with image pixels, "speech" without
    a_only = ours.prepare(text="Describe what you see and hear.", audio=[media["wav2"]])
    _, ca = ours.run_with_cache(a_only, names_filter="audio_encoder.hook_out")
    assert not torch.allclose(ca["audio_encoder.hook_out"], cache["audio_encoder.hook_out"])


# ------------------------------------------------------------------------------------------------ LoRA
def _hand_merged_reference(folder, adapter):
    """transformers' base model with scale * B @ A added to the fused weights, read straight from the files."""
    ref = load_reference(folder)
    ac = json.loads((folder / f"{adapter}-lora" / "adapter_config.json").read_text())
    w = load_file(str(folder / f"{adapter}-lora" / "adapter_model.safetensors"))
    scale = ac["lora_alpha"] / ac["r"]
    with torch.no_grad():
        for name, lin in ref.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in w:
                lin.weight += scale * w[key.replace("lora_A", "lora_B")] @ w[key]
    return ref


@pytest.mark.parametrize("adapter,case", [("vision", "image"), ("speech", "audio")])
def test_merged_lora_equals_hand_merged_transformers(dirs, pairs, media, adapter, case):
    folder = dirs["short_rope"]
    base, _ = pairs["short_rope"]
    merged = merge_lora(HookedAVTransformer.from_pretrained(folder), adapter)
    ref = _hand_merged_reference(folder, adapter)
    inp = merged.encode(merged.prepare(**cases(media)[case]))  # the adapters leave the encoders alone
    assert_parity(merged, ref, inp, TOL)
    with torch.no_grad():
        assert (merged(inp) - base(inp)).abs().max() > 1e-3  # the adapter changes the model
    with pytest.raises(InputError, match="already merged"):
        merge_lora(merged, "speech")


def test_lora_errors(dirs, pairs, tmp_path):
    base, _ = pairs["short_rope"]
    with pytest.raises(CheckpointError, match="no LoRA adapter folder"):
        merge_lora(HookedAVTransformer.from_pretrained(dirs["short_rope"]), "audio")
    bad = tmp_path / "bad-lora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((dirs["short_rope"] / "vision-lora" / "adapter_model.safetensors")
                                                     .read_bytes())
    with pytest.raises(CheckpointError, match="DoRA"):
        merge_lora(HookedAVTransformer.from_pretrained(dirs["short_rope"]), str(bad))


# ------------------------------------------------------------------------------------------------ analysis
def test_every_analysis_tool_runs(pairs, media):
    ours, _ = pairs["short_rope"]
    inp = ours.prepare(**cases(media)["audio"])
    n, H = ours.cfg.n_layers, ours.cfg.n_heads
    flow = attention_flow(ours, inp, "last_prompt", keys={"audio": "audio", "rest": "text|special"})
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
    assert abs(float(res["resid_pre"][0, 0]) - res.clean) < 1e-4  # audio positions carry the whole difference
    effects = head_effect_table(ours, inp, metric, progress=False)
    assert effects.shape == (n, H) and effects.abs().max() > 0
    assert pooled_residuals(ours, inp, "audio").shape == (n + 1, 1, ours.cfg.d_model)
