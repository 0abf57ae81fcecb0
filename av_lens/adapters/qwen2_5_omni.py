"""Qwen2.5-Omni thinker (3B, 7B): the Qwen2 decoder fed by a Whisper-style audio tower and the Qwen2.5-VL
vision tower. Accepts a thinker checkpoint (``qwen2_5_omni_thinker``) or a full Omni checkpoint
(``qwen2_5_omni``, weights under ``thinker.``; the talker and token2wav are skipped)."""

from __future__ import annotations

import torch

from av_lens.adapters.base import Adapter, register
from av_lens.config import AVConfig
from av_lens.errors import CheckpointError
from av_lens.layout import TokenIds

_MARKER_TOKENS = {"<|im_start|>": "im_start", "<|im_end|>": "im_end", "<|endoftext|>": "endoftext"}


def _thinker_config(hf_config):
    if getattr(hf_config, "model_type", None) == "qwen2_5_omni":
        return hf_config.thinker_config
    return hf_config


def _tok_id(tc, *names):
    for n in names:
        v = getattr(tc, n, None)
        if v is not None:
            return int(v)
    raise CheckpointError(f"the thinker config has none of {names}", "use a complete Qwen2.5-Omni config.json")


def _marker_ids(tokenizer) -> dict[int, str]:
    """Token id -> name of the chat markers the tokenizer has (<|im_start|>, <|im_end|>, <|endoftext|>)."""
    markers = {}
    if tokenizer is not None:
        for tok, name in _MARKER_TOKENS.items():
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                markers[tid] = name
    return markers


def _text_model_kwargs(text, markers: dict[int, str], tie: bool) -> dict:
    """AVConfig fields of a Qwen2-style decoder config (shared by the Qwen2.5 Omni and VL adapters)."""
    if getattr(text, "use_sliding_window", False):
        raise CheckpointError("this checkpoint enables sliding-window attention, which av_lens does not implement",
                              "use a checkpoint with use_sliding_window=false (all released Qwen2.5 Omni/VL models)")
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    eos = text.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for tid, name in markers.items():
        if name == "im_end" and tid not in eos:
            eos.append(tid)
    return dict(
        n_layers=text.num_hidden_layers, d_model=text.hidden_size, n_heads=text.num_attention_heads,
        n_key_value_heads=text.num_key_value_heads, d_head=head_dim, d_mlp=text.intermediate_size,
        d_vocab=text.vocab_size, n_ctx=text.max_position_embeddings, eps=text.rms_norm_eps, act_fn=text.hidden_act,
        rotary_base=float(rope.get("rope_theta", getattr(text, "rope_theta", 1e6))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=tie, pad_token_id=text.pad_token_id, eos_token_ids=tuple(eos),
    )


def _to_av_config(tc, tokenizer=None, **overrides) -> AVConfig:
    markers = _marker_ids(tokenizer)
    tokens = TokenIds(
        audio=_tok_id(tc, "audio_token_index", "audio_token_id"),
        image=_tok_id(tc, "image_token_index", "image_token_id"),
        video=_tok_id(tc, "video_token_index", "video_token_id"),
        audio_bos=_tok_id(tc, "audio_start_token_id"), audio_eos=_tok_id(tc, "audio_end_token_id"),
        vision_bos=_tok_id(tc, "vision_start_token_id"), vision_eos=_tok_id(tc, "vision_end_token_id"),
        markers=markers,
    )
    kw = _text_model_kwargs(tc.text_config, markers, tie=bool(getattr(tc, "tie_word_embeddings", False)))
    kw.update(
        tokens=tokens,
        position_id_per_seconds=int(tc.position_id_per_seconds), seconds_per_chunk=float(tc.seconds_per_chunk),
        spatial_merge_size=int(tc.vision_config.spatial_merge_size),
        original_architecture="Qwen2_5OmniThinkerForConditionalGeneration",
    )
    kw.update(overrides)
    return AVConfig(**kw)


def _build_towers(tc):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (Qwen2_5OmniAudioEncoder,
                                                                         Qwen2_5OmniVisionEncoder)

    return {
        "audio_tower": Qwen2_5OmniAudioEncoder._from_config(tc.audio_config, attn_implementation="sdpa"),
        "visual": Qwen2_5OmniVisionEncoder._from_config(tc.vision_config, attn_implementation="sdpa"),
    }


def _build_rotary(tc):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding

    return Qwen2_5OmniRotaryEmbedding(config=tc.text_config)


def _encoder_layers(tower, kind):
    return list(tower.layers) if kind == "audio" else list(tower.blocks)


def _encode_audio(model, inp) -> torch.Tensor:
    tower = model.audio_tower
    fam = inp.feature_attention_mask.to(inp.input_features.device)
    lengths = fam.sum(-1)
    flat = inp.input_features.permute(0, 2, 1)[fam.bool()].permute(1, 0)  # [n_mel, total_frames]
    aftercnn, _ = tower._get_feat_extract_output_lengths(lengths)
    call = lambda x: tower(x.to(tower.conv1.weight.dtype), feature_lens=lengths, aftercnn_lens=aftercnn).last_hidden_state
    return model.audio_encoder.run(_encoder_layers(tower, "audio"), call, flat)


def _encode_vision(kind):
    def encode(model, inp) -> torch.Tensor:
        tower = model.visual
        pixels, grid = (inp.pixel_values, inp.image_grid_thw) if kind == "image" else (inp.pixel_values_videos,
                                                                                        inp.video_grid_thw)
        hooks = model.image_encoder if kind == "image" else model.video_encoder
        call = lambda x: tower(x.type(tower.dtype), grid_thw=grid).pooler_output
        return hooks.run(_encoder_layers(tower, "vision"), call, pixels)
    return encode


QWEN2_5_OMNI = register(Adapter(
    name="qwen2_5_omni",
    model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"),
    global_map={
        "embed.W_E": "model.embed_tokens.weight",
        "ln_final.w": "model.norm.weight",
        "unembed.weight": "lm_head.weight",
    },
    layer_map={
        "blocks.{l}.ln1.w": "model.layers.{l}.input_layernorm.weight",
        "blocks.{l}.ln2.w": "model.layers.{l}.post_attention_layernorm.weight",
        "blocks.{l}.attn.q_proj.weight": "model.layers.{l}.self_attn.q_proj.weight",
        "blocks.{l}.attn.q_proj.bias": "model.layers.{l}.self_attn.q_proj.bias",
        "blocks.{l}.attn.k_proj.weight": "model.layers.{l}.self_attn.k_proj.weight",
        "blocks.{l}.attn.k_proj.bias": "model.layers.{l}.self_attn.k_proj.bias",
        "blocks.{l}.attn.v_proj.weight": "model.layers.{l}.self_attn.v_proj.weight",
        "blocks.{l}.attn.v_proj.bias": "model.layers.{l}.self_attn.v_proj.bias",
        "blocks.{l}.attn.o_proj.weight": "model.layers.{l}.self_attn.o_proj.weight",
        "blocks.{l}.mlp.gate_proj.weight": "model.layers.{l}.mlp.gate_proj.weight",
        "blocks.{l}.mlp.up_proj.weight": "model.layers.{l}.mlp.up_proj.weight",
        "blocks.{l}.mlp.down_proj.weight": "model.layers.{l}.mlp.down_proj.weight",
    },
    towers={"audio_tower": "audio_tower.", "visual": "visual."},
    strip_prefixes=("thinker.",),
    skip_prefixes=("talker.", "token2wav."),
    thinker_config=_thinker_config,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=_build_rotary,
    encoder_layers=_encoder_layers,
    encode={"audio": _encode_audio, "image": _encode_vision("image"), "video": _encode_vision("video")},
))
