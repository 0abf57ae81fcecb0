"""Checks on run and generation arguments that would otherwise pass silently: the context length, sampling
settings. Each raises an :class:`~av_lens.errors.InputError` naming the value and the fix, before any compute."""

from __future__ import annotations

import math
import numbers

from av_lens.errors import InputError


def last_position(inp) -> int:
    """The largest (TMRoPE) position id of ``inp`` (media blocks compress time, so not always its length - 1)."""
    pos = inp.layout.position_ids
    return int(pos.max()) if pos.numel() else -1


def check_context(model, inp, new_tokens: int = 0) -> None:
    """Refuse an input (plus ``new_tokens`` to generate) whose positions run past the model's context length."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if not n_ctx:
        return
    last = last_position(inp) + new_tokens
    length = inp.input_ids.shape[1] + new_tokens
    if last < n_ctx and length <= n_ctx:
        return
    what = f"{inp.input_ids.shape[1]} tokens (positions up to {last_position(inp)})"
    if new_tokens:
        raise InputError(f"the prompt has {what} and max_new_tokens={new_tokens} would reach position {last}, past "
                         f"the model's context of {n_ctx} positions (max_position_embeddings)",
                         f"lower max_new_tokens to at most {max(0, n_ctx - 1 - last_position(inp))}, or shorten the "
                         "prompt / media")
    raise InputError(f"the input has {what}, past the model's context of {n_ctx} positions "
                     "(max_position_embeddings); the model was never trained on such positions",
                     "shorten the prompt, use fewer frames (lower fps or max_frames) or a shorter clip")


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if not (isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool)):
        raise InputError(f"max_new_tokens must be an integer, got {max_new_tokens!r} "
                         f"({type(max_new_tokens).__name__})", f"pass e.g. max_new_tokens=32")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", "ask for one or more tokens")
    if not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}", "pass do_sample=True to sample")
    if not (_real(temperature) and math.isfinite(temperature)):
        raise InputError(f"temperature must be a finite number, got {temperature!r}", "pass e.g. temperature=0.7")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}",
                         "pass a positive temperature to sample, or do_sample=False for greedy decoding")
    if do_sample and temperature == 0:
        raise InputError("do_sample=True with temperature=0 is greedy decoding in disguise",
                         "pass do_sample=False for greedy decoding, or a positive temperature")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 0):
        raise InputError(f"top_k must be a non-negative integer or None, got {top_k!r}",
                         "pass e.g. top_k=50 (0 or None: no top-k filter)")
    if top_p is not None and not (_real(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p must lie in (0, 1], got {top_p!r}", "pass e.g. top_p=0.9 (1.0 or None: no filter)")


def check_left_padded(inp) -> None:
    """Generation appends new tokens at the end of every row, so padding must be on the left: a row whose real
    tokens are followed by padding would continue after its pads."""
    am = inp.attention_mask
    if am.shape[0] < 2 and bool(am.all()):
        return
    real = am.bool()
    # a pad (0) after a real token (1) in the same row = right padding
    after_real = real.long().cummax(-1).values.bool() & ~real
    if bool(after_real.any()):
        rows = after_real.any(-1).nonzero().squeeze(-1).tolist()
        raise InputError(f"the input is right-padded (sample(s) {rows} have padding after their last real token), "
                         "so generate() would continue those samples after their pads",
                         "pad on the left: model.prepare(...) does; with a tokenizer, set tokenizer.padding_side = "
                         "'left' (or pass padding_side='left')")
