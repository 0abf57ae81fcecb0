"""Tiny random-weight Phi-4-multimodal checkpoints, built offline from transformers' own classes.

    folder = save_tiny_phi4(tmp_path / "phi4", TinyPhi4Spec(), lora={"vision": 4, "speech": 6})
    model = HookedAVTransformer.from_pretrained(folder)

The tokenizer is a small byte-level BPE whose first ids are Phi-4's chat markers and the ``<|image|>`` /
``<|audio|>`` placeholders; the processor is the native ``Phi4MultimodalProcessor`` (its image processor
works in 448 x 448 crops whatever the vision config says, so the tiny SigLIP keeps 448 / 14 geometry). With
``lora=``, random PEFT-format LoRA adapters (``{name}-lora/adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.model.layers.{l}.<module>.lora_A.weight``) are written beside the weights, as the real
checkpoint ships its vision and speech adapters. Nothing here means anything; it has the real architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PHI4_SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>"]
LORA_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class TinyPhi4Spec:
    """Shape of a tiny Phi-4-multimodal: 2 layers of width 64, 4 heads of 16 (GQA 2:1), rotary on 12 of 16 dims."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    partial_rotary_factor: float = 0.75
    longrope: bool = True  # random short/long factors, as the real config's rope_scaling
    original_max_position: int = 4096  # below a prompt's length, the long factors apply
    tie: bool = False
    vocab_size: int = 400
    seed: int = 0


def build_tiny_tokenizer(vocab_size: int = 400):
    from av_lens.testing.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer(PHI4_SPECIAL_TOKENS, vocab_size, bos_token="<|endoftext|>", eos_token="<|end|>",
                               pad_token="<|endoftext|>",
                               extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"})


def tiny_phi4_config(spec: TinyPhi4Spec, tokenizer):
    from transformers import Phi4MultimodalConfig

    tid = tokenizer.convert_tokens_to_ids
    head_dim = spec.d_model // spec.n_heads
    half = int(head_dim * spec.partial_rotary_factor) // 2
    g = torch.Generator().manual_seed(spec.seed + 7)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": spec.partial_rotary_factor}
    if spec.longrope:
        rope.update(rope_type="longrope", short_factor=(1 + torch.rand(half, generator=g)).tolist(),
                    long_factor=(2 + 4 * torch.rand(half, generator=g)).tolist())
    return Phi4MultimodalConfig(
        vocab_size=len(tokenizer), hidden_size=spec.d_model, intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        max_position_embeddings=4 * max(spec.original_max_position, 1024),
        original_max_position_embeddings=spec.original_max_position, rope_parameters=rope,
        tie_word_embeddings=spec.tie,
        bos_token_id=tid("<|endoftext|>"), eos_token_id=[tid("<|end|>")], pad_token_id=tid("<|endoftext|>"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=448, patch_size=14, crop_size=448, feature_layer=-2,
                           image_token_id=tid("<|image|>")),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=2,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                          input_size=80, time_reduction=8, audio_token_id=tid("<|audio|>")),
    )


def _perturb(model, seed: int) -> None:
    """Random init leaves norms at one, biases and the image separators at zero; perturb them."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "extensor" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_tiny_processor(tokenizer):
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor, Phi4MultimodalProcessor

    ip = Phi4MultimodalImageProcessor(size={"height": 448, "width": 448}, patch_size=14, dynamic_hd=4)
    return Phi4MultimodalProcessor(image_processor=ip, audio_processor=Phi4MultimodalFeatureExtractor(),
                                   tokenizer=tokenizer)


def build_tiny_hf_phi4(spec: TinyPhi4Spec = TinyPhi4Spec()):
    """(transformers ``Phi4MultimodalForCausalLM``, tokenizer, processor) with random weights from ``spec.seed``."""
    from transformers import Phi4MultimodalForCausalLM

    tok = build_tiny_tokenizer(spec.vocab_size)
    cfg = tiny_phi4_config(spec, tok)
    torch.manual_seed(spec.seed)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    _perturb(model, spec.seed)
    return model, tok, build_tiny_processor(tok)


def write_tiny_lora(folder: str | os.PathLike, model, r: int, alpha: float, seed: int = 0,
                    modules: tuple[str, ...] = LORA_MODULES) -> Path:
    """A random PEFT-format LoRA adapter on the decoder's fused projections (B non-zero, unlike PEFT's init)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for l, layer in enumerate(model.model.layers):
        for mod in modules:
            lin = layer.get_submodule(mod)
            key = f"base_model.model.model.layers.{l}.{mod}"
            tensors[f"{key}.lora_A.weight"] = 0.2 * torch.randn(r, lin.in_features, generator=g)
            tensors[f"{key}.lora_B.weight"] = 0.2 * torch.randn(lin.out_features, r, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": [m.split(".")[-1] for m in modules], "task_type": "CAUSAL_LM",
    }, indent=1))
    return folder


def save_tiny_phi4(folder: str | os.PathLike, spec: TinyPhi4Spec = TinyPhi4Spec(),
                   lora: dict[str, int] | None = None) -> Path:
    """Build a tiny Phi-4-multimodal and write it as a checkpoint folder (safetensors, tokenizer, processor),
    with a random LoRA adapter ``{name}-lora/`` of rank r for each ``name: r`` in ``lora`` (alpha = 2 r)."""
    folder = Path(folder)
    model, tok, proc = build_tiny_hf_phi4(spec)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    for i, (name, r) in enumerate((lora or {}).items()):
        write_tiny_lora(folder / f"{name}-lora", model, r, 2.0 * r, seed=spec.seed + 100 + i)
    return folder


# --------------------------------------------------------------------------------------------- phi4mm format
#: transformers' tensor names -> the published custom-code (phi4mm) ones, as microsoft/Phi-4-multimodal-instruct's
#: main branch names them (the inverse of av_lens.adapters.phi4_multimodal.phi4mm_key)
_TO_PHI4MM = [
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.gate_up_proj\.", r"\1.net.0.linear."),
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.down_proj\.", r"\1.net.2."),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.(q|k|v)_proj\.", r"\1.linear_\2."),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.o_proj\.", r"\1.linear_out."),
    (r"image_embed\.img_projection_up\.", "image_embed.img_projection.0."),
    (r"image_embed\.img_projection_down\.", "image_embed.img_projection.2."),
    (r"image_embed\.global_img_feature_extensor$", "image_embed.glb_GN"),
    (r"image_embed\.sub_img_feature_extensor$", "image_embed.sub_GN"),
    (r"audio_embed\.up_proj_for_speech\.", "audio_embed.audio_projection.speech.0."),
    (r"audio_embed\.down_proj_for_speech\.", "audio_embed.audio_projection.speech.2."),
    (r"audio_embed\.up_proj_for_vision_speech\.", "audio_embed.audio_projection.vision.0."),
    (r"audio_embed\.down_proj_for_vision_speech\.", "audio_embed.audio_projection.vision.2."),
]


def phi4mm_config(hf_config, lora_ranks: dict[str, int]) -> dict:
    """A config.json in the published phi4mm layout for a (tiny) ``Phi4MultimodalConfig``: Phi-3-style text fields
    with ``rope_scaling``, the speech encoder under ``audio_processor.config`` with its own field names, the image
    embedding under ``embd_layer.image_embd_layer`` (here also holding the shrunk SigLIP sizes, which the published
    file leaves at their defaults), the LoRA settings, and the custom-code ``auto_map``."""
    d = hf_config.to_dict()
    ac, vc = d.pop("audio_config"), d.pop("vision_config")
    rope = d.pop("rope_parameters")
    for k in ("architectures", "model_type", "transformers_version", "dtype"):
        d.pop(k, None)
    d.update(model_type="phi4mm", architectures=["Phi4MMForCausalLM"], torch_dtype="bfloat16",
             auto_map={"AutoConfig": "configuration_phi4mm.Phi4MMConfig",
                       "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM",
                       "AutoTokenizer": "Xenova/gpt-4o"},
             rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
             rope_scaling={"type": rope["rope_type"], "short_factor": rope.get("short_factor"),
                           "long_factor": rope.get("long_factor")} if rope["rope_type"] == "longrope" else None,
             full_attn_mod=1, interpolate_factor=1, lm_head_bias=False, mlp_bias=False, img_processor=None)
    d["embd_layer"] = {
        "embedding_cls": "image_audio",
        "audio_embd_layer": {"downsample_rate": ac["downsample_rate"], "embedding_cls": "audio",
                             "enable_gradient_checkpointing": True},
        "image_embd_layer": {"crop_size": vc["crop_size"], "embedding_cls": "tune_image",
                             "enable_gradient_checkpointing": True, "hd_transform_order": "sub_glb",
                             "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp",
                             "use_hd_transform": True, "with_learnable_separator": True,
                             **{k: vc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "image_size", "patch_size",
                                                   "feature_layer", "image_token_id")}},
    }
    d["audio_processor"] = {"name": "cascades", "config": {
        "activation": ac["activation"], "activation_checkpointing": "", "attention_dim": ac["hidden_size"],
        "attention_heads": ac["num_attention_heads"], "batch_norm": False, "bias_in_glu": True, "causal": True,
        "chunk_size": ac["chunk_size"], "cnn_layer_norm": True, "conv_activation": ac["conv_activation"],
        "conv_glu_type": ac["conv_glu_type"], "depthwise_multiplier": ac["depthwise_multiplier"],
        "depthwise_separable_out_channel": ac["depthwise_separable_out_channel"], "dropout_rate": ac["dropout_rate"],
        "encoder_embedding_config": {"input_size": ac["input_size"]}, "ext_pw_kernel_size": 1,
        "ext_pw_out_channel": ac["ext_pw_out_channel"], "input_layer": "nemo_conv", "input_size": ac["input_size"],
        "kernel_size": ac["kernel_size"], "left_chunk": ac["left_chunk"], "linear_units": ac["intermediate_size"],
        "nemo_conv_settings": {"conv_channels": ac["nemo_conv_channels"]}, "num_blocks": ac["num_blocks"],
        "relative_attention_bias_args": {"type": "t5", "t5_bias_max_distance": ac["bias_max_distance"]},
        "time_reduction": ac["time_reduction"], "audio_token_id": ac["audio_token_id"],
    }}
    for name, r in lora_ranks.items():
        d[f"{name}_lora"] = {"dp": 0.0, "layer": r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))",
                             "lora_alpha": 2 * r, "r": r}
    return d


def save_tiny_phi4mm(folder: str | os.PathLike, spec: TinyPhi4Spec = TinyPhi4Spec(),
                     lora_ranks: dict[str, int] | None = None) -> Path:
    """A tiny Phi-4-multimodal written in the published phi4mm layout: its config.json (:func:`phi4mm_config`) and
    the custom code's tensor names, with each LoRA-targeted decoder weight stored as ``<module>.base_layer.weight``
    beside random ``<module>.lora_A.<name>.weight`` / ``lora_B`` for each adapter (vision r 4, speech r 6 unless
    given). The same random weights as :func:`save_tiny_phi4` for ``spec``; tokenizer and processor files are the
    transformers ones."""
    import re

    from safetensors.torch import save_file

    folder = Path(folder)
    lora_ranks = {"vision": 4, "speech": 6} if lora_ranks is None else lora_ranks
    model, tok, proc = build_tiny_hf_phi4(spec)
    proc.save_pretrained(folder)
    g = torch.Generator().manual_seed(spec.seed + 50)
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and spec.tie:
            continue
        if key.endswith("rotary_emb.inv_freq") or "original_inv_freq" in key:
            continue
        new = key
        for pat, rep in _TO_PHI4MM:
            new, n = re.subn(pat, rep, new, count=1)
            if n:
                break
        m = re.fullmatch(r"(model\.layers\.\d+\.(?:self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj))\.weight", new)
        if m:
            new = f"{m.group(1)}.base_layer.weight"
            for name, r in lora_ranks.items():
                out[f"{m.group(1)}.lora_A.{name}.weight"] = 0.2 * torch.randn(r, t.shape[1], generator=g)
                out[f"{m.group(1)}.lora_B.{name}.weight"] = 0.2 * torch.randn(t.shape[0], r, generator=g)
        out[new] = t.detach().clone().contiguous()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(phi4mm_config(model.config, lora_ranks), indent=1))
    return folder
