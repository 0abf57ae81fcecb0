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


def _cumstarts(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def _out_of_range(i: int, n: int) -> int:
    raise IndexError(f"sample {i} is out of range for a batch of {n}")


def _repeat_layout(layout: ModalityLayout, rows: list[int]) -> ModalityLayout:
    return _cat_layouts([layout.select_batch([r]) for r in rows])


def _cat_layouts(layouts: list[ModalityLayout]) -> ModalityLayout:
    """Layouts of equal length joined along the batch (items' samples and global indices shifted)."""
    first = layouts[0]
    items, offset, g = [], 0, {}
    for L in layouts:
        for it in sorted(L.items, key=lambda it: it.global_index):
            items.append(replace(it, sample=it.sample + offset, global_index=g.get(it.modality, 0) + it.global_index))
        for m in {it.modality for it in L.items}:
            g[m] = g.get(m, 0) + sum(1 for it in L.items if it.modality == m)
        offset += L.batch_size
    cat = lambda name, dim=0: torch.cat([getattr(L, name) for L in layouts], dim)
    return replace(first, modality=cat("modality"), item=cat("item"), time=cat("time"),
                   position_ids=cat("position_ids", 1), attention_mask=cat("attention_mask"),
                   token_ids=cat("token_ids"), rope_deltas=cat("rope_deltas"), items=tuple(items))


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

    def size(self, dim: int | None = None):
        return self.input_ids.size() if dim is None else self.input_ids.size(dim)

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index):
        """Batch indexing as on a [batch, pos] token tensor: ``inputs[i]``, ``inputs[[1, 0]]``, ``inputs[:2]``, a
        bool or index tensor give the sub-batch as an AVInput (with its media, encoder outputs and layout; an int
        keeps the batch dimension, unlike a tensor). A tuple (``inputs[0, 5:]``) indexes the token ids."""
        if isinstance(index, tuple):
            return self.input_ids[index]
        n = len(self)
        if isinstance(index, Tensor):
            index = index.nonzero().squeeze(-1).tolist() if index.dtype == torch.bool else index.reshape(-1).tolist()
        if isinstance(index, slice):
            rows = list(range(n))[index]
        elif isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(f"sample {index} is out of range for a batch of {n}")
            rows = [index % n]
        else:
            rows = [int(i) % n if -n <= int(i) < n else _out_of_range(int(i), n) for i in index]
        return self.select(rows)

    def select(self, rows: list[int]) -> "AVInput":
        """The samples ``rows`` (in that order; repeats allowed) as an AVInput."""
        from av_lens.layout import Modality

        if self.extra:
            raise InputError(f"this input carries model-specific processor outputs ({', '.join(sorted(self.extra))}) "
                             "that cannot be split by sample", "prepare each sample separately with model.prepare")
        items = self.layout.items
        kw: dict[str, Any] = {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}
        enc: dict[str, Tensor] = {}
        new_items = []
        for kind, m in (("audio", Modality.AUDIO), ("image", Modality.IMAGE), ("video", Modality.VIDEO)):
            its = sorted((it for it in items if it.modality == m), key=lambda it: it.global_index)
            tok_start = dict(zip([it.global_index for it in its], _cumstarts([it.n_tokens for it in its])))
            picked = [it for r in rows for it in its if it.sample == r]
            gis = [it.global_index for it in picked]
            if kind == "audio" and self.input_features is not None:
                kw["input_features"] = self.input_features[gis] if gis else None
                kw["feature_attention_mask"] = self.feature_attention_mask[gis] if gis else None
            if kind in ("image", "video") and not gis:
                pv, grid = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
                kw[pv] = kw[grid] = None
                if kind == "video":
                    kw["video_second_per_grid"] = None
            elif kind in ("image", "video"):
                pv, grid = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
                if getattr(self, pv) is not None:
                    g = getattr(self, grid)
                    sizes = [int(x) for x in g.prod(-1)]
                    starts = _cumstarts(sizes)
                    kw[pv] = torch.cat([getattr(self, pv)[starts[i]:starts[i] + sizes[i]] for i in gis])
                    kw[grid] = g[gis]
                    if kind == "video" and self.video_second_per_grid is not None:
                        kw["video_second_per_grid"] = self.video_second_per_grid[gis]
            for key, t in self.encoder_outputs.items():
                if key == kind or key == f"{kind}_deepstack":
                    dim = 1 if key.endswith("_deepstack") else 0
                    parts = [t.narrow(dim, tok_start[i], next(it.n_tokens for it in its if it.global_index == i))
                             for i in gis]
                    if parts:
                        enc[key] = torch.cat(parts, dim)
        layout = self.layout.select_batch(rows) if len(set(rows)) == len(rows) else _repeat_layout(self.layout, rows)
        # renumber each modality's global index in the new processor order (rows order, then position order)
        order: dict = {}
        for it in sorted(layout.items, key=lambda it: (it.sample, it.index)):
            order.setdefault(it.modality, []).append(it)
        renum = {id(it): k for m_items in order.values() for k, it in enumerate(m_items)}
        layout = replace(layout, items=tuple(replace(it, global_index=renum[id(it)]) for it in layout.items))
        return replace(self, layout=layout, encoder_outputs=enc, **kw)

    @classmethod
    def cat(cls, inputs: "list[AVInput]") -> "AVInput":
        """Concatenate inputs along the batch (``torch.cat([clean, corrupt])`` does the same): each must have the
        same sequence length and ``use_audio_in_video``; media, encoder outputs and layouts are joined."""
        inputs = list(inputs)
        first = inputs[0]
        for x in inputs[1:]:
            if x.shape[1] != first.shape[1] or x.use_audio_in_video != first.use_audio_in_video or x.extra or first.extra:
                raise InputError(f"cannot concatenate inputs of {first.shape[1]} and {x.shape[1]} positions "
                                 f"(use_audio_in_video {first.use_audio_in_video} / {x.use_audio_in_video})",
                                 "concatenate inputs of equal length and audio-in-video setting (prepare them as one "
                                 "padded batch with model.prepare([...]) otherwise)")
            if sorted(x.encoder_outputs) != sorted(first.encoder_outputs):
                raise InputError("cannot concatenate an encoded input with one that is not encoded",
                                 "call model.encode(...) on all of them, or on none")
        kw: dict[str, Any] = {}
        for name in _TENSOR_FIELDS:
            vals = [getattr(x, name) for x in inputs if getattr(x, name) is not None]
            kw[name] = torch.cat(vals) if vals else None
        enc = {k: torch.cat([x.encoder_outputs[k] for x in inputs], 1 if k.endswith("_deepstack") else 0)
               for k in first.encoder_outputs}
        return replace(first, layout=_cat_layouts([x.layout for x in inputs]), encoder_outputs=enc, **kw)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat and not (kwargs or {}).get("dim", 0) and (len(args) < 2 or args[1] == 0):
            return cls.cat(args[0])
        return NotImplemented

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
