"""Phi-4-multimodal in the custom-code format published on microsoft/Phi-4-multimodal-instruct's main branch
(model_type ``phi4mm``): a fake checkpoint with the published tensor names and config.json layout (shrunk shapes)
loads through the key map without remote code, every tensor used or deliberately skipped, into the same model as
the transformers-format checkpoint of the same weights."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from av_lens import HookedAVTransformer
from av_lens.adapters import adapter_for
from av_lens.adapters.phi4_multimodal import PHI4MM_LORA, config_from_phi4mm, phi4mm_key
from av_lens.errors import CheckpointError
from av_lens.testing.tiny_phi4 import TinyPhi4Spec, save_tiny_phi4, save_tiny_phi4mm

SPEC = TinyPhi4Spec(n_layers=2, seed=7)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi4mm")
    return save_tiny_phi4(root / "hf", SPEC), save_tiny_phi4mm(root / "published", SPEC)


def keys_of(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        return list(h.keys())


def test_fake_checkpoint_has_the_published_names(folders):
    _, pub = folders
    keys = keys_of(pub)
    raw = json.loads((pub / "config.json").read_text())
    assert raw["model_type"] == "phi4mm" and "auto_map" in raw and "embd_layer" in raw and "audio_processor" in raw
    for name in ("model.embed_tokens_extend.image_embed.glb_GN", "model.embed_tokens_extend.image_embed.sub_GN",
                 "model.embed_tokens_extend.image_embed.img_projection.0.weight",
                 "model.embed_tokens_extend.audio_embed.audio_projection.speech.0.weight",
                 "model.embed_tokens_extend.audio_embed.audio_projection.vision.2.bias",
                 "model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.linear_q.weight",
                 "model.embed_tokens_extend.audio_embed.encoder.encoders.1.self_attn.linear_out.bias",
                 "model.embed_tokens_extend.audio_embed.encoder.encoders.0.feed_forward_in.net.0.linear.weight",
                 "model.embed_tokens_extend.audio_embed.encoder.encoders.0.feed_forward_out.net.2.weight",
                 "model.layers.1.self_attn.qkv_proj.base_layer.weight", "model.layers.0.mlp.down_proj.lora_B.speech.weight",
                 "model.layers.0.self_attn.o_proj.lora_A.vision.weight"):
        assert name in keys, name


def test_every_published_key_is_used_or_deliberately_skipped(folders):
    """The key map sends each published name to exactly one transformers name (the same set as the
    transformers-format file holds), except the LoRA matrices, which it skips, and nothing else."""
    hf, pub = folders
    pub_keys, hf_keys = keys_of(pub), set(keys_of(hf))
    mapped = {k: phi4mm_key(k) for k in pub_keys}
    skipped = {k for k, v in mapped.items() if v is None}
    assert skipped == {k for k in pub_keys if ".lora_A." in k or ".lora_B." in k}
    assert len(skipped) == SPEC.n_layers * 4 * 2 * 2  # 4 modules x (A, B) x (vision, speech) per layer
    used = [v for v in mapped.values() if v is not None]
    assert len(used) == len(set(used))
    assert set(used) == hf_keys - ({"lm_head.weight"} if SPEC.tie else set())
    # transformers-format names pass the map unchanged
    assert all(phi4mm_key(k) == k for k in hf_keys)


def test_published_format_loads_to_the_same_model(folders):
    hf, pub = folders
    a, b = HookedAVTransformer.from_pretrained(hf), HookedAVTransformer.from_pretrained(pub)
    assert b.cfg.original_architecture == "Phi4MultimodalForCausalLM" and b.processor is not None
    assert a.hf_config.rope_parameters == b.hf_config.rope_parameters
    assert a.hf_config.audio_config.to_dict() == b.hf_config.audio_config.to_dict()
    assert a.hf_config.vision_config.to_dict() == b.hf_config.vision_config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    rng = np.random.default_rng(0)
    inp = a.prepare("Describe.", images=[rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)],
                    audio=[(0.1 * rng.standard_normal(16000)).astype(np.float32)])
    with torch.no_grad():
        assert torch.equal(a(inp), b(inp))


def test_a_stray_or_missing_tensor_still_fails(folders, tmp_path):
    """The map skips only what it names: an unknown tensor is still unexpected, a dropped one still missing."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, pub = folders
    for case in ("stray", "missing"):
        d = tmp_path / case
        shutil.copytree(pub, d)
        t = load_file(d / "model.safetensors")
        if case == "stray":
            t["model.layers.0.self_attn.qkv_proj.lora_magnitude.weight"] = torch.zeros(1)
        else:
            del t["model.layers.1.mlp.gate_up_proj.base_layer.weight"]
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="does not use" if case == "stray" else "lacks"):
            HookedAVTransformer.from_pretrained(d)


def test_config_conversion_names_what_is_missing():
    assert adapter_for({"model_type": "phi4mm"}, "x").name == "phi4_multimodal"
    with pytest.raises(CheckpointError, match="embd_layer"):
        config_from_phi4mm({"model_type": "phi4mm", "hidden_size": 64})
    assert PHI4MM_LORA.fullmatch("model.layers.3.mlp.gate_up_proj.lora_A.speech.weight")


def published_phi4mm_config() -> dict:
    """microsoft/Phi-4-multimodal-instruct's main-branch config.json, in its layout (sizes of the release; the
    48 longrope factors per list replaced by placeholders of the right length)."""
    return {
        "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm",
        "auto_map": {"AutoConfig": "configuration_phi4mm.Phi4MMConfig",
                     "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM", "AutoTokenizer": "Xenova/gpt-4o"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 199999, "eos_token_id": 199999,
        "pad_token_id": 199999, "embd_pdrop": 0.0, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
        "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 24, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144,
        "rope_scaling": {"type": "longrope", "long_factor": [1.5] * 48, "short_factor": [1.0] * 48},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 200064,
        "img_processor": None,
        "embd_layer": {"embedding_cls": "image_audio",
                       "audio_embd_layer": {"downsample_rate": 1, "embedding_cls": "audio",
                                            "enable_gradient_checkpointing": True},
                       "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image",
                                            "enable_gradient_checkpointing": True, "hd_transform_order": "sub_glb",
                                            "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp",
                                            "use_hd_transform": True, "with_learnable_separator": True}},
        "audio_processor": {"name": "cascades", "config": {
            "activation": "swish", "activation_checkpointing": {"interval": 1, "module": "transformer",
                                                              "offload": False},
            "attention_dim": 1024, "attention_heads": 16, "batch_norm": False, "bias_in_glu": True, "causal": True,
            "chunk_size": -1, "cnn_layer_norm": True, "conv_activation": "swish", "conv_glu_type": "swish",
            # 768 here (1024 published) so that reading the misspelt field is visible against the default
            "depthwise_multiplier": 1, "depthwise_seperable_out_channel": 768, "dropout_rate": 0.0,
            "encoder_embedding_config": {"input_size": 80}, "ext_pw_kernel_size": 1, "ext_pw_out_channel": 1024,
            "input_layer": "nemo_conv", "input_size": 80, "kernel_size": 3, "left_chunk": 18, "linear_units": 1536,
            "nemo_conv_settings": {"conv_channels": 1024}, "num_blocks": 24,
            "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"}, "time_reduction": 8}},
        "speech_lora": {"dp": 0.01, "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))",
                        "lora_alpha": 640, "r": 320},
        "vision_lora": {"dp": 0.0, "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))",
                        "lora_alpha": 512, "r": 256},
    }


def test_published_phi4mm_config_matches_its_model_config():
    """The main-branch config.json converts (no remote code) to an AVConfig that passes the Phi-4-multimodal YAML
    check, with the speech encoder's renamed fields and the published token ids."""
    from av_lens.registry import get_spec

    raw = published_phi4mm_config()
    adapter = adapter_for(raw, "published")
    hf = adapter.hf_config(None, raw)
    assert hf.audio_config.hidden_size == 1024 and hf.audio_config.num_blocks == 24
    assert hf.audio_config.nemo_conv_channels == 1024 and hf.audio_config.bias_max_distance == 500
    assert hf.audio_config.depthwise_separable_out_channel == 768  # read from the published (misspelt) field
    assert hf.vision_config.crop_size == 448 and hf.rope_parameters["rope_type"] == "longrope"
    cfg = adapter.to_av_config(hf)
    get_spec("microsoft/Phi-4-multimodal-instruct").check(cfg, "published")
    assert cfg.rotary_dim == 96 and cfg.tie_word_embeddings
