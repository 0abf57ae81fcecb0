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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
        self.setup()

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", model_config: str | None = None,
                        local_files_only: bool | None = None,
                        device_map: Mapping[str, str | int | torch.device] | Literal["auto"] | None = None,
                        ) -> "HookedAVTransformer":
        """Load a thinker from a hub id or a local folder (safetensors only), converting weights as they stream.

        ``model_config`` names a YAML in ``model_configs/`` to check the checkpoint against (chosen
        automatically for known hub ids such as ``Qwen/Qwen2.5-Omni-3B``). ``device_map`` (a map or ``"auto"``)
        spreads the model over several devices instead of ``device`` (see :meth:`place`).
        """
        from av_lens.loading import load_pretrained

        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, model_config=model_config,
                               local_files_only=local_files_only, device_map=device_map)

    # ------------------------------------------------------------------------------------------- device
    def to(self, *args, **kwargs) -> "HookedAVTransformer":
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        out = super().to(*args, **kwargs)
        if device is not None:
            self.cfg.device = torch.device(device)
            self.device_map = None  # everything is on one device again
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

    def place(self, device_map: Mapping[str, str | int | torch.device] | Literal["auto"]) -> "HookedAVTransformer":
        """Spread the model over devices: ``device_map`` maps ``"embed"``, ``"blocks.{l}"`` (and optionally the
        towers, ``"ln_final"``, ``"unembed"``) to devices; ``"auto"`` plans over the visible GPUs. Hooks, caches
        and analyses keep working; see :mod:`av_lens.placement` (and ``plan_device_map`` to compute a map)."""
        from av_lens.placement import apply_device_map

        if self.stream is not None:
            raise InputError(f"{self.cfg.original_architecture} cannot be spread over devices yet (its AltUp state "
                             "and per-layer inputs are not routed between devices)", "load it on one device")
        return apply_device_map(self, device_map)

    # ------------------------------------------------------------------------------------------- inputs
    def prepare(self, text: str | list[str] | None = None, **kwargs) -> AVInput:
        """Build an :class:`AVInput` from raw media through the native processor. See :func:`av_lens.processing.prepare`."""
        from av_lens.processing import prepare

        return prepare(self, text, **kwargs)

    def to_input(self, x: AVInput | Tensor | str | list[str] | Mapping, *, use_audio_in_video: bool | None = None) -> AVInput:
        """Coerce what a caller passed (AVInput, token ids, a string, a processor-output dict) to an AVInput."""
        if isinstance(x, AVInput):
            return x
        if isinstance(x, (str, list)) and (isinstance(x, str) or all(isinstance(s, str) for s in x)):
            return self.prepare(x, chat=False)
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
            return AVInput.from_processor_output({"input_ids": x}, self.cfg.tokens,
                                                 spatial_merge_size=self.cfg.spatial_merge_size,
                                                 rope_rules=self.cfg.rope_rules, audio_n_window=self.cfg.audio_n_window)
        raise InputError(f"cannot run the model on a {type(x).__name__}",
                         "pass an AVInput from model.prepare(...), token ids [batch, pos], a string, or a processor dict")

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
        route = None
        if self.device_map is not None:  # placed on several devices: move the stream and ctx at boundaries
            from av_lens.placement import Route

            route = Route(self.device_map)
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
                return_type: Literal["logits", "loss", "both"] | None = "logits",
                stop_at_layer: int | None = None, loss_per_token: bool = False):
        """Run the model. ``input`` is usually an :class:`AVInput` from :meth:`prepare`.

        Returns logits [batch, pos, d_vocab] (``return_type="logits"``), the mean next-token loss over real
        tokens (``"loss"``), both, or None; with ``stop_at_layer=l`` the residual stream entering layer l.
        """
        inp = self.to_input(input)
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
    def loss_fn(logits: Tensor, inp: AVInput, per_token: bool = False) -> Tensor:
        """Next-token cross-entropy on positions whose target is a real text token."""
        targets = inp.input_ids[:, 1:].to(logits.device)
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        valid = (inp.attention_mask[:, 1:].bool() & inp.attention_mask[:, :-1].bool()).to(logits.device)
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
        return super()._enable_hook_with_name(name, hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            raise unknown_hook_error(name, self.hook_dict)
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
    def generate(self, inputs: AVInput, max_new_tokens: int = 32, **kwargs):
        """Greedy or sampled continuation with a KV cache; hooks stay active at every step.
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
        """Sum of the output biases written to the residual stream before ``layer``: zero for Qwen2 (no o_proj or
        MLP output biases; value biases act through the attention pattern and are part of each head's result)."""
        return torch.zeros(self.cfg.d_model, device=self.device, dtype=self.cfg.dtype)

    def tokens_to_residual_directions(self, tokens: int | str | Tensor) -> Tensor:
        """Residual directions (in the final norm's *normalised* space) whose dot product gives each token's logit:
        ``ln_final.w * W_U[:, token]``. With TransformerLens's ``apply_ln_to_stack`` (which divides by the cached
        scale but does not apply the weight), logit attributions then sum exactly to the logits."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        w = self.ln_final.w
        if isinstance(tokens, int):
            return self.W_U[:, tokens] * w
        tokens = torch.as_tensor(tokens, device=self.device)
        return self.unembed.weight_matrix[tokens] * w

    def to_tokens(self, text: str | list[str]) -> Tensor:
        """Plain tokenisation (no chat template, no media) to a [batch, pos] tensor on the model's device."""
        self._need_tokenizer()
        enc = self.tokenizer([text] if isinstance(text, str) else text, return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device)

    def to_single_token(self, text: str) -> int:
        self._need_tokenizer()
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{text!r} is {len(ids)} tokens ({ids}), not one",
                             "pick a string the tokenizer keeps whole, or pass a token id")
        return int(ids[0])

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

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        self._need_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.tokenizer.decode(t) for t in tokens]
        return self.tokenizer.decode(tokens)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer", "load it with from_pretrained from a folder that has one")
