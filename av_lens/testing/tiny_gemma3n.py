"""Tiny random-weight Gemma-3n checkpoints (``Gemma3nForConditionalGeneration``), built offline from transformers'
own classes.

    folder = save_tiny_gemma3n(tmp_path / "g3n", TinyGemma3nSpec())
    model = HookedAVTransformer.from_pretrained(folder)

Vocabulary layout as in the real model, scaled down: the text vocabulary (a small byte-level BPE whose first ids
are Gemma's specials) | 8 vision "hard" ids (``<end_of_image>`` first, then ``<image_soft_token>``) | 8 audio hard
ids (``<end_of_audio>``, ``<audio_soft_token>``, ...). The processor is the native ``Gemma3nProcessor``
(``Gemma3nAudioFeatureExtractor`` + a 64 x 64 ``SiglipImageProcessor``) expanding each image / clip to a fixed
number of soft tokens. The vision tower is timm's MobileNetV5 at 1/8 width (timm is needed). Nothing here means
anything; it has the real architecture: AltUp, Laurel, per-layer inputs, KV sharing, sliding and full layers,
activation sparsity in the first layers, soft-capped logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

GEMMA3N_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<start_of_audio>"]
N_HARD = 8  # vision / audio hard-token vocabulary sizes (real: 128 each)


@dataclass(frozen=True)
class TinyGemma3nSpec:
    """Shape of a tiny Gemma-3n: 4 layers of width 64 (sliding, full, sliding, full), the last 2 sharing the KV of
    layers 0 and 1, 4 AltUp streams, a sliding window of 16 tokens, sparse MLPs in the first 2 layers."""

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_head: int = 16
    d_mlp: tuple[int, ...] | int = 128
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    sliding_window: int = 16
    n_kv_shared: int = 2
    d_per_layer: int = 8
    laurel_rank: int = 8
    altup_num_inputs: int = 4
    sparsity: tuple[float, ...] = (0.95, 0.95, 0.0, 0.0)
    n_image_tokens: int = 16  # real: 256 (16 x 16 MSFA grid)
    n_audio_tokens: int = 16  # real: 188 (30 s)
    vocab_size: int = 400
    seed: int = 0


def build_tiny_tokenizer(vocab_size: int = 400):
    from av_lens.testing.tiny import train_bpe_tokenizer

    fast = train_bpe_tokenizer(GEMMA3N_SPECIAL_TOKENS, vocab_size, bos_token="<bos>", eos_token="<eos>",
                               pad_token="<pad>")
    text_v = len(fast)
    vis = ["<end_of_image>", "<image_soft_token>"] + [f"<vision_{i}>" for i in range(N_HARD - 2)]
    aud = ["<end_of_audio>", "<audio_soft_token>"] + [f"<audio_{i}>" for i in range(N_HARD - 2)]
    fast.add_special_tokens({"extra_special_tokens": vis + aud})
    fast._set_model_specific_special_tokens({
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"})
    return fast, text_v


def tiny_gemma3n_config(spec: TinyGemma3nSpec, tokenizer, text_v: int):
    from transformers import Gemma3nConfig

    tid = tokenizer.convert_tokens_to_ids
    return Gemma3nConfig(
        text_config=dict(
            vocab_size=len(tokenizer), vocab_size_per_layer_input=text_v, hidden_size=spec.d_model,
            intermediate_size=list(spec.d_mlp) if isinstance(spec.d_mlp, tuple) else spec.d_mlp,
            num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
            head_dim=spec.d_head, layer_types=list(spec.layer_types), sliding_window=spec.sliding_window,
            num_kv_shared_layers=spec.n_kv_shared, hidden_size_per_layer_input=spec.d_per_layer,
            laurel_rank=spec.laurel_rank, altup_num_inputs=spec.altup_num_inputs,
            activation_sparsity_pattern=list(spec.sparsity), max_position_embeddings=1024,
            pad_token_id=tid("<pad>"), eos_token_id=[tid("<eos>"), tid("<end_of_turn>")], bos_token_id=tid("<bos>"),
        ),
        vision_config=dict(architecture="mobilenetv5_300m_enc", hidden_size=2048, vocab_size=N_HARD,
                           vocab_offset=text_v, model_args={"channel_multiplier": 0.125, "msfa_output_resolution": 4}),
        audio_config=dict(input_feat_size=128, hidden_size=64, conf_num_attention_heads=4, conf_num_hidden_layers=2,
                          sscp_conv_channel_size=[16, 8], vocab_size=N_HARD, vocab_offset=text_v + N_HARD),
        audio_soft_tokens_per_image=spec.n_audio_tokens, vision_soft_tokens_per_image=spec.n_image_tokens,
        boi_token_id=tid("<start_of_image>"), eoi_token_id=tid("<end_of_image>"),
        image_token_id=tid("<image_soft_token>"), boa_token_id=tid("<start_of_audio>"),
        eoa_token_id=tid("<end_of_audio>"), audio_token_id=tid("<audio_soft_token>"),
        pad_token_id=tid("<pad>"), eos_token_id=[tid("<eos>"), tid("<end_of_turn>")], bos_token_id=tid("<bos>"),
    )


def _perturb(model, seed: int) -> None:
    """Random init leaves norms at one and the AltUp coefficients / output scale at zero; perturb them so that
    every path carries signal."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "language_model" in name and ("norm" in name or "altup" in name or "laurel" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_tiny_processor(tokenizer, spec: TinyGemma3nSpec):
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    ip = SiglipImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    return Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=ip, tokenizer=tokenizer,
                            audio_seq_length=spec.n_audio_tokens, image_seq_length=spec.n_image_tokens)


def build_tiny_hf_gemma3n(spec: TinyGemma3nSpec = TinyGemma3nSpec()):
    """(transformers ``Gemma3nForConditionalGeneration``, tokenizer, processor) with random weights."""
    from transformers import Gemma3nForConditionalGeneration

    tok, text_v = build_tiny_tokenizer(spec.vocab_size)
    cfg = tiny_gemma3n_config(spec, tok, text_v)
    torch.manual_seed(spec.seed)
    model = Gemma3nForConditionalGeneration(cfg).eval()
    _perturb(model, spec.seed)
    return model, tok, build_tiny_processor(tok, spec)


def save_tiny_gemma3n(folder: str | os.PathLike, spec: TinyGemma3nSpec = TinyGemma3nSpec()) -> Path:
    """Build a tiny Gemma-3n and write it as a checkpoint folder (safetensors, tokenizer, processor)."""
    folder = Path(folder)
    model, tok, proc = build_tiny_hf_gemma3n(spec)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
