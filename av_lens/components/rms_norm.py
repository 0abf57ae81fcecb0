"""RMSNorm with TransformerLens's two hook points.

``hook_scale`` is the per-position root-mean-square ``sqrt(mean(x^2) + eps)`` ("batch pos 1", computed in
fp32), ``hook_normalized`` the normalised vector *before* the learned weight ("batch pos d_model"), as in
TransformerLens. ActivationCache.apply_ln_to_stack divides by the cached ``hook_scale`` and, as in TL, does not
apply the weight; :meth:`HookedAVTransformer.tokens_to_residual_directions` returns ``W_U``'s columns (TL's
convention), so on unprocessed weights logit attributions need the weight (or ``fold_ln=True``).

The norm computes ``x * rsqrt(mean(x^2) + eps)`` as transformers does (one fused reciprocal square root instead
of a square root and a division), hooked or not, and un-hooked applies the weight in place (see
:mod:`av_lens.components.inplace`). When a ``hook_scale`` hook edits the scale (returns another tensor, or
changes it in place), the norm divides by the edited scale instead, so the edit takes effect exactly.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from av_lens.components.inplace import hooked, may_overwrite


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        dtype = x.dtype
        x32 = x.float()
        var = x32.pow(2).mean(-1, keepdim=True) + self.eps
        edited = None
        if hooked(self.hook_scale):
            scale = var.sqrt()
            before = scale.clone()  # [batch, pos, 1]: tells an in-place edit from a hook that only read it
            out = self.hook_scale(scale)
            if out is not scale or not torch.equal(out, before):
                edited = out
        # Un-edited, the same arithmetic hooked or not, so run_with_cache's logits equal the plain forward's.
        normalized = x32 * torch.rsqrt(var) if edited is None else x32 / edited
        free = may_overwrite(self.hook_normalized)  # asked before and after the hook runs
        normalized = self.hook_normalized(normalized.to(dtype))
        if free and may_overwrite(self.hook_normalized) and normalized.dtype == self.w.dtype:
            return normalized.mul_(self.w)
        return self.w * normalized
