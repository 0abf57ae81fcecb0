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
def generate(model, inputs: AVInput, max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_ids: tuple[int, ...] | None = None, stop_at_eos: bool = True, fwd_hooks=(),
             return_logits: bool = False, verbose: bool = False) -> Generation:
    """Continue ``inputs`` by up to ``max_new_tokens`` tokens (greedy unless ``do_sample``).

    Encoders run once in the prefill. ``fwd_hooks`` (TransformerLens ``(name, fn)`` pairs) apply to the
    prefill and every decoding step.
    """
    from av_lens.input_checks import check_context, check_generation_args, check_left_padded

    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    inp = model.to_input(inputs)
    model._check_input(inp)
    check_context(model, inp, max_new_tokens)
    check_left_padded(inp)
    eos = tuple(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos[0] if eos else 0)
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    dev = model.device
    B = inp.input_ids.shape[0]
    cache = KVCache(model.cfg.n_layers)
    layout = inp.layout
    key_mask = inp.attention_mask.to(dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    new_tokens, step_logits = [], []
    from tqdm.auto import tqdm

    with model.hooks(fwd_hooks=list(fwd_hooks)):
        with model.running(layout, 0, layout.shape[1], cache):
            logits = model.run_backbone(model.embed_input(inp), layout.position_ids.to(dev), key_mask, cache=cache,
                                        input_ids=inp.input_ids.to(dev))
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            last = logits[:, -1].to(dev)  # a placed model's logits come out on the last device
            if return_logits:
                step_logits.append(last.float().cpu())
            tok = _sample(last, do_sample, temperature, top_k, top_p, gen)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            new_tokens.append(tok)
            if stop_at_eos and eos:
                finished |= torch.isin(tok, torch.tensor(eos, device=dev))
            layout = layout.extend(1, tok[:, None].cpu())
            if step == max_new_tokens - 1 or (stop_at_eos and bool(finished.all())):
                break
            key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=key_mask.dtype, device=dev)], 1)
            with model.running(layout, layout.shape[1] - 1, 1, cache):
                logits = model.run_backbone(model.embed(tok[:, None]), layout.position_ids[:, :, -1:].to(dev),
                                            key_mask, cache=cache, input_ids=tok[:, None])
    new = torch.stack(new_tokens, dim=1)
    text = [model.tokenizer.decode(t, skip_special_tokens=True) for t in new.cpu()] if model.tokenizer else None
    return Generation(sequences=torch.cat([inp.input_ids, new], 1), new_tokens=new, text=text, layout=layout,
                      logits=step_logits if return_logits else None)

