"""Small pieces the analysis tools share: layer checks, selector resolution against the running forward."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import ModalityLayout, SelectorLike, as_selector


def check_layers(model, layers: Iterable[int] | None, what: str = "layers") -> list[int]:
    """``layers`` as a sorted list of valid block indices (None: all)."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise InputError(f"{what} must be a list or range of layer indices, got {layers!r}",
                         f"pass e.g. [{layers}] for one layer or range(0, {n}) for all (half-open)"
                         if isinstance(layers, int) else f"pass e.g. [0, 3] or range(0, {n})")
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise InputError(f"{what} is empty", f"pass at least one layer in 0..{n - 1}")
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise InputError(f"{what} {bad} outside the model's blocks 0..{n - 1}",
                         f"use layers in range({n}) (negative indices are not accepted)")
    return layers


def as_window(w, n_layers: int | None = None, what: str = "knockout window") -> range:
    """A layer window as a half-open ``range(start, stop)`` (layers start..stop-1), the one convention of av_lens.

    Accepts a ``range`` (step 1), a ``slice`` or a ``"start:stop"`` string. Lists and tuples are refused: the old
    ``[first, last]`` (inclusive) form and a half-open ``(start, stop)`` pair look the same, so either reading
    could silently be the wrong one; an explicit list of layers belongs to ``knockout_hooks(layers=[...])``."""
    if isinstance(w, str):
        lo, sep, hi = w.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            w = range(int(lo), int(hi))
        except ValueError:
            raise InputError(f"cannot read the {what} {w!r}",
                             "write windows as half-open start:stop layer ranges, e.g. '0:4' for layers 0..3") from None
    elif isinstance(w, slice):
        if w.start is None or w.stop is None or w.step not in (None, 1):
            raise InputError(f"the {what} {w!r} needs a start and a stop (and no step)", "pass e.g. slice(0, 4)")
        w = range(w.start, w.stop)
    elif isinstance(w, (list, tuple)):
        seq = list(w)
        if len(seq) == 2 and all(isinstance(x, int) for x in seq):
            a, b = seq
            raise InputError(f"the {what} {w!r} is ambiguous: it reads as layers {a}..{b} (first-last) or as "
                             f"layers {a}..{b - 1} (half-open)",
                             f"pass range({a}, {b + 1}) for layers {a}..{b}, or range({a}, {b}) for layers "
                             f"{a}..{b - 1}: windows are half-open Python ranges (sliding_windows returns them)")
        raise InputError(f"the {what} {w!r} is a {type(w).__name__}, not a range",
                         "pass a half-open range(start, stop), e.g. range(0, 4) for layers 0..3 (for a set of "
                         "single layers use knockout_hooks(model, q, k, layers=[...]))")
    if not isinstance(w, range):
        raise InputError(f"the {what} {w!r} is a {type(w).__name__}, not a range",
                         "pass a half-open range(start, stop), e.g. range(0, 4) for layers 0..3")
    if w.step != 1:
        raise InputError(f"the {what} {w!r} has step {w.step}", "pass a contiguous range(start, stop) (step 1)")
    if len(w) == 0:
        raise InputError(f"the {what} {w.start}:{w.stop} is empty (half-open: stop must be larger than start)",
                         f"pass range({w.start}, {w.start + 1}) for layer {w.start} alone")
    if n_layers is not None and not (0 <= w.start and w.stop <= n_layers):
        raise InputError(f"the {what} {w.start}:{w.stop} is outside the model's layers 0:{n_layers}",
                         f"use windows within 0:{n_layers} (half-open; the last layer is {n_layers - 1})")
    return w


def selector_mask(layout: ModalityLayout, sel: SelectorLike, what: str, *, require: bool = True) -> Tensor:
    """Bool [batch, pos] of ``sel`` on ``layout``; with ``require`` an empty selection is an error."""
    mask = layout.mask(as_selector(sel)) & layout.attention_mask.bool()
    if require and not mask.any():
        raise InputError(f"the {what} selector {sel!r} matches no position of this input",
                         f"choose positions that exist here: {layout.counts()}"
                         + ("; 'generated' positions exist only inside generate() or on an input "
                            "extended with AVInput.extend()" if "generated" in str(sel) else ""))
    return mask


def check_run_match(st, sel, mask: Tensor, what: str, tool: str, warned: set) -> None:
    """A hook's selector against the forward now running (``st`` = ``model.run_state``; ``mask`` = the selector's
    [batch, pos] mask over ``st.layout``): no match at all is an :class:`InputError`, except ``"generated"``
    in the prefill of ``generate()``; a match in only some samples of a batch warns once (``warned`` remembers)."""
    per_sample = mask.any(-1)
    if bool(per_sample.all()):
        return
    if not bool(per_sample.any()):
        if st.cache is not None and st.query_start == 0 and "generated" in str(sel):
            return  # the prefill of generate(): generated positions come with the decoding steps
        gen = ("; 'generated' positions exist only inside generate() or on an input extended with AVInput.extend()"
               if "generated" in str(sel) else "")
        raise InputError(f"the {tool} {what} selector {sel!r} matches no position of the running input, so the "
                         f"hook would change nothing",
                         f"choose positions that exist here: {st.layout.counts()}{gen}")
    if what not in warned:
        warned.add(what)
        from av_lens.errors import warn

        missing = (~per_sample).nonzero().squeeze(-1).tolist()
        warn(f"the {tool} {what} selector {sel!r} matches no position in sample(s) {missing} of this batch; "
             "those samples are left unedited",
             "this is fine for a mixed batch; otherwise give every sample the positions", stacklevel=5)


def current_rows(model) -> tuple[ModalityLayout, int, int]:
    """(layout, first query position, number of query positions) of the forward now running."""
    st = getattr(model, "run_state", None)
    if st is None:
        raise InputError("this hook needs model.run_state, which only exists while the model runs",
                         "use the hooks with model.run_with_hooks / run_with_cache / generate")
    return st.layout, st.query_start, st.n_query


def group_masks(layout: ModalityLayout, groups: dict[str, SelectorLike]) -> Tensor:
    """Float [group, batch, pos]: 1 where the position belongs to the group (padding excluded)."""
    real = layout.attention_mask.bool()
    return torch.stack([(layout.mask(as_selector(s)) & real).float() for s in groups.values()])
