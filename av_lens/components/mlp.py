"""The SwiGLU MLP: ``out = W_out(act(x W_gate) * (x W_in))``.

Hook points follow TransformerLens's gated MLP: ``hook_pre`` is the gate pre-activation, ``hook_pre_linear``
the linear branch, ``hook_post`` their product after the activation (the "neurons", [batch, pos, d_mlp]).
Weights are stored as transformers' linear layers; ``W_gate``/``W_in`` [d_model, d_mlp] and ``W_out``
[d_mlp, d_model] are views in TransformerLens's orientation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from av_lens.components.inplace import may_overwrite

_ACTS = {"silu": F.silu, "gelu": F.gelu}
_BUILTIN_ACTS = tuple(_ACTS.values())


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, act_fn: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)
        self.act = _ACTS[act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_proj.weight.T

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Tensor:
        return torch.zeros(self.up_proj.out_features, device=self.up_proj.weight.device, dtype=self.up_proj.weight.dtype)

    @property
    def b_out(self) -> Tensor:
        return torch.zeros(self.down_proj.out_features, device=self.down_proj.weight.device,
                           dtype=self.down_proj.weight.dtype)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate_free = may_overwrite(self.hook_pre, self.gate_proj)  # asked before and after the hooks run
        pre = self.hook_pre(self.gate_proj(x))
        gate_free = gate_free and may_overwrite(self.hook_pre, self.gate_proj)
        if self.act is F.silu and gate_free:  # un-hooked inference: the activation reuses the gate's buffer
            act, act_free = F.silu(pre, inplace=True), True
        else:  # a built-in activation returns a new tensor; a user-set one (e.g. identity) may return ``pre``
            act = self.act(pre)
            act_free = self.act in _BUILTIN_ACTS and not torch.is_grad_enabled()
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        post = self.hook_post(act.mul_(pre_linear) if act_free and may_overwrite() else act * pre_linear)
        return self.down_proj(post)
