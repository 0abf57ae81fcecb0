"""AVInput: one object that carries everything a multimodal forward needs.

TransformerLens's helpers call ``model(tokens)`` / ``model.run_with_hooks(tokens, fwd_hooks=...)`` with a
single positional argument (patching does exactly this). For an audio-visual model that argument must also
carry the audio features, pixels, grids, attention mask, 3-D positions and the modality layout, or they
are silently lost. :class:`AVInput` is that argument: it quacks like a [batch, pos] token tensor where TL
looks (``.shape``, ``len``) and holds the rest as fields.

It can also hold precomputed encoder outputs (``encoder_outputs``), so that sweeps which only intervene
in the language model run the audio and vision towers once (:meth:`HookedAVTransformer.encode`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import MediaSpec, ModalityLayout, TokenIds, build_layout

_TENSOR_FIELDS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values",
                  "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


def checked_ids_and_mask(data: Mapping[str, Any]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``input_ids`` ([batch, pos], long) and ``attention_mask`` (ones when absent) from a processor output,
    or an :class:`InputError` naming what is wrong with them."""
    if "input_ids" not in data:
        raise InputError("the processor output has no 'input_ids'",
                         "pass the dict returned by processor(text=..., return_tensors='pt')")
    ids = torch.as_tensor(data["input_ids"])
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}",
                         "pass token ids (torch.long), not embeddings or floats")
    ids = ids.long()
    mask = data.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}",
                         "pass the attention_mask returned with these input_ids")
    return ids, mask


@dataclass(frozen=True)
class AVInput:
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    layout: ModalityLayout
    input_features: Tensor | None = None  # [n_audio, n_mel, frames]
    feature_attention_mask: Tensor | None = None  # [n_audio, frames]
    pixel_values: Tensor | None = None  # [n_image_patches, C*T*P*P]
    image_grid_thw: Tensor | None = None  # [n_images, 3]
    pixel_values_videos: Tensor | None = None
    video_grid_thw: Tensor | None = None
    video_second_per_grid: Tensor | None = None
    use_audio_in_video: bool = False
    #: precomputed encoder outputs by kind ("audio", "image", "video"): [n_tokens, d_model]
    encoder_outputs: Mapping[str, Tensor] = field(default_factory=dict)
    #: model-specific processor outputs the towers need beside the fields above (Phi-4-multimodal: image_sizes,
    #: image_attention_mask, audio_embed_sizes, audio_attention_mask); moved with the input
    extra: Mapping[str, Tensor] = field(default_factory=dict)

    # --- tensor-like surface that TransformerLens reads ---------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def position_ids(self) -> Int[Tensor, "3 batch pos"]:
        return self.layout.position_ids

    def __repr__(self) -> str:
        media = [k for k in ("input_features", "pixel_values", "pixel_values_videos") if getattr(self, k) is not None]
        return (f"AVInput(batch={self.shape[0]}, pos={self.shape[1]}, media={media}, "
                f"use_audio_in_video={self.use_audio_in_video}, encoded={sorted(self.encoder_outputs)})")

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_processor_output(cls, data: Mapping[str, Any], tokens: TokenIds, *, use_audio_in_video: bool = False,
                              spatial_merge_size: int = 2, position_id_per_seconds: int = 25,
                              seconds_per_chunk: float = 2.0, rope_rules: str = "qwen2_5_omni",
                              audio_n_window: int = 0) -> "AVInput":
        """Wrap the dict a Qwen2.5-Omni (or Qwen2.5-VL) processor returned (``return_tensors="pt"``) and compute
        its layout. ``rope_rules`` picks the model family's position rules (see :class:`~av_lens.layout.MediaSpec`)."""
        kw = {}
        data = dict(data)
        if "second_per_grid_ts" in data and "video_second_per_grid" not in data:  # the Qwen2.5-VL processor's name
            data["video_second_per_grid"] = data["second_per_grid_ts"]
        for name in _TENSOR_FIELDS:
            v = data.get(name)
            if v is not None and not isinstance(v, Tensor):
                v = torch.as_tensor(v)
            kw[name] = v
        kw["input_ids"], kw["attention_mask"] = checked_ids_and_mask(data)
        ids = kw["input_ids"]
        if kw["input_features"] is not None and kw["feature_attention_mask"] is None:
            raise InputError("input_features without feature_attention_mask",
                             "pass the processor's feature_attention_mask (it gives each clip's length)")
        spg = kw["video_second_per_grid"]
        media = MediaSpec(
            audio_lengths=tuple(int(x) for x in kw["feature_attention_mask"].sum(-1)) if kw["input_features"] is not None else (),
            image_grid_thw=tuple(tuple(int(v) for v in g) for g in kw["image_grid_thw"]) if kw["image_grid_thw"] is not None else (),
            video_grid_thw=tuple(tuple(int(v) for v in g) for g in kw["video_grid_thw"]) if kw["video_grid_thw"] is not None else (),
            video_second_per_grid=tuple(float(x) for x in spg) if spg is not None else (),
            use_audio_in_video=use_audio_in_video, spatial_merge_size=spatial_merge_size,
            position_id_per_seconds=position_id_per_seconds, seconds_per_chunk=seconds_per_chunk,
            rope_rules=rope_rules, audio_n_window=audio_n_window,
        )
        layout = build_layout(ids, kw["attention_mask"], tokens, media)
        return cls(layout=layout, use_audio_in_video=use_audio_in_video, **kw)

    # --- transformation -----------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "AVInput":
        """Move every tensor (not the layout, which stays on the CPU) to ``device``."""
        kw = {f.name: getattr(self, f.name).to(device) for f in fields(self)
              if f.name in _TENSOR_FIELDS and getattr(self, f.name) is not None}
        kw["encoder_outputs"] = {k: v.to(device) for k, v in self.encoder_outputs.items()}
        kw["extra"] = {k: v.to(device) for k, v in self.extra.items()}
        return replace(self, **kw)

    def extend(self, tokens: Int[Tensor, "batch new"]) -> "AVInput":
        """This input followed by ``tokens`` as generated text (teacher forcing in one forward).

        Positions continue as in :func:`av_lens.generation.generate` (the first new token one past the
        prompt's largest position), and the layout tags them ``generated``: a forward on the result equals
        the prefill + KV-cached decoding of the same tokens."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim == 1:
            tokens = tokens[None].expand(self.shape[0], -1)
        if tokens.ndim != 2 or tokens.shape[0] != self.shape[0]:
            raise InputError(f"tokens to append have shape {tuple(tokens.shape)} for a batch of {self.shape[0]}",
                             "pass [batch, n_new] token ids (or [n_new] for the same tokens in every sample)")
        n = tokens.shape[1]
        layout = self.layout.extend(n, tokens.cpu())
        return replace(
            self, layout=layout,
            input_ids=torch.cat([self.input_ids, tokens.to(self.input_ids.device)], 1),
            attention_mask=torch.cat([self.attention_mask, torch.ones_like(tokens).to(self.attention_mask)], 1),
        )

    def with_encoder_outputs(self, outputs: Mapping[str, Tensor]) -> "AVInput":
        return replace(self, encoder_outputs=dict(outputs))

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``."""
        kw = {k: getattr(self, k) for k in _TENSOR_FIELDS if getattr(self, k) is not None}
        kw["use_audio_in_video"] = self.use_audio_in_video
        return kw

    def media_tensors(self) -> dict[str, Tensor]:
        out = {k: getattr(self, k) for k in _TENSOR_FIELDS[2:] if getattr(self, k) is not None}
        out.update(self.extra)
        return out
