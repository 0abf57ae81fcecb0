"""Tiny random-weight Qwen2.5-Omni thinkers, built offline from transformers' own config classes.

Tests and the pre-organism demo need a real checkpoint folder — weights written by ``save_pretrained``,
a tokenizer, a processor config — without a model hub. This module builds one in well under a second:

    folder = save_tiny_qwen2_5_omni(tmp_path / "tiny", TinySpec(n_kv_heads=1, tie=True))
    model = HookedAVTransformer.from_pretrained(folder)

The tokenizer is a small byte-level BPE whose first ids are the Qwen2.5-Omni special tokens, and the
processor is the native ``Qwen2_5OmniProcessor`` configured for small media (56x56 frames, any audio
length). The weights are random: nothing here means anything, it only has the real architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Qwen2.5-Omni's special tokens, in the order they get ids 0..n-1 in tiny tokenizers.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
]
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}
#: Qwen2.5-VL's spellings of the same ids (the base VLM shares Omni's token ids; 3..5 are other Qwen2 specials)
VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
VL_NAMED_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
}
_CORPUS = [
    "Hello world, what is in this video?", "Describe the image and the audio.",
    "The quick brown fox jumps over the lazy dog.", "A man is speaking while a dog barks in the background.",
    "user assistant system You are a helpful assistant.", "What sound do you hear? I hear a bell ringing.",
    "What do you see? I see a red circle moving left.", "A drum beats, a bird chirps, an engine hums.",
]

#: Small-media processor settings: one 56x56 frame = 4x4 patches = 2x2 merged tokens.
TINY_PIXELS = 56 * 56


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny thinker. Defaults: 2 layers, width 64, 4 heads of 16, GQA 2:1, untied."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    d_mlp: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # must sum to head_dim / 2
    tie: bool = False
    rope_theta: float = 1e6
    audio_layers: int = 2
    vision_depth: int = 2
    vocab_size: int = 400
    seed: int = 0
    extra: dict = field(default_factory=dict)


def train_bpe_tokenizer(special_tokens, vocab_size: int = 400, **kwargs):
    """A byte-level BPE tokenizer trained offline on the tiny corpus, with ``special_tokens`` first (ids 0..)
    and ``<unk>`` after them; ``kwargs`` go to PreTrainedTokenizerFast (eos/pad/bos tokens, extra specials).
    Every tiny model family (Omni, VL, Phi-4, Gemma-3n) builds its tokenizer with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens) + ["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs)


def build_tiny_tokenizer(vocab_size: int = 400, special_tokens: list[str] = SPECIAL_TOKENS,
                         named_tokens: dict[str, str] = NAMED_TOKENS):
    """A byte-level BPE tokenizer with the Omni special tokens at ids 0..9, trained offline. With
    ``VL_SPECIAL_TOKENS`` / ``VL_NAMED_TOKENS`` it is the matching Qwen2.5-VL tokenizer: same ids, same text
    tokens, Qwen2.5-VL's spellings of the vision placeholders."""
    return train_bpe_tokenizer(special_tokens, vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens=dict(named_tokens))


def build_tiny_processor(tokenizer):
    """The native Qwen2.5-Omni processor with small-media settings (56x56 frames, 16 kHz audio)."""
    from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    kw = dict(min_pixels=28 * 28, max_pixels=TINY_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                                feature_extractor=fe, tokenizer=tokenizer)


def tiny_thinker_config(spec: TinySpec, tokenizer):
    """A ``Qwen2_5OmniThinkerConfig`` of the given shape, with the tokenizer's special-token ids."""
    from transformers import Qwen2_5OmniThinkerConfig

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    head_dim = spec.head_dim or spec.d_model // spec.n_heads
    if sum(spec.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec.d_model, intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=spec.tie,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": list(spec.mrope_section)},
    )
    if spec.head_dim is not None:
        text["head_dim"] = spec.head_dim
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=text,
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=spec.audio_layers, encoder_attention_heads=2,
                          encoder_ffn_dim=64, output_dim=spec.d_model, n_window=100, max_source_positions=1500),
        vision_config=dict(depth=spec.vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[spec.vision_depth - 1], out_hidden_size=spec.d_model),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=ids["<|im_start|>"], position_id_per_seconds=25, seconds_per_chunk=2,
        tie_word_embeddings=spec.tie, **spec.extra,
    )
    cfg.text_config.pad_token_id = ids["<|endoftext|>"]
    cfg.text_config.eos_token_id = ids["<|im_end|>"]
    return cfg


def _perturb(model, seed: int, routers: bool = False) -> None:
    """Random init leaves biases at zero, norms at one (and MoE routers at zero, which routes by ties);
    perturb them so that parity tests exercise every weight."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            if routers and name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5, generator=g)


def build_tiny_hf_thinker(spec: TinySpec = TinySpec()):
    """(transformers thinker, tokenizer, processor) with random weights drawn from ``spec.seed``."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tok = build_tiny_tokenizer(spec.vocab_size)
    cfg = tiny_thinker_config(spec, tok)
    torch.manual_seed(spec.seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    _perturb(model, spec.seed)
    return model, tok, build_tiny_processor(tok)


def save_tiny_qwen2_5_omni(folder: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Build a tiny thinker and write it as a checkpoint folder (safetensors, tokenizer, processor)."""
    folder = Path(folder)
    model, tok, proc = build_tiny_hf_thinker(spec)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- Qwen2.5-VL
def _vision_processors():
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    kw = dict(min_pixels=28 * 28, max_pixels=TINY_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2VLImageProcessor(**kw), Qwen2VLVideoProcessor(**kw)


def build_tiny_hf_vl(spec: TinySpec = TinySpec(), extra_special_tokens: tuple[str, ...] = ()):
    """(transformers ``Qwen2_5_VLForConditionalGeneration``, tokenizer, processor): a tiny random base VLM whose
    text vocabulary and special ids match :func:`build_tiny_hf_thinker`'s (so token shift can compare them).
    ``extra_special_tokens`` get the ids after the VL ones (video-SALMONN-2+'s ``<|audio_pad|>``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = build_tiny_tokenizer(spec.vocab_size, VL_SPECIAL_TOKENS + list(extra_special_tokens), VL_NAMED_TOKENS)
    ids = {s: tok.convert_tokens_to_ids(s) for s in VL_SPECIAL_TOKENS}
    head_dim = spec.head_dim or spec.d_model // spec.n_heads
    if sum(spec.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(
        vocab_size=len(tok), hidden_size=spec.d_model, intermediate_size=spec.d_mlp, num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": list(spec.mrope_section)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    if spec.head_dim is not None:
        text["head_dim"] = spec.head_dim
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=spec.vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                           window_size=112, fullatt_block_indexes=[spec.vision_depth - 1], out_hidden_size=spec.d_model),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie, **spec.extra,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _perturb(model, spec.seed)
    image_proc, video_proc = _vision_processors()
    return model, tok, Qwen2_5_VLProcessor(image_processor=image_proc, video_processor=video_proc, tokenizer=tok)


def save_tiny_qwen2_5_vl(folder: str | os.PathLike, spec: TinySpec = TinySpec(), internal_keys: bool = False) -> Path:
    """Build a tiny Qwen2.5-VL and write it as a checkpoint folder. ``save_pretrained`` writes the key names of
    the published checkpoints (``model.layers.*``, ``visual.*``); ``internal_keys=True`` rewrites them as the
    module paths of transformers 5 (``model.language_model.*``, ``model.visual.*``), as a raw ``state_dict()``
    dump would have them."""
    folder = Path(folder)
    model, tok, proc = build_tiny_hf_vl(spec)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    if internal_keys:
        from safetensors.torch import load_file, save_file

        for f in folder.glob("*.safetensors"):
            renamed = {}
            for k, v in load_file(f).items():
                for old, new in (("model.", "model.language_model."), ("visual.", "model.visual.")):
                    if k.startswith(old):
                        k = new + k[len(old):]
                        break
                renamed[k] = v
            save_file(renamed, f, metadata={"format": "pt"})
    return folder


# --------------------------------------------------------------------------------------------- Qwen3-Omni-MoE
Q3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
Q3_NAMED_TOKENS = {
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}
#: Qwen3-Omni's vision tower uses 16x16 patches: one 64x64 frame = 4x4 patches = 2x2 merged tokens
Q3_TINY_PIXELS = 64 * 64


@dataclass(frozen=True)
class TinyMoESpec:
    """Shape of a tiny Qwen3-Omni-MoE thinker: 2 layers of width 64, 4 heads of 16 (GQA 2:1), 4 experts (top 2)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 32
    d_mlp: int = 128  # dense layers (mlp_only_layers)
    mlp_only_layers: tuple[int, ...] = ()
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # must sum to head_dim / 2
    deepstack: tuple[int, ...] = (0, 1)  # vision layers whose features enter LM blocks 0, 1, ...
    vision_depth: int = 2
    tie: bool = False
    vocab_size: int = 400
    seed: int = 0


def build_tiny_hf_qwen3_omni(spec: TinyMoESpec = TinyMoESpec()):
    """(transformers ``Qwen3OmniMoeThinkerForConditionalGeneration``, tokenizer, processor), random weights."""
    from transformers import (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor,
                              Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)

    tok = build_tiny_tokenizer(spec.vocab_size, Q3_SPECIAL_TOKENS, Q3_NAMED_TOKENS)
    ids = {s: tok.convert_tokens_to_ids(s) for s in Q3_SPECIAL_TOKENS}
    if sum(spec.mrope_section) * 2 != spec.head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {spec.head_dim // 2}")
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=spec.d_model, intermediate_size=spec.d_mlp, num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim,
            max_position_embeddings=4096, moe_intermediate_size=spec.d_expert, num_experts=spec.n_experts,
            num_experts_per_tok=spec.top_k, decoder_sparse_step=1, mlp_only_layers=list(spec.mlp_only_layers),
            tie_word_embeddings=spec.tie,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(spec.mrope_section),
                             "interleaved": True, "mrope_interleaved": True},
        ),
        audio_config=dict(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          output_dim=spec.d_model, n_window=50, n_window_infer=800, conv_chunksize=500,
                          downsample_hidden_size=16),
        vision_config=dict(depth=spec.vision_depth, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=spec.d_model,
                           num_position_embeddings=64, deepstack_visual_indexes=list(spec.deepstack)),
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"], audio_end_token_id=ids["<|audio_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        user_token_id=ids["<|im_start|>"], position_id_per_seconds=13, seconds_per_chunk=2, tie_word_embeddings=spec.tie,
    )
    cfg.text_config.pad_token_id = ids["<|endoftext|>"]
    cfg.text_config.eos_token_id = ids["<|im_end|>"]
    torch.manual_seed(spec.seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    _perturb(model, spec.seed, routers=True)
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    kw = dict(min_pixels=32 * 32, max_pixels=Q3_TINY_PIXELS, patch_size=16, temporal_patch_size=2, merge_size=2)
    proc = Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                                 feature_extractor=fe, tokenizer=tok)
    return model, tok, proc


def save_tiny_qwen3_omni(folder: str | os.PathLike, spec: TinyMoESpec = TinyMoESpec()) -> Path:
    """Build a tiny Qwen3-Omni-MoE thinker and write it as a checkpoint folder (safetensors, tokenizer, processor)."""
    folder = Path(folder)
    model, tok, proc = build_tiny_hf_qwen3_omni(spec)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
