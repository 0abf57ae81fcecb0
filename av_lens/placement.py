"""Placing one model across several devices: a per-layer device map, a planner for it, and the moves.

The idea: a 7B or 30B thinker does not need tensor parallelism to be inspected, only room. Its layers are
split into contiguous runs, one run per device (pipeline placement without the pipelining); the residual
stream crosses a device boundary once per run. Every hook still sees one layer's tensors on that layer's
device, so hooks, caches, knockout and patching work unchanged.

A **device map** names a device for each placeable part of the model::

    {"embed": "cuda:0", "audio_tower": "cuda:0", "visual": "cuda:0",     # towers sit with their consumer,
     "blocks.0": "cuda:0", ..., "blocks.13": "cuda:0",                     #   the embedding
     "blocks.14": "cuda:1", ..., "blocks.27": "cuda:1",
     "ln_final": "cuda:1", "unembed": "cuda:1"}

The embedding's device is the model's *input device* (``model.device``, ``model.cfg.device``): inputs go
there, encoders run there, and generated tokens come back there. ``ln_final`` and ``unembed`` default to the
last block's device, so logits come out on the last device. With tied embeddings the unembedding reads the
embedding's matrix, so it runs on the embedding's device.

* :func:`plan_device_map` computes a balanced map from parameter bytes and per-device budgets. It reads
  only sizes, so it works on a model built on the ``meta`` device (:func:`meta_model`): a 30B plan needs
  no memory. Balanced means: the largest fraction of any device's budget used is as small as any
  contiguous split allows (blocks are indivisible).
* :func:`apply_device_map` (``model.place(device_map)``) moves the modules and records the map;
  ``model.place("auto")`` plans over the visible GPUs with 90 % of their free memory.
* During a forward, :class:`Route` moves the residual stream, the rotary cos/sin tables and the attention
  mask to a block's device when it differs from the previous block's (each table once per device and
  forward). Keys and values of the KV cache are produced on, and stay on, their layer's device. Every such
  move goes through :func:`to_device`, one function a test can wrap to record them.

Devices are compared by *name* (the map's labels), not by where a tensor says it lives, so a map over
``"cpu"`` and ``"cpu:1"`` exercises every move on a machine without GPUs (a ``.to("cpu:1")`` copies).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Shaped
from torch import Tensor, nn

from av_lens.errors import InputError
from av_lens.model import HookedAVTransformer

#: a device map: placeable part name -> device
DeviceMap = dict[str, str]

_FINAL = ("ln_final", "unembed")


# ------------------------------------------------------------------------------------------------ moves
def to_device(x: Shaped[Tensor, "..."], device: torch.device) -> Shaped[Tensor, "..."]:
    """Move one tensor across a block boundary. All boundary moves of a placed forward go through here."""
    return x.to(device)


class Route:
    """Moves the residual stream and the attention context along a placed model's blocks, for one forward."""

    def __init__(self, device_map: Mapping[str, torch.device]):
        self.map = device_map
        self.here = device_map["embed"]
        self._ctx: dict[torch.device, object] = {}

    def enter(self, part: str, resid: Tensor, ctx=None):
        """``resid`` (and ``ctx``, an AttnContext) on ``part``'s device; moved only when that device differs
        from the previous part's. The context is moved once per device and forward, then reused."""
        dev = self.map[part]
        if ctx is not None:
            self._ctx.setdefault(self.here, ctx)  # first call: the context as built, on the embedding's device
        if dev != self.here:
            resid, self.here = to_device(resid, dev), dev
        if ctx is None:
            return resid, None
        if dev not in self._ctx:
            self._ctx[dev] = _moved_context(ctx, dev)
        return resid, self._ctx[dev]


def _moved_context(ctx, dev: torch.device):
    """A copy of an AttnContext whose tensors (and dicts of tensors) are on ``dev``; the KV cache object is
    shared (each layer's keys and values already live on its device); the lazily built causal mask is
    rebuilt on the new device."""
    changes = {}
    for f in dataclasses.fields(ctx):
        v = getattr(ctx, f.name)
        if f.name == "causal":
            changes[f.name] = None
        elif isinstance(v, Tensor):
            changes[f.name] = to_device(v, dev)
        elif isinstance(v, dict) and v and all(isinstance(t, Tensor) for t in v.values()):
            changes[f.name] = {k: to_device(t, dev) for k, t in v.items()}
    return dataclasses.replace(ctx, **changes)


# ------------------------------------------------------------------------------------------------ parts
def parts(model) -> list[str]:
    """The placeable parts of ``model`` in forward order: the embedding and every top-level module that
    travels with it (encoder towers, hook containers), ``blocks.0`` .. ``blocks.{L-1}``, ``ln_final``,
    ``unembed``."""
    head = ["embed"] + [n for n, _ in model.named_children() if n not in ("embed", "blocks", *_FINAL)]
    return head + [f"blocks.{i}" for i in range(len(model.blocks))] + list(_FINAL)


def _owned_tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def part_bytes(model) -> dict[str, int]:
    """Bytes of parameters and buffers per placeable part (see :func:`parts`); works on ``meta`` tensors.
    With tied embeddings the shared matrix counts once, under ``embed``."""
    seen: set[int] = set()
    out = {}
    for name in parts(model):
        n = 0
        for t in _owned_tensors(model.get_submodule(name)):
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
        out[name] = n
    return out


def _head(model) -> list[str]:
    return [p for p in parts(model) if not p.startswith("blocks.") and p not in _FINAL]


# ------------------------------------------------------------------------------------------------ budgets
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(x: int | float | str) -> int:
    """``80e9``, ``"80GB"``, ``"70 GiB"``, ``"512MiB"`` -> bytes."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if x < 0:
            raise InputError(f"a memory budget of {x} bytes is negative", "give budgets as positive sizes, e.g. '70GiB'")
        return int(x)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(x))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read {x!r} as a memory size",
                         "write sizes as bytes or with a unit: '70GiB', '80GB', '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gpu_budgets(fraction: float = 0.9, devices: Sequence[int] | None = None) -> dict[str, int]:
    """``{"cuda:i": fraction * free bytes}`` for the visible (or given) CUDA devices."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise InputError("device_map='auto' plans over CUDA devices but none is visible",
                         "pass an explicit device map, or run where GPUs are visible (check CUDA_VISIBLE_DEVICES)")
    devices = range(torch.cuda.device_count()) if devices is None else devices
    return {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0] * fraction) for i in devices}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------------ planner
def plan_device_map(model, budgets: Mapping[str | int | torch.device, int | float | str]) -> DeviceMap:
    """A balanced device map for ``model`` within ``budgets`` (device -> bytes for weights, in the order
    the layers should flow: the first device gets the embedding and towers, the blocks follow in order,
    then ``ln_final`` and ``unembed``, on the last block's device when they fit there).

    Among contiguous splits of the blocks, the one chosen minimises the largest fraction of a device's
    budget that its weights take. Budgets are for weights only: leave room for activations and the KV
    cache (e.g. 85-90 % of a GPU's memory). ``model`` may live on the ``meta`` device (:func:`meta_model`).
    Raises :class:`InputError` when the weights cannot fit."""
    if not budgets:
        raise InputError("no devices to plan over (the budgets are empty)",
                         "pass budgets such as {'cuda:0': '70GiB', 'cuda:1': '70GiB'}")
    devs = [str(_device(d)) for d in budgets]
    if len(set(devs)) != len(devs):
        raise InputError(f"the budgets name a device twice ({devs})", "give each device one budget")
    caps = [parse_bytes(b) for b in budgets.values()]
    sizes = part_bytes(model)
    tied = model.unembed.weight is None
    head = sum(sizes[p] for p in _head(model)) + (sizes["unembed"] if tied else 0)  # tied: runs by the embedding
    blocks = [sizes[f"blocks.{i}"] for i in range(len(model.blocks))]
    tail = sizes["ln_final"] + (0 if tied else sizes["unembed"])
    items = [head, *blocks, tail]

    def assign(t: float) -> list[int] | None:
        """Greedy in-order fill with each device's capacity scaled by t; device index per item, or None."""
        where, j, load = [], 0, 0
        for k, size in enumerate(items):
            while load + size > t * caps[j]:
                if k == 0:  # the embedding and towers must sit on the first device
                    return None
                j, load = j + 1, 0
                if j == len(caps):
                    return None
            where.append(j)
            load += size
        return where

    if assign(1.0) is None:
        total = sum(items)
        raise InputError(
            f"the model's weights ({_gib(total)}: embedding and towers {_gib(head)}, largest block "
            f"{_gib(max(blocks, default=0))}, final norm and unembedding {_gib(tail)}) do not fit in the budgets "
            f"{', '.join(f'{d}: {_gib(c)}' for d, c in zip(devs, caps))} (total {_gib(sum(caps))}); the first "
            "device must hold the embedding and towers, and blocks are not split",
            "add devices or raise their budgets, or load in a smaller dtype (dtype='bf16' halves fp32)")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisect the smallest feasible scale
        mid = (lo + hi) / 2
        if assign(mid) is None:
            lo = mid
        else:
            hi = mid
    where = assign(hi)
    out: DeviceMap = {p: devs[where[0]] for p in _head(model)}
    for i in range(len(blocks)):
        out[f"blocks.{i}"] = devs[where[1 + i]]
    out["ln_final"] = devs[where[-1]]
    out["unembed"] = out["embed"] if tied else devs[where[-1]]
    return out


def device_loads(model, device_map: Mapping[str, str]) -> dict[str, int]:
    """Bytes of weights per device under ``device_map``, in the order devices first appear."""
    sizes = part_bytes(model)
    out: dict[str, int] = {}
    for p in parts(model):
        d = str(_device(device_map[p])) if p in device_map else None
        if d is not None:
            out[d] = out.get(d, 0) + sizes[p]
    return out


# ------------------------------------------------------------------------------------------------ applying
def _device(d) -> torch.device:
    if isinstance(d, torch.device):
        return d
    if isinstance(d, int) and not isinstance(d, bool):
        return torch.device("cuda", d)
    try:
        return torch.device(d)
    except (RuntimeError, TypeError):
        raise InputError(f"{d!r} is not a device", "name devices like 'cuda:0', 'cuda:1', 'cpu' (or give a GPU index)") from None


def resolve_device_map(model, device_map: Mapping[str, str | int | torch.device] | str) -> dict[str, torch.device]:
    """A complete, checked map (every part -> torch.device) from a user's map; ``"auto"`` plans over GPUs."""
    if isinstance(device_map, str):
        if device_map != "auto":
            raise InputError(f"unknown device map {device_map!r}",
                             "pass 'auto' or a dict such as {'embed': 'cuda:0', 'blocks.0': 'cuda:0', ...}")
        device_map = plan_device_map(model, gpu_budgets())
    if not isinstance(device_map, Mapping):
        raise InputError(f"a device map must be a dict, got a {type(device_map).__name__}",
                         "pass {'embed': 'cuda:0', 'blocks.0': 'cuda:0', ..., 'blocks.27': 'cuda:1'} or 'auto'")
    known = parts(model)
    unknown = [k for k in device_map if k not in known]
    if unknown:
        raise InputError(f"the device map names parts this model does not have: {unknown}",
                         f"use 'embed', the towers {_head(model)[1:]}, 'blocks.0'..'blocks.{len(model.blocks) - 1}', "
                         "'ln_final' and 'unembed'")
    missing = [f"blocks.{i}" for i in range(len(model.blocks)) if f"blocks.{i}" not in device_map]
    if "embed" not in device_map or missing:
        raise InputError(f"the device map leaves {(['embed'] if 'embed' not in device_map else []) + missing} "
                         "without a device", "give the embedding and every block a device (or use plan_device_map)")
    m = {k: _device(v) for k, v in device_map.items()}
    for d in set(m.values()):
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise InputError(f"the device map uses {d} but this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} usable CUDA device(s)",
                             "map onto devices that exist (see torch.cuda.device_count())")
    emb = m["embed"]
    for p in _head(model)[1:]:
        if m.setdefault(p, emb) != emb:
            raise InputError(f"the device map puts {p!r} on {m[p]} but the embedding on {emb}",
                             "keep encoder towers on the embedding's device (their outputs are scattered into it)")
    last = m[f"blocks.{len(model.blocks) - 1}"] if len(model.blocks) else emb
    m.setdefault("ln_final", last)
    m.setdefault("unembed", emb if model.unembed.weight is None else m["ln_final"])
    if model.unembed.weight is None and m["unembed"] != emb:
        raise InputError(f"the embeddings are tied, so the unembedding runs where the embedding is ({emb}), not on "
                         f"{m['unembed']}", f"map 'unembed' to {emb} or leave it out")
    return {p: m[p] for p in known}


def apply_device_map(model, device_map) -> "object":
    """Move ``model``'s parts to the devices of ``device_map`` (see :func:`resolve_device_map`) and record the
    map as ``model.device_map``; returns the model. The input device becomes the embedding's."""
    m = resolve_device_map(model, device_map)
    for p, d in m.items():
        model.get_submodule(p).to(d)
    model.device_map = m if len(set(m.values())) > 1 else None
    model.router = Router(m) if model.device_map is not None else None
    model.cfg.device = m["embed"]
    return model


class Router:
    """What a placed model asks at each forward (``model.router.route()``): a fresh :class:`Route` over its map."""

    def __init__(self, device_map: Mapping[str, torch.device]):
        self.device_map = device_map

    def route(self) -> Route:
        return Route(self.device_map)


# ------------------------------------------------------------------------------------------------ meta
def meta_model(source, dtype: torch.dtype | str = torch.bfloat16, revision: str | None = None):
    """A HookedAVTransformer with every tensor on the ``meta`` device (no memory), for planning.

    ``source``: a checkpoint folder or hub id whose ``config.json`` is at hand (weights are not read), or a
    transformers config object (e.g. ``Qwen2_5OmniThinkerConfig(...)``); ``revision``: the hub branch, tag or commit."""
    from av_lens.adapters import adapter_for
    from av_lens.hub import resolve_folder
    from av_lens.loading import _default_dtype, _parse_dtype

    dtype = _parse_dtype(dtype)
    if isinstance(source, (str, os.PathLike)):
        import json

        folder = resolve_folder(source, revision=revision)
        raw = json.loads((folder / "config.json").read_text())
        adapter = adapter_for(raw, str(folder))
        hf_config = adapter.hf_config(folder, raw)
    else:
        hf_config = source
        adapter = adapter_for({"model_type": getattr(hf_config, "model_type", None)}, type(hf_config).__name__)
    thinker = adapter.thinker_config(hf_config)
    cfg = adapter.to_av_config(thinker, None, dtype=dtype, device=torch.device("meta"))
    with torch.device("meta"), _default_dtype(dtype):
        return HookedAVTransformer(cfg, adapter, thinker)


def summary(model, device_map: Mapping[str, str]) -> str:
    """One line per device: its blocks and the bytes of weights it holds."""
    loads, sizes = device_loads(model, device_map), part_bytes(model)
    lines = []
    for d, n in loads.items():
        ps = [p for p in parts(model) if str(_device(device_map.get(p, "meta"))) == d]
        blocks = [int(p.split(".")[1]) for p in ps if p.startswith("blocks.")]
        span = f"blocks {min(blocks)}-{max(blocks)}" if blocks else "no blocks"
        other = [p for p in ps if not p.startswith("blocks.") and (sizes[p] or p in _FINAL)]
        lines.append(f"{d}: {span}" + (f" + {', '.join(other)}" if other else "") + f"; {_gib(n)}")
    return "\n".join(lines)



HookedAVTransformer.placer = staticmethod(apply_device_map)  # model.place(...) uses this module's placement
