"""Qwen2-Audio and Audio Flamingo 3 (the audio-only LLMs of the 2026 listening / temporal-binding studies):
parity with transformers' Qwen2AudioForConditionalGeneration / AudioFlamingo3ForConditionalGeneration on tiny
random configs saved with save_pretrained (fp32 logits and every layer's residual for text only, audio only and a
left-padded batch; greedy generation token for token), the 1-D layout against the native processor's own expansion
(audio token counts, positions, 40 ms time stamps; Audio Flamingo 3's multi-window clips), the encoder hook points,
both checkpoint key layouts, the published config formats against their model configs, and a smoke run of every
analysis tool."""

import json

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer, InputError
from av_lens.analysis import (attention_flow, head_effect_table, knockout_hooks, knockout_sweep, logit_lens,
                              patch_by_modality, path_patch, pooled_residuals, sliding_windows)
from av_lens.layout import Modality
from av_lens.registry import get_spec
from av_lens.testing.parity import assert_parity
from av_lens.testing.tiny_audio import TinyAudioSpec, save_tiny_audioflamingo3, save_tiny_qwen2_audio

TOL = 1e-4
FAMILIES = {"qwen2_audio": save_tiny_qwen2_audio, "audioflamingo3": save_tiny_audioflamingo3}
#: "tie_flag": the config says tie_word_embeddings=True, which transformers ignores for these models (they keep an
#: lm_head of their own); av_lens must too
SPECS = {"gqa2_untied": TinyAudioSpec(), "mqa_3layers_tie_flag": TinyAudioSpec(n_layers=3, n_kv_heads=1, tie=True, seed=4)}
PAIRS = [(f, s) for f in FAMILIES for s in SPECS]
#: one clip block per family (Qwen2-Audio wraps its placeholder in markers; Audio Flamingo 3 has a bare <sound>)
BLOCK = {"qwen2_audio": "<|audio_bos|><|AUDIO|><|audio_eos|>", "audioflamingo3": "<sound>"}


def reference_class(family):
    import transformers

    return getattr(transformers, {"qwen2_audio": "Qwen2AudioForConditionalGeneration",
                                  "audioflamingo3": "AudioFlamingo3ForConditionalGeneration"}[family])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_audio")
    return {(f, s): FAMILIES[f](root / f"{f}_{s}", SPECS[s]) for f, s in PAIRS}


@pytest.fixture(scope="module")
def pairs(dirs):
    return {k: (HookedAVTransformer.from_pretrained(d),
                reference_class(k[0]).from_pretrained(d, attn_implementation="eager").eval()) for k, d in dirs.items()}


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(5)
    return {"1.5s": (0.1 * rng.standard_normal(24000)).astype(np.float32),
            "0.7s": (0.1 * rng.standard_normal(11200)).astype(np.float32),
            "5s": (0.1 * rng.standard_normal(80000)).astype(np.float32)}


def padded_texts(family):
    b = BLOCK[family]
    return [f"{b}What?", f"Now {b}describe this sound, please, in some detail."]


def padded_batch(model, family, clips):
    """Two prompts, one clip each, left-padded; the long prompt's clip is 0.7 s (a padded encoder window)."""
    return model.prepare(padded_texts(family), audio=[clips["1.5s"], clips["0.7s"]], chat=False)


def case(model, name, clips):
    if name == "text":
        return model.prepare("Hello world, what is in this video?")
    return model.prepare("What sound do you hear?", audio=[clips["1.5s"]])


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("family,spec", PAIRS)
@pytest.mark.parametrize("name", ["text", "audio"])
def test_forward_parity(pairs, clips, family, spec, name):
    ours, ref = pairs[family, spec]
    inp = case(ours, name, clips)
    assert (inp.layout.count("audio") > 0) == (name == "audio")
    assert not ours.cfg.tie_word_embeddings
    assert_parity(ours, ref, inp, TOL)


@pytest.mark.parametrize("family,spec", PAIRS)
def test_padded_batch_parity(pairs, clips, family, spec):
    ours, ref = pairs[family, spec]
    inp = padded_batch(ours, family, clips)
    assert not inp.attention_mask[0, 0] and inp.attention_mask[1].all()  # sample 0 is left-padded
    assert_parity(ours, ref, inp, TOL)
    with torch.no_grad():
        alone = ours(ours.prepare(padded_texts(family)[0], audio=[clips["1.5s"]], chat=False))
        batched = ours(inp)
    assert (batched[0, inp.attention_mask[0].bool()] - alone[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", ["text", "audio", "padded_batch"])
def test_greedy_generate_matches(pairs, clips, family, name):
    ours, ref = pairs[family, "gqa2_untied"]
    inp = padded_batch(ours, family, clips) if name == "padded_batch" else case(ours, name, clips)
    gen = ours.generate(inp, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    kw = {k: v for k, v in ours.reference_kwargs(inp).items() if k != "position_ids"}  # generate derives its own
    with torch.no_grad():
        out = ref.generate(**kw, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
    assert torch.equal(gen.new_tokens, out.sequences[:, inp.shape[1]:])
    assert (torch.stack(gen.logits, 1) - torch.stack(out.logits, 1)).abs().max().item() <= TOL


def test_multi_window_clip_parity(pairs, clips):
    """A 5 s clip is three 2 s windows for the tiny Audio Flamingo 3 (30 s in the real one): one item of
    125 tokens (50 + 50 + 25), time stamps running on across windows, parity with transformers."""
    ours, ref = pairs["audioflamingo3", "gqa2_untied"]
    inp = ours.prepare("Describe it.", audio=[clips["5s"]])
    assert inp.input_features.shape[0] == 3 and inp.extra["audio_windows"].tolist() == [3]
    L = inp.layout
    pos = L.positions("audio")
    assert len(pos) == 125 and len(L.items) == 1
    torch.testing.assert_close(L.time[0, pos], torch.arange(125) * 0.04)
    assert_parity(ours, ref, inp, TOL)


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_matches_the_processor(pairs, clips, family):
    """Audio positions are exactly where the native processor (called directly, not through av_lens) put the
    placeholder tokens, item by item; positions are what transformers' generate uses (mask.cumsum - 1) at real
    tokens; audio token k of a clip sits at k * 40 ms."""
    ours, _ = pairs[family, "gqa2_untied"]
    audio_id = ours.cfg.tokens.audio
    texts, wavs = padded_texts(family), [clips["1.5s"], clips["0.7s"]]
    kw = {"padding": True, "padding_side": "left"} if family == "qwen2_audio" else {}
    data = ours.processor(text=texts, audio=wavs, sampling_rate=16000, return_tensors="pt", **kw)
    inp = padded_batch(ours, family, clips)
    assert torch.equal(data["input_ids"], inp.input_ids)
    L = inp.layout
    assert torch.equal(L.modality == int(Modality.AUDIO), data["input_ids"] == audio_id)
    mask = data["attention_mask"]
    real = mask.bool()
    assert torch.equal(L.position_ids[0][real], (mask.cumsum(-1) - 1)[real])
    assert (L.position_ids[0] == L.position_ids[1]).all() and (L.position_ids[0] == L.position_ids[2]).all()
    # per item: its positions are one contiguous run of the processor's placeholders, counted as the encoder does
    frames = (data["feature_attention_mask"] if family == "qwen2_audio" else data["input_features_mask"]).sum(-1)
    expected = [((int(f) - 1) // 2 + 1 - 2) // 2 + 1 for f in frames]
    assert [it.n_tokens for it in L.items] == expected == [int((data["input_ids"][b] == audio_id).sum()) for b in (0, 1)]
    for it in L.items:
        pos = (L.item[it.sample] == it.index).nonzero().squeeze(-1)
        pos = pos[L.modality[it.sample, pos] == int(Modality.AUDIO)]
        assert len(pos) == it.n_tokens and bool((pos.diff() == 1).all())
        torch.testing.assert_close(L.time[it.sample, pos], torch.arange(it.n_tokens) * 0.04)
    # a bare processor output gives the same layout as prepare
    raw = ours.to_input(dict(data))
    assert torch.equal(raw.layout.modality, L.modality) and torch.equal(raw.layout.position_ids, L.position_ids)


def test_qwen2_audio_chat_template_and_markers(pairs, clips):
    """Two clips in one chat prompt: the template's "Audio k:" blocks, both marker pairs tagged, two items, and
    parity with transformers on the result."""
    ours, ref = pairs["qwen2_audio", "gqa2_untied"]
    inp = ours.prepare("What do you hear?", audio=[clips["1.5s"], clips["0.7s"]])
    text = ours.tokenizer.decode(inp.input_ids[0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ")
    assert "Audio 2: <|audio_bos|>" in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert inp.layout.count("audio_bos") == 2 and inp.layout.count("audio_eos") == 2 and len(inp.layout.items) == 2
    assert [it.n_tokens for it in inp.layout.items] == [37, 17]  # 150 and 70 mel frames: ((f - 1) // 2 + 1 - 2) // 2 + 1
    assert_parity(ours, ref, inp, TOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modalities_hooks_and_bad_inputs(pairs, clips, family):
    ours, _ = pairs[family, "gqa2_untied"]
    assert ours.cfg.modalities == ("audio",) and ours.cfg.rope_rules == "1d"
    names = set(ours.hook_dict)
    assert {"audio_encoder.hook_in", "audio_encoder.blocks.1.hook_out", "audio_encoder.hook_out"} <= names
    assert not any(n.startswith(("image_encoder.", "video_encoder.")) for n in names)
    inp = case(ours, "audio", clips)
    _, cache = ours.run_with_cache(inp, names_filter=lambda n: n.startswith("audio_encoder."))
    n_audio = inp.layout.count("audio")
    assert cache["audio_encoder.hook_out"].shape == (n_audio, ours.cfg.d_model)
    assert cache["audio_encoder.blocks.0.hook_out"].shape == (1, 100, 32)  # [windows, positions, encoder width]
    with torch.no_grad():
        clean = ours(inp)
        edited = ours.run_with_hooks(inp, fwd_hooks=[("audio_encoder.blocks.0.hook_out", lambda x, hook: x * 0)])
    assert (clean - edited).abs().max() > 1e-3  # an edit inside the encoder reaches the logits
    with pytest.raises(InputError, match="audio only"):
        ours.prepare("What do you see?", images=[np.zeros((28, 28, 3), np.uint8)])
    with pytest.raises(InputError, match="placeholder"):
        ours.prepare([BLOCK[family] + "a", "b"], audio=[clips["1.5s"]], chat=False)


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers5_key_layout_loads_to_the_same_model(tmp_path, pairs, clips, family):
    """save_pretrained writes the published key names (language_model.model.*, audio_tower.*); a raw
    transformers-5 state_dict names them model.language_model.*, model.audio_tower.*, lm_head.*. Both load."""
    from safetensors.torch import load_file, save_file

    d = FAMILIES[family](tmp_path / "internal", SPECS["gqa2_untied"])
    for f in d.glob("*.safetensors"):
        out = {}
        for k, v in load_file(f).items():
            for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                             ("audio_tower.", "model.audio_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        assert any(k.startswith("model.language_model.layers.") for k in out)
        save_file(out, f, metadata={"format": "pt"})
    other = HookedAVTransformer.from_pretrained(d)
    ours, _ = pairs[family, "gqa2_untied"]
    inp = case(ours, "audio", clips)
    with torch.no_grad():
        assert torch.equal(other(inp), ours(inp))


PUBLISHED = {
    # Qwen/Qwen2-Audio-7B(-Instruct) config.json: the text config lists what differs from Qwen2Config's defaults
    # (hidden 4096, 32 layers, 32 heads, 32 KV heads)
    "Qwen/Qwen2-Audio-7B": {
        "architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio",
        "audio_token_index": 151646, "vocab_size": 156032,
        "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "encoder_layers": 32,
                         "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280,
                         "activation_function": "gelu", "scale_embedding": False, "max_source_positions": 1500},
        "text_config": {"model_type": "qwen2", "bos_token_id": 151643, "eos_token_id": 151645, "hidden_size": 4096,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "intermediate_size": 11008, "max_position_embeddings": 8192, "rope_theta": 10000,
                        "rms_norm_eps": 1e-05, "sliding_window": 32768, "vocab_size": 156032, "torch_dtype": "bfloat16"},
    },
    # nvidia/audio-flamingo-3-hf: AF-Whisper + the Qwen2.5-7B decoder
    "nvidia/audio-flamingo-3-hf": {
        "architectures": ["AudioFlamingo3ForConditionalGeneration"], "model_type": "audioflamingo3",
        "audio_token_id": 151669, "projector_hidden_act": "gelu", "projector_bias": True,
        "audio_config": {"model_type": "audioflamingo3_encoder", "num_mel_bins": 128, "num_hidden_layers": 32,
                         "num_attention_heads": 20, "intermediate_size": 5120, "hidden_size": 1280,
                         "max_source_positions": 1500},
        "text_config": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
                        "vocab_size": 151672, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    },
}


@pytest.mark.parametrize("spec_name,hub_id", [("Qwen2-Audio-7B", "Qwen/Qwen2-Audio-7B"),
                                              ("Qwen2-Audio-7B-Instruct", "Qwen/Qwen2-Audio-7B"),
                                              ("Audio-Flamingo-3", "nvidia/audio-flamingo-3-hf")])
def test_published_config_format_matches_its_model_config(tmp_path, spec_name, hub_id):
    """The published config.json converts to an AVConfig that passes the YAML check; a wrong size fails it."""
    from transformers import AutoConfig

    from av_lens.adapters import adapter_for
    from av_lens.errors import CheckpointError

    raw = json.loads(json.dumps(PUBLISHED[hub_id]))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    adapter = adapter_for(raw, str(tmp_path))
    spec = get_spec(spec_name)
    assert adapter.name == spec.adapter
    cfg = adapter.to_av_config(AutoConfig.from_pretrained(tmp_path))
    spec.check(cfg, str(tmp_path))
    assert cfg.rope_rules == "1d" and cfg.d_head == 128
    raw["text_config"]["num_hidden_layers"] -= 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="n_layers"):
        spec.check(adapter.to_av_config(AutoConfig.from_pretrained(tmp_path)), str(tmp_path))


# ------------------------------------------------------------------------------------------------ analyses
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_analysis_tool_runs(pairs, clips, family):
    """A smoke run of each analysis tool on the audio LLM, each checked for a property that could fail."""
    ours, _ = pairs[family, "gqa2_untied"]
    inp = case(ours, "audio", clips)
    n, H = ours.cfg.n_layers, ours.cfg.n_heads
    n_audio = inp.layout.count("audio")
    flow = attention_flow(ours, inp, "last_prompt", keys={"audio": "audio", "rest": "text|special"})
    assert flow.mass.shape[1:] == (n, H, 2)
    torch.testing.assert_close(flow.mass.sum(-1), torch.ones_like(flow.mass.sum(-1)), atol=1e-5, rtol=0)
    lens = logit_lens(ours, inp, "audio", k=3)
    assert lens.top_ids.shape[1:] == (n_audio, 3)
    with torch.no_grad():
        clean = ours(inp)
        knocked = ours.run_with_hooks(inp, fwd_hooks=knockout_hooks(ours, "last_prompt", "audio", range(n)))
    assert not torch.allclose(clean[:, -1], knocked[:, -1])
    last_tok = int(clean[0, -1].argmax())
    sweep = knockout_sweep(ours, inp, "last_prompt", "audio", sliding_windows(n, 1),
                           lambda logits, _: logits[0, -1].log_softmax(-1)[last_tok], progress=False)
    assert sweep.values.shape[0] == n
    other = case(ours, "audio", {"1.5s": clips["1.5s"][::-1].copy()})
    metric = lambda logits: logits[0, -1, last_tok]
    res = patch_by_modality(ours, inp, other, metric, sets=("audio", "text"), progress=False)
    # the inputs differ only in the clip: patching layer 0's residual at the audio positions restores the clean
    # metric, at the text positions it changes nothing
    assert res.clean != res.corrupted
    assert abs(float(res["resid_pre"][0, 0]) - res.clean) < 1e-4
    assert abs(float(res["resid_pre"][0, 1]) - res.corrupted) < 1e-4
    pp = path_patch(ours, inp, other, metric, senders="audio", receivers="last_prompt", layers=[0, 1])
    assert pp.shape == (2,) and torch.isfinite(pp).all()
    effects = head_effect_table(ours, inp, metric, progress=False)
    assert effects.shape == (n, H) and torch.isfinite(effects).all() and effects.abs().max() > 0
    assert pooled_residuals(ours, inp, "audio").shape == (n + 1, 1, ours.cfg.d_model)
