"""A tiny random-weight video-SALMONN-2+ checkpoint, written in the published layout, offline.

The published model (bytedance/video-SALMONN-2, ``video_SALMONN2_plus/``) is a Qwen2.5-VL checkpoint with one
more module, ``audio`` (Whisper encoder + BERT Q-Former + ``audio_proj``), and ``audio_config`` in its
config.json. This builder makes the tiny Qwen2.5-VL of :func:`av_lens.testing.tiny.build_tiny_hf_vl` (with
``<|audio_pad|>`` added to the tokenizer), draws the audio module's weights from transformers' ``WhisperEncoder``
and ``Blip2QFormerModel`` at random, and writes them under the published names — Whisper's keys at the top of
``audio.``, the Q-Former as the LAVIS-style BERT of ``modeling_bert.py`` (``audio.qformer.bert.embeddings.LayerNorm``,
``...encoder.layer.{i}.attention.self.query``, ``crossattention.self``, ``intermediate_query``, ``output_query``) —
so that loading exercises the renaming. Nothing here means anything: it only has the real architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from av_lens.testing.tiny import TinySpec, build_tiny_hf_vl

AUDIO_PAD = "<|audio_pad|>"


@dataclass(frozen=True)
class TinySalmonnSpec:
    """The audio branch's shape; the language model and vision tower are ``vl`` (a :class:`TinySpec`)."""

    vl: TinySpec = TinySpec()
    n_mel: int = 16
    d_whisper: int = 16
    whisper_layers: int = 2
    whisper_heads: int = 2
    d_qformer: int = 24
    qformer_layers: int = 2
    qformer_heads: int = 2
    query_length: int = 1
    second_per_window: float = 0.5
    seed: int = 0


def audio_config(spec: TinySalmonnSpec) -> dict:
    """``audio_config`` as the published ``WhisperConfig`` (with its ``qformer_config``) serialises it."""
    return {
        "model_type": "whisper", "num_mel_bins": spec.n_mel, "encoder_layers": spec.whisper_layers,
        "encoder_attention_heads": spec.whisper_heads, "encoder_ffn_dim": 2 * spec.d_whisper,
        "d_model": spec.d_whisper, "max_source_positions": 1500, "activation_function": "gelu",
        "scale_embedding": False, "second_per_window": spec.second_per_window,
        "second_stride": spec.second_per_window,
        "qformer_config": {
            "hidden_size": spec.d_qformer, "num_hidden_layers": spec.qformer_layers,
            "num_attention_heads": spec.qformer_heads, "intermediate_size": 2 * spec.d_qformer,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "encoder_width": spec.d_whisper,
            "add_cross_attention": True, "cross_attention_freq": 1, "query_length": spec.query_length,
            "position_embedding_type": "absolute", "out_hidden_size": spec.vl.d_model,
        },
    }


def published_audio_state_dict(spec: TinySalmonnSpec) -> dict[str, torch.Tensor]:
    """Random ``audio.*`` tensors under the published names."""
    from transformers import Blip2QFormerConfig, WhisperConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(spec.seed + 11)
    whisper = WhisperEncoder(WhisperConfig(num_mel_bins=spec.n_mel, encoder_layers=spec.whisper_layers,
                                           encoder_attention_heads=spec.whisper_heads,
                                           encoder_ffn_dim=2 * spec.d_whisper, d_model=spec.d_whisper,
                                           max_source_positions=1500))
    qf = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=spec.d_qformer, num_hidden_layers=spec.qformer_layers, num_attention_heads=spec.qformer_heads,
        intermediate_size=2 * spec.d_qformer, cross_attention_frequency=1, encoder_hidden_size=spec.d_whisper))
    g = torch.Generator().manual_seed(spec.seed + 12)
    out = {}
    for k, v in whisper.state_dict().items():
        v = v.clone()
        if k.endswith("bias") or "layer_norm" in k:
            v += 0.1 * torch.randn(v.shape, generator=g)
        if k == "embed_positions.weight":
            v = 0.1 * torch.randn(v.shape, generator=g)
        out["audio." + k] = v
    for k, v in qf.state_dict().items():
        v = v.clone()
        if k.endswith("bias") or "LayerNorm" in k or "layernorm" in k:
            v += 0.1 * torch.randn(v.shape, generator=g)
        name = ("embeddings.LayerNorm." + k[len("layernorm."):] if k.startswith("layernorm.") else
                k.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                                ".crossattention.self."))
        out["audio.qformer.bert." + name] = v
    out["audio.qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]  # BERT's persistent buffer
    out["audio.q_tokens"] = 0.02 * torch.randn(1, spec.query_length, spec.d_qformer, generator=g)
    out["audio.audio_proj.weight"] = 0.2 * torch.randn(spec.vl.d_model, spec.d_qformer, generator=g)
    out["audio.audio_proj.bias"] = 0.1 * torch.randn(spec.vl.d_model, generator=g)
    return out


def save_tiny_video_salmonn2(folder: str | os.PathLike, spec: TinySalmonnSpec = TinySalmonnSpec()) -> Path:
    """Write a tiny video-SALMONN-2+ folder: the tiny Qwen2.5-VL's ``save_pretrained`` output (its
    ``model.*`` / ``visual.*`` / ``lm_head`` keys), the ``audio.*`` tensors, and config.json with ``audio_config``
    and ``audio_token_id``."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    model, tok, proc = build_tiny_hf_vl(spec.vl, extra_special_tokens=(AUDIO_PAD,))
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one weight file, found {files}")
    tensors = load_file(files[0])
    tensors.update(published_audio_state_dict(spec))
    save_file(tensors, files[0], metadata={"format": "pt"})
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["audio_config"] = audio_config(spec)
    cfg["audio_token_id"] = tok.convert_tokens_to_ids(AUDIO_PAD)
    cfg["architectures"] = ["video_SALMONN2_plus"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder
