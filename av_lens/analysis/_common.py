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
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise InputError(f"{what} is empty", f"pass at least one layer in 0..{n - 1}")
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise InputError(f"{what} {bad} outside the model's blocks 0..{n - 1}",
                         f"use layers in range({n}) (negative indices are not accepted)")
    return layers


def selector_mask(layout: ModalityLayout, sel: SelectorLike, what: str, *, require: bool = True) -> Tensor:
    """Bool [batch, pos] of ``sel`` on ``layout``; with ``require`` an empty selection is an error."""
    mask = layout.mask(as_selector(sel)) & layout.attention_mask.bool()
    if require and not mask.any():
        raise InputError(f"the {what} selector {sel!r} matches no position of this input",
                         f"choose positions that exist here: {layout.counts()}"
                         + ("; 'generated' positions exist only inside generate() or on an input "
                            "extended with AVInput.extend()" if "generated" in str(sel) else ""))
    return mask


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
