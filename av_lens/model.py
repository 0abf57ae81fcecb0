"""HookedAVTransformer: an audio-visual LLM's language backbone as a TransformerLens-style hooked model.

The data path of one forward, each step a hook point::

    AVInput ──► audio tower ──► audio_encoder.hook_out ─┐          (native transformers encoders,
            ──► vision tower ─► image/video_encoder.* ───┤           run unchanged)
            ──► embed(token ids)                         ▼
                 hook_audio_embed / hook_image_embed / hook_video_embed   (scattered into placeholders)
                 hook_embed  (= resid_pre of layer 0)
                 blocks.{l}: hook_resid_pre ─ ln1 ─ attn (hook_q/k/v, rot_q/k, attn_scores, pattern, z, result)
                             ─ hook_attn_out ─ hook_resid_mid ─ ln2 ─ mlp (hook_pre, hook_post) ─ hook_mlp_out
                             ─ hook_resid_post
                 ln_final (hook_scale, hook_normalized) ─ unembed ─► logits

Every run knows its :class:`~av_lens.layout.ModalityLayout` (``inputs.layout``, ``cache.layout``, and
``model.run_state`` while hooks execute), so hooks can select audio, video or generated positions.

The class is a :class:`transformer_lens.hook_points.HookedRootModule`: ``run_with_hooks``,
``run_with_cache`` (returning an :class:`AVActivationCache`, a TransformerLens ``ActivationCache`` that
also carries the layout), ``hooks()`` and TransformerLens's ``patching`` helpers work as on a
HookedTransformer. Weights are not processed (no LayerNorm folding, no centering): activations and
ablations are those of the original model.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from av_lens.adapters.base import Adapter
from av_lens.components import EncoderHooks, RMSNorm, TransformerBlock
from av_lens.components.attention import AttnContext, KVCache
from av_lens.components.embed import Embed, Unembed
from av_lens.config import AVConfig
from av_lens.errors import HookNameError, InputError, LayoutError, unknown_hook_error
from av_lens.inputs import AVInput
from av_lens.layout import ModalityLayout

_MEDIA_KINDS = ("audio", "image", "video")


@dataclass
class RunState:
    """What the model is running right now, for hooks that need it (``model.run_state``).

    ``layout`` covers all positions seen so far (prompt and generated); the current forward computes the
    positions ``query_start .. query_start + n_query - 1`` (0 and the full length for a prefill; the cache
    length and 1 for each decoding step)."""

    layout: ModalityLayout
    query_start: int
    n_query: int
    cache: "KVCache | None" = None  # during generate: keys/values of earlier positions (before this step's)
    deepstack: dict[int, Tensor] | None = None  # Qwen3-Omni: layer -> visual features added after that block

    @property
    def is_decoding(self) -> bool:
        return self.query_start > 0


class AVActivationCache(ActivationCache):
    """TransformerLens's ActivationCache, plus the modality layout of the run that filled it."""

    def __init__(self, cache_dict: dict[str, Tensor], model: "HookedAVTransformer", layout: ModalityLayout | None,
                 has_batch_dim: bool = True):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.layout = layout

    def __getitem__(self, key) -> Tensor:
        try:
            return super().__getitem__(key)
        except KeyError as e:  # say whether the name is unknown or only not cached (still a KeyError)
            name = e.args[0] if e.args and isinstance(e.args[0], str) else str(key)
            if name in self.model.hook_dict:
                err = HookNameError(f"hook {name!r} was not cached in this run (the cache holds "
                                    f"{len(self.cache_dict)} activations)",
                                    "include it in run_with_cache(..., names_filter=...), or leave names_filter=None "
                                    "to cache every hook")
            else:
                err = unknown_hook_error(name, self.model.hook_dict)
            err.key = name
            raise err from None

    @staticmethod
    def _media_kind(name: str) -> str | None:
        for kind in _MEDIA_KINDS:
            if name == f"hook_{kind}_embed" or name.startswith(f"{kind}_encoder."):
                return kind
        return None

    def _media_counts(self, kind: str) -> Tensor:
        from av_lens.layout import Modality

        return (self.layout.modality == int(Modality[kind.upper()])).sum(-1)  # [batch]

    def media_rows(self, name: str, sample: int) -> Tensor:
        """The rows of an encoder-side entry (``hook_audio_embed``, ``video_encoder.hook_out``, ...; their first
        axis runs over the media tokens of the whole batch, sample after sample) that belong to ``sample``."""
        kind = self._media_kind(name)
        t = self[name]
        counts = self._media_counts(kind) if kind is not None and self.layout is not None else None
        if counts is None or t.shape[0] != int(counts.sum()):
            raise InputError(f"{name!r} is not laid out one row per media token of the batch (shape "
                             f"{tuple(t.shape)})", "read it whole; per-sample rows exist for hook_{audio,image,video}_embed "
                             "and the encoders' hook_out")
        start = int(counts[:sample].sum())
        return t[start:start + int(counts[sample])]

    def apply_slice_to_batch_dim(self, batch_slice) -> "AVActivationCache":
        """TL's ``apply_slice_to_batch_dim``, aware that encoder-side entries are not batch-major: those with one
        row per media token are split by sample (:meth:`media_rows`); encoder-internal ones are left out."""
        from transformer_lens.utilities.slice import Slice

        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        rows = batch_slice.indices(self.layout.batch_size) if self.layout is not None else None
        rows = [int(r) % self.layout.batch_size for r in np.atleast_1d(rows)] if rows is not None else None
        out = {}
        for name, t in self.cache_dict.items():
            kind = self._media_kind(name)
            if kind is None:
                out[name] = batch_slice.apply(t, dim=0)
            elif self.layout is not None and t.shape[0] == int(self._media_counts(kind).sum()):
                out[name] = torch.cat([self.media_rows(name, r) for r in rows]) if rows else t[:0]
        squeeze = isinstance(batch_slice.slice, int)
        layout = self.layout.select_batch(rows) if self.layout is not None else None
        return AVActivationCache(out, self.model, layout, has_batch_dim=not squeeze)


class HookedAVTransformer(HookedRootModule):
    """A hooked audio-visual LLM thinker. Build it with :meth:`from_pretrained`."""

    def __init__(self, cfg: AVConfig, adapter: Adapter, hf_config: Any, tokenizer=None, processor=None):
        super().__init__()
        self.cfg, self.adapter, self.hf_config = cfg, adapter, hf_config
        self.tokenizer, self.processor = tokenizer, processor
        parts = adapter.backbone(cfg, hf_config) if adapter.backbone is not None else {}
        self.embed = parts["embed"] if "embed" in parts else Embed(cfg.d_vocab, cfg.d_model)
        self.hook_audio_embed = HookPoint()  # [n_audio_tokens, d_model]: audio tower output entering the stream
        self.hook_image_embed = HookPoint()  # [n_image_tokens, d_model]
        self.hook_video_embed = HookPoint()  # [n_video_tokens, d_model]
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: merged embeddings = resid_pre of layer 0
        make_block = parts.get("block", lambda layer: TransformerBlock(cfg, layer))
        self.blocks = nn.ModuleList([make_block(layer) for layer in range(cfg.n_layers)])
        #: Gemma-3n: the AltUp streams around the blocks, per-layer inputs and logit soft-capping (None: Qwen2 shape)
        self.stream = parts.get("stream")
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab_out, tied_to=self.embed if cfg.tie_word_embeddings else None)
        for name, tower in adapter.build_towers(hf_config).items():
            setattr(self, name, tower)
        # encoder hook points (audio_encoder.*, image_encoder.*, video_encoder.*) for the media the model takes
        if "audio" in cfg.modalities:
            self.audio_encoder = EncoderHooks(len(adapter.encoder_layers(self.audio_tower, "audio")))
        if "image" in cfg.modalities:
            self.image_encoder = EncoderHooks(len(adapter.encoder_layers(self.visual, "vision")))
        if "video" in cfg.modalities:
            self.video_encoder = EncoderHooks(len(adapter.encoder_layers(self.visual, "vision")))
        # The rotary module is kept out of the module tree so that model.to(dtype) leaves its fp32 tables alone.
        object.__setattr__(self, "_rotary", adapter.build_rotary(hf_config))
        self.run_state: RunState | None = None
        self.device_map: dict[str, torch.device] | None = None  # set by place() when parts sit on several devices
        self.router = None  # set by place(): an object whose route() moves one forward's tensors between devices
        #: id(tokens) -> (weakref to the tensor to_tokens returned, its attention mask)
        self._made_tokens: dict[int, tuple[weakref.ref, Tensor]] = {}
        self.setup()

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", model_config: str | None = None,
                        local_files_only: bool | None = None, revision: str | None = None,
                        device_map: Mapping[str, str | int | torch.device] | Literal["auto"] | None = None,
                        fold_ln: bool = False, center_writing_weights: bool = False, center_unembed: bool = False,
                        fold_value_biases: bool = False, refactor_factored_attn_matrices: bool = False,
                        ) -> "HookedAVTransformer":
        """Load a thinker from a hub id or a local folder (safetensors only), converting weights as they stream.

        ``model_config`` names a YAML in ``model_configs/`` to check the checkpoint against (chosen
        automatically for known hub ids such as ``Qwen/Qwen2.5-Omni-3B``). ``device_map`` (a map or ``"auto"``)
        spreads the model over several devices instead of ``device`` (see :meth:`place`). ``revision`` (a branch,
        tag or commit) is passed to the hub, e.g. to reach a converted branch of a checkpoint.

        Weights are **unprocessed by default** (unlike TransformerLens, whose ``from_pretrained`` folds and
        centres them): activations and ablations are the original model's. ``fold_ln``,
        ``center_writing_weights``, ``center_unembed``, ``fold_value_biases`` and
        ``refactor_factored_attn_matrices`` ask for TL's processing, with TL's meaning for RMSNorm models
        (:mod:`av_lens.weights`).
        """
        from av_lens.loading import load_pretrained
        from av_lens.weights import process_weights

        if refactor_factored_attn_matrices:  # refused before loading anything
            process_weights(None, refactor_factored_attn_matrices=True)
        model = load_pretrained(cls, name_or_path, dtype=dtype, device=device, model_config=model_config,
                                local_files_only=local_files_only, device_map=device_map, revision=revision)
        return process_weights(model, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed, fold_value_biases=fold_value_biases)

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                         refactor_factored_attn_matrices: bool = False, fold_value_biases: bool = True) -> "HookedAVTransformer":
        """TL's ``process_weights_``, in place, with TL's defaults (see :mod:`av_lens.weights`)."""
        from av_lens.weights import process_weights

        return process_weights(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                               refactor_factored_attn_matrices=refactor_factored_attn_matrices)

    @classmethod
    def from_pretrained_no_processing(cls, name_or_path: str | os.PathLike, **kwargs) -> "HookedAVTransformer":
        """TL's ``from_pretrained_no_processing``: every processing option off (av_lens's default already)."""
        for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                  "refactor_factored_attn_matrices"):
            kwargs[k] = False
        return cls.from_pretrained(name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------- device
    def to(self, *args, **kwargs) -> "HookedAVTransformer":
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        out = super().to(*args, **kwargs)
        if device is not None:
            self.cfg.device = torch.device(device)
            self.device_map = self.router = None  # everything is on one device again
        if dtype is not None:
            self.cfg.dtype = dtype
        return out

    def cuda(self, device=None):
        return self.to("cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)

    def cpu(self):
        return self.to("cpu")

    @property
    def device(self) -> torch.device:
        """The input device: where the embedding (and the encoders) run. After :meth:`place` over several
        devices, logits come out on the unembedding's device."""
        return self.embed.W_E.device

    #: how :meth:`place` spreads a model over devices: ``placer(model, device_map) -> model``, which leaves a
    #: ``router`` on the model. The placement code (``av_lens.placement``) provides it; the model does not import it.
    placer = None

    def place(self, device_map: Mapping[str, str | int | torch.device] | Literal["auto"]) -> "HookedAVTransformer":
        """Spread the model over devices: ``device_map`` maps ``"embed"``, ``"blocks.{l}"`` (and optionally the
        towers, ``"ln_final"``, ``"unembed"``) to devices; ``"auto"`` plans over the visible GPUs. Hooks, caches
        and analyses keep working; see :mod:`av_lens.placement` (and ``plan_device_map`` to compute a map)."""
        if self.stream is not None:
            raise InputError(f"{self.cfg.original_architecture} cannot be spread over devices yet (its AltUp state "
                             "and per-layer inputs are not routed between devices)", "load it on one device")
        return type(self).placer(self, device_map)

    # ------------------------------------------------------------------------------------------- inputs
    def prepare(self, text: str | list[str] | None = None, **kwargs) -> AVInput:
        """Build an :class:`AVInput` from raw media through the native processor. See :func:`av_lens.processing.prepare`."""
        from av_lens.processing import prepare

        return prepare(self, text, **kwargs)

    def to_input(self, x: AVInput | Tensor | str | list[str] | Mapping, *, use_audio_in_video: bool | None = None,
                 attention_mask: Tensor | None = None, prepend_bos: bool | None = None,
                 padding_side: Literal["left", "right"] | None = None) -> AVInput:
        """Coerce what a caller passed (AVInput, token ids, a string, a processor-output dict) to an AVInput.

        Token ids carry their attention mask as TransformerLens infers it: the mask ``to_tokens`` returned them
        with when they are that very tensor, else ``attention_mask`` when given, else pads are found as
        TransformerLens's ``get_attention_mask`` finds them (leading pad tokens for left padding, trailing ones
        for right padding, ``padding_side`` defaulting to the tokenizer's). Pads are then never attended to."""
        if isinstance(x, AVInput):
            return x
        if isinstance(x, (str, list)) and (isinstance(x, str) or all(isinstance(s, str) for s in x)):
            if prepend_bos is None and padding_side is None:
                return self.prepare(x, chat=False)
            x = self.to_tokens(x, prepend_bos=prepend_bos, padding_side=padding_side)
        if isinstance(x, Mapping) and self.adapter.input_from_processor is not None:
            return self.adapter.input_from_processor(self, x).to(self.device)
        if isinstance(x, Mapping):
            return AVInput.from_processor_output(
                x, self.cfg.tokens, use_audio_in_video=bool(use_audio_in_video),
                spatial_merge_size=self.cfg.spatial_merge_size,
                position_id_per_seconds=self.cfg.position_id_per_seconds, seconds_per_chunk=self.cfg.seconds_per_chunk,
                rope_rules=self.cfg.rope_rules, audio_n_window=self.cfg.audio_n_window,
            ).to(self.device)
        if isinstance(x, Tensor):
            ids = x[None] if x.ndim == 1 else x
            mask = attention_mask if attention_mask is not None else self._token_mask(ids, prepend_bos, padding_side)
            return AVInput.from_processor_output({"input_ids": ids, "attention_mask": mask}, self.cfg.tokens,
                                                 spatial_merge_size=self.cfg.spatial_merge_size,
                                                 rope_rules=self.cfg.rope_rules, audio_n_window=self.cfg.audio_n_window)
        raise InputError(f"cannot run the model on a {type(x).__name__}",
                         "pass an AVInput from model.prepare(...), token ids [batch, pos], a string, or a processor dict")

    def _token_mask(self, ids: Tensor, prepend_bos: bool | None, padding_side: str | None) -> Tensor:
        """The attention mask of a token tensor: the one to_tokens made it with, or TransformerLens's rule."""
        ref = self._made_tokens.get(id(ids))
        if ref is not None and ref[0]() is ids:
            return ref[1].to(ids.device)
        from av_lens.utils import get_attention_mask

        if self.tokenizer is None or self.tokenizer.pad_token_id is None:
            return torch.ones_like(ids)
        return get_attention_mask(self.tokenizer, ids, self._prepend_bos(prepend_bos),
                                  padding_side=padding_side or self.tokenizer.padding_side)

    def _prepend_bos(self, prepend_bos: bool | None) -> bool:
        """TL's default: ``cfg.default_prepend_bos``, True also when the tokenizer itself adds a BOS (Gemma-3n)."""
        if prepend_bos is not None:
            return bool(prepend_bos)
        return self.cfg.default_prepend_bos or self._tokenizer_prepends_bos()

    def _tokenizer_prepends_bos(self) -> bool:
        tok = self.tokenizer
        if tok is None or tok.bos_token_id is None:
            return False
        if "tokenizer_prepends_bos" not in self.cfg.extra:
            ids = tok("a")["input_ids"]
            self.cfg.extra["tokenizer_prepends_bos"] = bool(ids) and ids[0] == tok.bos_token_id
            self.cfg.tokenizer_prepends_bos = self.cfg.extra["tokenizer_prepends_bos"]
        return self.cfg.extra["tokenizer_prepends_bos"]

    def _check_input(self, inp: AVInput) -> None:
        for kind in _MEDIA_KINDS:
            if kind not in self.cfg.modalities and (self._has_media(inp, kind) or kind in inp.encoder_outputs
                                                     or bool((inp.input_ids == self._token_id(kind)).any())):
                raise InputError(f"the input has {kind} but {self.cfg.model_name or 'this model'} "
                                 f"({self.cfg.original_architecture}) takes only {', '.join(self.cfg.modalities)}",
                                 f"drop the {kind} from the prompt, or load an audio-visual model for it")
        dev = self.device
        for name, t in [("input_ids", inp.input_ids), *inp.media_tensors().items(), *inp.encoder_outputs.items()]:
            if t.device.type != dev.type or (dev.index is not None and t.device.index not in (None, dev.index)):
                raise InputError(f"input tensor {name!r} is on {t.device} but the model is on {dev}",
                                 "move the inputs with `inputs = inputs.to(model.cfg.device)`")
        for kind, t in inp.encoder_outputs.items():
            if t.dtype != self.cfg.dtype:
                raise InputError(f"precomputed {kind} encoder outputs are {t.dtype} but the model runs in {self.cfg.dtype}",
                                 "recompute them with model.encode(inputs) after changing the model's dtype")
        if int(inp.input_ids.max()) >= self.cfg.d_vocab or int(inp.input_ids.min()) < 0:
            raise InputError(f"token ids range over [{int(inp.input_ids.min())}, {int(inp.input_ids.max())}] but the "
                             f"vocabulary has {self.cfg.d_vocab} entries",
                             "tokenize with this model's tokenizer (model.tokenizer / model.prepare)")

    def reference_kwargs(self, inputs: AVInput) -> dict[str, Any]:
        """Keyword arguments that run the same input through the transformers model of this architecture
        (for parity checks: ``reference(**model.reference_kwargs(inputs))``)."""
        fn = self.adapter.reference_kwargs
        return fn(inputs) if fn is not None else inputs.hf_kwargs()

    # ------------------------------------------------------------------------------------------- encoders
    def encode(self, inputs: AVInput) -> AVInput:
        """Run the audio/vision towers once and return inputs that carry their outputs (for sweeps)."""
        inputs = self.to_input(inputs)
        outs = dict(inputs.encoder_outputs)
        for kind in _MEDIA_KINDS:
            if kind not in outs and self._has_media(inputs, kind):
                feats, extras = self._encode(kind, inputs)
                outs[kind] = feats.to(self.cfg.dtype)
                outs.update({k: v.to(self.cfg.dtype) for k, v in extras.items()})
        return inputs.with_encoder_outputs(outs)

    def _encode(self, kind: str, inp: AVInput) -> tuple[Tensor, dict[str, Tensor]]:
        """One tower call: its output tokens, and any side outputs (``"{kind}_deepstack"`` [n_deepstack, n, d])."""
        out = self.adapter.encode[kind](self, inp)
        return out if isinstance(out, tuple) else (out, {})

    @staticmethod
    def _has_media(inp: AVInput, kind: str) -> bool:
        return {"audio": inp.input_features, "image": inp.pixel_values, "video": inp.pixel_values_videos}[kind] is not None

    def _token_id(self, kind: str) -> int:
        return getattr(self.cfg.tokens, kind)

    def embed_input(self, inp: AVInput) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the encoder outputs scattered into their placeholder positions (before hook_embed)."""
        ids = inp.input_ids
        embeds = self.embed(ids)
        deepstack: dict[int, Tensor] = {}
        for kind in _MEDIA_KINDS:
            extras = {}
            if kind in inp.encoder_outputs:
                feats = inp.encoder_outputs[kind]
                extras = {k: v for k, v in inp.encoder_outputs.items() if k == f"{kind}_deepstack"}
            elif self._has_media(inp, kind):
                feats, extras = self._encode(kind, inp)
            else:
                feats = None
            where = ids == self._token_id(kind)
            n_slots = int(where.sum())
            if feats is None:
                if n_slots:
                    raise LayoutError(f"the text has {n_slots} {kind} placeholder tokens but no {kind} input",
                                      f"pass the {kind} media to model.prepare(...) with the text")
                continue
            if feats.shape[0] != n_slots:
                raise LayoutError(f"{kind} encoder produced {feats.shape[0]} tokens but the text has {n_slots} "
                                  f"{kind} placeholders", "let model.prepare(...) expand the placeholders for this media")
            feats = getattr(self, f"hook_{kind}_embed")(feats.to(embeds.dtype))
            embeds = embeds.masked_scatter(where[..., None], feats)
            for layer, layer_feats in enumerate(extras.get(f"{kind}_deepstack", ())):
                if layer not in deepstack:
                    deepstack[layer] = torch.zeros_like(embeds)
                deepstack[layer] = deepstack[layer].masked_scatter(where[..., None], layer_feats.to(embeds.dtype))
        if self.run_state is not None:
            self.run_state.deepstack = deepstack or None
        return embeds

    # ------------------------------------------------------------------------------------------- forward
    def _rotary_tables(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        rot = self._rotary
        if rot.inv_freq.device != x.device:
            rot.to(x.device)
        return rot(x, position_ids)

    @staticmethod
    def _additive_mask(key_mask: Tensor, n_query: int, dtype: torch.dtype) -> Tensor | None:
        """[batch, 1, q, k] additive mask (0 or dtype-min) for causal attention over the last ``n_query`` keys;
        None when nothing but causality is masked (the fast path)."""
        B, K = key_mask.shape
        if n_query == K and bool(key_mask.all()):
            return None
        q_abs = torch.arange(K - n_query, K, device=key_mask.device)
        allowed = (torch.arange(K, device=key_mask.device)[None, :] <= q_abs[:, None])[None] & key_mask[:, None, :].bool()
        mask = torch.zeros(B, 1, n_query, K, dtype=dtype, device=key_mask.device)
        return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)

    def run_backbone(self, resid: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "3 batch pos"],
                     key_mask: Int[Tensor, "batch key_pos"], cache: KVCache | None = None,
                     stop_at_layer: int | None = None, input_ids: Tensor | None = None) -> Tensor:
        """The decoder stack on merged embeddings: hook_embed, the blocks, the final norm and unembedding.
        ``input_ids`` (the tokens of these positions) are needed by models with per-layer token inputs (Gemma-3n)."""
        resid = self.hook_embed(resid)
        cos, sin = self._rotary_tables(resid, position_ids)
        ctx = AttnContext(cos=cos, sin=sin, mask=self._additive_mask(key_mask, resid.shape[1], resid.dtype), cache=cache,
                          deepstack=self.run_state.deepstack if self.run_state is not None else None)
        if self.stream is not None:
            return self._run_streams(resid, position_ids, key_mask, ctx, stop_at_layer, input_ids)
        # placed on several devices: the router given by the placement code moves the stream and ctx at boundaries
        route = self.router.route() if self.router is not None and self.device_map is not None else None
        for l, block in enumerate(self.blocks[:stop_at_layer]):
            if route is not None:
                resid, ctx = route.enter(f"blocks.{l}", resid, ctx)
            resid = block(resid, ctx)
        if stop_at_layer is not None:
            return resid
        if route is not None:
            resid = self.ln_final(route.enter("ln_final", resid)[0])
            return self.unembed(route.enter("unembed", resid)[0])
        return self.unembed(self.ln_final(resid))

    def _run_streams(self, resid: Tensor, position_ids: Tensor, key_mask: Tensor, ctx: AttnContext,
                     stop_at_layer: int | None, input_ids: Tensor | None) -> Tensor:
        """Gemma-3n: the blocks work on the AltUp state [batch, pos, n_streams, d_model] (``self.stream``); with
        ``stop_at_layer`` the state entering that layer is returned."""
        if input_ids is None:
            raise InputError("this model adds per-layer token embeddings, so run_backbone needs input_ids",
                             "pass input_ids= (the token ids of the positions in resid)")
        state = self.stream.enter(self, resid, input_ids, position_ids, key_mask, ctx)
        for block in self.blocks[:stop_at_layer]:
            state = block(state, ctx)
        if stop_at_layer is not None:
            return state
        return self.stream.cap(self.unembed(self.ln_final(self.stream.exit(state))))

    def forward(self, input: AVInput | Tensor | str | list[str] | Mapping,
                return_type: Literal["logits", "loss", "both"] | None = "logits", loss_per_token: bool = False,
                prepend_bos: bool | None = None, padding_side: Literal["left", "right"] | None = None, *,
                attention_mask: Tensor | None = None, stop_at_layer: int | None = None):
        """Run the model. ``input`` is usually an :class:`AVInput` from :meth:`prepare`; token ids, strings and
        processor dicts are converted by :meth:`to_input` (``prepend_bos``, ``padding_side`` and
        ``attention_mask`` with TransformerLens's meaning; a token tensor's pads are inferred as TL does).

        Returns logits [batch, pos, d_vocab] (``return_type="logits"``), the mean next-token loss over the text
        targets (``"loss"``; see :meth:`loss_fn`), both, or None; with ``stop_at_layer=l`` the residual stream
        entering layer l.
        """
        inp = self.to_input(input, attention_mask=attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
        self._check_input(inp)
        from av_lens.input_checks import check_context

        check_context(self, inp)
        dev = self.device
        with self.running(inp.layout, 0, inp.input_ids.shape[1]):
            embeds = self.embed_input(inp)
            out = self.run_backbone(embeds, inp.layout.position_ids.to(dev), inp.attention_mask.to(dev),
                                    stop_at_layer=stop_at_layer, input_ids=inp.input_ids.to(dev))
        if stop_at_layer is not None or return_type == "logits":
            return out
        if return_type is None:
            return None
        loss = self.loss_fn(out, inp, per_token=loss_per_token)
        return loss if return_type == "loss" else (out, loss)

    @contextlib.contextmanager
    def running(self, layout: ModalityLayout, query_start: int, n_query: int, cache: KVCache | None = None):
        """Expose what is being computed to hooks as ``model.run_state`` for the duration of one forward."""
        self.run_state = RunState(layout, query_start, n_query, cache)
        try:
            yield self.run_state
        finally:
            self.run_state = None

    @staticmethod
    def loss_targets(inp: AVInput) -> Tensor:
        """[batch, pos - 1] bool: which next-token targets the loss covers — the *text* targets: every target
        that is a token of the text vocabulary (words and special markers such as ``<|im_end|>`` or
        ``<|audio_bos|>``) at a real position, predicted from a real position. Audio, image and video placeholder
        targets (their "token" is a tower output, not a prediction) and pads are excluded. On a text-only input
        this is exactly TransformerLens's ``lm_cross_entropy_loss(logits, tokens, attention_mask)``."""
        from av_lens.layout import Modality

        mod = inp.layout.modality[:, 1:]
        media = (mod == int(Modality.AUDIO)) | (mod == int(Modality.IMAGE)) | (mod == int(Modality.VIDEO))
        real = inp.attention_mask[:, 1:].bool().cpu() & inp.attention_mask[:, :-1].bool().cpu()
        return real & ~media & (mod != int(Modality.PAD))

    @classmethod
    def loss_fn(cls, logits: Tensor, inp: AVInput, per_token: bool = False) -> Tensor:
        """Next-token cross-entropy on the text targets (:meth:`loss_targets`). ``per_token=True`` gives
        [batch, pos - 1] with 0 at every excluded target, as TransformerLens masks pads."""
        targets = inp.input_ids[:, 1:].to(logits.device)
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        valid = cls.loss_targets(inp).to(logits.device)
        if per_token:
            return -lp * valid
        return -(lp * valid).sum() / valid.sum().clamp(min=1)

    # ------------------------------------------------------------------------------------------- hooks & cache
    def _enable_hook(self, name, hook, dir):
        from av_lens.hook_checks import check_callable, checked_hook

        check_callable(name if isinstance(name, str) else "a name filter", hook)
        return super()._enable_hook(name, checked_hook(hook, dir), dir)

    def check_and_add_hook(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, level=None,
                           prepend=False) -> None:
        from av_lens.hook_checks import check_callable, checked_hook

        check_callable(hook_point_name, hook)
        return super().check_and_add_hook(hook_point, hook_point_name, checked_hook(hook, dir), dir=dir,
                                          is_permanent=is_permanent, level=level, prepend=prepend)

    def hooks(self, fwd_hooks=(), bwd_hooks=(), *args, **kwargs):
        from av_lens.hook_checks import check_hook_pairs

        return super().hooks(check_hook_pairs(fwd_hooks, "fwd_hooks"), check_hook_pairs(bwd_hooks, "bwd_hooks"),
                             *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook, dir):
        if name not in self.hook_dict:
            raise unknown_hook_error(name, self.hook_dict)
        self._check_switched(name)
        return super()._enable_hook_with_name(name, hook, dir)

    _SWITCHED = {"hook_q_input": "use_split_qkv_input", "hook_k_input": "use_split_qkv_input",
                 "hook_v_input": "use_split_qkv_input", "hook_attn_in": "use_attn_in", "hook_mlp_in": "use_hook_mlp_in"}

    def _check_switched(self, name: str) -> None:
        """As TransformerLens: a hook on a point that only runs behind a switch is refused while it is off
        (else it would silently never fire)."""
        flag = self._SWITCHED.get(name.rsplit(".", 1)[-1])
        if flag is not None and not getattr(self.cfg, flag):
            raise InputError(f"hook {name!r} runs only with {flag} on, and it is off",
                             f"call model.set_{flag}(True) first")

    def get_caching_hooks(self, *args, **kwargs):
        """TL's caching hooks, without the points that cannot fire (their switch is off), as TL caches them."""
        out = super().get_caching_hooks(*args, **kwargs)
        ok = lambda name: (flag := self._SWITCHED.get(name.rsplit(".", 1)[-1])) is None or getattr(self.cfg, flag)
        cache, fwd, bwd = out
        return cache, [(n, h) for n, h in fwd if ok(n)], [(n, h) for n, h in bwd if ok(n)]

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            raise unknown_hook_error(name, self.hook_dict)
        if isinstance(name, str):
            self._check_switched(name)
        return super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _check_names_filter(self, names_filter) -> None:
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if isinstance(names, (list, tuple)):
            for n in names:
                if n not in self.hook_dict:
                    raise unknown_hook_error(n, self.hook_dict)

    def run_with_cache(self, *model_args, names_filter=None, return_cache_object: bool = True,
                       remove_batch_dim: bool = False, **kwargs):
        """Run and cache activations; returns ``(output, AVActivationCache)`` whose ``.layout`` is the run's layout."""
        self._check_names_filter(names_filter)
        if model_args and not isinstance(model_args[0], AVInput):
            model_args = (self.to_input(model_args[0]), *model_args[1:])
        out, cache_dict = super().run_with_cache(*model_args, names_filter=names_filter,
                                                 remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        layout = model_args[0].layout if model_args else None
        return out, AVActivationCache(cache_dict, self, layout, has_batch_dim=not remove_batch_dim)

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, inputs: AVInput | Tensor | str | list[str], max_new_tokens: int = 32, **kwargs):
        """Greedy or sampled continuation with a KV cache; hooks stay active at every step. Takes
        TransformerLens's keywords (``return_type``, ``use_past_kv_cache``, ``stop_at_eos``, ``eos_token_id``,
        ``freq_penalty``, ``verbose``, sampling); defaults differ from TL's (greedy, quiet, a Generation).
        See :func:`av_lens.generation.generate`."""
        from av_lens.generation import generate

        return generate(self, inputs, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------- TL surface
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.unembed.b_U

    def _stack(self, attr: str) -> Tensor:
        part, name = attr.split(".")
        return torch.stack([getattr(getattr(b, part), name) for b in self.blocks], dim=0)

    W_Q = property(lambda self: self._stack("attn.W_Q"))
    W_K = property(lambda self: self._stack("attn.W_K"))
    W_V = property(lambda self: self._stack("attn.W_V"))
    W_O = property(lambda self: self._stack("attn.W_O"))
    b_Q = property(lambda self: self._stack("attn.b_Q"))
    b_K = property(lambda self: self._stack("attn.b_K"))
    b_V = property(lambda self: self._stack("attn.b_V"))
    b_O = property(lambda self: self._stack("attn.b_O"))
    W_in = property(lambda self: self._stack("mlp.W_in"))
    W_gate = property(lambda self: self._stack("mlp.W_gate"))
    W_out = property(lambda self: self._stack("mlp.W_out"))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """TL's ``accumulated_bias``: the output biases written to the residual stream before ``layer`` (the
        attention's ``b_O`` of each earlier layer, and of ``layer`` itself with ``mlp_input=True``). Zero for an
        unprocessed Qwen2 (no o_proj or MLP output biases); non-zero after ``fold_value_biases=True``."""
        total = torch.zeros(self.cfg.d_model, device=self.device, dtype=self.cfg.dtype)
        for l in range(layer + (1 if mlp_input else 0)):
            total = total + self.blocks[l].attn.b_O.to(total.device)
        return total

    def tokens_to_residual_directions(self, tokens: int | str | Tensor) -> Tensor:
        """TransformerLens's convention: the unembedding column(s) ``W_U[:, token]`` ([d_model] for one token,
        [..., d_model] for a tensor of them), so ``resid @ model.tokens_to_residual_directions(t)`` and
        ``resid @ model.W_U[:, t]`` are the same number. The final norm's weight is *not* included, as in TL;
        TL folds it into ``W_U`` by default, av_lens does so only with ``from_pretrained(..., fold_ln=True)``.
        So on an unprocessed model ``cache.logit_attrs`` (which divides by the cached scale, as TL does) sums to
        the logits only after multiplying by ``model.ln_final.w``, or on a ``fold_ln=True`` model, whose logits
        are the same (docs/tl_compat.md, "Unembedding directions")."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        if tokens.numel() == 1:  # as TL: a one-element tensor gives one [d_model] direction
            return self.W_U[:, int(tokens.item())]
        return self.unembed.weight_matrix[tokens]

    # ------------------------------------------------------------------------------------------- tokens (TL)
    def _bos_token_id(self) -> int | None:
        """TransformerLens's BOS: the tokenizer's, or — for a tokenizer without one (Qwen) — its EOS token,
        which TL substitutes (``tokenizer.bos_token = tokenizer.eos_token``)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None,
                  padding_side: Literal["left", "right"] | None = None, move_to_device: bool = True,
                  truncate: bool = True) -> Int[Tensor, "batch pos"]:
        """TransformerLens's ``to_tokens``: plain tokenisation (no chat template, no media) to [batch, pos].

        ``prepend_bos`` defaults to ``cfg.default_prepend_bos`` (False for these models, as in TL's Qwen configs);
        True prepends the BOS token, which for a tokenizer without one is its EOS token, as TL does.
        ``padding_side`` defaults to the tokenizer's; ``truncate`` cuts to ``cfg.n_ctx``. The returned tensor
        carries its attention mask: passing it (unchanged) to the model masks exactly its pads, also when they are
        the same id as a prepended BOS; a tensor built otherwise gets TL's inferred mask (see :meth:`to_input`)."""
        self._need_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        bos = self._prepend_bos(prepend_bos)
        side = padding_side or self.tokenizer.padding_side
        enc = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if bos:
            enc = [[self._bos_token_id(), *e] for e in enc]
        if truncate:
            enc = [e[: self.cfg.n_ctx] for e in enc]
        n = max((len(e) for e in enc), default=0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._bos_token_id() or 0
        ids = torch.full((len(enc), n), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for i, e in enumerate(enc):
            sl = slice(n - len(e), n) if side == "left" else slice(0, len(e))
            ids[i, sl] = torch.tensor(e, dtype=torch.long)
            mask[i, sl] = 1
        if move_to_device:
            ids = ids.to(self.device)
        key = id(ids)
        self._made_tokens[key] = (weakref.ref(ids, lambda _r, k=key, d=self._made_tokens: d.pop(k, None)), mask)
        return ids

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token (TL's ``to_single_token``; no BOS)."""
        self._need_tokenizer()
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{string!r} is {len(ids)} tokens ({ids}), not one",
                             "pick a string the tokenizer keeps whole, or pass a token id")
        return int(ids[0])

    def to_str_tokens(self, input: str | list | Tensor | AVInput, prepend_bos: bool | None = None,
                      padding_side: Literal["left", "right"] | None = None) -> list[str] | list[list[str]]:
        """TransformerLens's ``to_str_tokens``: one string per token. Strings and token ids as in TL (a list of
        inputs gives a list of lists; a [1, pos] tensor is squeezed). On an :class:`AVInput` every position is
        listed, media placeholders labelled with modality, item and time — ``'<audio 0 · 1.20 s>'``,
        ``'<video 0 · 2.00 s>'``, ``'<image 0>'`` — text and marker tokens decoded; a batch of several samples
        gives one list per sample."""
        self._need_tokenizer()
        if isinstance(input, AVInput):
            lists = [self._av_str_tokens(input, b) for b in range(len(input))]
            return lists[0] if len(lists) == 1 else lists
        if isinstance(input, list) and not (input and isinstance(input[0], int)):
            return [self.to_str_tokens(x, prepend_bos=prepend_bos, padding_side=padding_side) for x in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            tokens = torch.as_tensor(input).squeeze()
            if tokens.ndim == 0:
                tokens = tokens[None]
            if tokens.ndim != 1:
                raise InputError(f"to_str_tokens takes one sequence of token ids, got shape {tuple(tokens.shape)}",
                                 "pass tokens[i] for one sample, or a list of sequences")
        return self.tokenizer.batch_decode(tokens.cpu()[:, None], clean_up_tokenization_spaces=False)

    def _av_str_tokens(self, inp: AVInput, b: int) -> list[str]:
        import math

        from av_lens.layout import Modality

        L = inp.layout
        ids = inp.input_ids[b].cpu()
        words = self.tokenizer.batch_decode(ids[:, None], clean_up_tokenization_spaces=False)
        out = []
        for p, w in enumerate(words):
            m = int(L.modality[b, p])
            if m in (int(Modality.AUDIO), int(Modality.IMAGE), int(Modality.VIDEO)):
                t = float(L.time[b, p])
                label = f"{Modality(m).name.lower()} {int(L.item[b, p])}"
                out.append(f"<{label} · {t:.2f} s>" if not math.isnan(t) else f"<{label}>")
            else:
                out.append(w)
        return out

    def to_string(self, tokens: Tensor | list[int] | int) -> str | list[str]:
        """TransformerLens's ``to_string``: [batch, pos] -> list of strings, [pos] or a scalar -> one string."""
        self._need_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return self.tokenizer.batch_decode(tokens.cpu(), clean_up_tokenization_spaces=False)
        if tokens.ndim > 2:
            raise InputError(f"to_string takes [batch, pos], [pos] or one token id, got shape {tuple(tokens.shape)}",
                             "index the extra dimensions away first")
        return self.tokenizer.decode(tokens.reshape(-1).cpu(), clean_up_tokenization_spaces=False)

    def get_token_position(self, single_token: str | int, input: str | Tensor | AVInput,
                           mode: Literal["first", "last"] = "first", prepend_bos: bool | None = None,
                           padding_side: Literal["left", "right"] | None = None) -> int:
        """TransformerLens's ``get_token_position``: the first (or last) index of ``single_token`` in one
        sequence (a string, [pos] / [1, pos] ids, or a batch-1 :class:`AVInput`; indices are into the padded
        sequence, as in TL)."""
        if isinstance(input, AVInput):
            tokens = input.input_ids
        elif isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise InputError(f"get_token_position takes one sequence, got shape {tuple(tokens.shape)}",
                             "pass one sample (tokens[i:i + 1] or inputs[i])")
        tid = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (tokens[0].cpu() == tid).nonzero().squeeze(-1)
        if len(where) == 0:
            raise InputError(f"token {single_token!r} (id {tid}) does not occur in the input",
                             "check the token with model.to_str_tokens(input)")
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', got {mode!r}", "pass mode='first' or mode='last'")
        return int(where[0] if mode == "first" else where[-1])

    # ------------------------------------------------------------------------------------------- TL switches
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute ``blocks.{l}.attn.hook_result`` (each head's write, [batch, pos, head, d_model]) in every run."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def _set_split_input(self, flag: str, value: bool) -> None:
        if value and self.stream is not None:
            raise InputError(f"{flag} is not available for {self.cfg.original_architecture} (its blocks read the "
                             "AltUp streams, not one residual stream)",
                             "hook blocks.{l}.hook_resid_pre or the attention's hook_q/k/v instead")
        setattr(self.cfg, flag, bool(value))

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give queries, keys and values their own copy of the block input, per head:
        ``blocks.{l}.hook_q_input`` [batch, pos, head, d_model], ``hook_k_input`` / ``hook_v_input``
        [batch, pos, kv_head, d_model] (before ``ln1``, as in TransformerLens)."""
        self._set_split_input("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own copy of the attention input: ``blocks.{l}.hook_attn_in``
        [batch, pos, head, d_model] (before ``ln1``); with grouped-query attention the keys and values of a
        key/value head read the copy of the first query head of its group."""
        self._set_split_input("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Run ``blocks.{l}.hook_mlp_in`` [batch, pos, d_model] on the MLP's input (before ``ln2``)."""
        self._set_split_input("use_hook_mlp_in", use_hook_mlp_in)

    def word_token(self, word: str) -> int:
        """The single token of a word as it appears in running text: ``word`` itself (word-level vocabularies)
        or, in BPE vocabularies that fold the leading space into the token, ``" " + word``."""
        try:
            return self.to_single_token(word)
        except InputError:
            try:
                return self.to_single_token(" " + word)
            except InputError:
                raise InputError(f"{word!r} is not one token (nor is {' ' + word!r})",
                                 "pick a word the tokenizer keeps whole, or pass a token id") from None

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer", "load it with from_pretrained from a folder that has one")
