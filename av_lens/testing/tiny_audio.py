"""Tiny random-weight audio LLMs: Qwen2-Audio and Audio Flamingo 3, built offline from transformers' own classes.

    folder = save_tiny_qwen2_audio(tmp_path / "q2a", TinyAudioSpec())
    folder = save_tiny_audioflamingo3(tmp_path / "af3", TinyAudioSpec(tie=True))
    model = HookedAVTransformer.from_pretrained(folder)

Both are a Whisper-style audio encoder (two convolutions, ``max_source_positions`` positions, average pooling)
feeding a Qwen2 decoder through a projector. The full models read 30 s windows (3000 mel frames, 1500
positions, 750 tokens); the tiny ones read ``chunk_seconds`` windows (200 mel frames for 2 s, 50 tokens), so the
feature extractor's ``chunk_length`` and the encoder's ``max_source_positions`` shrink together. The tokenizer
is the tiny byte-level BPE of :mod:`av_lens.testing.tiny` (Qwen specials first; Audio Flamingo 3's ``<sound>``
placeholder added). Nothing here means anything; it has the real architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from av_lens.testing.tiny import NAMED_TOKENS, SPECIAL_TOKENS, _perturb, train_bpe_tokenizer

AF3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"]


@dataclass(frozen=True)
class TinyAudioSpec:
    """Shape of a tiny audio LLM: 2 decoder layers of width 64, 4 heads of 16 (GQA 2:1), a 2-layer encoder of 32."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    tie: bool = False
    audio_layers: int = 2
    audio_d_model: int = 32
    chunk_seconds: int = 2  # the encoder window (30 in the real models)
    vocab_size: int = 400
    seed: int = 0


def _feature_extractor(spec: TinyAudioSpec):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=spec.chunk_seconds,
                                   n_fft=400)


def _text_config(spec: TinyAudioSpec, tok, eos: str) -> dict:
    return dict(model_type="qwen2", vocab_size=len(tok), hidden_size=spec.d_model, intermediate_size=spec.d_mlp,
                num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
                max_position_embeddings=4096, tie_word_embeddings=spec.tie, rope_parameters={"rope_type": "default",
                                                                                             "rope_theta": 1e6},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids(eos),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))


def _audio_config(spec: TinyAudioSpec) -> dict:
    # 100 frames per second of mel, halved by conv2: max_source_positions = 50 per second of window
    return dict(num_mel_bins=128, d_model=spec.audio_d_model, encoder_layers=spec.audio_layers,
                encoder_attention_heads=2, encoder_ffn_dim=2 * spec.audio_d_model,
                max_source_positions=50 * spec.chunk_seconds)


def build_tiny_hf_qwen2_audio(spec: TinyAudioSpec = TinyAudioSpec()):
    """(transformers ``Qwen2AudioForConditionalGeneration``, tokenizer, processor) with random weights."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    tok = train_bpe_tokenizer(SPECIAL_TOKENS, spec.vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              extra_special_tokens={k: v for k, v in NAMED_TOKENS.items() if k.startswith("audio")})
    cfg = Qwen2AudioConfig(audio_config=dict(model_type="qwen2_audio_encoder", **_audio_config(spec)),
                           text_config=_text_config(spec, tok, "<|im_end|>"),
                           audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"), tie_word_embeddings=spec.tie)
    torch.manual_seed(spec.seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    _perturb(model, spec.seed)
    proc = Qwen2AudioProcessor(feature_extractor=_feature_extractor(spec), tokenizer=tok)
    return model, tok, proc


def build_tiny_hf_audioflamingo3(spec: TinyAudioSpec = TinyAudioSpec()):
    """(transformers ``AudioFlamingo3ForConditionalGeneration``, tokenizer, processor) with random weights."""
    from transformers import (AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration,
                              AudioFlamingo3Processor)

    tok = train_bpe_tokenizer(AF3_SPECIAL_TOKENS, spec.vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ac = _audio_config(spec)
    ac = dict(model_type="audioflamingo3_encoder", num_mel_bins=128, hidden_size=ac["d_model"],
              num_hidden_layers=ac["encoder_layers"], num_attention_heads=2, intermediate_size=ac["encoder_ffn_dim"],
              max_source_positions=ac["max_source_positions"])
    cfg = AudioFlamingo3Config(audio_config=ac, text_config=_text_config(spec, tok, "<|im_end|>"),
                               audio_token_id=tok.convert_tokens_to_ids("<sound>"), tie_word_embeddings=spec.tie)
    torch.manual_seed(spec.seed)
    model = AudioFlamingo3ForConditionalGeneration(cfg).eval()
    _perturb(model, spec.seed)
    proc = AudioFlamingo3Processor(feature_extractor=_feature_extractor(spec), tokenizer=tok,
                                   max_audio_len=10 * spec.chunk_seconds)
    return model, tok, proc


def _save(folder, built) -> Path:
    folder = Path(folder)
    model, _, proc = built
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def save_tiny_qwen2_audio(folder: str | os.PathLike, spec: TinyAudioSpec = TinyAudioSpec()) -> Path:
    """Build a tiny Qwen2-Audio and write it as a checkpoint folder (safetensors, tokenizer, processor)."""
    return _save(folder, build_tiny_hf_qwen2_audio(spec))


def save_tiny_audioflamingo3(folder: str | os.PathLike, spec: TinyAudioSpec = TinyAudioSpec()) -> Path:
    """Build a tiny Audio Flamingo 3 and write it as a checkpoint folder (safetensors, tokenizer, processor)."""
    return _save(folder, build_tiny_hf_audioflamingo3(spec))
