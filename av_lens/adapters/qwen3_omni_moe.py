"""Qwen3-Omni-MoE thinker (30B-A3B): a Qwen3-MoE decoder fed by a chunked Whisper-style audio tower and a
Qwen3-VL vision tower with "deepstack" outputs.

What differs from Qwen2.5-Omni, and where av_lens handles it:

* **Sparse MoE MLPs** (``components/moe.py``): a linear router picks 8 of 128 SwiGLU experts per token.
  Hooks: ``blocks.{l}.mlp.hook_router_logits``, ``hook_topk_weights``, ``hook_topk_experts``,
  ``hook_expert_out`` (each chosen expert's output before weighting). Checkpoints store one tensor per expert
  (``mlp.experts.{e}.gate_proj.weight``); the loader stacks them into [n_experts, ...] parameters.
* **q/k norms** (``attn.q_norm``, ``attn.k_norm``: RMSNorm over d_head before the rotary embedding); no q/k/v
  biases.
* **Interleaved M-RoPE**: transformers' own rotary module recomposes the (t, h, w) frequencies; the attention
  code is unchanged.
* **Deepstack**: the vision tower also returns features from intermediate layers (through their own mergers);
  they are added to the image and video positions after blocks 0..n-1 (``blocks.{l}.hook_deepstack``).
* **Positions** (``rope_rules="qwen3_omni"``): 13 time units per second, fractional video times kept (float
  positions, as the reference), audio tokens counted per chunk of 2 * n_window mel frames, and a video with its
  soundtrack interleaved token by token in time order between two-position start and end markers.

Accepts a thinker checkpoint (``qwen3_omni_moe_thinker``) or a full one (``qwen3_omni_moe``, thinker under
``thinker.``; the talker and code2wav are skipped).
"""

from __future__ import annotations

import torch

from av_lens.adapters.base import Adapter, register
from av_lens.adapters.qwen2_5_omni import QWEN2_5_OMNI, _encoder_layers, _marker_ids, _text_model_kwargs, _tok_id
from av_lens.config import AVConfig
from av_lens.errors import CheckpointError
from av_lens.layout import TokenIds


def _thinker_config(hf_config):
    if getattr(hf_config, "model_type", None) == "qwen3_omni_moe":
        return hf_config.thinker_config
    return hf_config


def _moe_layers(text) -> tuple[int, ...]:
    n_exp = int(getattr(text, "num_experts", 0) or 0)
    step = int(getattr(text, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(text, "mlp_only_layers", None) or [])
    return tuple(l for l in range(text.num_hidden_layers) if n_exp > 0 and l not in dense and (l + 1) % step == 0)


def _to_av_config(tc, tokenizer=None, **overrides) -> AVConfig:
    text = tc.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("mrope_section") is None:
        raise CheckpointError("the Qwen3-Omni text config has no rope_parameters.mrope_section",
                              "use the checkpoint's complete config.json (mrope_section [24, 20, 20] for 30B-A3B)")
    markers = _marker_ids(tokenizer)
    tokens = TokenIds(
        audio=_tok_id(tc, "audio_token_id"), image=_tok_id(tc, "image_token_id"), video=_tok_id(tc, "video_token_id"),
        audio_bos=_tok_id(tc, "audio_start_token_id"), audio_eos=_tok_id(tc, "audio_end_token_id"),
        vision_bos=_tok_id(tc, "vision_start_token_id"), vision_eos=_tok_id(tc, "vision_end_token_id"),
        markers=markers,
    )
    tie = getattr(text, "tie_word_embeddings", None)
    kw = _text_model_kwargs(text, markers, tie=bool(getattr(tc, "tie_word_embeddings", False) if tie is None else tie))
    kw.update(
        tokens=tokens, position_id_per_seconds=int(tc.position_id_per_seconds),
        seconds_per_chunk=float(getattr(tc, "seconds_per_chunk", 2.0) or 2.0),
        spatial_merge_size=int(tc.vision_config.spatial_merge_size),
        original_architecture="Qwen3OmniMoeThinkerForConditionalGeneration", rope_rules="qwen3_omni",
        attn_bias=bool(getattr(text, "attention_bias", False)), qk_norm=True,
        n_experts=int(getattr(text, "num_experts", 0) or 0), n_experts_per_tok=int(text.num_experts_per_tok),
        d_mlp_expert=int(text.moe_intermediate_size), norm_topk_prob=bool(text.norm_topk_prob),
        moe_layers=_moe_layers(text), n_deepstack=len(tc.vision_config.deepstack_visual_indexes or ()),
        audio_n_window=int(tc.audio_config.n_window),
    )
    kw.update(overrides)
    return AVConfig(**kw)


def _build_towers(tc):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeAudioEncoder,
                                                                            Qwen3OmniMoeVisionEncoder)

    return {
        "audio_tower": Qwen3OmniMoeAudioEncoder._from_config(tc.audio_config, attn_implementation="sdpa"),
        "visual": Qwen3OmniMoeVisionEncoder._from_config(tc.vision_config, attn_implementation="sdpa"),
    }


def _build_rotary(tc):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

    return Qwen3OmniMoeThinkerTextRotaryEmbedding(config=tc.text_config)


def _encode_audio(model, inp) -> torch.Tensor:
    tower = model.audio_tower
    fam = inp.feature_attention_mask.to(inp.input_features.device)
    lengths = fam.sum(-1)
    flat = inp.input_features.permute(0, 2, 1)[fam.bool()].permute(1, 0)  # [n_mel, total_frames]
    call = lambda x: tower(x.to(tower.conv2d1.weight.dtype), feature_lens=lengths).last_hidden_state
    return model.audio_encoder.run(_encoder_layers(tower, "audio"), call, flat)


def _encode_vision(kind):
    def encode(model, inp):
        tower = model.visual
        pixels, grid = (inp.pixel_values, inp.image_grid_thw) if kind == "image" else (inp.pixel_values_videos,
                                                                                        inp.video_grid_thw)
        hooks = model.image_encoder if kind == "image" else model.video_encoder
        side = {}

        def call(x):
            out = tower(x.type(tower.dtype), grid_thw=grid)
            side["deepstack"] = torch.stack(list(out.deepstack_features)) if out.deepstack_features else None
            return out.pooler_output

        feats = hooks.run(_encoder_layers(tower, "vision"), call, pixels)
        extras = {} if side.get("deepstack") is None else {f"{kind}_deepstack": side["deepstack"]}
        return feats, extras
    return encode


def _layer_extra(cfg, layer: int) -> dict[str, str]:
    p = "model.layers.{l}.mlp."
    if cfg is not None and layer in cfg.moe_layers:
        return {
            "blocks.{l}.mlp.W_router": p + "gate.weight",
            "blocks.{l}.mlp.W_gate": p + "experts.{e}.gate_proj.weight",
            "blocks.{l}.mlp.W_up": p + "experts.{e}.up_proj.weight",
            "blocks.{l}.mlp.W_down": p + "experts.{e}.down_proj.weight",
        }
    return {
        "blocks.{l}.mlp.gate_proj.weight": p + "gate_proj.weight",
        "blocks.{l}.mlp.up_proj.weight": p + "up_proj.weight",
        "blocks.{l}.mlp.down_proj.weight": p + "down_proj.weight",
    }


def reference_kwargs(inp) -> dict:
    """Keyword arguments for transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``."""
    return inp.hf_kwargs()


QWEN3_OMNI_MOE = register(Adapter(
    name="qwen3_omni_moe",
    model_types=("qwen3_omni_moe", "qwen3_omni_moe_thinker"),
    global_map=QWEN2_5_OMNI.global_map,
    # the Qwen2.5 attention and norm keys without the q/k/v biases, plus the q/k norms; MLPs per layer below
    layer_map={**{k: v for k, v in QWEN2_5_OMNI.layer_map.items() if ".mlp." not in k and not k.endswith(".bias")},
               "blocks.{l}.attn.q_norm.w": "model.layers.{l}.self_attn.q_norm.weight",
               "blocks.{l}.attn.k_norm.w": "model.layers.{l}.self_attn.k_norm.weight"},
    layer_extra=_layer_extra,
    towers={"audio_tower": "audio_tower.", "visual": "visual."},
    strip_prefixes=("thinker.",),
    skip_prefixes=("talker.", "code2wav."),
    thinker_config=_thinker_config,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=_build_rotary,
    encoder_layers=_encoder_layers,
    encode={"audio": _encode_audio, "image": _encode_vision("image"), "video": _encode_vision("video")},
    reference_kwargs=reference_kwargs,
))
