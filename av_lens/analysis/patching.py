"""Activation and path patching between a factual and a counterfactual run, by modality.

Patching asks *where* the difference between two runs lives: run the counterfactual (corrupted) input, copy
one activation from the factual (clean) run into it, and see how much of the clean metric comes back.
The study's question — where does the sound's information enter the answer? — is answered per layer and per
*modality position set*:

    res = patch_by_modality(model, factual, counterfactual, metric,
                            components=("resid_pre", "attn_out", "mlp_out"), sets=("audio", "video", "text"))
    res["resid_pre"]          # [layer, set]: metric after patching that set's positions at that layer

Built on ``transformer_lens.patching.generic_activation_patch`` (one index row per (layer, set) or
(layer, head, set)), with a patch setter that copies the clean activation at the set's positions. The two
inputs must be position-aligned (same length, same modality tags) — counterfactual pairs that swap the audio
track are (see ``av_lens.analysis.pairs``). Per-position patching (``per_position=True``) uses TransformerLens's
own ``get_act_patch_*`` functions.

Path patching restricts the patch to *edges*: :func:`path_patch_hooks` replaces, in the heads of one layer,
only the contribution that flows from sender positions (e.g. video) to receiver positions (e.g. the last
prompt token or the generated tokens) with its clean value — z[q] gets sum_{k in S} p_clean[q,k] v_clean[k]
instead of the corrupted run's — and leaves every other edge corrupted. Downstream layers recompute from the
patched residual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from transformer_lens import patching as tl_patching

from av_lens.analysis._common import check_layers, current_rows, selector_mask
from av_lens.errors import InputError
from av_lens.layout import SelectorLike

#: component name -> (TransformerLens activation name, per-head?)
COMPONENTS = {
    "resid_pre": ("resid_pre", False), "resid_mid": ("resid_mid", False), "resid_post": ("resid_post", False),
    "attn_out": ("attn_out", False), "mlp_out": ("mlp_out", False), "z": ("z", True),
    "q": ("q", True), "k": ("k", True), "v": ("v", True),
}


def n_component_heads(model, component: str) -> int:
    """Heads a per-head component is indexed by: query heads for z / q, key-value heads for k / v (GQA)."""
    return model.cfg.n_key_value_heads if component in ("k", "v") else model.cfg.n_heads


def check_aligned(clean, corrupted) -> None:
    """Refuse inputs whose positions do not correspond one to one."""
    a, b = clean.layout, corrupted.layout
    if a.shape != b.shape:
        raise InputError(f"the clean input has {a.shape[1]} positions and the corrupted {b.shape[1]} "
                         f"(clean {a.counts()}, corrupted {b.counts()})",
                         "patch between position-aligned inputs: build the pair with the same media lengths "
                         "(av_lens.analysis.pairs.counterfactual_pair trims the swapped audio)")
    if not torch.equal(a.modality, b.modality):
        diff = int((a.modality != b.modality).sum())
        raise InputError(f"the two inputs have the same length but {diff} positions with different modality tags",
                         "use inputs with the same layout (same prompt template and media token counts)")


def metric_gap(clean: float, corrupted: float) -> float:
    """clean - corrupted, refused when the two runs' metrics are equal (recovery would be undefined)."""
    gap = clean - corrupted
    if abs(gap) < 1e-12:
        raise InputError("the clean and corrupted metrics are equal, so recovery is undefined",
                         "choose a metric that separates the two runs")
    return gap


@dataclass
class PatchResult:
    """Patched metric per component: [layer, set] or [layer, head, set]; with the clean and corrupted metrics."""

    values: dict[str, Tensor]
    sets: list[str]
    layers: list[int]
    clean: float
    corrupted: float

    def __getitem__(self, component: str) -> Tensor:
        return self.values[component]

    def recovered(self, component: str) -> Tensor:
        """Fraction of the clean-corrupted metric gap the patch restores (1 = all of it)."""
        return (self.values[component] - self.corrupted) / metric_gap(self.clean, self.corrupted)


def _set_masks(layout, sets: dict[str, SelectorLike]) -> list[Tensor]:
    return [selector_mask(layout, s, f"patching set '{name}'") for name, s in sets.items()]


@contextlib.contextmanager
def _quiet_tl(progress: bool):
    """TransformerLens's patching loops draw a tqdm bar per call; ``progress=False`` silences them."""
    if progress:
        yield
        return
    orig = tl_patching.tqdm
    tl_patching.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        tl_patching.tqdm = orig


def patch_by_modality(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                      components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
                      sets: Sequence[str] | dict[str, SelectorLike] = ("audio", "video", "text"),
                      layers=None, progress: bool = True, position_map=None) -> PatchResult:
    """Patch each component at each layer, at the positions of each set, from ``clean`` into ``corrupted``.

    With ``position_map`` (:func:`av_lens.analysis.position_map.position_map`) the inputs need not be aligned:
    sets select positions of the *corrupted* layout, and each mapped position receives the mean of its clean
    source positions' activations (unmapped positions are left as they are)."""
    clean, corrupted = model.encode(model.to_input(clean)), model.encode(model.to_input(corrupted))
    if position_map is None:
        check_aligned(clean, corrupted)
    else:
        _check_map(position_map, clean, corrupted)
    sets = {s: s for s in sets} if not isinstance(sets, dict) else dict(sets)
    if not sets:
        raise InputError("no position sets given", "pass e.g. sets=('audio', 'video', 'text')")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise InputError(f"unknown patching components {unknown}", f"use some of {sorted(COMPONENTS)}")
    layers = check_layers(model, layers)
    masks = _set_masks(corrupted.layout if position_map is not None else clean.layout, sets)
    if position_map is not None:
        masks = [m & position_map.mapped for m in masks]
        empty = [name for name, m in zip(sets, masks) if not m.any()]
        if empty:
            raise InputError(f"no position of the patching set(s) {empty} is mapped to the clean input",
                             "check the map (position_map(..., unmatched='skip') leaves positions unmapped) or "
                             "patch other sets")
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=lambda n: any(
            n.endswith("hook_" + COMPONENTS[c][0]) for c in components))
        clean_metric = float(metric(clean_logits))
        corrupted_metric = float(metric(model(corrupted)))
    values = {}
    for comp in components:
        act, per_head = COMPONENTS[comp]

        def setter(corrupted_act, index, clean_act):
            m = masks[index[-1]].to(corrupted_act.device)
            clean_act = clean_act.to(corrupted_act.device)  # a cache gathered elsewhere (placed models)
            if position_map is not None:
                clean_act = position_map.gather(clean_act)
            if per_head:
                h = index[1]
                corrupted_act[:, :, h][m] = clean_act[:, :, h][m].to(corrupted_act.dtype)
            else:
                corrupted_act[m] = clean_act[m].to(corrupted_act.dtype)
            return corrupted_act

        n_h = n_component_heads(model, comp)
        rows = ([(l, h, s) for l in layers for h in range(n_h) for s in range(len(sets))] if per_head
                else [(l, s) for l in layers for s in range(len(sets))])
        cols = ["layer", "head", "set"] if per_head else ["layer", "set"]
        with torch.no_grad(), _quiet_tl(progress):
            flat = tl_patching.generic_activation_patch(
                model, corrupted, cache, lambda logits: torch.as_tensor(metric(logits)).to(model.cfg.device), setter, act,
                index_df=pd.DataFrame(rows, columns=cols))
        shape = (len(layers), n_h, len(sets)) if per_head else (len(layers), len(sets))
        values[comp] = flat.detach().float().cpu().reshape(shape)
    return PatchResult(values, list(sets), layers, clean_metric, corrupted_metric)


def _check_map(pm, clean, corrupted) -> None:
    if pm.src.shape[:2] != tuple(corrupted.layout.shape) or pm.clean_len != clean.layout.shape[1]:
        raise InputError(f"the position map is for {pm.clean_len} clean and {pm.src.shape[1]} corrupted positions, "
                         f"but the inputs have {clean.layout.shape[1]} and {corrupted.layout.shape[1]}",
                         "build the map from these two inputs: position_map(clean, corrupted)")


def patch_per_position(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                       component: str = "resid_pre", progress: bool = True, position_map=None) -> Tensor:
    """TransformerLens's per-(layer, position) patching on aligned inputs: [layer, pos].

    With ``position_map`` the inputs need not be aligned: positions are the corrupted run's, each mapped position
    receives the mean of its clean sources (in every sample where it is mapped), and positions mapped in no
    sample are NaN (not patched)."""
    fns = {"resid_pre": tl_patching.get_act_patch_resid_pre, "resid_mid": tl_patching.get_act_patch_resid_mid,
           "attn_out": tl_patching.get_act_patch_attn_out, "mlp_out": tl_patching.get_act_patch_mlp_out}
    if component not in fns:
        raise InputError(f"per-position patching supports {sorted(fns)}, not {component!r}",
                         "use patch_by_modality for other components")
    clean, corrupted = model.encode(model.to_input(clean)), model.encode(model.to_input(corrupted))
    if position_map is not None:
        return _patch_per_position_mapped(model, clean, corrupted, metric, component, progress, position_map)
    check_aligned(clean, corrupted)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_" + component))
        with _quiet_tl(progress):
            return fns[component](model, corrupted, cache,
                                    lambda logits: torch.as_tensor(metric(logits)).to(model.cfg.device)).cpu()


def _patch_per_position_mapped(model, clean, corrupted, metric, component, progress, pm) -> Tensor:
    _check_map(pm, clean, corrupted)
    mapped = pm.mapped                                                         # [batch, pos]
    cols = [int(j) for j in mapped.any(0).nonzero()[:, 0]]
    if not cols:
        raise InputError("no position of the corrupted input is mapped to the clean input",
                         "check the map (unmatched='skip' leaves positions unmapped)")
    layers = list(range(model.cfg.n_layers))
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_" + component))

    def setter(corrupted_act, index, clean_act):
        j = index[1]
        moved = pm.gather(clean_act.to(corrupted_act.device))
        rows = mapped[:, j].to(corrupted_act.device)
        corrupted_act[rows, j] = moved[rows, j].to(corrupted_act.dtype)
        return corrupted_act

    with torch.no_grad(), _quiet_tl(progress):
        flat = tl_patching.generic_activation_patch(
            model, corrupted, cache, lambda logits: torch.as_tensor(metric(logits)).to(model.cfg.device), setter,
            component, index_df=pd.DataFrame([(l, j) for l in layers for j in cols], columns=["layer", "pos"]))
    out = torch.full((len(layers), corrupted.layout.shape[1]), float("nan"))
    out[:, cols] = flat.detach().float().cpu().reshape(len(layers), len(cols))
    return out


# ------------------------------------------------------------------------------------------ path patching
def path_patch_hooks(model, clean_cache, layer: int, senders: SelectorLike, receivers: SelectorLike,
                     heads: Sequence[int] | None = None, *, position_map=None,
                     clean_layout=None) -> list[tuple[str, Callable]]:
    """Hooks for the corrupted run that give the ``senders -> receivers`` edges of ``layer``'s heads their
    clean values. ``clean_cache`` must hold that layer's ``attn.hook_pattern`` and ``attn.hook_v``
    (see :func:`path_patch_cache_filter`). Prefill only.

    With ``position_map`` (and the clean input's ``clean_layout``) the two runs need not be aligned: senders are
    selected in each run's own layout, and a mapped receiver j of the corrupted run gets, in place of its
    corrupted senders' contribution, the clean contribution of the clean senders to j's clean source
    positions (their mean). Unmapped receivers keep their corrupted values."""
    (layer,) = check_layers(model, [layer], "path-patching layer")
    heads = list(range(model.cfg.n_heads)) if heads is None else sorted(set(heads))
    bad = [h for h in heads if not 0 <= h < model.cfg.n_heads]
    if bad or not heads:
        raise InputError(f"heads {bad or heads} are not valid heads of a {model.cfg.n_heads}-head layer",
                         f"pass head indices in 0..{model.cfg.n_heads - 1}")
    if (position_map is None) != (clean_layout is None):
        raise InputError("a path-patching position map needs the clean input's layout too",
                         "pass position_map=pm, clean_layout=clean.layout (path_patch does this for you)")
    pre = f"blocks.{layer}.attn."
    try:
        p_clean, v_clean = clean_cache[pre + "hook_pattern"], clean_cache[pre + "hook_v"]
    except KeyError as e:
        raise InputError(f"the clean cache lacks {getattr(e, 'key', e.args[0])}",
                         "cache with names_filter=path_patch_cache_filter(layer)") from None
    n_rep = model.cfg.n_rep
    state: dict[str, Tensor] = {}

    def edge_sum(p, v, S, R):
        # sum_{k in S} p[b, h, q, k] v[b, k, h // n_rep] for receiver rows q: [batch, q, head, d_head]
        vr = v.repeat_interleave(n_rep, dim=2)  # [batch, key, head, d_head]
        pm = p * S[:, None, None, :].to(p.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", pm, vr) * R[:, :, None, None].to(p.dtype)

    def on_v(v, hook):
        state["v"] = v

    def on_pattern(p, hook):
        state["p"] = p


    def on_z(z, hook):
        layout, qs, n = current_rows(model)
        if qs != 0:
            raise InputError("path patching hooks run in a prefill forward only", "use them with run_with_hooks")
        S = selector_mask(layout, senders, "sender").to(z.device)
        R = selector_mask(layout, receivers, "receiver").to(z.device)
        if position_map is None:
            clean_part = edge_sum(p_clean.to(z.device), v_clean.to(z.device), S, R)
        else:
            S_clean = selector_mask(clean_layout, senders, "sender").to(z.device)
            every = torch.ones(p_clean.shape[0], p_clean.shape[2], dtype=torch.bool, device=z.device)
            R = R & position_map.mapped.to(z.device)
            moved = position_map.gather(edge_sum(p_clean.to(z.device), v_clean.to(z.device), S_clean, every))
            clean_part = moved.to(z.device) * R[:, :, None, None].to(moved.dtype)
        delta = clean_part - edge_sum(state["p"], state["v"], S, R)
        out = z.clone()
        out[:, :, heads] = z[:, :, heads] + delta[:, :, heads].to(z.dtype)
        state.clear()
        return out

    return [(pre + "hook_v", on_v), (pre + "hook_pattern", on_pattern), (pre + "hook_z", on_z)]


def path_patch_cache_filter(layer: int) -> Callable[[str], bool]:
    names = {f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"}
    return lambda n: n in names


def path_patch(model, clean, corrupted, metric: Callable[[Tensor], Tensor], senders: SelectorLike,
               receivers: SelectorLike, layers=None, heads_per_layer: bool = False, position_map=None) -> Tensor:
    """Metric after patching ``senders -> receivers`` edges: [layer] (all heads at once) or [layer, head].
    ``position_map``: inputs whose layouts differ (see :func:`path_patch_hooks`)."""
    clean, corrupted = model.encode(model.to_input(clean)), model.encode(model.to_input(corrupted))
    if position_map is None:
        check_aligned(clean, corrupted)
    else:
        _check_map(position_map, clean, corrupted)
        R = selector_mask(corrupted.layout, receivers, "receiver")
        if not (R & position_map.mapped).any():
            raise InputError("no receiver position is mapped to the clean input",
                             "check the map (unmatched='skip' leaves positions unmapped) or choose other receivers")
    selector_mask(clean.layout, senders, "sender")
    selector_mask(corrupted.layout, receivers, "receiver")
    layers = check_layers(model, layers)
    names = {f"blocks.{l}.attn.hook_{a}" for l in layers for a in ("pattern", "v")}
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
        out = []
        for l in layers:
            hs = [[h] for h in range(model.cfg.n_heads)] if heads_per_layer else [None]
            row = [float(metric(model.run_with_hooks(corrupted, fwd_hooks=path_patch_hooks(
                model, cache, l, senders, receivers, h, position_map=position_map,
                clean_layout=clean.layout if position_map is not None else None))))
                   for h in hs]
            out.append(row)
    t = torch.tensor(out)
    return t if heads_per_layer else t[:, 0]
