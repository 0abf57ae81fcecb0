"""Token distribution shift: which of an AVLLM's output tokens would its base model also have said?

An audio-visual LLM is usually a base model (a text LLM, or a vision-language model) tuned further. The study
asks whether that tuning changed *what* is said or only *how*. Following the token-distribution-shift
analysis of Lin et al. 2023 ("The Unlocking Spell on Base LLMs", URIAL), we take the AVLLM's answer, feed it
token by token into the base model (teacher forcing) and ask, at each position, where the base ranks the
token the AVLLM actually produced:

* rank 1 — **unshifted**: the base would have said it too;
* rank 2..3 — **marginal**: the base had it among its top candidates;
* rank > 3 — **shifted**: the tuning put it there (thresholds are parameters).

Beside the rank, each token gets the base's probability of it and the KL divergence
``KL(p_avllm || p_base)`` between the two next-token distributions at that position, both computed by
teacher-forcing the same tokens into both models::

    res = token_shift(model, base, inputs, base_inputs, max_new_tokens=32)
    res.fractions()   # {'unshifted': 0.81, 'marginal': 0.12, 'shifted': 0.07}
    print(res.table())

The base may be another checkpoint that shares the tokenizer (the organism's stage-1 vision-language model
``av-lens/organism-base``) and may see other media (video without its soundtrack), so it takes its own prompt
``base_inputs``; with ``base_inputs=None`` it gets the AVLLM's prompt.

Teacher forcing appends the output tokens to the prompt as generated text positions
(:meth:`~av_lens.layout.ModalityLayout.extend`): their 3-D positions continue from the prompt's largest
position + 1, exactly as :func:`av_lens.generation.generate` places them, so for ``base = model`` the forced
distributions are the ones greedy decoding saw (ranks 1, KL 0). Only the positions that predict output tokens
are unembedded, so a long video prompt does not materialise ``[pos, vocab]`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from av_lens.errors import InputError
from av_lens.inputs import AVInput

CATEGORIES = ("unshifted", "marginal", "shifted")

TokensLike = Tensor | Sequence[int] | Sequence[Sequence[int]]


# ------------------------------------------------------------------------------------------ teacher forcing
def append_tokens(inputs: AVInput, tokens: Int[Tensor, "batch n"]) -> AVInput:
    """``inputs`` followed by ``tokens`` as generated text positions (same media, layout extended).

    The new positions' TMRoPE positions continue from each sample's largest prompt position + 1, as in
    generation; the layout marks them ``generated`` (``layout.prompt_len`` stays the prompt's length)."""
    tokens = torch.as_tensor(tokens).long()
    if tokens.ndim != 2 or tokens.shape[0] != inputs.input_ids.shape[0]:
        raise InputError(f"tokens to append must be [batch={inputs.input_ids.shape[0]}, n], got shape "
                         f"{tuple(tokens.shape)}", "pass one row of token ids per prompt in the batch")
    if tokens.shape[1] == 0:
        return inputs
    if len(inputs.layout) != inputs.layout.prompt_len:
        raise InputError("these inputs already carry generated positions",
                         "append to the prompt as model.prepare(...) returned it")
    return inputs.extend(tokens)


@torch.no_grad()
def forced_logits(model, inputs: AVInput, tokens: Int[Tensor, "batch n"]) -> Float[Tensor, "batch n vocab"]:
    """Next-token logits (float32, CPU) that predict each of ``tokens`` when they are teacher-forced after the
    prompt: row j is the distribution after the prompt and ``tokens[:, :j]``."""
    inputs = model.to_input(inputs)
    tokens = torch.as_tensor(tokens).long()
    n = tokens.shape[1]
    if n == 0:
        return torch.empty(tokens.shape[0], 0, model.cfg.d_vocab_out)
    prompt_len = inputs.input_ids.shape[1]
    full = append_tokens(inputs, tokens[:, :-1])  # the last token's own position predicts nothing we need
    resid = model(full, stop_at_layer=model.cfg.n_layers)  # final residual stream, [batch, pos, d_model]
    resid = resid[:, prompt_len - 1: prompt_len - 1 + n]
    return model.unembed(model.ln_final(resid)).float().cpu()


# ------------------------------------------------------------------------------------------------- result
@dataclass
class TokenShiftResult:
    """Per output token of one sample: the base model's rank of it, probabilities, KL and category."""

    tokens: Int[Tensor, "n"]
    strings: list[str]
    ranks: Int[Tensor, "n"]            # 1 = the base's top choice (ties count in the token's favour)
    base_prob: Float[Tensor, "n"]      # p_base(token | prompt_base, previous output tokens)
    avllm_prob: Float[Tensor, "n"]     # p_avllm(token | prompt, previous output tokens)
    kl: Float[Tensor, "n"]             # KL(p_avllm || p_base) at the position predicting the token, in nats
    category: list[str]                # "unshifted" | "marginal" | "shifted"
    unshifted_max_rank: int = 1
    marginal_max_rank: int = 3
    note: str = ""

    def __len__(self) -> int:
        return len(self.strings)

    def counts(self) -> dict[str, int]:
        return {c: sum(1 for x in self.category if x == c) for c in CATEGORIES}

    def fractions(self) -> dict[str, float]:
        """Fraction of the output tokens in each category (NaN for an empty output)."""
        n = len(self)
        return {c: (k / n if n else math.nan) for c, k in self.counts().items()}

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if len(self) else math.nan

    def table(self, max_rows: int | None = None) -> str:
        """One row per output token: index, token, base rank, base and AVLLM probability, KL, category."""
        rows = [f"{'i':>3} {'token':18s} {'rank':>6} {'p_base':>8} {'p_avllm':>8} {'KL':>8}  category"]
        n = len(self) if max_rows is None else min(len(self), max_rows)
        for i in range(n):
            tok = repr(self.strings[i])
            tok = tok if len(tok) <= 18 else tok[:15] + "..."
            rows.append(f"{i:3d} {tok:18s} {int(self.ranks[i]):6d} {float(self.base_prob[i]):8.4f} "
                        f"{float(self.avllm_prob[i]):8.4f} {float(self.kl[i]):8.4f}  {self.category[i]}")
        if n < len(self):
            rows.append(f"... {len(self) - n} more")
        f = self.fractions()
        rows.append(f"{len(self)} tokens: " + ", ".join(f"{c} {f[c]:.3f}" for c in CATEGORIES)
                    + f"; mean KL {self.mean_kl:.4f} (unshifted: rank <= {self.unshifted_max_rank}, "
                    f"marginal: rank <= {self.marginal_max_rank})")
        if self.note:
            rows.append(f"note: {self.note}")
        return "\n".join(rows)


def pooled_fractions(results: Sequence[TokenShiftResult]) -> dict[str, float]:
    """Category fractions over all tokens of several results (each token weighs the same)."""
    total = sum(len(r) for r in results)
    counts = {c: sum(r.counts()[c] for r in results) for c in CATEGORIES}
    return {c: (k / total if total else math.nan) for c, k in counts.items()}


def categorise(ranks: Tensor, unshifted_max_rank: int = 1, marginal_max_rank: int = 3) -> list[str]:
    return ["unshifted" if r <= unshifted_max_rank else "marginal" if r <= marginal_max_rank else "shifted"
            for r in ranks.tolist()]


# ----------------------------------------------------------------------------------------------- main API
def token_shift(model, base, inputs: AVInput, base_inputs: AVInput | None = None,
                output_tokens: TokensLike | None = None, max_new_tokens: int = 32, *,
                unshifted_max_rank: int = 1, marginal_max_rank: int = 3, include_eos: bool = True,
                eos_token_ids: Sequence[int] | None = None) -> TokenShiftResult:
    """Token distribution shift of one answer (a batch of 1) of ``model`` against ``base``.

    Args:
        model: the AVLLM (a :class:`~av_lens.HookedAVTransformer`).
        base: the base model; any HookedAVTransformer whose tokenizer agrees with ``model``'s on the output
            tokens (``base = model`` is allowed and gives ranks 1, KL 0 for greedy outputs).
        inputs: the AVLLM's prompt (from ``model.prepare``).
        base_inputs: the base's prompt (from ``base.prepare``; may carry other media); None: ``inputs``.
        output_tokens: the answer's token ids ([n], [1, n] or a list); None: greedy ``model.generate``.
        max_new_tokens: how many tokens to generate when ``output_tokens`` is None.
        unshifted_max_rank / marginal_max_rank: rank thresholds of the categories (1 and 3 as in URIAL).
        include_eos: keep the first end-of-turn token of the output (tokens after it are always dropped).
        eos_token_ids: what ends the output; default ``model.cfg.eos_token_ids``.

    For a batch, use :func:`token_shift_batch`.
    """
    inputs = model.to_input(inputs)
    if inputs.input_ids.shape[0] != 1:
        raise InputError(f"token_shift takes one prompt, got a batch of {inputs.input_ids.shape[0]}",
                         "use token_shift_batch(...) for a batch (it returns one result per prompt)")
    if output_tokens is not None:
        t = output_tokens if isinstance(output_tokens, Tensor) else torch.as_tensor(list(output_tokens), dtype=torch.long)
        if t.ndim == 2 and t.shape[0] != 1:
            raise InputError(f"output_tokens has {t.shape[0]} rows for one prompt", "pass the [n] token ids of one answer")
        output_tokens = t.reshape(1, -1)
    return token_shift_batch(model, base, inputs, base_inputs, output_tokens, max_new_tokens,
                             unshifted_max_rank=unshifted_max_rank, marginal_max_rank=marginal_max_rank,
                             include_eos=include_eos, eos_token_ids=eos_token_ids)[0]


def token_shift_batch(model, base, inputs: AVInput, base_inputs: AVInput | None = None,
                      output_tokens: TokensLike | None = None, max_new_tokens: int = 32, *,
                      unshifted_max_rank: int = 1, marginal_max_rank: int = 3, include_eos: bool = True,
                      eos_token_ids: Sequence[int] | None = None) -> list[TokenShiftResult]:
    """:func:`token_shift` for a batch of prompts: one :class:`TokenShiftResult` per prompt.

    ``output_tokens`` is [batch, n] (tokens after a sample's first end-of-turn are ignored, so generate's
    padding may stay) or a list of per-sample lists of different lengths. Each model runs one teacher-forced
    forward over the whole (left-padded) batch."""
    if not 1 <= unshifted_max_rank <= marginal_max_rank:
        raise InputError(f"rank thresholds must satisfy 1 <= unshifted_max_rank ({unshifted_max_rank}) <= "
                         f"marginal_max_rank ({marginal_max_rank})", "use e.g. unshifted_max_rank=1, marginal_max_rank=3")
    inputs = model.to_input(inputs)
    B = inputs.input_ids.shape[0]
    if base_inputs is None:
        # the AVLLM's encoder outputs belong to its own towers: let the base encode the media itself
        base_inputs = inputs if base is model else replace(inputs, encoder_outputs={})
    base_inputs = base.to_input(base_inputs)
    if base_inputs.input_ids.shape[0] != B:
        raise InputError(f"inputs has {B} prompt(s) but base_inputs has {base_inputs.input_ids.shape[0]}",
                         "pass one base prompt per AVLLM prompt, in the same order")
    eos = tuple(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)

    if output_tokens is None:
        gen = model.generate(inputs, max_new_tokens=max_new_tokens, eos_token_ids=eos)
        rows = [r.tolist() for r in gen.new_tokens.cpu()]
    elif isinstance(output_tokens, Tensor):
        t = output_tokens.reshape(1, -1) if output_tokens.ndim == 1 and B == 1 else output_tokens
        if t.ndim != 2 or t.shape[0] != B:
            raise InputError(f"output_tokens has shape {tuple(output_tokens.shape)} for {B} prompt(s)",
                             "pass [batch, n] token ids (or a list of per-prompt lists)")
        if t.is_floating_point():
            raise InputError(f"output_tokens must be integer token ids, got dtype {t.dtype}", "pass torch.long ids")
        rows = [r.tolist() for r in t.cpu()]
    else:
        rows = [list(map(int, r)) for r in output_tokens]
        if len(rows) != B:
            raise InputError(f"output_tokens has {len(rows)} rows for {B} prompt(s)", "pass one list per prompt")
    rows = [_cut_at_eos(r, eos, include_eos) for r in rows]

    vocab = min(model.cfg.d_vocab_out, base.cfg.d_vocab_out)
    note = ""
    if model.cfg.d_vocab_out != base.cfg.d_vocab_out:
        note = (f"vocabularies differ ({model.cfg.d_vocab_out} vs {base.cfg.d_vocab_out} rows): distributions are "
                f"renormalised over the first {vocab} ids")
    bad = sorted({t for r in rows for t in r if not 0 <= t < vocab})
    if bad:
        raise InputError(f"output token ids {bad[:5]} lie outside the shared vocabulary 0..{vocab - 1}",
                         "pass ids from the AVLLM's tokenizer")
    _check_same_tokens(model, base, sorted({t for r in rows for t in r}))

    n_max = max((len(r) for r in rows), default=0)
    fill = eos[0] if eos else 0
    tokens = torch.tensor([r + [fill] * (n_max - len(r)) for r in rows], dtype=torch.long).reshape(B, n_max)
    if n_max:
        lp_a = F.log_softmax(forced_logits(model, inputs, tokens.to(model.device))[..., :vocab], -1)
        if base is model and base_inputs is inputs:  # the same computation: run it once
            lp_b = lp_a
        else:
            lp_b = F.log_softmax(forced_logits(base, base_inputs, tokens.to(base.device))[..., :vocab], -1)
    out = []
    for b, r in enumerate(rows):
        n = len(r)
        tok = tokens[b, :n]
        if n:
            a, bb = lp_a[b, :n], lp_b[b, :n]
            own = bb.gather(-1, tok[:, None])            # [n, 1] base log-prob of the output token
            ranks = 1 + (bb > own).sum(-1)
            base_prob = own[:, 0].exp()
            avllm_prob = a.gather(-1, tok[:, None])[:, 0].exp()
            kl = (a.exp() * (a - bb)).sum(-1).clamp_min(0.0)
        else:
            ranks, base_prob, avllm_prob, kl = (torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0),
                                                torch.zeros(0))
        strings = _token_strings(model, r)
        out.append(TokenShiftResult(tok, strings, ranks, base_prob, avllm_prob, kl,
                                    categorise(ranks, unshifted_max_rank, marginal_max_rank),
                                    unshifted_max_rank, marginal_max_rank, note))
    return out


def _token_strings(model, ids: list[int]) -> list[str]:
    """Each token decoded on its own; a byte fragment of a multi-byte character shows as its raw token."""
    tok = model.tokenizer
    if tok is None:
        return [str(t) for t in ids]
    out = []
    for t in ids:
        s = tok.decode([t])
        out.append(tok.convert_ids_to_tokens(t) if "\ufffd" in s else s)
    return out


def _cut_at_eos(row: list[int], eos: tuple[int, ...], include_eos: bool) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1] if include_eos else row[:i]
    return row


def _check_same_tokens(model, base, ids: list[int]) -> None:
    """The base must read the output tokens as the same strings the AVLLM wrote."""
    if base is model or not ids or model.tokenizer is None or base.tokenizer is None:
        return
    a = model.tokenizer.convert_ids_to_tokens(ids)
    b = base.tokenizer.convert_ids_to_tokens(ids)
    diff = [(i, x, y) for i, x, y in zip(ids, a, b) if x != y]
    if diff:
        i, x, y = diff[0]
        raise InputError(f"the AVLLM and the base tokenizers disagree on {len(diff)} output token(s), e.g. id {i} is "
                         f"{x!r} for the AVLLM but {y!r} for the base",
                         "use a base model with the AVLLM's tokenizer (e.g. the VLM it was tuned from)")
