"""Generation with a KV cache, 3-D decode positions and hooks active at every step.

The prompt runs once (prefill, encoders included) filling a :class:`KVCache`; each new token then runs
alone. Its TMRoPE position is one past the previous position — the first generated token sits at the
prompt's largest position + 1 (not at the sequence length: media blocks compress time), and all three
axes are equal for text. The layout grows with the sequence (``generated`` positions), and
``model.run_state`` tells hooks whether they are in the prefill or in decoding step k, so that a knockout
hook can block edges to video keys in both.

Hooks given as ``fwd_hooks`` are attached for the whole call and removed afterwards, also on error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from av_lens.components.attention import KVCache
from av_lens.errors import InputError
from av_lens.inputs import AVInput
from av_lens.layout import ModalityLayout


@dataclass
class Generation:
    """The result of :func:`generate`: full sequences, the new tokens, their text and the grown layout."""

    sequences: Tensor  # [batch, prompt + new]
    new_tokens: Tensor  # [batch, new] (pad id after an end-of-turn token)
    text: list[str] | None
    layout: ModalityLayout
    logits: list[Tensor] | None = None  # per step, [batch, d_vocab], when return_logits=True


def _sample(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, inputs, max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_ids: tuple[int, ...] | None = None, stop_at_eos: bool = True, fwd_hooks=(),
             return_logits: bool = False, verbose: bool = False, eos_token_id: int | list[int] | None = None,
             freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
             return_type: Literal["str", "tokens", "input"] | None = None, prepend_bos: bool | None = None,
             padding_side: Literal["left", "right"] | None = None):
    """Continue ``inputs`` by up to ``max_new_tokens`` tokens (greedy unless ``do_sample``).

    Encoders run once in the prefill. ``fwd_hooks`` (TransformerLens ``(name, fn)`` pairs) apply to the
    prefill and every decoding step.

    TransformerLens's keywords have TL's meaning: ``stop_at_eos``, ``eos_token_id`` (one id or a list; the same
    as ``eos_token_ids``), ``do_sample``/``top_k``/``top_p``/``temperature``, ``freq_penalty`` (subtracted from a
    token's logit once per earlier occurrence in the sequence; as in TL only when sampling),
    ``use_past_kv_cache`` (False: every step reruns the whole sequence, hooks see all of it), ``verbose``
    (a progress bar), ``prepend_bos``/``padding_side`` (string inputs) and ``return_type``: ``"tokens"`` the full
    sequences [batch, pos + new], ``"str"`` their decoded text (one string for a string input), ``"input"`` the
    type of the input (a string for a string, tokens for tokens, and for an :class:`AVInput` the input extended
    by the new tokens). Defaults differ from TL's on purpose: greedy (TL samples), no progress bar (TL shows
    one), and ``return_type=None`` returns a :class:`Generation` (sequences, new tokens, text, grown layout).
    """
    from av_lens.input_checks import check_context, check_generation_args, check_left_padded

    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    original = inputs
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs)):
        inputs = model.to_tokens(inputs, prepend_bos=prepend_bos, padding_side=padding_side)
    inp = model.to_input(inputs, prepend_bos=prepend_bos, padding_side=padding_side)
    model._check_input(inp)
    check_context(model, inp, max_new_tokens)
    if return_type not in (None, "str", "tokens", "input"):
        raise InputError(f"return_type must be 'str', 'tokens', 'input' or None, got {return_type!r}",
                         "pass one of those (None returns a Generation with sequences, new tokens, text and layout)")
    if eos_token_id is not None:
        eos_token_ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    check_left_padded(inp)
    eos = tuple(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos[0] if eos else 0)
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    dev = model.device
    B = inp.input_ids.shape[0]
    cache = KVCache(model.cfg.n_layers) if use_past_kv_cache else None
    layout = inp.layout
    key_mask = inp.attention_mask.to(dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    new_tokens, step_logits = [], []
    counts = None
    if freq_penalty and do_sample:
        counts = torch.zeros(B, model.cfg.d_vocab_out, device=dev)
        counts.scatter_add_(1, inp.input_ids.to(dev), inp.attention_mask.to(dev, counts.dtype))
    from tqdm.auto import tqdm

    with model.hooks(fwd_hooks=list(fwd_hooks)):
        with model.running(layout, 0, layout.shape[1], cache):
            logits = model.run_backbone(model.embed_input(inp), layout.position_ids.to(dev), key_mask, cache=cache,
                                        input_ids=inp.input_ids.to(dev))
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            last = logits[:, -1].to(dev)  # a placed model's logits come out on the last device
            if return_logits:
                step_logits.append(last.float().cpu())
            if counts is not None:
                last = last.float() - freq_penalty * counts
            tok = _sample(last, do_sample, temperature, top_k, top_p, gen)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            new_tokens.append(tok)
            if counts is not None:
                counts.scatter_add_(1, tok[:, None], torch.ones(B, 1, device=dev))
            if stop_at_eos and eos:
                finished |= torch.isin(tok, torch.tensor(eos, device=dev))
            layout = layout.extend(1, tok[:, None].cpu())
            if step == max_new_tokens - 1 or (stop_at_eos and bool(finished.all())):
                break
            key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=key_mask.dtype, device=dev)], 1)
            if cache is None:  # no KV cache: the whole sequence again
                full = inp.extend(torch.stack(new_tokens, dim=1).cpu())
                with model.running(layout, 0, layout.shape[1]):
                    logits = model.run_backbone(model.embed_input(full), layout.position_ids.to(dev), key_mask,
                                                input_ids=full.input_ids.to(dev))
                continue
            with model.running(layout, layout.shape[1] - 1, 1, cache):
                logits = model.run_backbone(model.embed(tok[:, None]), layout.position_ids[:, :, -1:].to(dev),
                                            key_mask, cache=cache, input_ids=tok[:, None])
    new = torch.stack(new_tokens, dim=1)
    text = [model.tokenizer.decode(t, skip_special_tokens=True) for t in new.cpu()] if model.tokenizer else None
    sequences = torch.cat([inp.input_ids, new.to(inp.input_ids.device)], 1)
    if return_type == "tokens" or (return_type == "input" and isinstance(original, Tensor)):
        return sequences
    if return_type == "input" and isinstance(original, AVInput):
        return inp.extend(new.cpu())
    if return_type in ("str", "input"):
        out = model.tokenizer.batch_decode(sequences.cpu(), clean_up_tokenization_spaces=False)
        return out[0] if isinstance(original, str) else out
    return Generation(sequences=sequences, new_tokens=new, text=text, layout=layout,
                      logits=step_logits if return_logits else None)
