"""Attention knockout: cut the edges from one group of positions to another in a window of layers.

The study blocks attention from *generated* tokens to *video* tokens (G↛V) in deep layers, in the prefill
and at every decoding step, and the counterfactual audio fidelity of the captions rises; G↛A lowers it.
As composable hooks:

    hooks = knockout_hooks(model, query="generated", keys="video", layers=range(20, 36))
    gen = model.generate(inputs, max_new_tokens=64, fwd_hooks=hooks)

and as a sweep over windows with a metric:

    sweep = knockout_sweep(model, inputs, "last_prompt", "video", sliding_windows(model.cfg.n_layers, 4),
                           metric=lambda logits, inp: logits[0, -1, bark] - logits[0, -1, ring])

The hooks edit each layer's additive attention mask (``blocks.{l}.attn.hook_attn_mask``): the blocked
(query, key) entries get the dtype's minimum, so attention keeps its SDPA path and no pattern is
materialised. During KV-cached decoding the mask is [batch, 1, 1, cache + 1] and ``model.run_state`` says
which absolute position the query is, so a "generated" query is blocked at every step. A query row left
with no key to attend to is refused with an error (softmax would silently spread it uniformly).

A sweep encodes the media once (``model.encode``) and reuses the encoder outputs for every window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from av_lens.analysis._common import as_window, check_layers, check_run_match, current_rows, selector_mask
from av_lens.errors import InputError
from av_lens.layout import SelectorLike


def knockout_hooks(model, query: SelectorLike = "generated", keys: SelectorLike = "video",
                   layers=None) -> list[tuple[str, Callable]]:
    """Hooks that block attention from ``query`` positions to ``keys`` positions in ``layers`` (default all)."""
    layers = check_layers(model, layers, "knockout layers")

    warned: set = set()

    def hook(mask: Tensor, hook) -> Tensor:
        layout, qs, n = current_rows(model)
        K = mask.shape[-1]
        qfull = selector_mask(layout, query, "query", require=False)
        kfull = selector_mask(layout, keys, "key", require=False)
        check_run_match(model.run_state, keys, kfull, "key", "knockout", warned)
        check_run_match(model.run_state, query, qfull, "query", "knockout", warned)
        qm, km = qfull[:, qs:qs + n], kfull[:, :K]
        block = (qm[:, None, :, None] & km[:, None, None, :]).to(mask.device)
        if not block.any():
            return mask
        lo = torch.finfo(mask.dtype).min
        open_before = mask > lo / 2
        left = open_before & ~block
        dead = open_before.any(-1) & ~left.any(-1)
        if dead.any():
            b, _, q = dead.nonzero()[0].tolist()
            raise InputError(f"the knockout {query!r} -> {keys!r} leaves query position {qs + q} of sample {b} "
                             "with no key to attend to",
                             "exclude the blocked keys from the query group, or block a smaller key group")
        return mask.masked_fill(block.expand_as(mask), lo)

    return [(f"blocks.{l}.attn.hook_attn_mask", hook) for l in layers]


def sliding_windows(n_layers: int, width: int, stride: int = 1) -> list[range]:
    """Windows ``range(l, l + width)`` (half-open) sliding over the layers."""
    if not 1 <= width <= n_layers:
        raise InputError(f"window width {width} does not fit in {n_layers} layers", f"use 1 <= width <= {n_layers}")
    if stride < 1:
        raise InputError(f"stride must be >= 1, got {stride}", "use stride=1")
    return [range(l, l + width) for l in range(0, n_layers - width + 1, stride)]


def from_layer_windows(n_layers: int) -> list[range]:
    """Windows "from layer l on": [l, n_layers) for every l."""
    return [range(l, n_layers) for l in range(n_layers)]


@dataclass
class SweepResult:
    """A metric per knockout window, with the metric of the unedited run."""

    windows: list[range]
    values: Tensor        # [window, ...] (whatever shape the metric returns)
    baseline: Tensor
    query: str
    keys: str

    @property
    def effect(self) -> Tensor:
        return self.values - self.baseline

    def table(self) -> str:
        rows = [f"{'window':>10} {'metric':>10} {'effect':>10}",
                f"{'none':>10} {float(self.baseline.float().mean()):10.4f} {0.0:10.4f}"]
        for w, v, e in zip(self.windows, self.values, self.effect):
            label = f"{w.start}:{w.stop}"  # half-open, as the windows themselves
            rows.append(f"{label:>10} {float(v.float().mean()):10.4f} {float(e.float().mean()):10.4f}")
        return "\n".join(rows)


def knockout_sweep(model, inputs, query: SelectorLike, keys: SelectorLike, windows: Sequence[Sequence[int]],
                   metric: Callable, *, generate: dict | None = None, progress: bool = True) -> SweepResult:
    """Evaluate ``metric`` with the knockout applied in each window (and once without).

    Without ``generate``, ``metric(logits, inputs)`` scores one forward. With ``generate=dict(max_new_tokens=..)``
    the model generates under the knockout (prefill and every step) and ``metric(generation, inputs)`` scores
    the result (e.g. a caption-fidelity scorer). Returns metric values as a tensor [window, ...]."""
    from tqdm.auto import tqdm

    inputs = model.to_input(inputs)
    selector_mask(inputs.layout, keys, "key")
    if generate is None or "generated" not in str(query):
        selector_mask(inputs.layout, query, "query")
    windows = list(windows)
    if not windows:
        raise InputError("no knockout windows given", "pass e.g. sliding_windows(model.cfg.n_layers, 4)")
    windows = [as_window(w, model.cfg.n_layers) for w in windows]
    inputs = model.encode(inputs)

    def run(hooks) -> Tensor:
        with torch.no_grad():
            if generate is None:
                out = metric(model.run_with_hooks(inputs, fwd_hooks=hooks), inputs)
            else:
                out = metric(model.generate(inputs, fwd_hooks=hooks, **generate), inputs)
        return torch.as_tensor(out).detach().float().cpu()

    baseline = run([])
    values = [run(knockout_hooks(model, query, keys, w))
              for w in tqdm(windows, desc=f"knockout {query}->{keys}", disable=not progress)]
    return SweepResult(list(windows), torch.stack(values), baseline, str(query), str(keys))


def token_drop_sweep(model, inputs, drop: SelectorLike, metric: Callable, *, start_layers: Sequence[int] | None = None,
                     generate: dict | None = None, progress: bool = True) -> SweepResult:
    """"Drop ``drop``'s tokens from layer L on": for each L, no other position attends to them in layers
    L..n_layers-1 (prefill and, with ``generate``, every decoding step), and ``metric`` is measured.

    The curve of SEATS / "From Senses to Decisions": where it reaches the baseline, the model no longer needs
    the dropped tokens. Built on :func:`knockout_sweep` with queries = every position not in ``drop`` and
    windows ``range(L, n_layers)``; ``start_layers`` defaults to every layer. The dropped positions keep
    attending among themselves (what they compute no longer reaches anyone else)."""
    from av_lens.layout import as_selector

    n = model.cfg.n_layers
    starts = check_layers(model, range(n) if start_layers is None else start_layers, "token-drop start layers")
    query = as_selector("all") - as_selector(drop)
    return knockout_sweep(model, inputs, query, drop, [range(l, n) for l in starts], metric, generate=generate,
                          progress=progress)
