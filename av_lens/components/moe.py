"""A sparse mixture-of-experts MLP (Qwen3-MoE): a linear router picks the top-k of ``n_experts`` SwiGLU experts
for each position and mixes their outputs with the renormalised router probabilities.

``router_logits = x W_router``; ``p = softmax(router_logits)`` (fp32); the k largest ``p`` are kept (and
divided by their sum when ``cfg.norm_topk_prob``); ``out = sum_k p_k * expert_{i_k}(x)`` with
``expert_e(x) = W_down[e] (act(W_gate[e] x) * (W_up[e] x))``.

Hook points (TransformerLens style, under ``blocks.{l}.mlp``):

* ``hook_router_logits`` [batch, pos, n_experts] — edit to change the routing (e.g. forbid an expert);
* ``hook_topk_weights`` [batch, pos, k] — the mixing weights of the chosen experts;
* ``hook_topk_experts`` [batch, pos, k] — their indices (integers; read-only in spirit);
* ``hook_expert_out`` [batch, pos, k, d_model] — each chosen expert's output *before* weighting: zero one
  slot, or every slot whose index is e, to ablate expert e at those positions.

The output is ``sum_k hook_topk_weights * hook_expert_out``. Each expert runs only on the positions routed to
it (as transformers does), so the cost stays that of the k active experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from av_lens.components.mlp import _ACTS
from av_lens.config import AVConfig


class SparseMoE(nn.Module):
    def __init__(self, cfg: AVConfig):
        super().__init__()
        E, D, I = cfg.n_experts, cfg.d_model, cfg.d_mlp_expert
        self.n_experts, self.top_k, self.norm_topk = E, cfg.n_experts_per_tok, cfg.norm_topk_prob
        self.W_router = nn.Parameter(torch.empty(E, D))  # transformers' mlp.gate.weight
        self.W_gate = nn.Parameter(torch.empty(E, I, D))  # per expert, transformers' [out, in] orientation
        self.W_up = nn.Parameter(torch.empty(E, I, D))
        self.W_down = nn.Parameter(torch.empty(E, D, I))
        self.act = _ACTS[cfg.act_fn]
        self.hook_router_logits = HookPoint()
        self.hook_topk_weights = HookPoint()
        self.hook_topk_experts = HookPoint()
        self.hook_expert_out = HookPoint()

    def route(self, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Int[Tensor, "batch pos k"]]:
        logits = self.hook_router_logits(F.linear(x, self.W_router))
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        return self.hook_topk_weights(top_p.to(logits.dtype)), self.hook_topk_experts(top_i)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        B, P, D = x.shape
        weights, experts = self.route(x)
        flat_x, flat_i = x.reshape(-1, D), experts.reshape(-1, self.top_k)
        outs = x.new_zeros(B * P, self.top_k, D)
        for e in torch.unique(flat_i).tolist():
            tok, slot = torch.where(flat_i == e)
            h = flat_x[tok]
            h = self.act(F.linear(h, self.W_gate[e])) * F.linear(h, self.W_up[e])
            outs[tok, slot] = F.linear(h, self.W_down[e])
        outs = self.hook_expert_out(outs.view(B, P, self.top_k, D))
        return (weights[..., None] * outs).sum(2)
