"""Head ablation as composable TransformerLens hooks: which heads carry audio or video into the answer?

The study asks where the audio and the video a model was shown enter the tokens it generates. An attention
head moves information from the positions it attends to (keys) into the positions it computes (queries);
knocking a head out and watching a metric of the output change says how much that head mattered. Three
questions fall out of one mechanism:

* *does the head matter at all?* — ablate its output ``z`` everywhere;
* *does it matter for the answer?* — ablate it only at the query positions that produce the answer
  (``query="generated"`` during :meth:`~av_lens.model.HookedAVTransformer.generate`, or
  ``query="last_prompt"`` for the first answer token in a plain forward);
* *does it matter as a channel from video (or audio)?* — remove only the part of its output that comes
  from those keys (``keys="video"``), leaving what it reads from the text alone.

Applied to every head in turn (:func:`head_effect_table`), with ``keys="audio"`` and then ``keys="video"``,
this gives two [layer, head] maps of which heads carry each modality into the generated tokens.

What replaces the removed part (``mode``):

* ``"zero"`` — nothing: ``z[q, h] = 0`` (or, with ``keys``, ``z[q, h] -= sum_{k in keys} A[h, q, k] v[k]``);
* ``"mean"`` — its mean over a reference batch (all non-pad positions, or those matching ``query``), which
  keeps the head's typical output and removes only what is specific to this input;
* ``"resample"`` — its value at the same position in another example of a reference batch (seeded choice).
  Positions are aligned one to one, so the reference must have the same padded length as the run (same
  prompt template and media sizes).

How ``keys`` is implemented: this model computes ``z = pattern @ v`` from ``hook_pattern`` (over *all* keys,
cached ones included during decoding), so zeroing ``pattern[:, h, q, keys]`` removes exactly
``sum_{k in keys} pattern[q, k] v[k]`` from ``z[q, h]`` — no renormalisation, the other keys keep their
weights. Editing the pattern rather than subtracting at ``hook_z`` needs no copy of ``v``, so the same hooks
work in the prefill and in every KV-cached decoding step. (A ``hook_pattern`` hook makes that layer take the
explicit attention path instead of SDPA; the two agree to ~1e-6.) ``"mean"``/``"resample"`` then add the
reference's contribution of the same keys back at ``hook_z``.

Selectors (``query``, ``keys``) are resolved when each hook runs, against ``model.run_state.layout`` — the
layout of everything seen so far — so ``"generated"`` picks the new tokens in each decoding step and nothing in
the prefill. A selector that matches no position in the current forward makes the hook a no-op there;
:func:`head_effect_table` checks its selectors against its inputs and refuses ones that match nothing.

    hooks = head_ablation_hooks(model, [(20, 3), (21, 7)], keys="video", query="generated")
    gen = model.generate(inputs, max_new_tokens=20, fwd_hooks=hooks)
    table = head_effect_table(model, inputs, metric, keys="audio", query="last_prompt")   # [layer, head]
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import Sel, SelectorLike, as_selector

Mode = Literal["zero", "mean", "resample"]
HeadsLike = Union[Sequence[tuple[int, int]], Mapping[int, Union[int, Sequence[int]]], tuple[int, int]]
Hook = tuple[str, Callable]
_MODES = ("zero", "mean", "resample")
_HEADS_FIX = "pass (layer, head) pairs such as [(0, 1), (3, 2)], or a dict {layer: [heads]}"


# ------------------------------------------------------------------------------------------- arguments
def _as_int(x) -> int | None:
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _normalise_heads(model, heads: HeadsLike) -> dict[int, list[int]]:
    """``heads`` as ``{layer: sorted heads}``, validated against the model's shape."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if isinstance(heads, Mapping):
        pairs = []
        for layer, hs in heads.items():
            hs = [hs] if _as_int(hs) is not None else list(hs)
            if not hs:
                raise InputError(f"layer {layer} is given an empty list of heads", _HEADS_FIX)
            pairs += [(layer, h) for h in hs]
    elif isinstance(heads, tuple) and len(heads) == 2 and all(_as_int(x) is not None for x in heads):
        pairs = [heads]
    else:
        try:
            pairs = [tuple(p) for p in heads]
        except TypeError:
            raise InputError(f"cannot read heads from a {type(heads).__name__}", _HEADS_FIX) from None
    if not pairs:
        raise InputError("no heads to ablate (heads is empty)", _HEADS_FIX)
    out: dict[int, set[int]] = {}
    for p in pairs:
        if len(p) != 2 or any(_as_int(x) is None for x in p):
            raise InputError(f"{p!r} is not a (layer, head) pair of integers", _HEADS_FIX)
        layer, head = (_as_int(x) for x in p)
        if not 0 <= layer < n_layers:
            raise InputError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})",
                             f"use layers 0..{n_layers - 1}")
        if not 0 <= head < n_heads:
            raise InputError(f"head {head} (layer {layer}) is out of range: each layer has {n_heads} heads "
                             f"(0..{n_heads - 1})", f"use heads 0..{n_heads - 1}")
        out.setdefault(layer, set()).add(head)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def _check_mode(mode: str, reference) -> None:
    if mode not in _MODES:
        raise InputError(f"unknown ablation mode {mode!r}", f"use one of {list(_MODES)}")
    if mode != "zero" and reference is None:
        raise InputError(f"mode={mode!r} needs a reference batch to take {mode} values from",
                         "pass reference=model.prepare(...) (e.g. other clips with the same prompt), or use "
                         "mode='zero'")


def _selector(sel: SelectorLike | None) -> Sel | None:
    return None if sel is None else as_selector(sel)


def _require_match(layout, sel: Sel | None, what: str, where: str) -> None:
    if sel is not None and not bool(layout.mask(sel).any()):
        raise InputError(f"{what} selector {sel.name!r} matches no position in {where}",
                         f"pick positions present there (token counts: {layout.counts()}), or pass {what}=None")


# ------------------------------------------------------------------------------------------- positions
class _Positions:
    """Resolves ``query``/``keys`` against the running forward (``model.run_state``), memoised per forward."""

    def __init__(self, model, query: Sel | None, keys: Sel | None):
        self.model, self.query, self.keys = model, query, keys
        self._layout = None
        self._memo: dict = {}

    def state(self):
        st = self.model.run_state
        if st is None:
            raise InputError("a head-ablation hook ran outside a model forward (model.run_state is not set)",
                             "run the hooks through model.run_with_hooks, model.hooks(...), run_with_cache or "
                             "model.generate(fwd_hooks=...)")
        return st

    def _mask(self, sel: Sel, key: str, device) -> Tensor:
        st = self.state()
        if st.layout is not self._layout:
            self._layout, self._memo = st.layout, {}
        k = (key, st.query_start, st.n_query, str(device))
        if k not in self._memo:
            m = st.layout.mask(sel)
            from av_lens.analysis._common import check_run_match

            check_run_match(st, sel, m & st.layout.attention_mask.bool(), key, "head-ablation",
                            self.__dict__.setdefault("_warned", set()))
            if key == "query":
                m = m[:, st.query_start:st.query_start + st.n_query]
            self._memo[k] = m.to(device)
        return self._memo[k]

    def query_mask(self, z: Tensor) -> Bool[Tensor, "batch query_pos"] | None:
        """Which of the current forward's positions are ablated (None: all of them)."""
        if self.query is None:
            return None
        m = self._mask(self.query, "query", z.device)
        if m.shape[1] != z.shape[1]:
            raise InputError(f"the run state covers {m.shape[1]} query positions but the activation has "
                             f"{z.shape[1]}", "run the hooks through the model's own forward or generate")
        return m

    def key_mask(self, device) -> Bool[Tensor, "batch key_pos"]:
        return self._mask(self.keys, "keys", device)


def _resample_rows(batch: int, n_ref: int, seed: int) -> Tensor:
    """Reference row for each sample of the run: seeded, and never row ``b`` for sample ``b`` (so that a
    batch resampled against itself always takes another example)."""
    if n_ref == 1:
        return torch.zeros(batch, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(batch) + torch.randint(1, n_ref, (batch,), generator=g)) % n_ref


# ------------------------------------------------------------------------------------------- reference
class _Reference:
    """What ``mean``/``resample`` put back, per layer, for all heads, computed in one reference forward.

    ``values[layer]`` is the head output ``z`` (or, with ``keys``, the part of it from those keys):
    ``[n_heads, d_head]`` (mean over the selected reference positions, float32) or
    ``[n_ref, ref_pos, n_heads, d_head]`` (resample)."""

    def __init__(self, model, reference, layers: list[int], mode: Mode, over: Sel | None, keys: Sel | None):
        ref = model.encode(model.to_input(reference))
        layout = ref.layout
        self.mode, self.n, self.length = mode, layout.batch_size, len(layout)
        self.attention_mask = ref.attention_mask.to(model.device).bool()
        _require_match(layout, keys, "keys", "the reference")
        where = layout.mask(over if (mode == "mean" and over is not None) else "all")  # never pads
        if not bool(where.any()):
            raise InputError(f"selector {over.name!r} matches no position in the reference, so there is "
                             "nothing to average", f"pick positions present there (token counts: "
                             f"{layout.counts()}) with reference_query= (e.g. 'last_prompt' when the queries "
                             "are generated tokens and the reference is a prompt)")
        where = where.to(model.device)
        n_rep = model.cfg.n_rep
        key_mask = None if keys is None else layout.mask(keys).to(model.device)
        self.values: dict[int, Tensor] = {}
        v_store: dict[int, Tensor] = {}

        def keep(layer: int, z: Tensor) -> None:  # z [batch, pos, head, d_head]
            z = z.detach().float()
            self.values[layer] = z[where].mean(0) if mode == "mean" else z.clone()

        def z_hook(z, hook):
            keep(int(hook.name.split(".")[1]), z)

        def v_hook(v, hook):
            v_store[int(hook.name.split(".")[1])] = v.detach()

        def pattern_hook(pattern, hook):  # the part of each head's z that comes from the keys
            layer = int(hook.name.split(".")[1])
            v = v_store.pop(layer).repeat_interleave(n_rep, dim=2)  # [batch, key_pos, head, d_head]
            a = pattern * key_mask[:, None, None, :].to(pattern.dtype)
            keep(layer, torch.einsum("bhqk,bkhd->bqhd", a, v))

        if keys is None:
            hooks = [(f"blocks.{l}.attn.hook_z", z_hook) for l in layers]
        else:
            hooks = [h for l in layers for h in ((f"blocks.{l}.attn.hook_v", v_hook),
                                                  (f"blocks.{l}.attn.hook_pattern", pattern_hook))]
        with torch.no_grad():
            model.run_with_hooks(ref, fwd_hooks=hooks, return_type=None)

    def replacement(self, layer: int, z: Tensor, positions: _Positions, need: Bool[Tensor, "batch query_pos"],
                    seed: int) -> Float[Tensor, "batch query_pos head_index d_head"]:
        """The values to put at the current forward's positions (``need``: the positions being ablated)."""
        vals = self.values[layer]
        if self.mode == "mean":
            return vals.to(z.dtype)[None, None]
        st = positions.state()
        if len(st.layout) != self.length:
            raise InputError(
                f"resample ablation aligns positions with the reference, which has {self.length} positions, but "
                f"this forward's sequence has {len(st.layout)}" + (" (generated tokens have no counterpart)"
                                                                   if st.is_decoding else ""),
                "resample from a reference with the same padded length (same prompt template and media sizes); "
                "for generation use mode='mean' or mode='zero'")
        rows = _resample_rows(z.shape[0], self.n, seed).to(vals.device)
        span = slice(st.query_start, st.query_start + st.n_query)
        real = self.attention_mask[rows, span]  # [batch, query_pos]
        need = need & st.layout.attention_mask[:, span].to(need.device).bool()  # pads of the run may take pads
        if bool((need & ~real).any()):
            raise InputError("resample ablation would copy padding from the reference into real positions",
                             "use a reference whose samples have the same padded layout as the run")
        return vals[rows][:, span].to(z.dtype)


# ------------------------------------------------------------------------------------------- hooks
def _layer_hooks(model, layer: int, heads: list[int], mode: Mode, positions: _Positions,
                 reference: _Reference | None, seed: int) -> list[Hook]:
    n_heads = model.cfg.n_heads
    head_sel = torch.zeros(n_heads, dtype=torch.bool)
    head_sel[heads] = True
    sel_cache: dict = {}

    def hsel(device) -> Tensor:
        k = str(device)
        if k not in sel_cache:
            sel_cache[k] = head_sel.to(device)
        return sel_cache[k]

    def where(z: Tensor) -> Bool[Tensor, "batch query_pos head_index"]:
        qm = positions.query_mask(z)
        hs = hsel(z.device)[None, None, :]
        return hs.expand(z.shape[0], z.shape[1], -1) if qm is None else qm[:, :, None] & hs

    def z_replace(z: Float[Tensor, "batch pos head_index d_head"], hook):
        m = where(z)[..., None]
        if mode == "zero":
            return z.masked_fill(m, 0.0)
        return torch.where(m, reference.replacement(layer, z, positions, m[..., 0].any(-1), seed), z)

    def pattern_cut(pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook):
        qm = positions.query_mask(pattern.transpose(1, 2))  # [batch, query_pos] or None
        km = positions.key_mask(pattern.device)  # [batch, key_pos]
        if km.shape[1] != pattern.shape[-1]:
            raise InputError(f"the layout has {km.shape[1]} key positions but the attention pattern has "
                             f"{pattern.shape[-1]}", "run the hooks through the model's own forward or generate")
        cut = hsel(pattern.device)[None, :, None, None] & km[:, None, None, :]
        if qm is not None:
            cut = cut & qm[:, None, :, None]
        return pattern.masked_fill(cut, 0.0)

    def z_add_back(z: Float[Tensor, "batch pos head_index d_head"], hook):
        m = where(z)
        add = reference.replacement(layer, z, positions, m.any(-1), seed)
        return z + torch.where(m[..., None], add, torch.zeros((), dtype=z.dtype, device=z.device))

    name = f"blocks.{layer}.attn"
    if positions.keys is None:
        return [(f"{name}.hook_z", z_replace)]
    hooks = [(f"{name}.hook_pattern", pattern_cut)]
    if mode != "zero":
        hooks.append((f"{name}.hook_z", z_add_back))
    return hooks


def _build(model, heads: dict[int, list[int]], mode: Mode, query: Sel | None, keys: Sel | None,
           reference: _Reference | None, seed: int) -> list[Hook]:
    positions = _Positions(model, query, keys)
    return [h for layer, hs in heads.items() for h in _layer_hooks(model, layer, hs, mode, positions, reference, seed)]


def head_ablation_hooks(model, heads: HeadsLike, *, mode: Mode = "zero", query: SelectorLike | None = None,
                        keys: SelectorLike | None = None, reference=None, reference_query: SelectorLike | None = None,
                        seed: int = 0) -> list[Hook]:
    """TransformerLens ``(hook_name, fn)`` pairs that ablate attention heads; pass them to ``run_with_hooks``,
    ``model.hooks(...)`` or ``generate(fwd_hooks=...)``.

    ``heads``: ``[(layer, head), ...]`` or ``{layer: [heads]}``. ``query``: the query positions whose head
    output is ablated (a selector resolved in each forward; None = all). ``keys``: if given, only the part of
    the head's output read from these key positions is removed (a ``hook_pattern`` edit, valid in the prefill
    and in KV-cached decoding). ``mode``: ``"zero"``, ``"mean"`` (mean over ``reference``'s positions matching
    ``reference_query``, which defaults to ``query``, or to all non-pad positions) or ``"resample"`` (the same
    position in another ``reference`` example, chosen with ``seed``; needs the same padded length). The
    reference statistics are computed once, here. The hooks never edit their input in place.
    """
    heads = _normalise_heads(model, heads)
    _check_mode(mode, reference)
    q, k = _selector(query), _selector(keys)
    over = _selector(reference_query) if reference_query is not None else q
    ref = None if mode == "zero" else _Reference(model, reference, list(heads), mode, over, k)
    return _build(model, heads, mode, q, k, ref, seed)


# ------------------------------------------------------------------------------------------- sweep
def _identity(x, hook):
    return None


def head_effect_table(model, inputs, metric: Callable[[Tensor], float | Tensor], *, mode: Mode = "zero",
                      query: SelectorLike | None = None, keys: SelectorLike | None = None, reference=None,
                      reference_query: SelectorLike | None = None, layers: Sequence[int] | None = None, seed: int = 0,
                      progress: bool = True) -> Float[Tensor, "layer head_index"]:
    """``metric(logits)`` with each head ablated alone, minus the clean ``metric(logits)``: [n_layers, n_heads].

    Rows of layers not in ``layers`` are NaN. The encoders run once; ``reference`` defaults to ``inputs``
    itself for ``"mean"`` and ``"resample"`` (a batch resampled against itself: each sample takes another).
    With ``keys``, the clean run also takes the explicit attention path (an identity ``hook_pattern`` hook on
    every layer), so heads that do not read those keys get an effect of exactly 0. ``progress=False`` hides
    the progress bar.
    """
    from tqdm.auto import tqdm

    inputs = model.encode(model.to_input(inputs))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(n_layers)) if layers is None else list(layers)
    if not layers:
        raise InputError("no layers to sweep (layers is empty)", f"pass layers from 0..{n_layers - 1}, or None")
    bad = [l for l in layers if not (isinstance(l, int) and 0 <= l < n_layers)]
    if bad:
        raise InputError(f"layers {bad} are outside 0..{n_layers - 1}", f"use layers 0..{n_layers - 1}")
    if mode not in _MODES:
        raise InputError(f"unknown ablation mode {mode!r}", f"use one of {list(_MODES)}")
    q, k = _selector(query), _selector(keys)
    _require_match(inputs.layout, q, "query", "the inputs")
    _require_match(inputs.layout, k, "keys", "the inputs")
    ref = None
    if mode != "zero":
        over = _selector(reference_query) if reference_query is not None else q
        ref = _Reference(model, inputs if reference is None else reference, layers, mode, over, k)
    base = [] if k is None else [(f"blocks.{l}.attn.hook_pattern", _identity) for l in range(n_layers)]
    out = torch.full((n_layers, n_heads), float("nan"))
    with torch.no_grad():
        clean = float(metric(model.run_with_hooks(inputs, fwd_hooks=base)))
        with tqdm(total=len(layers) * n_heads, disable=not progress, desc="head ablation") as bar:
            for layer in layers:
                for head in range(n_heads):
                    hooks = base + _build(model, {layer: [head]}, mode, q, k, ref, seed)
                    out[layer, head] = float(metric(model.run_with_hooks(inputs, fwd_hooks=hooks))) - clean
                    bar.update(1)
    return out
