"""Attribution patching (AtP): a first-order estimate of every patching effect from two forwards and one backward.

Exhaustive activation patching needs one forward per node; at real scale (36 layers x 16 heads x ~3,000
video tokens) that is thousands of forwards per clip. AtP (Nanda 2023; Syed et al. 2023; Kramár et al. 2024)
linearises the metric around the corrupted run:

    effect(node) ≈ (a_clean(node) - a_corrupted(node)) · ∂metric/∂a (at the corrupted run)

summed over the node's positions (a modality set, a media item, a time window, or each position) and over the
activation's features. One clean forward (activations), one corrupted forward and backward (activations and
gradients) give every node at once:

    res = attribution_patch(model, factual, counterfactual, metric,
                            components=("resid_pre", "attn_out", "mlp_out", "z", "neurons"),
                            sets=("audio", "video", "text"))
    res["z"]            # [layer, head, set]: estimated patched metric, comparable to patch_by_modality's
    res.effect("z")     # [layer, head, set]: estimated change from the corrupted metric
    res.top(10, "z")    # the largest nodes

The clean and corrupted inputs may differ in media, text or both (the encoders are not differentiated: the
estimate is over the language model's activations, which is what patching patches). Inputs whose layouts
differ take a :class:`~av_lens.analysis.position_map.PositionMap`: the clean activation at corrupted position
j is then the mean of its mapped clean positions, and unmapped positions contribute nothing.

When to trust it: AtP is exact when the metric is linear in the node (it equals patching to rounding on a model
whose MLPs and softmax are linear, see the tests), and usually ranks resid / attn_out / mlp_out nodes as
patching does; it misses effects through saturated softmaxes (a head whose pattern is one-hot) and through
cancellations. Check the top nodes with exact patching. Heads are read at ``hook_z`` (the head's result is
``z @ W_O[h]``, a linear map, so the estimate is the same); MLP neurons at ``mlp.hook_post``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from av_lens.analysis._common import check_layers, selector_mask
from av_lens.errors import InputError
from av_lens.layout import SelectorLike

EMBED = "blocks.0.hook_resid_pre"

#: component -> (hook suffix, kind); kind: "pos" [b, p, d], "head" [b, p, h, d], "neuron" [b, p, n]
COMPONENTS = {
    "resid_pre": ("hook_resid_pre", "pos"), "resid_mid": ("hook_resid_mid", "pos"),
    "resid_post": ("hook_resid_post", "pos"), "attn_out": ("hook_attn_out", "pos"),
    "mlp_out": ("hook_mlp_out", "pos"), "z": ("attn.hook_z", "head"), "neurons": ("mlp.hook_post", "neuron"),
    "q": ("attn.hook_q", "head"), "k": ("attn.hook_k", "head"), "v": ("attn.hook_v", "head"),
}


@dataclass
class AttributionResult:
    """AtP estimates per component: [layer, set], [layer, head, set] (``k`` / ``v``: [layer, kv_head, set]) or
    [layer, neuron, set]. ``grad_drop`` holds AtP*'s GradDrop magnitudes (same shapes, >= 0) when asked for."""

    effects: dict[str, Tensor]
    sets: list[str]
    layers: list[int]
    clean: float
    corrupted: float
    grad_drop: dict[str, Tensor] | None = None
    method: str = "AtP"

    def effect(self, component: str) -> Tensor:
        """Estimated change of the metric when the node is patched from clean into corrupted."""
        if component not in self.effects:
            raise InputError(f"no attribution for {component!r}", f"use one of {sorted(self.effects)}")
        return self.effects[component]

    def magnitude(self, component: str) -> Tensor:
        """GradDrop's estimate of |effect| (AtP*: the mean over dropped layers of each run's |estimate|)."""
        if self.grad_drop is None:
            raise InputError("this result has no GradDrop magnitudes", "run attribution_patch(..., grad_drop=True)")
        self.effect(component)
        return self.grad_drop[component]

    def __getitem__(self, component: str) -> Tensor:
        """Estimated patched metric (corrupted + effect), on the scale of :class:`PatchResult` values."""
        return self.corrupted + self.effect(component)

    def recovered(self, component: str) -> Tensor:
        """Estimated fraction of the clean-corrupted metric gap the patch restores."""
        from av_lens.analysis.patching import metric_gap

        return self.effect(component) / metric_gap(self.clean, self.corrupted)

    def top(self, k: int, component: str, *, by: str = "effect") -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` nodes of ``component`` with the largest |effect| (``by="grad_drop"``: largest GradDrop
        magnitude): ((layer, [head/neuron,] set index), value)."""
        if by not in ("effect", "grad_drop"):
            raise InputError(f"unknown ranking {by!r}", "use by='effect' or by='grad_drop'")
        e = self.effect(component) if by == "effect" else self.magnitude(component)
        flat = e.flatten()
        idx = flat.abs().argsort(descending=True)[:k]
        out = []
        for i in idx.tolist():
            nd = list(torch.unravel_index(torch.tensor(i), e.shape))
            nd[0] = self.layers[int(nd[0])]
            out.append((tuple(int(x) for x in nd), float(flat[i])))
        return out

    def to_frame(self):
        """A tidy ``pandas.DataFrame``: one row per node — component, layer, unit ("head", "kv_head", "neuron"
        or ""), index (the head / neuron, -1 for whole-layer nodes), set, effect (and grad_drop when present)."""
        import pandas as pd

        unit = {"z": "head", "q": "head", "k": "kv_head", "v": "kv_head", "neurons": "neuron"}
        rows = []
        for c, e in self.effects.items():
            g = self.grad_drop[c] if self.grad_drop is not None else None
            for nd in torch.cartesian_prod(*[torch.arange(n) for n in e.shape]).reshape(-1, e.ndim).tolist():
                r = {"component": c, "layer": self.layers[nd[0]], "unit": unit.get(c, "") if e.ndim == 3 else "",
                     "index": nd[1] if e.ndim == 3 else -1, "set": self.sets[nd[-1]], "effect": float(e[tuple(nd)])}
                if g is not None:
                    r["grad_drop"] = float(g[tuple(nd)])
                rows.append(r)
        return pd.DataFrame(rows)

    def table(self, component: str, k: int = 10, *, by: str = "effect") -> str:
        rows = [f"{self.method} {component}: clean {self.clean:.4f}, corrupted {self.corrupted:.4f}",
                f"{'node':>24} {'effect' if by == 'effect' else '|effect|~':>10}"]
        unit = {"z": " h", "q": " h", "k": " kv", "v": " kv", "neurons": " n"}.get(component, "")
        for nd, v in self.top(k, component, by=by):
            label = f"L{nd[0]}" + (f"{unit}{nd[1]}" if len(nd) == 3 else "") + f" {self.sets[nd[-1]]}"
            rows.append(f"{label:>24} {v:10.4f}")
        return "\n".join(rows)


def _scalar(m) -> Tensor:
    if not isinstance(m, Tensor) or m.numel() != 1:
        raise InputError(f"the attribution metric must return a scalar tensor, got "
                         f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}",
                            "reduce over the batch, e.g. (logits[:, -1, a] - logits[:, -1, b]).mean()")
    return m


def _leaf(resid, hook):  # make the residual stream a graph root, so no parameter gradient is kept
    return resid.detach().requires_grad_(True)


def _no_grad_through(act, hook):
    """Forward value unchanged, zero gradient backward: GradDrop's dropped layer."""
    return act.detach() + 0 * act


def _masked(scores: Tensor) -> Tensor:
    """Entries the additive attention mask removed (it adds the dtype's minimum)."""
    return scores <= torch.finfo(scores.dtype).min / 2


def _qk_estimates(model, l: int, clean_acts, corr_acts, masks: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
    """AtP* for layer ``l``'s query and key nodes: ``Σ (A' - A) · g`` where A' is the pattern recomputed exactly
    with a set's queries (or keys) clean and every other input of the head corrupted, ``g = ∂metric/∂A``.
    Returns ([head, set], [kv_head, set])."""
    pre = f"blocks.{l}.attn."
    rq_c, rk_c = clean_acts[pre + "hook_rot_q"], clean_acts[pre + "hook_rot_k"]
    rq, rk, scores = corr_acts[pre + "hook_rot_q"], corr_acts[pre + "hook_rot_k"], corr_acts[pre + "hook_attn_scores"]
    cfg, scale = model.cfg, model.blocks[l].attn.scale
    n_sets = masks.shape[0]
    if g is None:  # the metric does not depend on this layer's pattern (e.g. pinned by a hook)
        return torch.zeros(cfg.n_heads, n_sets), torch.zeros(cfg.n_key_value_heads, n_sets)
    f32 = torch.float32
    sc, off, g = scores.to(f32), _masked(scores), g.to(f32)
    A = sc.softmax(-1)

    def s(qx, kx):  # [b, h, q, k]
        return torch.einsum("bqhd,bkhd->bhqk", qx.to(f32), kx.repeat_interleave(cfg.n_rep, dim=2).to(f32)) * scale

    err = (s(rq, rk) - sc).masked_fill(off, 0).abs().max()
    if float(err) > 1e-3 * (float(sc.masked_fill(off, 0).abs().max()) + 1.0):
        raise InputError(f"layer {l}'s attention scores are not scale * rot_q . rot_k + mask (they differ by "
                         f"{float(err):.3g})", "recompute_qk supports standard softmax attention only; use "
                                              "recompute_qk=False")
    m = masks.to(sc.device, f32)                                                # [set, b, pos]
    aq = s(rq_c, rk).masked_fill(off, float("-inf")).softmax(-1).nan_to_num(0.0)
    rows = ((aq - A) * g).sum(-1)                                               # [b, h, q]: each query row alone
    eq = torch.einsum("sbq,bhq->hs", m, rows)
    kc = s(rq, rk_c)
    ek = []
    for j in range(n_sets):
        new = torch.where(m[j].bool()[:, None, None, :] & ~off, kc, sc).masked_fill(off, float("-inf"))
        ek.append(torch.einsum("bhqk,bhqk->h", new.softmax(-1).nan_to_num(0.0) - A, g))
    ek = torch.stack(ek, dim=1)                                                 # [head, set]
    ek = ek.reshape(cfg.n_key_value_heads, cfg.n_rep, n_sets).sum(1)            # a key-value head's query heads
    return eq.float().cpu(), ek.float().cpu()


def attribution_patch(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                      components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
                      sets: Sequence[str] | dict[str, SelectorLike] | None = ("audio", "video", "text"), *,
                      per_position: bool = False, layers=None, position_map=None, recompute_qk: bool = False,
                      grad_drop: bool = False) -> AttributionResult:
    """AtP estimates for every (layer, component[, head | neuron]) x set (or x position with ``per_position``).

    ``metric(logits)`` must return a scalar (e.g. a logit difference averaged over the batch). Sets select
    positions of the corrupted input (the run that is patched).

    AtP*'s two fixes (Kramár et al. 2024), each opt-in:

    * ``recompute_qk=True``: for query (``q``) and key (``k``) nodes the attention pattern the patch would give is
      computed exactly (the head's scores with the set's clean queries, or clean keys, and every other input
      corrupted; softmax) and only the step from the pattern on is linearised: ``Σ (A' - A) · ∂metric/∂A``. A
      first-order estimate through a saturated softmax misses such effects. Position-aligned inputs only.
    * ``grad_drop=True``: for each layer ℓ one more corrupted backward with the gradient through ℓ's attention
      and MLP outputs set to zero (their forward values kept); ``result.magnitude(c)`` is
      ``1/(L-1) Σ_ℓ |estimate_ℓ|`` — large where a direct and an indirect path cancel in plain AtP. Costs L extra
      forward + backward passes."""
    clean, corrupted = model.encode(model.to_input(clean)), model.encode(model.to_input(corrupted))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise InputError(f"unknown attribution components {unknown or list(components)}",
                         f"use some of {sorted(COMPONENTS)}")
    layers = check_layers(model, layers, "attribution layers")
    if position_map is None:
        from av_lens.analysis.patching import check_aligned
        check_aligned(clean, corrupted)
    else:
        from av_lens.analysis.patching import _check_map
        _check_map(position_map, clean, corrupted)
        if recompute_qk:
            raise InputError("recompute_qk needs position-aligned inputs (a mapped query or key would be rotated at "
                             "another position)", "use recompute_qk=False with a position map")
    if grad_drop and model.cfg.n_layers < 2:
        raise InputError("GradDrop needs a model with at least two layers", "use grad_drop=False")
    lay = corrupted.layout
    real = lay.attention_mask.bool()
    if per_position:
        names = [str(p) for p in range(lay.shape[1])]
        masks = torch.eye(lay.shape[1], dtype=torch.bool)[:, None, :].expand(-1, lay.batch_size, -1) & real[None]
    else:
        if not sets:
            raise InputError("no position sets given", "pass sets=('audio', 'video', 'text') or per_position=True")
        sets = {s: s for s in sets} if not isinstance(sets, dict) else dict(sets)
        names = list(sets)
        masks = torch.stack([selector_mask(lay, s, f"attribution set '{n}'") for n, s in sets.items()])
    if position_map is not None:
        masks = masks & position_map.mapped[None]
    hook_names = {f"blocks.{l}.{COMPONENTS[c][0]}": (l, c) for l in layers for c in components}
    qk = recompute_qk and any(c in ("q", "k") for c in components)
    attn_names = {f"blocks.{l}.attn.hook_{a}" for l in layers for a in ("rot_q", "rot_k")} if qk else set()
    corr_only = {f"blocks.{l}.attn.hook_attn_scores" for l in layers} if qk else set()
    pattern_names = [f"blocks.{l}.attn.hook_pattern" for l in layers] if qk else []

    clean_acts: dict[str, Tensor] = {}

    def keep(act, hook):
        clean_acts[hook.name] = act.detach()

    with torch.no_grad():
        clean_metric = float(_scalar(metric(model.run_with_hooks(
            clean, fwd_hooks=[(n, keep) for n in sorted(set(hook_names) | attn_names)]))))

    corr_acts: dict[str, Tensor] = {}

    def backward(drop: int | None = None) -> tuple[float, dict[str, Tensor]]:
        grads: dict[str, Tensor] = {}

        def track(act, hook):
            corr_acts[hook.name] = act.detach()
            if act.requires_grad:
                act.register_hook(lambda g, name=hook.name: grads.__setitem__(name, g.detach()))

        def keep_corr(act, hook):
            corr_acts[hook.name] = act.detach()

        hooks = [(EMBED, _leaf)] + [(n, track) for n in sorted(set(hook_names) | set(pattern_names))]
        hooks += [(n, keep_corr) for n in sorted(attn_names | corr_only)]
        if drop is not None:
            hooks += [(f"blocks.{drop}.hook_{a}", _no_grad_through) for a in ("attn_out", "mlp_out")]
        with torch.enable_grad():
            m = _scalar(metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)))
            if not m.requires_grad:
                raise InputError("the attribution metric does not depend on the logits' graph",
                                 "compute it from the logits tensor it is given (no .item(), no argmax)")
            m.backward()
        return float(m.detach()), grads

    def estimates(grads: dict[str, Tensor], strict: bool) -> dict[str, Tensor]:
        out: dict[str, list] = {c: [] for c in components}
        for l in layers:
            qk_est = None
            for c in components:
                name = f"blocks.{l}.{COMPONENTS[c][0]}"
                kind = COMPONENTS[c][1]
                if recompute_qk and c in ("q", "k"):
                    if qk_est is None:
                        qk_est = _qk_estimates(model, l, clean_acts, corr_acts, masks,
                                               grads.get(f"blocks.{l}.attn.hook_pattern"))
                    out[c].append(qk_est[0] if c == "q" else qk_est[1])
                    continue
                if name not in grads:
                    if strict:
                        raise InputError(f"no gradient reached {name}", "the metric must depend on that layer's output")
                    grads[name] = torch.zeros_like(corr_acts[name])
                a_clean = clean_acts[name]
                if position_map is not None:
                    a_clean = position_map.gather(a_clean)
                delta = (a_clean.to(grads[name].dtype) - corr_acts[name]) * grads[name]
                mk = masks.to(delta.device, delta.dtype)                         # [set, batch, pos]
                if kind == "pos":
                    e = torch.einsum("sbp,bpd->s", mk, delta)
                elif kind == "head":
                    e = torch.einsum("sbp,bphd->hs", mk, delta)
                else:
                    e = torch.einsum("sbp,bpn->ns", mk, delta)
                out[c].append(e.float().cpu())
        return {c: torch.stack(v) for c, v in out.items()}

    corrupted_metric, grads = backward()
    effects = estimates(grads, strict=True)
    magnitudes = None
    if grad_drop:
        L = model.cfg.n_layers
        magnitudes = {c: torch.zeros_like(v) for c, v in effects.items()}
        for drop in range(L):
            _, g = backward(drop)
            for c, v in estimates(g, strict=False).items():
                magnitudes[c] += v.abs() / (L - 1)
    method = "AtP*" if recompute_qk and grad_drop else ("AtP (q/k recomputed)" if recompute_qk else
                                                       "AtP + GradDrop" if grad_drop else "AtP")
    return AttributionResult(effects, names, layers, clean_metric, corrupted_metric, magnitudes, method)


# ------------------------------------------------------------------------------------------- edges
@dataclass
class EdgeAttributionResult:
    """Estimated effect of patching each (layer, head, sender group -> receiver group) edge."""

    effects: Tensor          # [layer, head, sender, receiver]
    layers: list[int]
    senders: list[str]
    receivers: list[str]
    clean: float
    corrupted: float
    ig_steps: int | None
    ig_path: str = "input"

    def __getitem__(self, key) -> Tensor:
        return self.effects[key]

    def table(self, k: int = 10) -> str:
        e = self.effects
        idx = e.flatten().abs().argsort(descending=True)[:k].tolist()
        how = ("EAP" if self.ig_steps is None else f"EAP-IG ({self.ig_steps} steps)" if self.ig_path == "input"
               else f"edge IG ({self.ig_steps} steps per edge)")
        rows = [f"{how}: clean {self.clean:.4f}, corrupted {self.corrupted:.4f}", f"{'edge':>32} {'effect':>10}"]
        for i in idx:
            l, h, s, r = (int(x) for x in torch.unravel_index(torch.tensor(i), e.shape))
            rows.append(f"{f'L{self.layers[l]} h{h} {self.senders[s]} -> {self.receivers[r]}':>32} "
                        f"{float(e[l, h, s, r]):10.4f}")
        return "\n".join(rows)


def edge_attribution(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                     senders: Sequence[str] | dict[str, SelectorLike] = ("audio", "video", "text"),
                     receivers: Sequence[str] | dict[str, SelectorLike] = ("last_prompt",), *, layers=None,
                     ig_steps: int | None = None, ig_path: str = "input") -> EdgeAttributionResult:
    """Edge attribution patching between modality groups through every attention head.

    The edge (layer l, head h, S -> R) is what :func:`~av_lens.analysis.patching.path_patch_hooks` patches: the
    part of head h's output z at receiver queries q ∈ R that comes from sender keys k ∈ S,
    ``e[q] = Σ_{k∈S} A[q, k] v[k]`` (with grouped-query attention, v of the head's key-value group). EAP
    estimates the patching effect as ``Σ_{q∈R} (e_clean[q] - e_corrupted[q]) · ∂metric/∂z[q]`` at the corrupted
    run. With ``ig_steps=k`` (EAP-IG, Hanna et al. 2024) the gradient is averaged over k runs whose input
    residual stream (``blocks.0.hook_resid_pre``) is interpolated between corrupted and clean at the midpoints
    α = (j - ½)/k. Inputs must be position-aligned.

    EAP-IG's limit as k grows is the integrated gradient along the *input* path, which is not the effect of
    patching one edge while every other stays corrupted (they differ wherever the model is not linear).
    ``ig_path="edge"`` integrates along the edge itself instead: head h's z at the receivers is moved by
    ``α · (e_clean - e_corrupted)``, everything else corrupted, and the gradient there averaged over the k
    midpoints. At α = 1 that *is* path patching, so the estimate converges to exact edge patching (midpoint rule:
    error O(1/k²)) — but it costs k forward + backward passes per edge, k times exhaustive path patching. Use it
    to check EAP / EAP-IG on a few edges, not as a shortcut."""
    from av_lens.analysis.patching import check_aligned

    clean, corrupted = model.encode(model.to_input(clean)), model.encode(model.to_input(corrupted))
    check_aligned(clean, corrupted)
    layers = check_layers(model, layers, "edge-attribution layers")
    if ig_steps is not None and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise InputError(f"ig_steps must be a positive integer or None, got {ig_steps!r}",
                         "use None for EAP or e.g. ig_steps=5 for EAP-IG")
    if ig_path not in ("input", "edge"):
        raise InputError(f"unknown ig_path {ig_path!r}", "use ig_path='input' (EAP-IG) or 'edge' (per-edge IG)")
    if ig_path == "edge" and ig_steps is None:
        raise InputError("ig_path='edge' needs ig_steps", "pass e.g. ig_steps=8")
    senders = {s: s for s in senders} if not isinstance(senders, dict) else dict(senders)
    receivers = {s: s for s in receivers} if not isinstance(receivers, dict) else dict(receivers)
    if not senders or not receivers:
        raise InputError("edge attribution needs sender and receiver groups", "pass e.g. senders=('audio', 'video')")
    lay = clean.layout
    S = torch.stack([selector_mask(lay, s, f"sender group '{n}'") for n, s in senders.items()]).float()
    R = torch.stack([selector_mask(lay, s, f"receiver group '{n}'") for n, s in receivers.items()]).float()
    n_rep = model.cfg.n_rep
    names = [EMBED] + [f"blocks.{l}.attn.hook_{a}" for l in layers for a in ("pattern", "v")]

    def edge_sums(cache, l) -> Tensor:
        """[sender, batch, q, head, d_head]: Σ_{k∈S} A[b, h, q, k] v[b, k, h // n_rep]."""
        p = cache[f"blocks.{l}.attn.hook_pattern"].detach()
        v = cache[f"blocks.{l}.attn.hook_v"].detach().repeat_interleave(n_rep, dim=2)
        return torch.einsum("bhqk,sbk,bkhd->sbqhd", p, S.to(p.device, p.dtype), v)

    def run(x, alpha=None, emb_clean=None, emb_corr=None, want_grad=False):
        store: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}

        def keep(act, hook):
            store[hook.name] = act.detach()

        def track_z(z, hook):
            z.register_hook(lambda g, name=hook.name: grads.__setitem__(name, g.detach()))

        def leaf(resid, hook):
            if alpha is not None:
                resid = emb_corr + alpha * (emb_clean - emb_corr)
            return resid.detach().requires_grad_(True)

        hooks = [(n, keep) for n in names]
        if want_grad:
            hooks = [(EMBED, leaf)] + hooks + [(f"blocks.{l}.attn.hook_z", track_z) for l in layers]
            with torch.enable_grad():
                m = metric(model.run_with_hooks(x, fwd_hooks=hooks))
                if not isinstance(m, Tensor) or m.numel() != 1 or not m.requires_grad:
                    raise InputError("the edge-attribution metric must return a scalar tensor computed from the logits",
                                     "reduce over the batch, e.g. (logits[:, -1, a] - logits[:, -1, b]).mean()")
                m.backward()
            return float(m.detach()), store, grads
        with torch.no_grad():
            m = metric(model.run_with_hooks(x, fwd_hooks=hooks))
        return float(m), store, grads

    clean_metric, clean_cache, _ = run(clean)
    corrupted_metric, corr_cache, g = run(corrupted, want_grad=True)
    emb_clean, emb_corr = clean_cache[EMBED], corr_cache[EMBED]          # the input residual of both runs
    if ig_steps is not None and ig_path == "edge":
        return _edge_ig(model, corrupted, metric, layers, edge_sums, clean_cache, corr_cache, R, list(senders),
                        list(receivers), clean_metric, corrupted_metric, ig_steps)
    if ig_steps is not None:
        acc = {n: torch.zeros_like(t) for n, t in g.items()}
        for j in range(ig_steps):
            _, _, gj = run(corrupted, (j + 0.5) / ig_steps, emb_clean, emb_corr, want_grad=True)
            for n in acc:
                acc[n] += gj[n] / ig_steps
        g = acc
    out = []
    for l in layers:
        delta = edge_sums(clean_cache, l) - edge_sums(corr_cache, l)            # [s, b, q, h, d]
        gz = g[f"blocks.{l}.attn.hook_z"].to(delta.dtype)                       # [b, q, h, d]
        out.append(torch.einsum("sbqhd,bqhd,rbq->hsr", delta, gz, R.to(delta.device, delta.dtype)).float().cpu())
    return EdgeAttributionResult(torch.stack(out), layers, list(senders), list(receivers), clean_metric,
                                 corrupted_metric, ig_steps)


def _edge_ig(model, corrupted, metric, layers, edge_sums, clean_cache, corr_cache, R, senders, receivers,
             clean_metric, corrupted_metric, k) -> EdgeAttributionResult:
    """Per-edge integrated gradients: for each edge, k corrupted runs with head h's z at the receivers moved by
    α · Δ_edge (α = (j - ½)/k), the gradient there dotted with Δ_edge and averaged."""
    out = torch.zeros(len(layers), model.cfg.n_heads, len(senders), len(receivers))
    for li, l in enumerate(layers):
        deltas = edge_sums(clean_cache, l) - edge_sums(corr_cache, l)                 # [s, b, q, h, d]
        for h in range(model.cfg.n_heads):
            for si in range(len(senders)):
                for ri in range(len(receivers)):
                    d = torch.zeros_like(deltas[si])
                    rows = R[ri].to(d.device).bool()
                    d[:, :, h] = deltas[si][:, :, h] * rows[..., None]
                    total = 0.0
                    for j in range(k):
                        alpha, grad = (j + 0.5) / k, {}

                        def move(z, hook, alpha=alpha, d=d, grad=grad):
                            z = z + alpha * d.to(z.dtype)
                            z.register_hook(lambda g: grad.__setitem__("z", g.detach()))
                            return z

                        with torch.enable_grad():
                            m = metric(model.run_with_hooks(corrupted, fwd_hooks=[
                                (EMBED, _leaf), (f"blocks.{l}.attn.hook_z", move)]))
                            m.backward()
                        total += float((grad["z"].to(d.dtype) * d).sum()) / k
                    out[li, h, si, ri] = total
    return EdgeAttributionResult(out, layers, senders, receivers, clean_metric, corrupted_metric, k, "edge")


# --------------------------------------------------------------------------------- teacher-forced answers
def teacher_forced(clean, corrupted, answer) -> tuple:
    """Both inputs extended by the same answer tokens, and a metric: the answer's mean log-probability.

    ``answer``: token ids ``[n]`` / ``[batch, n]``, or a :class:`~av_lens.generation.Generation` (its new tokens,
    e.g. the clean run's greedy caption). Attribution (or exact) patching on the extended pair then asks which
    nodes make the corrupted run produce the clean answer — the study's captions, teacher-forced in one forward::

        gen = model.generate(clean, max_new_tokens=4)
        clean_x, corrupted_x, metric = teacher_forced(clean, corrupted, gen)
        atp = attribution_patch(model, clean_x, corrupted_x, metric)

    The metric scores the positions that predict each answer token (the last prompt position and the answer's
    own positions but the last), averaged over answer tokens and samples."""
    tokens = getattr(answer, "new_tokens", answer)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim == 1:
        tokens = tokens[None].expand(clean.input_ids.shape[0], -1)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise InputError(f"the answer has shape {tuple(tokens.shape)}", "pass [n] or [batch, n] token ids, n >= 1")
    clean_x, corrupted_x = clean.extend(tokens), corrupted.extend(tokens)
    n = tokens.shape[1]

    def metric(logits: Tensor) -> Tensor:
        lp = logits[:, -n - 1:-1].float().log_softmax(-1)
        return lp.gather(-1, tokens.to(lp.device)[..., None]).squeeze(-1).mean()

    return clean_x, corrupted_x, metric
