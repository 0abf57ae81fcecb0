"""Checks on what users hand to hooks and what their hooks return, with the hook's name in every message.

A TransformerLens hook is ``fn(activation, hook) -> activation | None``. Without these checks a hook that returns
a numpy array, a tensor of another shape or dtype, or a bool mask from ``hook_attn_mask`` fails deep inside torch
(or, for the bool mask, silently makes attention non-causal). :func:`checked_hook` wraps each forward hook as it
is attached (``run_with_hooks``, ``hooks()``, ``add_hook``, ``generate(fwd_hooks=...)``) and checks its return:
a tensor, of the activation's shape (or one that broadcasts to it), dtype and device. Only metadata is read, so
the cost is a few attribute lookups per hook call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from av_lens.errors import InputError


def check_hook_pairs(hooks, what: str = "fwd_hooks") -> list:
    """``hooks`` as a list of ``(name, fn)`` pairs, or an :class:`InputError` naming what is wrong."""
    if hooks is None:
        return []
    if isinstance(hooks, tuple) and len(hooks) == 2 and (isinstance(hooks[0], str) or callable(hooks[0])) \
            and callable(hooks[1]):
        raise InputError(f"{what} is one (name, hook) pair, not a list of pairs",
                         f"wrap it in a list: {what}=[({hooks[0]!r}, fn)]")
    try:
        pairs = list(hooks)
    except TypeError:
        raise InputError(f"{what} is a {type(hooks).__name__}, not a list of (name, hook) pairs",
                         f"pass {what}=[('blocks.0.hook_resid_post', fn), ...]") from None
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise InputError(f"{what}[{i}] is {p!r:.80}, not a (name, hook) pair",
                             f"pass {what}=[('blocks.0.hook_resid_post', fn), ...]")
        check_callable(p[0] if isinstance(p[0], str) else f"{what}[{i}]", p[1])
    return pairs


def check_callable(name, fn) -> None:
    if not callable(fn):
        raise InputError(f"the hook given for {name!r} is a {type(fn).__name__} ({fn!r:.60}), not a function",
                         "pass a function fn(activation, hook) that returns the activation (edited) or None")


def check_return(name: str, x, out) -> None:
    """The value a forward hook on ``name`` returned, against the activation ``x`` it was given."""
    if not isinstance(out, torch.Tensor):
        conv = " (convert with torch.as_tensor(a, dtype=x.dtype, device=x.device))" if hasattr(out, "__array__") else ""
        raise InputError(f"the hook on {name!r} returned a {type(out).__name__}, not a torch.Tensor",
                         f"return the activation tensor (edited in place or new){conv}, or None to leave it as it is")
    if not isinstance(x, torch.Tensor):
        return
    if name.endswith("hook_attn_mask") and out.dtype == torch.bool and x.dtype != torch.bool:
        raise InputError(f"the hook on {name!r} returned a bool mask, but the attention mask here is additive "
                         f"({x.dtype}: 0 = attend, the dtype's minimum = blocked); a bool mask would be added as 0/1 "
                         "and leave every position visible (attention no longer causal)",
                         "edit the mask additively: mask.masked_fill(block, torch.finfo(mask.dtype).min)")
    if tuple(out.shape) != tuple(x.shape):
        try:
            ok = torch.broadcast_shapes(out.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(f"the hook on {name!r} returned shape {tuple(out.shape)} but the activation has "
                             f"{tuple(x.shape)}", "return a tensor of the activation's shape (edit it with indexing, "
                                                  "e.g. x[:, pos] = ...; return x)")
    if out.dtype != x.dtype:
        raise InputError(f"the hook on {name!r} returned dtype {out.dtype} but the activation is {x.dtype}",
                         "convert before returning: return out.to(x.dtype)")
    if out.device != x.device:
        raise InputError(f"the hook on {name!r} returned a tensor on {out.device} but the activation is on "
                         f"{x.device}", "return out.to(x.device)")


def checked_hook(fn: Callable, dir: str = "fwd") -> Callable:
    """``fn`` wrapped so that its return value is checked (forward hooks; backward hooks pass through)."""
    if dir != "fwd" or getattr(fn, "_av_lens_checked", False):
        return fn

    def hook(x, hook):
        out = fn(x, hook=hook)
        if out is not None and out is not x:
            check_return(getattr(hook, "name", None) or "?", x, out)
        return out

    hook._av_lens_checked = True
    hook.__wrapped__ = fn
    hook.__name__ = getattr(fn, "__name__", "hook")
    return hook
