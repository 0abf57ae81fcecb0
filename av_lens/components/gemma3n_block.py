"""Gemma-3n's decoder, hooked: AltUp streams, Laurel, per-layer inputs, KV sharing, sliding windows, soft-capping.

Gemma-3n carries ``n`` (4) parallel residual streams ("AltUp"), a state [batch, pos, n_streams, d_model]. Stream 0
is the *active* stream: each layer first *predicts* all streams from a mix of them, computes attention and MLP on
the predicted active stream only, then *corrects* every stream with the innovation (layer output - predicted
active stream). Hook points of one block, in forward order (standard names where the meaning is the standard one):

* ``hook_streams_pre`` [batch, pos, n, d_model] — the incoming AltUp state (transformers' ``hidden_states[l]``)
* ``hook_resid_pre`` [batch, pos, d_model] — its active stream 0 (= the previous block's ``hook_resid_post``);
  an edit replaces stream 0 only
* ``hook_predicted`` [batch, pos, n, d_model] — AltUp's prediction of all streams
* ``hook_resid_in`` [batch, pos, d_model] — the predicted active stream: the input the layer computes with
* ``ln1.*`` (``input_layernorm``) ─ ``attn.*`` (``hook_q/k/v``, ``hook_rot_q/k``, ``hook_attn_mask``,
  ``hook_attn_scores``, ``hook_pattern``, ``hook_z``, ``hook_result``) ─ ``attn_post_norm``
* ``hook_attn_out`` [batch, pos, d_model] — attention's write (after ``post_attention_layernorm``)
* ``hook_laurel_out`` [batch, pos, d_model] — the Laurel block's output (normed input + low-rank branch)
* ``hook_resid_mid`` [batch, pos, d_model] — ``(resid_in + attn_out + laurel_out) / sqrt(2)``
* ``ln2.*`` ─ ``mlp.*`` (``hook_pre`` is the gate pre-activation *after* the gaussian top-k sparsification in
  the sparse layers, ``hook_pre_dense`` before it) ─ ``mlp_post_norm`` ─ ``hook_mlp_out``
* ``hook_activated`` [batch, pos, d_model] — ``resid_mid + mlp_out``, the layer's output that AltUp corrects to
* ``hook_corrected`` [batch, pos, n, d_model] — the corrected streams
* ``hook_per_layer_input`` [batch, pos, d_per_layer] — this layer's per-layer input (token-id + projected embedding)
* ``hook_per_layer_out`` [batch, pos, d_model] — the gated per-layer term added to streams 1..n-1 (not stream 0)
* ``hook_streams_post`` [batch, pos, n, d_model] — the outgoing state (transformers' ``hidden_states[l + 1]``)
* ``hook_resid_post`` [batch, pos, d_model] — its active stream 0 (an edit replaces stream 0 only)

KV sharing: a layer whose ``kv_sharing_modes`` entry is ``"reuse"`` has no k/v projections; it attends with the keys
and values stored by the last earlier layer of its type. Its ``hook_rot_k`` / ``hook_v`` fire with those shared
tensors ([batch, key_pos, kv_head, d_head]: the prompt in a prefill, every position so far in a decoding step), so an
edit there changes this layer's reading only; ``hook_k`` never fires in it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb

from av_lens.components.attention import Attention, AttnContext
from av_lens.components.mlp import GatedMLP
from av_lens.components.rms_norm import RMSNorm
from av_lens.config import AVConfig


class ScalelessRMSNorm(nn.Module):
    """RMSNorm without a learned weight (Gemma-3n's ``v_norm``), with the usual two hook points."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized((x32 / scale).to(x.dtype))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)[0]


def sliding_mask(key_mask: Tensor, n_query: int, window: int, dtype: torch.dtype) -> Tensor:
    """Additive [batch, 1, q, k] mask: causal, padding, and key index > query index - window (transformers'
    ``q_idx - kv_idx < sliding_window`` on sequence indices)."""
    B, K = key_mask.shape
    q_abs = torch.arange(K - n_query, K, device=key_mask.device)[:, None]
    k = torch.arange(K, device=key_mask.device)[None, :]
    allowed = (k <= q_abs) & (q_abs - k < window)
    allowed = allowed[None] & key_mask[:, None, :].bool()
    mask = torch.zeros(B, 1, n_query, K, dtype=dtype, device=key_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class Gemma3nAttention(Attention):
    """Gemma-3n attention: q/k RMSNorms (between ``hook_q``/``hook_k`` and the rotary), a weightless v RMSNorm
    (``hook_v`` is the normalised value, what the pattern weighs), scale 1, per-type rotary tables and masks
    (sliding window for local layers), KV sharing. The explicit path runs whenever scores or pattern are hooked,
    torch's fused kernel otherwise; an edited ``hook_attn_mask`` is used by whichever path runs."""

    def __init__(self, cfg: AVConfig, layer: int, layer_type: str, kv_mode: str | None):
        super().__init__(cfg, layer)
        self.scale = 1.0
        self.layer_type, self.kv_mode = layer_type, kv_mode
        if kv_mode == "reuse":  # no key/value weights: this layer reads an earlier layer's
            del self.k_proj, self.v_proj, self.k_norm
        else:
            self.v_norm = ScalelessRMSNorm(cfg.eps)

    def forward(self, x: Float[Tensor, "batch pos d_model"], ctx: AttnContext) -> Float[Tensor, "batch pos d_model"]:
        B, P, _ = x.shape
        nh, nkv, dh = self.cfg.n_heads, self.cfg.n_key_value_heads, self.cfg.d_head
        ex = ctx.extra
        cos, sin = ex["rope"][self.layer_type]
        q = self.q_norm(self.hook_q(self.q_proj(x).view(B, P, nh, dh)))
        q = self.hook_rot_q(_rope(q, cos, sin))
        if self.kv_mode == "reuse":
            kh, vh = ex["shared_kv"][self.layer_type]
            kh = self.hook_rot_k(kh.transpose(1, 2)).transpose(1, 2)
            vh = self.hook_v(vh.transpose(1, 2)).transpose(1, 2)
        else:
            k = self.k_norm(self.hook_k(self.k_proj(x).view(B, P, nkv, dh)))
            k = self.hook_rot_k(_rope(k, cos, sin))
            v = self.hook_v(self.v_norm(self.v_proj(x).view(B, P, nkv, dh)))
            kh, vh = k.transpose(1, 2), v.transpose(1, 2)
            if ctx.cache is not None:
                kh, vh = ctx.cache.update(self.layer, kh, vh)
            if self.kv_mode == "store":
                ex["shared_kv"][self.layer_type] = (kh, vh)
        qh = q.transpose(1, 2)
        K = kh.shape[2]
        mask = ex["masks"][self.layer_type]
        if self.hook_attn_mask.has_hooks():
            base = mask if mask is not None else ctx.causal_mask(P, K, qh.dtype, x.device).expand(B, 1, P, K).clone()
            mask = self.hook_attn_mask(base)
        if self.needs_explicit(ctx):
            kr = kh.repeat_interleave(self.cfg.n_rep, dim=1)
            vr = vh.repeat_interleave(self.cfg.n_rep, dim=1)
            scores = torch.matmul(qh, kr.transpose(2, 3)) * self.scale
            scores = scores + (mask if mask is not None else ctx.causal_mask(P, K, scores.dtype, x.device))
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype))
            zh = torch.matmul(pattern, vr)
        else:
            zh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None and P > 1 and K == P,
                                                scale=self.scale, enable_gqa=nkv != nh)
        z = self.hook_z(zh.transpose(1, 2))
        if self.cfg.use_attn_result or self.hook_result.has_hooks():
            return self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O)).sum(dim=2)
        return self.o_proj(z.reshape(B, P, nh * dh))


class Gemma3nMLP(GatedMLP):
    """GeGLU MLP (tanh-approximate gelu) with Gemma-3n's activation sparsity: in the layers with a target sparsity
    s > 0 the gate pre-activation keeps only what exceeds mean + std * Phi^-1(s) over the d_mlp units
    (``relu(x - cutoff)``). ``hook_pre_dense`` is the gate before that, ``hook_pre`` after."""

    def __init__(self, d_model: int, d_mlp: int, sparsity: float):
        super().__init__(d_model, d_mlp, "gelu")
        self.act = lambda x: F.gelu(x, approximate="tanh")
        self.sparsity = float(sparsity)
        self.hook_pre_dense = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate = self.hook_pre_dense(self.gate_proj(x))
        if self.sparsity > 0.0:
            mult = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(self.sparsity, dtype=torch.float32))
            cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * mult.to(gate.dtype)
            gate = F.relu(gate - cutoff)
        pre = self.hook_pre(gate)
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(self.act(pre) * pre_linear))


class Gemma3nBlock(nn.Module):
    """One Gemma-3n decoder layer on the AltUp state [batch, pos, n_streams, d_model] (see the module docstring)."""

    def __init__(self, cfg: AVConfig, layer: int, hf_text):
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAltUp, Gemma3nTextLaurelBlock

        super().__init__()
        self.layer = layer
        d, eps = cfg.d_model, cfg.eps
        self.active = int(hf_text.altup_active_idx)
        self.correct_scale = bool(hf_text.altup_correct_scale)
        #: transformers' AltUp and Laurel modules, called as they are (pure functions of their weights in eval mode)
        self.altup = Gemma3nTextAltUp(hf_text)
        self.laurel = Gemma3nTextLaurelBlock(hf_text)
        self.ln1 = RMSNorm(d, eps)
        self.attn = Gemma3nAttention(cfg, layer, hf_text.layer_types[layer], hf_text.kv_sharing_modes[layer])
        self.attn_post_norm = RMSNorm(d, eps)
        self.ln2 = RMSNorm(d, eps)
        self.mlp = Gemma3nMLP(d, hf_text.intermediate_size[layer], hf_text.activation_sparsity_pattern[layer])
        self.mlp_post_norm = RMSNorm(d, eps)
        self.per_layer_input_gate = nn.Linear(d, hf_text.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(hf_text.hidden_size_per_layer_input, d, bias=False)
        self.per_layer_norm = RMSNorm(d, eps)
        for name in ("streams_pre", "resid_pre", "predicted", "resid_in", "attn_out", "laurel_out", "resid_mid",
                     "mlp_out", "activated", "corrected", "per_layer_input", "per_layer_out", "streams_post",
                     "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def _with_active(self, state: Tensor, active: Tensor) -> Tensor:
        parts = list(state.unbind(2))
        parts[self.active] = active
        return torch.stack(parts, dim=2)

    def forward(self, state: Float[Tensor, "batch pos n d_model"], ctx: AttnContext) -> Float[Tensor, "batch pos n d_model"]:
        state = self.hook_streams_pre(state)
        if self.hook_resid_pre.has_hooks():
            state = self._with_active(state, self.hook_resid_pre(state[:, :, self.active]))
        # transformers' AltUp works on [n, batch, pos, d]
        predicted = self.hook_predicted(self.altup.predict(state.permute(2, 0, 1, 3)).permute(1, 2, 0, 3))
        resid_in = self.hook_resid_in(predicted[:, :, self.active])
        normed = self.ln1(resid_in)
        laurel = self.hook_laurel_out(self.laurel(normed))
        attn_out = self.hook_attn_out(self.attn_post_norm(self.attn(normed, ctx)))
        resid_mid = self.hook_resid_mid((resid_in + attn_out + laurel) / math.sqrt(2))
        mlp_out = self.hook_mlp_out(self.mlp_post_norm(self.mlp(self.ln2(resid_mid))))
        activated = self.hook_activated(resid_mid + mlp_out)
        corrected = self.altup.correct(predicted.permute(2, 0, 1, 3), activated).permute(1, 2, 0, 3)
        corrected = self.hook_corrected(corrected)
        first = corrected[:, :, self.active]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        per_layer = self.hook_per_layer_input(ctx.extra["per_layer"][:, :, self.layer])
        gated = F.gelu(self.per_layer_input_gate(first), approximate="tanh") * per_layer
        extra = self.hook_per_layer_out(self.per_layer_norm(self.per_layer_projection(gated)))
        keep = torch.zeros(corrected.shape[2], device=corrected.device, dtype=corrected.dtype)
        keep[torch.arange(corrected.shape[2]) != self.active] = 1  # every stream but the active one gets the term
        out = self.hook_streams_post(corrected + keep[:, None] * extra[:, :, None])
        if self.hook_resid_post.has_hooks():
            out = self._with_active(out, self.hook_resid_post(out[:, :, self.active]))
        return out


class Gemma3nStreams(nn.Module):
    """What Gemma-3n does around the blocks: the per-layer inputs, the expansion of the embeddings into the AltUp
    state, its collapse after the last block, and the final logit soft-capping. Hook points:

    * ``hook_per_layer_input`` [batch, pos, n_layers, d_per_layer]: ``(proj(embeds) + per-layer token embedding)
      / sqrt(2)`` (ids beyond the per-layer vocabulary, i.e. vision / audio ids, use row 0)
    * ``hook_streams_in`` [batch, pos, n, d_model]: the initial AltUp state (stream 0 = ``hook_embed``, the others
      its projections rescaled to its magnitude)
    * ``hook_streams_out`` [batch, pos, n, d_model]: after the unembedding projections (rescaled), before their mean
    * ``hook_logits_uncapped`` [batch, pos, d_vocab]: logits before ``cap * tanh(logits / cap)``
    """

    def __init__(self, cfg: AVConfig, hf_text):
        super().__init__()
        d, L, dpl, n = cfg.d_model, cfg.n_layers, hf_text.hidden_size_per_layer_input, hf_text.altup_num_inputs
        self.n_layers, self.d_per_layer, self.n_streams = L, dpl, n
        self.vocab_per_layer = hf_text.vocab_size_per_layer_input
        self.W_E_per_layer = nn.Parameter(torch.empty(self.vocab_per_layer, L * dpl))
        self.per_layer_model_projection = nn.Linear(d, L * dpl, bias=False)
        self.per_layer_projection_norm = RMSNorm(dpl, cfg.eps)
        self.altup_projections = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(n - 1)])
        self.altup_unembed_projections = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(n - 1)])
        self.softcap = hf_text.final_logit_softcapping
        self.layer_types = tuple(hf_text.layer_types)
        self.window = hf_text.sliding_window
        self.hook_per_layer_input = HookPoint()
        self.hook_streams_in = HookPoint()
        self.hook_streams_out = HookPoint()
        self.hook_logits_uncapped = HookPoint()

    @staticmethod
    def _rescaled(x: Tensor, target: Tensor) -> Tensor:
        new = torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
        return x * target / new

    def per_layer_inputs(self, input_ids: Tensor, embeds: Tensor) -> Tensor:
        B, P = input_ids.shape
        ids = torch.where((input_ids >= 0) & (input_ids < self.vocab_per_layer), input_ids, 0)
        scale = torch.tensor(self.d_per_layer ** 0.5, dtype=self.W_E_per_layer.dtype, device=embeds.device)
        tok = (F.embedding(ids, self.W_E_per_layer) * scale).reshape(B, P, self.n_layers, self.d_per_layer)
        proj = self.per_layer_model_projection(embeds)
        proj = proj * torch.tensor(embeds.shape[-1] ** -0.5, device=embeds.device).to(embeds.dtype)
        proj = self.per_layer_projection_norm(proj.reshape(B, P, self.n_layers, self.d_per_layer))
        return (proj + tok) * torch.rsqrt(torch.tensor(2.0, device=embeds.device)).to(embeds.dtype)

    def enter(self, model, embeds: Tensor, input_ids: Tensor, position_ids: Tensor, key_mask: Tensor,
              ctx: AttnContext) -> Float[Tensor, "batch pos n d_model"]:
        """Fill ``ctx.extra`` (per-layer inputs, rotary tables and masks per layer type, the KV-sharing store)
        and return the initial AltUp state."""
        P = embeds.shape[1]
        ctx.extra["per_layer"] = self.hook_per_layer_input(self.per_layer_inputs(input_ids.to(embeds.device), embeds))
        ctx.extra["rope"] = {t: model._rotary.tables(embeds, position_ids, t) for t in set(self.layer_types)}
        masks = {"full_attention": ctx.mask}
        if key_mask.shape[1] > self.window:
            masks["sliding_attention"] = sliding_mask(key_mask, P, self.window, embeds.dtype)
        else:  # the window covers every key: the same as full causal attention
            masks["sliding_attention"] = ctx.mask
        ctx.extra["masks"] = masks
        ctx.extra["shared_kv"] = {}
        target = torch.mean(embeds ** 2, dim=-1, keepdim=True) ** 0.5
        streams = [embeds] + [self._rescaled(p(embeds), target) for p in self.altup_projections]
        return self.hook_streams_in(torch.stack(streams, dim=2))

    def exit(self, state: Float[Tensor, "batch pos n d_model"]) -> Float[Tensor, "batch pos d_model"]:
        target = torch.mean(state[:, :, 0] ** 2, dim=-1, keepdim=True) ** 0.5
        streams = [state[:, :, 0]] + [self._rescaled(p(state[:, :, i + 1]), target)
                                      for i, p in enumerate(self.altup_unembed_projections)]
        return self.hook_streams_out(torch.stack(streams, dim=2)).mean(dim=2)

    def cap(self, logits: Tensor) -> Tensor:
        logits = self.hook_logits_uncapped(logits)
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap


class Gemma3nEmbed(nn.Module):
    """Gemma-3n's token embedding: text ids -> ``W_E[id] * sqrt(d_model)``; vision and audio "hard" ids (the ranges
    above the text vocabulary, placeholders included) -> transformers' ``Gemma3nMultimodalEmbedder`` (``embed_vision``
    / ``embed_audio``, which also project the encoders' soft tokens). ``W_E`` holds the unscaled table (the tied
    unembedding reads it)."""

    def __init__(self, cfg: AVConfig, hf):
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder

        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.scale = cfg.d_model ** 0.5
        self.embed_vision = Gemma3nMultimodalEmbedder(hf.vision_config, hf.text_config)
        self.embed_audio = Gemma3nMultimodalEmbedder(hf.audio_config, hf.text_config)

    def forward(self, tokens: Tensor) -> Tensor:
        x = F.embedding(tokens, self.W_E) * torch.tensor(self.scale, device=tokens.device).to(self.W_E.dtype)
        for emb, upper in ((self.embed_vision, self.embed_audio.vocab_offset), (self.embed_audio, None)):
            hard = tokens >= emb.vocab_offset
            if upper is not None:
                hard &= tokens < upper
            if bool(hard.any()):
                ids = torch.where(hard, tokens, emb.vocab_offset)
                x = torch.where(hard[..., None], emb(input_ids=ids).to(x.dtype), x)
        return x
