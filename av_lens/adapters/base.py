"""Architecture adapters: one declarative description per transformers architecture.

An adapter says everything model-specific that the generic machinery needs, and nothing else:

* which ``config.json`` files it accepts (``model_types``) and how to find the thinker's config in them;
* how to turn that config into an :class:`~av_lens.config.AVConfig`;
* a weight map from av_lens parameter names to checkpoint keys (``{l}`` stands for the layer), plus the
  checkpoint prefixes to strip (a full Omni checkpoint nests the thinker under ``thinker.``) and to skip
  (the talker);
* which native encoder towers to build, and how to call them.

Adding a model is one new file in this package that instantiates :class:`Adapter` and registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from av_lens.errors import CheckpointError


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    #: av_lens parameter name -> checkpoint key, once per model
    global_map: dict[str, str]
    #: av_lens parameter name -> checkpoint key, per layer; "{l}" is the layer index. A key ending in "[a:b]"
    #: names rows a..b-1 of a fused checkpoint tensor (e.g. the q rows of a qkv_proj)
    layer_map: dict[str, str]
    #: encoder attribute on the model -> checkpoint key prefix (loaded as the tower's own state dict)
    towers: dict[str, str]
    #: prefixes stripped from checkpoint keys before matching (tried in order)
    strip_prefixes: tuple[str, ...] = ("",)
    #: checkpoint key prefixes that are not part of the thinker and are skipped
    skip_prefixes: tuple[str, ...] = ()
    #: (old, new) prefix renames applied after stripping, so that several key layouts of one architecture load
    rename_prefixes: tuple[tuple[str, str], ...] = ()
    #: functions of the adapter (config conversion, tower construction and calls)
    thinker_config: Callable[[Any], Any] = None  # hf config -> thinker config
    to_av_config: Callable[..., Any] = None  # (thinker config, tokenizer) -> AVConfig
    build_towers: Callable[[Any], dict[str, nn.Module]] = None  # thinker config -> {attr: module}
    build_rotary: Callable[[Any], nn.Module] = None  # thinker config -> rotary module (positions -> cos, sin)
    encoder_layers: Callable[[nn.Module, str], list[nn.Module]] = None  # (tower, kind) -> its layers
    encode: dict[str, Callable] = field(default_factory=dict)  # kind -> fn(model, AVInput) -> [n_tok, d_model]
    #: (AVConfig, prefix-stripped checkpoint key) -> True for a tensor the checkpoint holds but this model never
    #: uses (e.g. Gemma-3n's k/v weights of layers that reuse another layer's keys and values); skipped on load
    unused_key: Callable[[Any, str], bool] | None = None
    #: AVInput -> keyword arguments of the transformers reference model (None: ``AVInput.hf_kwargs()``)
    reference_kwargs: Callable[[Any], dict] | None = None
    #: (AVConfig, layer) -> extra per-layer entries, for layers that differ (dense vs mixture-of-experts MLPs).
    #: A checkpoint key holding "{e}" is one expert's slice of a stacked [n_experts, ...] parameter.
    layer_extra: Callable[[Any, int], dict[str, str]] | None = None
    #: (model, text, **kwargs) -> AVInput: the model's own ``prepare`` when its processor differs from the Qwen
    #: family's (None: :func:`av_lens.processing.prepare`'s Qwen path)
    prepare: Callable[..., Any] | None = None
    #: (model, processor output dict) -> AVInput, for processors whose outputs are not Qwen-shaped
    input_from_processor: Callable[[Any, Any], Any] | None = None
    #: (AVConfig, hf config) -> replacements for parts of the Qwen2-shaped backbone, for decoders of another shape
    #: (Gemma-3n): {"embed": module, "block": fn(layer) -> module, "stream": module with enter/exit/cap}; a key left
    #: out keeps the standard part (None: all standard)
    backbone: Callable[[Any, Any], dict] | None = None
    #: config.json (as a dict) -> transformers config, for checkpoint formats transformers cannot read without
    #: remote code (Phi-4-multimodal's published ``phi4mm``); None (or a None result): ``AutoConfig.from_pretrained``
    config_from_dict: Callable[[dict], Any] | None = None
    #: prefix-stripped checkpoint key -> the key this adapter expects, or None for a tensor deliberately skipped
    #: (applied after ``rename_prefixes``; e.g. the published phi4mm names -> transformers' names)
    key_map: Callable[[str], str | None] | None = None
    #: config.json (as a dict) -> True when this adapter takes it although its model_type names another family
    #: (video-SALMONN-2+ publishes a ``qwen2_5_vl`` config with an ``audio_config``); checked before model_types
    accepts: Callable[[dict], bool] | None = None
    #: torch-pickle weight files the published release keeps beside its safetensors shards (VideoLLaMA2-AV's
    #: ``audio_tower.bin``, ``mm_projector_a.bin``); read with ``torch.load(weights_only=True)``, never executed, and
    #: only for tensors the shards lack (where both hold one, the shards' is loaded)
    pickled_files: tuple[str, ...] = ()

    def hf_config(self, folder, raw: dict):
        """The transformers config of a checkpoint folder whose config.json is ``raw`` (no remote code run)."""
        hf = self.config_from_dict(raw) if self.config_from_dict is not None else None
        if hf is not None:
            return hf
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder, trust_remote_code=False)

    def expected_keys(self, n_layers: int, tied: bool, cfg: Any = None) -> dict[str, str]:
        """av_lens parameter name -> checkpoint key (prefix-stripped) for the backbone."""
        keys = {k: v for k, v in self.global_map.items() if not (tied and k == "unembed.weight")}
        for layer in range(n_layers):
            entries = dict(self.layer_map)
            if self.layer_extra is not None:
                entries.update(self.layer_extra(cfg, layer))
            for ours, theirs in entries.items():
                keys[ours.format(l=layer)] = theirs.replace("{l}", str(layer))
        return keys

    def strip(self, key: str) -> str | None:
        """The checkpoint key without its container prefix (renamed, mapped), or None when it is to be skipped."""
        if any(key.startswith(p) for p in self.skip_prefixes):
            return None
        for p in self.strip_prefixes:
            if p and key.startswith(p):
                key = key[len(p):]
                break
        for old, new in self.rename_prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        return key if self.key_map is None else self.key_map(key)


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _REGISTRY[adapter.name] = adapter
    return adapter


def adapters() -> Iterator[Adapter]:
    return iter(_REGISTRY.values())


def adapter_for(config_dict: dict, where: str) -> Adapter:
    """The adapter that accepts a checkpoint's config.json (as a dict)."""
    model_type = config_dict.get("model_type")
    for a in _REGISTRY.values():
        if a.accepts is not None and a.accepts(config_dict):
            return a
    for a in _REGISTRY.values():
        if model_type in a.model_types:
            return a
    supported = sorted(t for a in _REGISTRY.values() for t in a.model_types)
    raise CheckpointError(
        f"{where} holds a {model_type or 'config without model_type'!s} checkpoint "
        f"(architectures {config_dict.get('architectures')}), which is not a supported audio-visual model (or base VLM)",
        f"load a checkpoint whose config.json model_type is one of {supported} (e.g. Qwen/Qwen2.5-Omni-3B)",
    )


class Rotary1D(nn.Module):
    """A 1-D rotary module (a transformers ``*RotaryEmbedding``) fed the first row of av_lens's
    ``[3, batch, pos]`` positions: under the 1-D position rules all three rows are equal."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def inv_freq(self):
        return self.inner.inv_freq

    def forward(self, x, position_ids):
        return self.inner(x, position_ids[0] if position_ids.ndim == 3 else position_ids)
