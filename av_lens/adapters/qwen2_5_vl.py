"""Qwen2.5-VL (3B, 7B): the vision-language model the Qwen2.5-Omni thinker's language model grew from.

It is the *base* of the study's token-shift experiment: teacher-force the AVLLM's answer into it and see
which tokens the audio-visual training changed. Architecturally it is the Omni thinker without the audio
tower: the same Qwen2 decoder (GQA, q/k/v biases, RMSNorm, SwiGLU, M-RoPE with sections [16, 24, 24]) and
the same windowed ViT with a 2x2 patch merger. Two things differ, both handled by ``rope_rules="qwen2_5_vl"``
in the layout:

* video time runs in units of 1/``tokens_per_second`` s (2 per second), not 1/25 s;
* text after an image or video resumes at the block's start + max(h, w) merged patches, not at the block's
  largest position + 1 (so a long video's last temporal positions can exceed the following text's).

The token ids coincide with Omni's (``<|image_pad|>`` = ``<|IMAGE|>`` = 151655 and so on); only their
spellings differ, which :func:`av_lens.processing.placeholders` reads from the tokenizer.

Checkpoints come in two key layouts: the published one (``model.layers.*``, ``visual.*``, ``lm_head``) and the
one transformers 5 writes (``model.language_model.*``, ``model.visual.*``); both load.
"""

from __future__ import annotations

from av_lens.adapters.base import Adapter, register
from av_lens.adapters.qwen2_5_omni import (QWEN2_5_OMNI, _encode_vision, _encoder_layers, _marker_ids,
                                           _text_model_kwargs)
from av_lens.config import AVConfig
from av_lens.errors import CheckpointError
from av_lens.layout import TokenIds


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    text = hf.text_config
    ids = {}
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        v = getattr(hf, name, None)
        if v is None:
            v = getattr(text, name, None)
        if v is None:
            raise CheckpointError(f"the Qwen2.5-VL config has no {name}", "use a complete Qwen2.5-VL config.json")
        ids[name] = int(v)
    markers = _marker_ids(tokenizer)
    tokens = TokenIds(audio=-1, audio_bos=-1, audio_eos=-1, image=ids["image_token_id"], video=ids["video_token_id"],
                      vision_bos=ids["vision_start_token_id"], vision_eos=ids["vision_end_token_id"], markers=markers)
    tie = getattr(hf, "tie_word_embeddings", None)  # top level in published configs (true for 3B)
    kw = _text_model_kwargs(text, markers, tie=bool(getattr(text, "tie_word_embeddings", False) if tie is None else tie))
    kw.update(
        tokens=tokens, position_id_per_seconds=int(hf.vision_config.tokens_per_second), seconds_per_chunk=2.0,
        spatial_merge_size=int(hf.vision_config.spatial_merge_size),
        original_architecture="Qwen2_5_VLForConditionalGeneration",
        modalities=("image", "video"), rope_rules="qwen2_5_vl",
    )
    kw.update(overrides)
    return AVConfig(**kw)


def _build_towers(hf):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return {"visual": Qwen2_5_VisionTransformerPretrainedModel._from_config(hf.vision_config,
                                                                            attn_implementation="sdpa")}


def _build_rotary(hf):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    return Qwen2_5_VLRotaryEmbedding(config=hf.text_config)


def reference_kwargs(inp) -> dict:
    """Keyword arguments for transformers' ``Qwen2_5_VLForConditionalGeneration`` on an AVInput (the
    processor's ``mm_token_type_ids`` rebuilt from the layout: 1 image, 2 video)."""
    from av_lens.layout import Modality

    kw = {k: v for k, v in inp.hf_kwargs().items() if k not in ("use_audio_in_video", "video_second_per_grid")}
    if inp.video_second_per_grid is not None:
        kw["second_per_grid_ts"] = inp.video_second_per_grid
    mod = inp.layout.modality.to(inp.input_ids.device)
    kw["mm_token_type_ids"] = (mod == int(Modality.IMAGE)).int() + 2 * (mod == int(Modality.VIDEO)).int()
    return kw


QWEN2_5_VL = register(Adapter(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    global_map=QWEN2_5_OMNI.global_map,
    layer_map=QWEN2_5_OMNI.layer_map,
    towers={"visual": "visual."},
    # transformers 5 writes model.language_model.* / model.visual.*; published checkpoints model.* / visual.*
    rename_prefixes=(("model.language_model.", "model."), ("model.visual.", "visual.")),
    thinker_config=lambda hf: hf,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=_build_rotary,
    encoder_layers=_encoder_layers,
    encode={"image": _encode_vision("image"), "video": _encode_vision("video")},
    reference_kwargs=reference_kwargs,
))
