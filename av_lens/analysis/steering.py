"""Steering: add a direction to the residual stream at chosen positions, in the prefill and every decoding step.

2026 papers on audio-visual and audio LLMs steer with a direction built from two sets of runs — audio minus
silence ("Are Audio-Language Models Listening?"), the playing sound minus another, factual minus
counterfactual — added at the audio positions (or the last prompt token, or every generated token) of one
or a few layers. As composable hooks:

    d = mean_difference(model, clips_of_bark, clips_of_ring, at="audio")      # [n_layers + 1, d_model]
    hooks = steering_hooks(model, d, at="audio", layers=[2], coeff=1.0)
    model.run_with_hooks(inputs, fwd_hooks=hooks)          # or model.generate(inputs, fwd_hooks=hooks)

and as a sweep over layer x coefficient with a metric:

    sweep = steering_sweep(model, inputs, d, at="audio", layers=range(4), coeffs=[0.5, 1, 2], metric=fn)
    sweep.table(); sweep.view()

A direction is either one vector ``[d_model]`` (the same in every layer) or one per residual-stream index
``[n_layers + 1, d_model]`` as :func:`mean_difference` returns it (index 0 is the input to block 0, index l
the output of block l-1, the convention of :func:`av_lens.analysis.probes.pooled_residuals`). The hook adds
``coeff * direction`` at ``blocks.{l}.hook_resid_pre`` (``point="resid_pre"``, residual index l) or
``blocks.{l}.hook_resid_post`` (``point="resid_post"``, index l + 1) at every query row the selector ``at``
picks: during KV-cached decoding only the new token is a query row, so ``at="audio"`` steers the prompt's
audio positions once (their keys and values are cached), while ``at="generated"`` steers every new token.

The hooks count what they steered (``hooks.n_steered``); :func:`steer` and :func:`steering_sweep` refuse a
selector that steered nothing, since a no-op intervention reads as "no effect".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from av_lens.analysis._common import check_layers, current_rows, selector_mask
from av_lens.errors import InputError
from av_lens.layout import SelectorLike

POINTS = ("resid_pre", "resid_post")


class SteeringHooks(list):
    """A list of ``(hook_name, fn)`` pairs that also counts what it steered: ``n_steered`` = (position, layer)
    edits made, summed over every forward the hooks ran in."""

    n_steered: int = 0

    def reset(self) -> None:
        self.n_steered = 0


def _direction_rows(model, direction: Tensor, what: str = "direction") -> Tensor:
    """``direction`` as [n_layers + 1, d_model] (a single vector is repeated)."""
    if not isinstance(direction, Tensor):
        raise InputError(f"the steering {what} is a {type(direction).__name__}, not a tensor",
                         "pass a torch tensor [d_model] or [n_layers + 1, d_model] (e.g. from mean_difference)")
    d, n = model.cfg.d_model, model.cfg.n_layers
    if direction.ndim == 1 and direction.shape[0] == d:
        direction = direction[None].expand(n + 1, -1)
    if direction.ndim != 2 or direction.shape != (n + 1, d):
        raise InputError(f"the steering {what} has shape {tuple(direction.shape)}; this model needs [{d}] or "
                         f"[{n + 1}, {d}] (one row per residual-stream index 0..{n})",
                         "build it with mean_difference(model, ...) or pass one d_model vector")
    if not torch.isfinite(direction).all():
        raise InputError(f"the steering {what} contains NaN or Inf", "check how the direction was computed")
    return direction.detach()


def steering_hooks(model, direction: Float[Tensor, "... d_model"], at: SelectorLike = "audio", *,
                   layers: Sequence[int], coeff: float = 1.0, point: str = "resid_pre") -> SteeringHooks:
    """Hooks that add ``coeff * direction`` to the residual stream at ``at``'s positions in ``layers``.

    Active in every forward the hooks are passed to: a plain run, and the prefill and each decoding step of
    ``generate``. ``layers`` must be given (steering every layer at once is rarely meant)."""
    if point not in POINTS:
        raise InputError(f"unknown steering point {point!r}", f"use one of {POINTS}")
    if layers is None:
        raise InputError("steering_hooks needs layers=", "pass e.g. layers=[2]")
    layers = check_layers(model, layers, "steering layers")
    rows = _direction_rows(model, direction)
    coeff = float(coeff)
    if coeff != coeff:
        raise InputError("the steering coefficient is NaN", "pass a finite number")
    hooks = SteeringHooks()
    shift = 0 if point == "resid_pre" else 1

    def make(l: int):
        vec = rows[l + shift]

        def hook(resid: Tensor, hook) -> Tensor:
            layout, qs, n = current_rows(model)
            m = selector_mask(layout, at, "steering", require=False)[:, qs:qs + n].to(resid.device)
            k = int(m.sum())
            if k == 0:
                return resid
            hooks.n_steered += k
            return resid + (coeff * m[..., None].to(resid.dtype)) * vec.to(resid.device, resid.dtype)

        return hook

    hooks.extend((f"blocks.{l}.hook_{point}", make(l)) for l in layers)
    return hooks


def steer(model, inputs, direction: Tensor, at: SelectorLike = "audio", *, layers: Sequence[int],
          coeff: float = 1.0, point: str = "resid_pre", generate: dict | None = None):
    """Run (or, with ``generate=dict(max_new_tokens=...)``, generate) under steering; returns logits or the
    generation. Refuses a selector that steered no position."""
    inputs = model.to_input(inputs)
    hooks = steering_hooks(model, direction, at, layers=layers, coeff=coeff, point=point)
    with torch.no_grad():
        out = (model.run_with_hooks(inputs, fwd_hooks=hooks) if generate is None
               else model.generate(inputs, fwd_hooks=hooks, **generate))
    _require_steered(hooks, at)
    return out


def _require_steered(hooks: SteeringHooks, at) -> None:
    if hooks.n_steered == 0:
        raise InputError(f"the steering selector {at!r} matched no position, so nothing was steered",
                         "pick positions that exist in this input (see inputs.layout.counts()); 'generated' "
                         "positions exist only under generate=")


# ------------------------------------------------------------------------------------------- directions
def mean_difference(model, inputs_a, inputs_b, at: SelectorLike = "audio", *, at_b: SelectorLike | None = None,
                    per_item: bool = False) -> Float[Tensor, "resid d_model"]:
    """Mean residual at ``at``'s positions over the runs of ``inputs_a`` minus that over ``inputs_b``.

    Returns ``[n_layers + 1, d_model]``, one row per residual-stream index. Each sample (or, with
    ``per_item``, each media item) is first mean-pooled over its selected positions, so every clip weighs the
    same. ``inputs_a`` / ``inputs_b``: an input batch or a list of batches. ``at_b`` (default ``at``) selects
    in ``inputs_b`` (e.g. audio minus the last prompt token of silent runs)."""
    a = _pooled_mean(model, inputs_a, at, per_item)
    b = _pooled_mean(model, inputs_b, at if at_b is None else at_b, per_item)
    return a - b


def _pooled_mean(model, batches, at, per_item: bool) -> Tensor:
    from av_lens.analysis.probes import pooled_residuals

    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    if not batches:
        raise InputError("no inputs given for a mean-difference direction", "pass an input batch or a list of them")
    total, n = None, 0
    for x in batches:
        f = pooled_residuals(model, x, at, per_item=per_item).double()  # [resid, items, d]
        total = f.sum(1) if total is None else total + f.sum(1)
        n += f.shape[1]
    return (total / n).float()


def probe_direction(probe, positive: int, negative: int | None = None) -> Float[Tensor, "d_model"]:
    """The read-out direction of a fitted :class:`~av_lens.analysis.probes.LinearProbe` in residual units.

    The probe scores ``((x - mu) / sd) @ W``, so class ``positive``'s logit rises fastest along
    ``W[:, positive] / sd``; with ``negative`` the direction is the difference of the two classes' rows, without
    it the positive row minus the mean of the others."""
    if probe.W is None:
        raise InputError("the probe is not fitted", "call probe.fit(X, y) first")
    k = probe.W.shape[1]
    for c in (positive, negative):
        if c is not None and not 0 <= c < k:
            raise InputError(f"class {c} is not one of the probe's classes 0..{k - 1}", "pass a class index")
    W = probe.W / probe.sd[:, None]
    other = W[:, negative] if negative is not None else (W.sum(1) - W[:, positive]) / max(k - 1, 1)
    return (W[:, positive] - other).float()


def random_direction_like(direction: Tensor, seed: int = 0) -> Tensor:
    """A Gaussian random direction with the same norm as ``direction`` (row by row): the control for steering."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(direction.shape, generator=g, dtype=torch.float64)
    norm = direction.double().norm(dim=-1, keepdim=True)
    return (r / r.norm(dim=-1, keepdim=True) * norm).to(direction.dtype)


# ---------------------------------------------------------------------------------------------- sweeps
@dataclass
class SteeringSweep:
    """A metric per (steered layer, coefficient), with the metric of the unsteered run."""

    layers: list[int]
    coeffs: list[float]
    values: Tensor      # [layer, coeff, ...]
    baseline: Tensor
    at: str
    point: str

    @property
    def effect(self) -> Tensor:
        return self.values - self.baseline

    def mean_values(self) -> Tensor:
        return self.values.float().reshape(len(self.layers), len(self.coeffs), -1).mean(-1)

    def table(self) -> str:
        m = self.mean_values()
        head = f"{'layer':>6} " + " ".join(f"{'c=' + format(c, 'g'):>9}" for c in self.coeffs)
        rows = [f"steering at {self.at} ({self.point}); unsteered metric {float(self.baseline.float().mean()):.4f}",
                head]
        rows += [f"{l:6d} " + " ".join(f"{float(v):9.4f}" for v in m[i]) for i, l in enumerate(self.layers)]
        return "\n".join(rows)

    def view(self, title: str | None = None):
        from av_lens.views.html import View
        from av_lens.views.plots import heatmap

        title = title or f"Steering at {self.at}: metric by layer and coefficient"
        m = self.mean_values()
        svg = heatmap(m, [f"layer {l}" for l in self.layers], [f"×{c:g}" for c in self.coeffs], title=title,
                      diverging=False, cell=48, fmt="{:.2f}")
        return View(svg, title)


def steering_sweep(model, inputs, direction: Tensor, at: SelectorLike = "audio", *, layers: Sequence[int],
                   coeffs: Sequence[float], metric: Callable, point: str = "resid_pre", generate: dict | None = None,
                   progress: bool = True) -> SteeringSweep:
    """Evaluate ``metric`` with the direction steered into each layer alone, at each coefficient.

    Without ``generate``, ``metric(logits, inputs)`` scores one forward; with ``generate=dict(...)``,
    ``metric(generation, inputs)``. Media are encoded once. Returns values ``[layer, coeff, ...]``."""
    from tqdm.auto import tqdm

    inputs = model.to_input(inputs)
    layers = check_layers(model, layers, "steering layers")
    coeffs = [float(c) for c in coeffs]
    if not coeffs:
        raise InputError("no steering coefficients given", "pass e.g. coeffs=[0.5, 1, 2]")
    _direction_rows(model, direction)
    if generate is None:
        selector_mask(inputs.layout, at, "steering")
    inputs = model.encode(inputs)

    def run(hooks) -> Tensor:
        with torch.no_grad():
            out = (model.run_with_hooks(inputs, fwd_hooks=hooks) if generate is None
                   else model.generate(inputs, fwd_hooks=hooks, **generate))
        return torch.as_tensor(metric(out, inputs)).detach().float().cpu()

    baseline = run([])
    values = []
    bar = tqdm(total=len(layers) * len(coeffs), desc=f"steering at {at}", disable=not progress)
    for l in layers:
        row = []
        for c in coeffs:
            bar.set_postfix_str(f"layer {l}, ×{c:g}")
            hooks = steering_hooks(model, direction, at, layers=[l], coeff=c, point=point)
            row.append(run(hooks))
            _require_steered(hooks, at)
            bar.update()
        values.append(torch.stack(row))
    bar.close()
    return SteeringSweep(layers, coeffs, torch.stack(values), baseline, str(at), point)
