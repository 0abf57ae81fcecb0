"""Logit lens over a modality's positions: what would the model say if it stopped at layer l?

The study decodes the hidden states at the *audio* positions of every layer through the unembedding and
finds sound words ("drill", "engine", "horse") in the top-1 of middle layers — "latent audio understanding"
that the final caption then ignores. As a tool:

    lens = logit_lens(model, inputs, "audio", targets=["bark", "ring"], k=10)
    lens.top_tokens(layer=2, position=0)          # [(token, prob), ...]
    lens.target_rank                               # [layer, position, target]
    lens.hits(k=5).any(-1)                         # [layer]: some audio position has a target in its top 5

The reduction happens inside the forward: each hook turns the selected positions' residual into
probabilities in chunks and keeps only the top-k and the targets' ranks and probabilities, never a
[layers, positions, vocab] tensor. ``apply_ln=True`` (default) applies the final RMSNorm (with its weight)
before unembedding — the proper lens; ``apply_ln=False`` unembeds the raw residual, the study's variant.
Layer index l means the residual after block l (``blocks.{l}.hook_resid_post``); ``include_embed=True``
adds the embeddings as layer -1 (for media positions: the encoder output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from av_lens.analysis._common import check_layers, selector_mask
from av_lens.errors import InputError
from av_lens.layout import SelectorLike


@dataclass
class LensResult:
    """Top-k tokens and target ranks per layer and selected position."""

    layers: list[int]                     # -1 = embeddings
    positions: list[tuple[int, int]]      # (sample, position) of each column
    top_ids: Int[Tensor, "layer position k"]
    top_probs: Float[Tensor, "layer position k"]
    targets: list[int]
    target_rank: Int[Tensor, "layer position target"]   # 1 = top-1
    target_prob: Float[Tensor, "layer position target"]
    tokenizer: object = None

    def top_tokens(self, layer: int, position: int = 0) -> list[tuple[str, float]]:
        i = self.layers.index(layer)
        ids = self.top_ids[i, position].tolist()
        names = self.tokenizer.convert_ids_to_tokens(ids) if self.tokenizer is not None else [str(t) for t in ids]
        return list(zip(names, self.top_probs[i, position].tolist()))

    def hits(self, k: int | None = None) -> Tensor:
        """Bool [layer, position]: some target is within the top ``k`` (default: the k the lens kept)."""
        if not self.targets:
            raise InputError("this lens has no targets", "pass targets=[...] (token ids or strings) to logit_lens")
        k = self.top_ids.shape[-1] if k is None else k
        return (self.target_rank <= k).any(-1)

    def hit_layers(self, k: int | None = None) -> list[int]:
        """Layers at which a target enters the top-k at some selected position ("latent hit")."""
        h = self.hits(k).any(-1)
        return [l for l, x in zip(self.layers, h.tolist()) if x]

    def sample_target_hits(self, target_of_sample, k: int | None = None) -> Tensor:
        """Bool [layer, sample]: sample b's own target (index into ``targets``, e.g. the class of the sound
        playing in clip b) is in the top ``k`` at some selected position of b, per layer."""
        k = self.top_ids.shape[-1] if k is None else k
        idx = torch.as_tensor(target_of_sample, dtype=torch.long)
        cols = torch.tensor([idx[b] for b, _ in self.positions])
        rank = self.target_rank[:, torch.arange(len(cols)), cols]  # [layer, position]
        out = torch.zeros(len(self.layers), len(idx), dtype=torch.bool)
        for j, (b, _) in enumerate(self.positions):
            out[:, b] |= rank[:, j] <= k
        return out

    def per_sample_hit(self, n_samples: int, k: int | None = None) -> Tensor:
        """Bool [sample]: a target is in the top-k at some layer and some selected position of that sample."""
        h = self.hits(k).any(0)
        out = torch.zeros(n_samples, dtype=torch.bool)
        for (b, _), x in zip(self.positions, h.tolist()):
            out[b] |= x
        return out


def _targets(model, targets) -> list[int]:
    out = []
    if isinstance(targets, (str, int)):
        targets = [targets]
    unk = getattr(getattr(model, "tokenizer", None), "unk_token_id", None)
    for t in targets or []:
        if isinstance(t, str):
            tid = model.word_token(t)
            if unk is not None and tid == unk:
                raise InputError(f"the target word {t!r} is not in the vocabulary (it tokenizes to the unknown "
                                 f"token {unk})", "pick a word the tokenizer knows, or pass a token id")
            out.append(tid)
        elif isinstance(t, bool) or not float(t) == int(t):
            raise InputError(f"target {t!r} is not a token id", "pass integer ids or the words themselves")
        else:
            out.append(int(t))
    bad = [t for t in out if not 0 <= t < model.cfg.d_vocab]
    if bad:
        raise InputError(f"target token ids {bad} are outside the vocabulary (size {model.cfg.d_vocab})",
                         "pass ids from model.to_single_token(...) or the strings themselves")
    return out


class LogitLens:
    """Hooks that reduce the residual at ``sel``'s positions to top-k and target ranks, per layer."""

    def __init__(self, model, sel: SelectorLike = "audio", *, layers=None, k: int = 10, apply_ln: bool = True,
                 targets=None, include_embed: bool = False, chunk: int = 64):
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}", "use e.g. k=10")
        self.model, self.sel, self.k, self.apply_ln, self.chunk = model, sel, min(k, model.cfg.d_vocab), apply_ln, chunk
        self.layers = ([-1] if include_embed else []) + check_layers(model, layers)
        self.targets = _targets(model, targets)
        self._out: dict[int, tuple] = {}
        self._positions: list[tuple[int, int]] | None = None

    def hooks(self):
        names = [("blocks.0.hook_resid_pre" if l == -1 else f"blocks.{l}.hook_resid_post", l) for l in self.layers]
        return [(n, (lambda resid, hook, l=l: self._on_resid(resid, l))) for n, l in names]

    def _unembed_probs(self, x: Tensor) -> Tensor:
        m = self.model
        x = x.float().to(m.W_U.device)  # a placed model's layers may sit on other devices than the unembedding
        if self.apply_ln:
            ln = m.ln_final
            x = x / (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt() * ln.w.float().to(x.device)
        logits = x @ m.W_U.float() + m.b_U.float()
        return logits.softmax(-1)

    def _on_resid(self, resid: Tensor, layer: int) -> None:
        st = self.model.run_state
        if st.query_start != 0:  # decoding steps: the lens reads the prompt's positions, computed in the prefill
            return
        mask = selector_mask(st.layout, self.sel, "logit-lens", require=False)
        pos = mask.nonzero().tolist()
        self._positions = [tuple(p) for p in pos]
        if not pos:
            return
        idx = torch.tensor(pos)
        x = resid[idx[:, 0].to(resid.device), idx[:, 1].to(resid.device)]
        tops, topp, rank, tprob = [], [], [], []
        tgt = torch.tensor(self.targets, dtype=torch.long, device=self.model.W_U.device)
        for c in range(0, len(x), self.chunk):
            p = self._unembed_probs(x[c:c + self.chunk])
            v, i = p.topk(self.k, dim=-1)
            tops.append(i.cpu())
            topp.append(v.cpu())
            if len(tgt):
                pt = p[:, tgt]
                rank.append(((p[:, None, :] > pt[:, :, None]).sum(-1) + 1).cpu())
                tprob.append(pt.cpu())
        n_t = len(self.targets)
        self._out[layer] = (torch.cat(tops), torch.cat(topp),
                            torch.cat(rank) if rank else torch.zeros(len(x), 0, dtype=torch.long),
                            torch.cat(tprob) if tprob else torch.zeros(len(x), n_t))

    def result(self) -> LensResult:
        if not self._out:
            raise InputError(f"the selector {self.sel!r} matched no position in the runs so far",
                             "run the model with lens.hooks() on an input that has these positions")
        st = [self._out[l] for l in self.layers]
        return LensResult(self.layers, self._positions, torch.stack([s[0] for s in st]), torch.stack([s[1] for s in st]),
                          self.targets, torch.stack([s[2] for s in st]), torch.stack([s[3] for s in st]),
                          getattr(self.model, "tokenizer", None))


def logit_lens(model, inputs, sel: SelectorLike = "audio", **kwargs) -> LensResult:
    """Logit lens of one forward pass over ``sel``'s positions (see :class:`LogitLens`)."""
    inputs = model.to_input(inputs)
    selector_mask(inputs.layout, sel, "logit-lens")
    lens = LogitLens(model, sel, **kwargs)
    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=lens.hooks(), return_type=None)
    return lens.result()
