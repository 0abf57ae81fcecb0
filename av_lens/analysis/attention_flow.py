"""Attention flow: how much attention a set of query positions gives to each modality, per layer and head.

The study's first figure: the mean attention that *generated* tokens pay to video, audio and text keys in
every layer (audio high in the first layers then near zero; video rising in the deep "fusion" layers). As
a tool:

    flow = AttentionFlow(model, query="generated")            # keys: audio / video / image / text / ...
    gen = model.generate(inputs, max_new_tokens=32, fwd_hooks=flow.hooks())
    res = flow.result()                                        # res.mass: [batch, layer, head, group]
    res.by_layer()                                             # [layer, group], mean over heads and batch

or in one call on a forward: ``attention_flow(model, inputs, query="last_prompt")``.

Nothing of size layers x heads x T^2 is ever kept. By default (``method="rows"``) the hooks read the
rotated queries and keys (``hook_rot_q``/``hook_rot_k``, plus the KV cache during generation), recompute the
softmax *only for the query rows asked for*, in chunks, and fold each row into per-group sums at once; the
model itself keeps its fast SDPA path, so memory stays near a plain forward even at thousands of tokens.
``method="pattern"`` reads ``hook_pattern`` instead (the model then materialises patterns, one layer at a
time): use it when another hook edits the attention mask (a knockout), which the rows method does not see.

``per_token=True`` divides each group's mass by the number of keys of that group the query can see: the
average attention *per token*, which corrects the imbalance between, e.g., ~3,000 video and ~250 audio
tokens of a 10 s clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from av_lens.analysis._common import check_layers, current_rows, group_masks, selector_mask
from av_lens.errors import InputError
from av_lens.layout import SelectorLike

#: default key groups: a partition of the non-padding positions
DEFAULT_GROUPS: dict[str, SelectorLike] = {
    "audio": "audio", "video": "video", "image": "image", "text": "prompt & text", "special": "special",
    "generated": "generated",
}


@dataclass
class FlowResult:
    """Attention mass per sample, layer, head and key group, averaged over the sample's query positions."""

    mass: Float[Tensor, "batch layer head group"]
    n_queries: Tensor          # [batch] query positions averaged over (per layer, all equal)
    layers: list[int]
    groups: list[str]
    per_token: bool

    def mean(self) -> Float[Tensor, "layer head group"]:
        """Mean over the samples that had query positions."""
        ok = self.n_queries > 0
        if not ok.any():
            raise InputError("no query position was seen, so there is no attention flow to report",
                             "check the query selector (e.g. 'generated' needs generate() or an extended input)")
        return self.mass[ok].mean(0)

    def by_layer(self) -> Float[Tensor, "layer group"]:
        return self.mean().mean(1)

    def group(self, name: str) -> Float[Tensor, "layer head"]:
        return self.mean()[..., self.groups.index(name)]

    def table(self, digits: int = 3) -> str:
        m = self.by_layer()
        head = f"{'layer':>5} " + " ".join(f"{g:>9}" for g in self.groups)
        rows = [f"{l:5d} " + " ".join(f"{v:9.{digits}f}" for v in m[i].tolist()) for i, l in enumerate(self.layers)]
        return "\n".join([head] + rows)


class AttentionFlow:
    """Hooks that reduce attention to [layer, head, group] masses inside the forward.

    Args:
        query: positions whose attention is measured ("generated", "last_prompt", "text", a Sel, ...).
        keys: named key groups (default :data:`DEFAULT_GROUPS`).
        per_token: divide each group's mass by the number of its keys visible to the query.
        layers: blocks to measure (default all).
        method: "rows" (recompute only the query rows from q and k) or "pattern" (read hook_pattern).
    """

    def __init__(self, model, query: SelectorLike = "generated", keys: dict[str, SelectorLike] | None = None, *,
                 per_token: bool = False, layers=None, method: str = "rows", chunk: int = 128):
        if method not in ("rows", "pattern"):
            raise InputError(f"unknown attention-flow method {method!r}", "use method='rows' or 'pattern'")
        if method == "rows" and model.cfg.extra.get("sliding_window"):
            raise InputError(f"{model.cfg.original_architecture} has sliding-window and KV-shared layers, which the "
                             "rows method (causal attention over each layer's own keys) does not reproduce",
                             "use method='pattern'")
        self.model, self.query, self.per_token, self.method, self.chunk = model, query, per_token, method, chunk
        self.keys = dict(DEFAULT_GROUPS if keys is None else keys)
        if not self.keys:
            raise InputError("no key groups given", "pass keys={'audio': 'audio', 'video': 'video'} or leave the default")
        self.layers = check_layers(model, layers)
        self._li = {l: i for i, l in enumerate(self.layers)}
        self.reset()

    def reset(self) -> None:
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        self._q: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------------- hooks
    def hooks(self) -> list[tuple[str, callable]]:
        if self.method == "pattern":
            return [(f"blocks.{l}.attn.hook_pattern", self._on_pattern) for l in self.layers]
        return ([(f"blocks.{l}.attn.hook_rot_q", self._on_q) for l in self.layers]
                + [(f"blocks.{l}.attn.hook_rot_k", self._on_k) for l in self.layers])

    def _query_mask(self, layout, qs: int, n: int) -> Tensor:
        return selector_mask(layout, self.query, "query", require=False)[:, qs:qs + n]

    def _ensure(self, B: int) -> None:
        if self._sum is None:
            self._sum = torch.zeros(B, len(self.layers), self.model.cfg.n_heads, len(self.keys))
            self._count = torch.zeros(B, len(self.layers))

    @staticmethod
    def _layer(hook) -> int:
        return int(hook.name.split(".")[1])

    def _on_q(self, q, hook):
        layout, qs, n = current_rows(self.model)
        qm = self._query_mask(layout, qs, n)
        self._q[self._layer(hook)] = (q, qm) if qm.any() else None

    def _on_k(self, k, hook):
        l = self._layer(hook)
        stored = self._q.pop(l, None)
        if stored is None:
            return
        q, qm = stored
        if self.model.blocks[l].attn.hook_attn_mask.has_hooks():
            raise InputError(f"layer {l}'s attention mask is edited by a hook (e.g. a knockout), which the rows method "
                             "cannot see", "measure the flow under edits with AttentionFlow(..., method='pattern')")
        st = self.model.run_state
        keys = k.transpose(1, 2)  # [batch, kv_head, new, d_head]
        if st.cache is not None and st.cache.k[l] is not None:
            keys = torch.cat([st.cache.k[l], keys], dim=2)
        keys = keys.repeat_interleave(self.model.cfg.n_rep, dim=1).float()
        scale = self.model.blocks[l].attn.scale
        layout = st.layout
        K = keys.shape[2]
        real = layout.attention_mask[:, :K].bool().to(keys.device)
        G = group_masks(layout, self.keys)[:, :, :K].to(keys.device)  # [group, batch, key]
        self._ensure(q.shape[0])
        kpos = torch.arange(K, device=keys.device)
        for b in range(q.shape[0]):
            rows = qm[b].nonzero().squeeze(-1)
            for c in range(0, len(rows), self.chunk):
                r = rows[c:c + self.chunk].to(keys.device)
                scores = torch.einsum("nhd,hkd->hnk", q[b, r].float(), keys[b]) * scale
                allowed = (kpos[None] <= (st.query_start + r)[:, None]) & real[b][None]  # [n, key]
                p = F.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1)
                self._accumulate(b, l, p, allowed, G[:, b])

    def _on_pattern(self, pattern, hook):
        l = self._layer(hook)
        layout, qs, n = current_rows(self.model)
        qm = self._query_mask(layout, qs, n)
        if not qm.any():
            return
        K = pattern.shape[-1]
        real = layout.attention_mask[:, :K].bool().to(pattern.device)
        G = group_masks(layout, self.keys)[:, :, :K].to(pattern.device)
        self._ensure(pattern.shape[0])
        kpos = torch.arange(K, device=pattern.device)
        for b in range(pattern.shape[0]):
            r = qm[b].nonzero().squeeze(-1).to(pattern.device)
            if len(r):
                allowed = (kpos[None] <= (qs + r)[:, None]) & real[b][None]
                self._accumulate(b, l, pattern[b][:, r].float(), allowed, G[:, b])

    def _accumulate(self, b: int, l: int, p: Tensor, allowed: Tensor, G: Tensor) -> None:
        mass = torch.einsum("hnk,gk->hng", p, G)
        if self.per_token:
            n_vis = torch.einsum("nk,gk->ng", allowed.float(), G)
            mass = torch.where(n_vis[None] > 0, mass / n_vis.clamp(min=1)[None], torch.zeros_like(mass))
        i = self._li[l]
        self._sum[b, i] += mass.sum(1).cpu()
        self._count[b, i] += p.shape[1]

    # ------------------------------------------------------------------------------------------ result
    def result(self) -> FlowResult:
        if self._sum is None:
            raise InputError(f"no position matched the query selector {self.query!r} in the runs so far",
                             "run the model with flow.hooks() first; 'generated' needs generate() "
                             "or an input extended with AVInput.extend()")
        n = self._count[:, 0]
        mass = self._sum / self._count.clamp(min=1)[:, :, None, None]
        return FlowResult(mass, n, list(self.layers), list(self.keys), self.per_token)


def attention_flow(model, inputs, query: SelectorLike = "last_prompt", keys: dict[str, SelectorLike] | None = None,
                   **kwargs) -> FlowResult:
    """Attention flow of one forward pass on ``inputs`` (see :class:`AttentionFlow`)."""
    inputs = model.to_input(inputs)
    selector_mask(inputs.layout, query, "query")
    if keys is not None:  # an explicitly asked-for key group with no position gets mass 0: say so
        for name, sel in keys.items():
            if not bool(selector_mask(inputs.layout, sel, "key", require=False).any()):
                from av_lens.errors import warn

                warn(f"the attention-flow key group {name!r} ({sel!r}) matches no position of this input, so its "
                     "attention mass is 0 everywhere", f"drop the group or pass an input that has it "
                     f"({inputs.layout.counts()})")
    flow = AttentionFlow(model, query, keys, **kwargs)
    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=flow.hooks(), return_type=None)
    return flow.result()
