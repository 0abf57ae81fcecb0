"""BEATs, the audio encoder of VideoLLaMA2.1-7B-AV, written out layer by layer.

VideoLLaMA2's audio branch runs a fine-tuned BEATs_iter3+ (AS2M, cpt2) tower on Kaldi log-mel filter banks
and hands the tower's last hidden state to the audio projector (``mm_projector_a``). This module recomputes
that hidden state from the published equations, with the published parameter names, so a published state
dict loads strictly and torch forward hooks on ``BEATsEncoder.layers[i]`` see each layer's output.

The computation, in order (shapes for the published sizes; ``frames`` = 100 per second of audio)::

    fbank [batch, frames, 128]                              Kaldi fbank of 16 kHz audio (see beats_fbank)
    (fbank - 15.41663) / (2 * 6.55582)                      the published normalisation, inside the tower
    patch_embedding: Conv2d(1, 512, 16, stride 16)          16x16 (time x mel) patches, no bias
      -> [batch, 512, frames // 16, 8] -> [batch, pos, 512] pos = (frames // 16) * 8, time-major:
                                                            token n is time patch n // 8, mel patch n % 8
    layer_norm (512), post_extract_proj 512 -> 768
    + conv positional embedding                             x + GELU(SamePad(Conv1d_wn(x)))
    encoder.layer_norm (768)                                (post-norm model: the norm comes first here)
    12 x encoder layer (post-norm, deep-norm residuals):
        x = LN(alpha * x + Attn(x));   x = LN(alpha * x + FFN(x)),   alpha = (2 * n_layers) ** 0.25
    -> [batch, pos, 768]                                    what extract_features returns; no final norm

**Convolutional positional embedding.** A grouped Conv1d over positions (kernel 128, 16 groups, padding 64;
the even kernel yields one extra output, which ``SamePad`` drops), followed by GELU and added to the input.
Its weight is weight-normalised: the checkpoint stores ``weight_g`` [1, 1, 128] and ``weight_v``
[768, 48, 128], and the effective weight is ``g * v / sqrt(sum(v**2) + 1e-6)`` where the sum runs over the
output- and input-channel dims for each kernel tap (``dim=2``). The ``1e-6`` and the fp32 norm come from
VideoLLaMA2's own ``weight_norm_fix.py``, which replaces ``torch.nn.utils.weight_norm`` there.

**Relative position buckets.** Attention logits get a learned per-head bias that depends only on the
signed distance ``d = key_pos - query_pos``. Distances are mapped to ``num_buckets`` buckets: half for
``d <= 0``, half for ``d > 0`` (offset ``num_buckets // 2``). Within a half (``n = num_buckets // 2``
buckets), ``|d| < n // 2`` gets its own bucket; larger ``|d|`` is binned logarithmically,
``n//2 + floor(log(|d| / (n//2)) / log(max_distance / (n//2)) * (n - n//2))``, capped at ``n - 1``.
With 320 buckets and max distance 800: distances 0..79 are exact, 80..799 share 80 log-spaced buckets, and
everything at 800 or beyond shares the last one. The table ``relative_attention_bias`` [320, 12] lives in
layer 0; the published code deletes it from layers 1..11 and points them at layer 0's module, and the bias
tensor [batch, head, query, key] is computed once in layer 0 and passed on to every later layer.

**The gate (gated relative position bias, "gru_rel_pos").** Each layer rescales the shared bias per query
and head, from that query's own (pre-scaling) projection ``q`` [batch, head, pos, d_head]::

    a, b = sigmoid(grep_linear(q).view(..., 2, 4).sum(-1))        grep_linear: d_head -> 8
    gate = a * (b * grep_a - 1) + 2                                grep_a: [1, head, 1, 1]
    logits = q k^T / sqrt(d_head) + gate * bias

so the gate spans ``(1, 1 + grep_a)`` and lets each query choose how much positional prior it wants. The
published attention computes the logits as ``((q * s / 32) k^T - rowmax) * 32`` (``s = d_head**-0.5``) and
rebuilds the gate's input as ``q_scaled * 32 / s``; this module repeats that order of operations so bf16 runs
round like the original. A key padding mask sets masked keys' logits to ``-inf`` before the bias is added.

**Padding mask.** ``padding_mask`` [batch, frames] (or [batch, frames, 128], as VideoLLaMA2 passes it; True =
padding) is reduced to tokens exactly as the published ``forward_padding_mask`` does: drop
``frames % pos`` trailing frames, split the rest into ``pos`` consecutive chunks, and mark a token padded if
its whole chunk is. (That chunking ignores the time-major patch layout; VideoLLaMA2 always passes an
all-False mask, which this module, like the original, makes equal to no mask.) Padded tokens are zeroed
before the positional convolution and are masked as keys.

Sizes of the VideoLLaMA2.1-7B-AV tower (``BEATsConfig()`` defaults): patch 16, embed_dim 512, 12 layers,
d_model 768, FFN 3072, 12 heads (d_head 64), GELU, post-norm with deep norm (alpha = 24**0.25), conv_pos 128
in 16 groups, 320 buckets, max distance 800, gated bias on, AudioSet-527 ``predictor`` head present in the
weights but unused for features. VideoLLaMA2 pads/crops every clip to 30 s: 2998 fbank frames -> 187 x 8 =
1496 tokens (10 s: 998 frames -> 62 x 8 = 496 tokens), each [768], projected by ``mm_projector_a``
(inferred, not read from config.json: its 31.2 MB bf16 file fits mlp2x_gelu 768 -> 3584 -> 3584).

Sources (read, not copied):

* VideoLLaMA2 ``audio_visual`` branch, commit 8cedfbd (github.com/DAMO-NLP-SG/VideoLLaMA2):
  ``videollama2/model/beats/BEATs.py`` (config defaults, ``preprocess`` constants, ``extract_features``,
  ``forward_padding_mask``), ``.../beats/backbone.py`` (encoder, layer, attention, buckets, gate, deep norm,
  shared bias table), ``.../beats/modules.py`` (``SamePad``, fp32 GELU), ``.../beats/weight_norm_fix.py``
  (weight norm with eps 1e-6, dim=2), ``videollama2/model/encoder.py`` (``build_audio_tower``: the model is
  built from ``BEATsConfig()`` defaults when loaded with the LLM; ``audio_tower.bin`` keys carry the prefix
  ``model.audio_tower.``), ``videollama2/model/videollama2_arch.py`` (``extract_features(fbank,
  padding_mask=zeros, feature_only=True)`` -> ``mm_projector_a``), ``videollama2/mm_utils.py`` (30 s
  pad/crop, ``waveform * 2**15``, ``ta_kaldi.fbank(num_mel_bins=128, sample_frequency=16000,
  frame_length=25, frame_shift=10)`` cast to bf16), ``videollama2/model/projector.py``.
* huggingface.co/DAMO-NLP-SG/VideoLLaMA2.1-7B-AV, commit acd1625 ("add VideoLLaMA2.1-AV model"): the tower
  ships as ``audio_tower.bin`` (bf16, LFS size 181514532 bytes = 2 bytes x this module's 90,717,055 unique
  parameters + ~80 kB of pickle/zip overhead), the model card names "Fine-tuned BEATs_iter3+(AS2M)(cpt2)".
  The checkpoint's ``config.json`` and ``model.safetensors.index.json`` were NOT readable here (only their
  names and sizes), so key names come from the published code; third-party loaders of that checkpoint
  (found by code search) read ``model.audio_tower.encoder.pos_conv.0.weight_g`` / ``weight_v`` from its
  safetensors index, which agrees.
* BEATs paper: Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", arXiv:2212.09058.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

__all__ = ["BEATsConfig", "BEATsEncoder", "BEATsEncoderLayer", "BEATsAttention", "beats_fbank",
           "relative_position_bucket"]

FBANK_MEAN = 15.41663  # BEATs.preprocess / extract_features defaults
FBANK_STD = 6.55582
_ATTN_ALPHA = 32.0  # the published attention's logit rescaling constant ("alpha = 32")
_WN_EPS = 1e-6  # weight_norm_fix.py: v * rsqrt(sum(v**2) + 1e-6)


@dataclass
class BEATsConfig:
    """The published BEATs cfg; defaults are the values VideoLLaMA2.1-7B-AV's audio tower is built with."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    hidden_size: int = 4096  # LLM width in the published cfg (config.json overrides: 3584 for Qwen2); unused here
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 0.6  # training-only (gradient scaling); ignored
    layer_norm_first: bool = False
    deep_norm: bool = True
    # dropouts / layerdrop: training-only, ignored at inference
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True  # the checkpoint carries the AudioSet predictor head
    predictor_dropout: float = 0.0
    predictor_class: int = 527
    extra: dict = field(default_factory=dict)  # keys of a loaded cfg this dataclass does not know

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> "BEATsConfig":
        """Build from a published cfg dict (e.g. a BEATs ``.pt`` checkpoint's ``cfg``); unknown keys go to
        ``extra``, missing ones keep the defaults (as the published ``BEATsConfig.update`` does)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        cfg = dict(cfg or {})
        known = {k: v for k, v in cfg.items() if k in names}
        return cls(**known, extra={k: v for k, v in cfg.items() if k not in names})

    @property
    def d_head(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @property
    def deep_norm_alpha(self) -> float:
        return math.pow(2 * self.encoder_layers, 0.25) if self.deep_norm else 1.0

    def n_tokens(self, n_frames: int, n_mels: int = 128) -> int:
        """Tokens out of the patch embedding for ``n_frames`` fbank frames."""
        p = self.input_patch_size
        return (n_frames // p) * (n_mels // p)


def relative_position_bucket(
    relative_position: Int[Tensor, "..."], num_buckets: int, max_distance: int
) -> Int[Tensor, "..."]:
    """Bidirectional T5-style bucket of ``key_pos - query_pos`` (published ``_relative_positions_bucket``)."""
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * half
    dist = relative_position.abs()
    max_exact = half // 2
    is_small = dist < max_exact
    large = max_exact + (
        torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(is_small, dist, large)


def _activation(name: str):
    if name == "gelu":  # modules.gelu: computed in fp32, cast back
        return lambda x: F.gelu(x.float()).type_as(x)
    if name in ("gelu_accurate", "gelu_fast"):
        return lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
    if name == "relu":
        return F.relu
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    raise NotImplementedError(f"BEATs activation_fn={name!r} is not supported here (the published tower uses gelu)")


class _WeightNormConv1d(nn.Module):
    """Grouped Conv1d with a weight-normalised kernel stored as ``weight_g`` / ``weight_v`` (norm over dims
    0 and 1, i.e. one magnitude per kernel tap, as ``weight_norm(conv, dim=2)`` in the published code)."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.kernel_size, self.groups, self.padding = kernel_size, groups, kernel_size // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel_size * channels)))

    @property
    def weight(self) -> Float[Tensor, "d_out d_in_per_group kernel"]:
        v = self.weight_v
        v32 = v.float()
        norm_inv = torch.rsqrt(v32.pow(2).sum(dim=(0, 1), keepdim=True) + _WN_EPS)
        return self.weight_g * (v32 * norm_inv).to(v.dtype)

    def forward(self, x: Float[Tensor, "batch d_model pos"]) -> Float[Tensor, "batch d_model pos_plus"]:
        return F.conv1d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)


class _SamePad(nn.Module):
    """Drop the extra trailing output an even-sized, symmetrically padded kernel produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class BEATsAttention(nn.Module):
    """Multi-head self-attention with the gated relative position bias (published ``MultiheadAttention``,
    self-attention path only). Parameter names: q/k/v/out_proj, relative_attention_bias (layer 0's table,
    shared by reference in later layers), grep_linear, grep_a."""

    def __init__(self, cfg: BEATsConfig, has_table: bool):
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        if d % h:
            raise ValueError("encoder_embed_dim must be divisible by encoder_attention_heads")
        self.n_heads, self.d_head = h, d // h
        self.scaling = self.d_head ** -0.5
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.has_relative_attention_bias = cfg.relative_position_embedding
        self.gru_rel_pos = cfg.gru_rel_pos
        if self.has_relative_attention_bias and has_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, h)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.d_head, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def compute_bias(self, n_query: int, n_key: int) -> Float[Tensor, "1 head query_pos key_pos"]:
        """The (ungated) relative position bias from this layer's table."""
        table = self.relative_attention_bias.weight
        q_pos = torch.arange(n_query, device=table.device)[:, None]
        k_pos = torch.arange(n_key, device=table.device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        key_padding_mask: Optional[Bool[Tensor, "batch pos"]] = None,
        position_bias: Optional[Float[Tensor, "1 head pos pos"]] = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Optional[Float[Tensor, "1 head pos pos"]]]:
        B, P, _ = x.shape
        H, Dh = self.n_heads, self.d_head
        if self.has_relative_attention_bias and position_bias is None:
            position_bias = self.compute_bias(P, P)

        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        q = q * self.scaling
        q = q * (1.0 / _ATTN_ALPHA)
        q = q.view(B, P, H, Dh).transpose(1, 2)  # [batch, head, pos, d_head]
        k = k.view(B, P, H, Dh).transpose(1, 2)
        v = v.view(B, P, H, Dh).transpose(1, 2)

        scores = q @ k.transpose(-1, -2)  # [batch, head, query_pos, key_pos]
        scores = (scores - scores.max(dim=-1, keepdim=True)[0]) * _ATTN_ALPHA
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))

        if position_bias is not None:
            bias = position_bias
            if self.gru_rel_pos:
                q_raw = q * _ATTN_ALPHA / self.scaling  # the pre-scaling query projection
                gates = torch.sigmoid(self.grep_linear(q_raw).view(B, H, P, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)  # [batch, head, pos, 1] each
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                bias = gate * position_bias
            scores = scores + bias

        pattern = F.softmax(scores, dim=-1).type_as(scores)
        z = (pattern @ v).transpose(1, 2).reshape(B, P, H * Dh)
        return self.out_proj(z), position_bias


class BEATsEncoderLayer(nn.Module):
    """One transformer layer (published ``TransformerSentenceEncoderLayer``), batch-first.

    Returns ``(hidden, position_bias)``: ``hidden`` [batch, pos, d_model] is what forward hooks route;
    ``position_bias`` is layer 0's ungated bias, handed to the next layer."""

    def __init__(self, cfg: BEATsConfig, has_table: bool):
        super().__init__()
        d = cfg.encoder_embed_dim
        if cfg.activation_fn == "glu":
            raise NotImplementedError("BEATs activation_fn='glu' (GLU_Linear fc1) is not supported here")
        self.self_attn = BEATsAttention(cfg, has_table)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = _activation(cfg.activation_fn)
        self.layer_norm_first = cfg.layer_norm_first
        self.deep_norm_alpha = cfg.deep_norm_alpha

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        key_padding_mask: Optional[Bool[Tensor, "batch pos"]] = None,
        position_bias: Optional[Float[Tensor, "1 head pos pos"]] = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Optional[Float[Tensor, "1 head pos pos"]]]:
        if self.layer_norm_first:  # pre-norm variant (not the published tower's)
            attn, position_bias = self.self_attn(self.self_attn_layer_norm(x), key_padding_mask, position_bias)
            x = x + attn
            x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
            return x, position_bias
        attn, position_bias = self.self_attn(x, key_padding_mask, position_bias)
        x = self.self_attn_layer_norm(x * self.deep_norm_alpha + attn)
        x = self.final_layer_norm(x * self.deep_norm_alpha + self.fc2(self.act(self.fc1(x))))
        return x, position_bias


class BEATsTransformerEncoder(nn.Module):
    """Positional convolution, input norm and the layer stack (published ``TransformerEncoder``)."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(_WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups),
                                      _SamePad(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList([BEATsEncoderLayer(cfg, has_table=(i == 0)) for i in range(cfg.encoder_layers)])
        if cfg.relative_position_embedding:  # later layers point at layer 0's table (same module, same keys)
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(d)
        self.layer_norm_first = cfg.layer_norm_first

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], padding_mask: Optional[Bool[Tensor, "batch pos"]] = None
    ) -> Float[Tensor, "batch pos d_model"]:
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        position_bias = None
        for layer in self.layers:
            out = layer(x, padding_mask, position_bias)
            x, position_bias = out[0], out[1]
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATsEncoder(nn.Module):
    """The BEATs audio tower: fbank -> [batch, pos, d_model], equal to the published ``extract_features``.

    Parameter names equal the published model's (``audio_tower.bin`` / the LLM checkpoint store them under
    ``model.audio_tower.``; strip that prefix before ``load_state_dict``). ``self.layers`` is the encoder's
    layer list (``encoder.layers``), for per-layer forward hooks."""

    def __init__(self, cfg: BEATsConfig | None = None):
        super().__init__()
        cfg = cfg or BEATsConfig()
        self.cfg = cfg
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        if cfg.deep_norm and cfg.layer_norm_first:
            raise ValueError("BEATs: deep_norm and layer_norm_first are exclusive")
        self.encoder = BEATsTransformerEncoder(cfg)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None
        self._register_load_state_dict_pre_hook(self._accept_published_variants, with_module=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @staticmethod
    def token_padding_mask(
        mask: Bool[Tensor, "batch frames *n_mels"], n_tokens: int
    ) -> Bool[Tensor, "batch n_tokens"]:
        """The published ``forward_padding_mask``: frames (or frames x mels) -> tokens by consecutive chunks."""
        mask = mask.reshape(mask.shape[0], mask.shape[1], -1).all(-1)
        extra = mask.shape[1] % n_tokens
        if extra:
            mask = mask[:, :-extra]
        return mask.view(mask.shape[0], n_tokens, -1).all(-1)

    def extract_features(
        self,
        fbank: Float[Tensor, "batch frames n_mels"],
        padding_mask: Optional[Bool[Tensor, "batch frames *n_mels"]] = None,
        fbank_mean: float = FBANK_MEAN,
        fbank_std: float = FBANK_STD,
    ) -> tuple[Float[Tensor, "batch pos d_model"], int, int]:
        """As the published method with ``feature_only=True``: (features, time patches, mel patches)."""
        x = (fbank - fbank_mean) / (2 * fbank_std)
        if padding_mask is not None:  # first reduction: drop the mel axis (frames stay frames)
            padding_mask = self.token_padding_mask(padding_mask, x.shape[1])
        feats = self.patch_embedding(x.unsqueeze(1))  # [batch, embed_dim, time_patches, mel_patches]
        T, Fq = feats.shape[2], feats.shape[3]
        feats = feats.flatten(2).transpose(1, 2)  # [batch, pos, embed_dim], time-major
        feats = self.layer_norm(feats)
        if padding_mask is not None:
            padding_mask = self.token_padding_mask(padding_mask, feats.shape[1])
        if self.post_extract_proj is not None:
            feats = self.post_extract_proj(feats)
        return self.encoder(feats, padding_mask), T, Fq

    def forward(
        self,
        fbank: Float[Tensor, "batch frames n_mels"],
        padding_mask: Optional[Bool[Tensor, "batch frames *n_mels"]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The features VideoLLaMA2 feeds ``mm_projector_a`` (raw Kaldi fbank in, normalised here)."""
        return self.extract_features(fbank, padding_mask)[0]

    def _accept_published_variants(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Let two spellings of the published weights load strictly: the shared bias table stored under
        layer 0 only (de-duplicating savers drop the aliases), and torch's parametrized weight-norm names
        (``parametrizations.weight.original0/1`` for ``weight_g/weight_v``)."""
        wn = prefix + "encoder.pos_conv.0."
        for new, old in (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1")):
            if wn + old in state_dict and wn + new not in state_dict:
                state_dict[wn + new] = state_dict.pop(wn + old)
        if self.cfg.relative_position_embedding:
            key0 = prefix + "encoder.layers.0.self_attn.relative_attention_bias.weight"
            if key0 in state_dict:
                for i in range(1, len(self.layers)):
                    state_dict.setdefault(prefix + f"encoder.layers.{i}.self_attn.relative_attention_bias.weight",
                                          state_dict[key0])


def _kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float) -> Tensor:
    """Kaldi's triangular mel filters [n_mels, n_fft // 2 + 1] (last column, the Nyquist bin, is zero)."""
    def mel(f):
        return 1127.0 * (1.0 + f / 700.0).log() if isinstance(f, Tensor) else 1127.0 * math.log(1.0 + f / 700.0)

    if high_freq <= 0.0:
        high_freq += sample_rate / 2
    lo, hi = mel(low_freq), mel(high_freq)
    delta = (hi - lo) / (n_mels + 1)
    b = torch.arange(n_mels, dtype=torch.float32)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1.0) * delta, lo + (b + 2.0) * delta
    m = mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32))[None, :]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def beats_fbank(waveform: Float[Tensor, "*channels samples"], sample_rate: int = 16000) -> Float[Tensor, "frames 128"]:
    """VideoLLaMA2's audio features for one clip: ``ta_kaldi.fbank(wav * 2**15, num_mel_bins=128,
    sample_frequency=16000, frame_length=25, frame_shift=10)`` with torchaudio's other defaults (no dither,
    DC offset removed, pre-emphasis 0.97, Povey window, 512-point FFT, power spectrum, mel 20 Hz..Nyquist,
    log floored at fp32 eps, snip_edges), in torch only.

    ``waveform`` is 16 kHz audio in [-1, 1] ([samples], or [channels, samples]: channel 0 is used, as Kaldi
    does). Computed in the waveform's dtype (mel filters built in fp32, as torchaudio does); VideoLLaMA2 then
    casts to bf16. Returns the un-normalised fbank; :class:`BEATsEncoder` applies the published
    ``(fbank - 15.41663) / (2 * 6.55582)``. VideoLLaMA2 also pads/crops the waveform to 30 s first
    (``mm_utils.process_audio_file``); that is the caller's choice here."""
    if sample_rate != 16000:
        raise ValueError(f"BEATs fbank expects 16 kHz audio (got {sample_rate}); resample first")
    if not waveform.is_floating_point():
        raise TypeError("beats_fbank expects a float waveform in [-1, 1]")
    wav = waveform[0] if waveform.dim() == 2 else waveform
    if wav.dim() != 1:
        raise ValueError(f"waveform must be [samples] or [channels, samples], got {tuple(waveform.shape)}")
    wav = wav * 2 ** 15
    win, hop, n_fft = 400, 160, 512  # 25 ms, 10 ms at 16 kHz; next power of two
    if wav.shape[0] < win:
        return wav.new_zeros(0, 128)
    frames = wav.unfold(0, win, hop)  # [frames, 400]: 1 + (samples - 400) // 160 frames
    frames = frames - frames.mean(dim=-1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=-1)
    frames = frames - 0.97 * prev
    window = torch.hann_window(win, periodic=False, dtype=frames.dtype, device=frames.device).pow(0.85)
    frames = F.pad(frames * window, (0, n_fft - win))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [frames, 257]
    banks = _kaldi_mel_banks(128, n_fft, float(sample_rate), 20.0, 0.0).to(power.device, power.dtype)
    energies = power @ banks.T
    eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=power.dtype, device=power.device)
    return torch.maximum(energies, eps).log()
