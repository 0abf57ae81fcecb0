"""Grouped-query self-attention with 3-D rotary positions and TransformerLens hook points.

Qwen2-style attention: q/k/v projections with biases, ``n_key_value_heads`` key/value heads shared by
groups of query heads, rotary embeddings whose frequency bands are driven by the (time, height, width)
position axes (TMRoPE: the caller passes ready ``cos``/``sin`` built by transformers' rotary module), no
output bias.

Hook points, in forward order (TransformerLens names and shapes):

* ``hook_q`` [batch, pos, head_index, d_head], ``hook_k`` / ``hook_v`` [batch, pos, kv_head, d_head]
* ``q_norm.*`` / ``k_norm.*`` — with ``cfg.qk_norm`` (Qwen3), the per-head RMSNorm of q and k
* ``hook_rot_q`` / ``hook_rot_k`` — after the rotary embedding (with ``cfg.rotary_dim < d_head``, as in Phi-4,
  only the first ``rotary_dim`` dims of each head rotate; the rest pass through)
* ``hook_attn_mask`` [batch, 1, query_pos, key_pos] — the additive mask (0 or the dtype's minimum) this
  layer's attention will use (causal + padding). Only materialised while hooked; a hook returns an edited
  copy to cut edges (attention knockout). The fused kernel then still runs with the unedited mask, and
  only the query rows the edit touched are recomputed explicitly with the edited one.
* ``hook_attn_scores`` [batch, head_index, query_pos, key_pos] — scaled, masked, pre-softmax
* ``hook_pattern`` [batch, head_index, query_pos, key_pos] — post-softmax
* ``hook_z`` [batch, pos, head_index, d_head] — the pattern-weighted values
* ``hook_result`` [batch, pos, head_index, d_model] — each head's write to the residual stream

Two execution paths give the same numbers: an explicit one (scores, softmax, matmul) whenever a hook
needs ``hook_attn_scores`` or ``hook_pattern``, and torch's ``scaled_dot_product_attention`` otherwise.
``hook_result`` is computed only while it is hooked or ``cfg.use_attn_result`` is set (it costs
n_heads x d_model per position); then the output is the sum of the (possibly edited) head results.
During KV-cached decoding, q/k/v hooks see the new positions only, and scores/pattern are
[batch, head, new_pos, cache_len + new_pos].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb

from av_lens.components.rms_norm import RMSNorm
from av_lens.config import AVConfig


@dataclass
class AttnContext:
    """What every layer's attention needs for one forward: rotary tables, mask, cache."""

    cos: Tensor  # [batch, pos, d_head]
    sin: Tensor
    mask: Tensor | None  # additive [batch, 1, q, k], or None for plain causal without padding
    cache: "KVCache | None" = None
    force_explicit: bool = False
    causal: Tensor | None = None  # additive causal mask [q, k], built once per forward when a layer needs it
    deepstack: dict[int, Tensor] | None = None  # layer -> [batch, pos, d_model] added after that block (Qwen3)
    extra: dict = field(default_factory=dict)  # what an adapter's own blocks need (Gemma-3n: per-type masks, ...)

    def causal_mask(self, P: int, K: int, dtype: torch.dtype, device) -> Tensor:
        """The additive causal mask (0 / dtype minimum) for P queries ending at key K, shared by all layers."""
        c = self.causal
        if c is None or c.shape != (P, K) or c.dtype != dtype or c.device != torch.device(device):
            keep = torch.ones(P, K, dtype=torch.bool, device=device).tril(K - P)
            c = torch.zeros(P, K, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
            self.causal = c
        return c


class KVCache:
    """Per-layer keys and values (after rotary) of the positions seen so far: [batch, kv_head, pos, d_head]."""

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: AVConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, dh, dm = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        self.q_proj = nn.Linear(dm, nh * dh, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(dm, nkv * dh, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(dm, nkv * dh, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(nh * dh, dm, bias=False)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm of q and k (between hook_q/hook_k and the rotary embedding)
            self.q_norm = RMSNorm(dh, cfg.eps)
            self.k_norm = RMSNorm(dh, cfg.eps)
        self.scale = dh ** -0.5
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_mask = HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z, self.hook_result = HookPoint(), HookPoint()

    # --- TransformerLens-orientation weight views -------------------------------------------------
    @property
    def W_Q(self) -> Float[Tensor, "head_index d_model d_head"]:
        return einops.rearrange(self.q_proj.weight, "(h d) m -> h m d", h=self.cfg.n_heads)

    def _bias(self, lin: nn.Linear) -> Tensor:
        return lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=lin.weight.device,
                                                                 dtype=lin.weight.dtype)

    @property
    def b_Q(self) -> Float[Tensor, "head_index d_head"]:
        return einops.rearrange(self._bias(self.q_proj), "(h d) -> h d", h=self.cfg.n_heads)

    @property
    def _W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return einops.rearrange(self.k_proj.weight, "(h d) m -> h m d", h=self.cfg.n_key_value_heads)

    @property
    def _W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return einops.rearrange(self.v_proj.weight, "(h d) m -> h m d", h=self.cfg.n_key_value_heads)

    @property
    def _b_K(self) -> Float[Tensor, "kv_head d_head"]:
        return einops.rearrange(self._bias(self.k_proj), "(h d) -> h d", h=self.cfg.n_key_value_heads)

    @property
    def _b_V(self) -> Float[Tensor, "kv_head d_head"]:
        return einops.rearrange(self._bias(self.v_proj), "(h d) -> h d", h=self.cfg.n_key_value_heads)

    @property
    def W_K(self) -> Float[Tensor, "head_index d_model d_head"]:
        return self._W_K.repeat_interleave(self.cfg.n_rep, dim=0)

    @property
    def W_V(self) -> Float[Tensor, "head_index d_model d_head"]:
        return self._W_V.repeat_interleave(self.cfg.n_rep, dim=0)

    @property
    def b_K(self) -> Float[Tensor, "head_index d_head"]:
        return self._b_K.repeat_interleave(self.cfg.n_rep, dim=0)

    @property
    def b_V(self) -> Float[Tensor, "head_index d_head"]:
        return self._b_V.repeat_interleave(self.cfg.n_rep, dim=0)

    @property
    def W_O(self) -> Float[Tensor, "head_index d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "m (h d) -> h d m", h=self.cfg.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        """Zero for Qwen2 (no output bias) unless value biases were folded into it (``fold_value_biases``)."""
        if self.o_proj.bias is not None:
            return self.o_proj.bias
        return torch.zeros(self.cfg.d_model, device=self.o_proj.weight.device, dtype=self.o_proj.weight.dtype)

    # --- forward ------------------------------------------------------------------------------------
    def needs_explicit(self, ctx: AttnContext) -> bool:
        return ctx.force_explicit or self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def _rows_with_mask(self, zh: Tensor, qh: Tensor, kh: Tensor, vh: Tensor, mask: Tensor, rows: Tensor,
                        chunk: int = 256) -> Tensor:
        """Recompute attention for the (sample, query) ``rows`` an edited mask touches, explicitly and in
        chunks; other rows keep the kernel's result. Exact: the same softmax(qK^T * scale + mask) V."""
        zh = zh.clone()
        for b in range(zh.shape[0]):
            r = rows[b].nonzero().squeeze(-1)
            if not len(r):
                continue
            kr = kh[b].repeat_interleave(self.cfg.n_rep, dim=0)  # [head, key, d_head]
            vr = vh[b].repeat_interleave(self.cfg.n_rep, dim=0)
            for c in range(0, len(r), chunk):
                rc = r[c:c + chunk]
                scores = torch.matmul(qh[b][:, rc], kr.transpose(1, 2)) * self.scale + mask[b, :, rc]
                p = F.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype)
                zh[b][:, rc] = torch.matmul(p, vr)
        return zh

    def forward(self, x: Float[Tensor, "batch pos d_model"], ctx: AttnContext) -> Float[Tensor, "batch pos d_model"]:
        nh, nkv, dh = self.cfg.n_heads, self.cfg.n_key_value_heads, self.cfg.d_head
        if isinstance(x, tuple):  # per-head inputs (use_split_qkv_input / use_attn_in): [batch, pos, head, d_model]
            q_in, k_in, v_in = x
            B, P = q_in.shape[:2]
            q = self.hook_q(torch.einsum("bphm,hmd->bphd", q_in, self.W_Q) + self.b_Q)
            k = self.hook_k(torch.einsum("bphm,hmd->bphd", k_in, self._W_K) + self._b_K)
            v = self.hook_v(torch.einsum("bphm,hmd->bphd", v_in, self._W_V) + self._b_V)
            x = q_in
        else:
            B, P, _ = x.shape
            q = self.hook_q(self.q_proj(x).view(B, P, nh, dh))
            k = self.hook_k(self.k_proj(x).view(B, P, nkv, dh))
            v = self.hook_v(self.v_proj(x).view(B, P, nkv, dh))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.rotary_dim < dh:  # partial rotary (Phi-3/4): only the first rotary_dim dims of each head rotate
            r = self.cfg.rotary_dim
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], ctx.cos, ctx.sin, unsqueeze_dim=2)
            q, k = torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)
        else:
            q, k = apply_rotary_pos_emb(q, k, ctx.cos, ctx.sin, unsqueeze_dim=2)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        if ctx.cache is not None:
            kh, vh = ctx.cache.update(self.layer, kh, vh)
        mask, edited = ctx.mask, None
        if self.hook_attn_mask.has_hooks():
            base = mask
            if base is None:
                base = ctx.causal_mask(P, kh.shape[2], qh.dtype, x.device).expand(B, 1, P, kh.shape[2]).clone()
            edited = self.hook_attn_mask(base)
            if edited is base:
                edited = None
            elif self.needs_explicit(ctx):
                mask = edited
            else:  # fast path: the unedited kernel for every row, then only the edited rows again (below)
                changed = (edited != base).any(-1)[:, 0]  # [batch, query]
                if changed.float().mean() > 0.5:  # most rows edited (e.g. one decoding step): masked kernel
                    mask, edited = edited, None
        if self.needs_explicit(ctx):
            # Grouped: the n_rep query heads that share a key/value head form one [n_rep * pos, d_head] operand,
            # so keys and values are never repeated, and the scores come out directly as [batch, head, q, k].
            K, rep = kh.shape[2], self.cfg.n_rep
            scores = torch.matmul(qh.reshape(B, nkv, rep * P, dh), kh.transpose(2, 3)).view(B, nh, P, K)
            # Scale and mask in place (the product is fresh; no hook has seen it yet). Adding a shared float mask
            # is faster than masked_fill with a fresh boolean one.
            scores.mul_(self.scale).add_(mask if mask is not None else ctx.causal_mask(P, K, scores.dtype, x.device))
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype))
            # (expand: a hook may return a broadcastable pattern, e.g. [batch, 1, q, k]; a no-op otherwise)
            zh = torch.matmul(pattern.expand(B, nh, P, K).reshape(B, nkv, rep * P, K), vh).view(B, nh, P, dh)
        else:
            zh = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=mask is None and P > 1 and kh.shape[2] == P,
                scale=self.scale, enable_gqa=nkv != nh,
            )
            if edited is not None and changed.any():
                zh = self._rows_with_mask(zh, qh, kh, vh, edited, changed)
        z = self.hook_z(zh.transpose(1, 2))  # [batch, pos, head, d_head]
        if self.cfg.use_attn_result or self.hook_result.has_hooks():
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            out = result.sum(dim=2)
            return out + self.o_proj.bias if self.o_proj.bias is not None else out
        return self.o_proj(z.reshape(B, P, nh * dh))
