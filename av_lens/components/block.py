"""One pre-norm decoder block: ``resid_mid = resid_pre + attn(ln1(resid_pre))``,
``resid_post = resid_mid + mlp(ln2(resid_mid))``, with TransformerLens's residual hook points
(``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post``).

The MLP is a dense SwiGLU or, in the layers ``cfg.moe_layers``, a sparse mixture of experts. In the first
``cfg.n_deepstack`` layers of a Qwen3-Omni thinker, the vision tower's intermediate ("deepstack") features
are added to the image and video positions after the MLP: ``resid_post = resid_mid + mlp_out + deepstack``,
with ``hook_deepstack`` [batch, pos, d_model] (zero at other positions) so that they can be read or ablated."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from av_lens.components.attention import Attention, AttnContext
from av_lens.components.inplace import may_overwrite
from av_lens.components.mlp import GatedMLP
from av_lens.components.moe import SparseMoE
from av_lens.components.rms_norm import RMSNorm
from av_lens.config import AVConfig


class TransformerBlock(nn.Module):
    #: read by TransformerLens 4's analysis tools (logit_lens, DLA): hook_resid_post is the one residual stream
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: AVConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = SparseMoE(cfg) if layer in cfg.moe_layers else GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        # TransformerLens's optional per-head inputs (fire only with cfg.use_attn_in / use_split_qkv_input /
        # use_hook_mlp_in, set by model.set_use_attn_in(...) etc.)
        self.hook_attn_in = HookPoint()  # [batch, pos, head_index, d_model]
        self.hook_q_input = HookPoint()  # [batch, pos, head_index, d_model]
        self.hook_k_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.hook_v_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.hook_mlp_in = HookPoint()  # [batch, pos, d_model]
        self.cfg = cfg
        if layer < cfg.n_deepstack:
            self.hook_deepstack = HookPoint()

    @property
    def _attn_producers(self) -> tuple:
        return self.attn, getattr(self.attn, "o_proj", None)

    @property
    def _mlp_producers(self) -> tuple:
        return self.mlp, getattr(self.mlp, "down_proj", None)  # the MoE mixes its experts itself (no module)

    def _split_inputs(self, resid_pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised per-head query/key/value inputs ([batch, pos, head, d_model]), as TransformerLens builds
        them: with use_split_qkv_input each has its hook; with use_attn_in one copy per query head
        (``hook_attn_in``), a key/value head reading the copy of the first query head of its group."""
        cfg = self.cfg
        nh, nkv = cfg.n_heads, cfg.n_key_value_heads
        rep = lambda n: resid_pre[:, :, None, :].expand(-1, -1, n, -1).clone()
        if cfg.use_split_qkv_input:
            q_in, k_in, v_in = self.hook_q_input(rep(nh)), self.hook_k_input(rep(nkv)), self.hook_v_input(rep(nkv))
        else:
            q_in = self.hook_attn_in(rep(nh))
            k_in = v_in = q_in[:, :, ::cfg.n_rep]
        return self.ln1(q_in), self.ln1(k_in), self.ln1(v_in)

    def forward(self, resid: Float[Tensor, "batch pos d_model"], ctx: AttnContext) -> Float[Tensor, "batch pos d_model"]:
        # Un-hooked inference sums into the freshly computed branch output instead of a new buffer. The producers
        # of attn_out / mlp_out are watched too (a plain hook on blocks.l.attn or its o_proj receives the very
        # tensor that would be summed into), before and after they run.
        attn_watch, mlp_watch = (self.hook_attn_out, *self._attn_producers), (self.hook_mlp_out, *self._mlp_producers)
        attn_free, mlp_free = may_overwrite(*attn_watch), may_overwrite(*mlp_watch)
        resid_pre = self.hook_resid_pre(resid)
        cfg = self.cfg
        if cfg.use_split_qkv_input or cfg.use_attn_in:
            attn_out = self.hook_attn_out(self.attn(self._split_inputs(resid_pre), ctx))
        else:
            attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), ctx))
        attn_free = attn_free and may_overwrite(*attn_watch)
        resid_mid = self.hook_resid_mid(attn_out.add_(resid_pre) if attn_free else resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        mlp_free = mlp_free and may_overwrite(*mlp_watch)
        resid_post = mlp_out.add_(resid_mid) if mlp_free else resid_mid + mlp_out
        extra = ctx.deepstack.get(self.layer) if ctx.deepstack else None
        if extra is not None and extra.shape[1] == resid_post.shape[1]:  # prefill: the prompt's visual positions
            resid_post = resid_post + self.hook_deepstack(extra.to(resid_post.device, resid_post.dtype))
        return self.hook_resid_post(resid_post)
