"""AVConfig: the hooked backbone's configuration, in TransformerLens's vocabulary.

TransformerLens's helpers (ActivationCache, patching) read ``model.cfg.n_layers``, ``d_head``,
``normalization_type`` and friends, so the config uses TL's field names and meanings. The multimodal part —
token ids, TMRoPE sections, media timing — sits beside them. An adapter (``av_lens.adapters``) builds an
AVConfig from a transformers config; nothing else in the package reads transformers configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from av_lens.layout import TokenIds


@dataclass
class AVConfig:
    # --- TransformerLens-compatible fields --------------------------------------------------------
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: int | None = None
    n_ctx: int = 32768
    d_vocab_out: int = -1
    act_fn: str = "silu"
    normalization_type: str = "RMS"
    final_rms: bool = True
    eps: float = 1e-6
    attn_only: bool = False
    gated_mlp: bool = True
    positional_embedding_type: str = "rotary"
    rotary_base: float = 1_000_000.0
    rotary_dim: int | None = None
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    ungroup_grouped_query_attention: bool = False
    parallel_attn_mlp: bool = False
    default_prepend_bos: bool = False
    tokenizer_prepends_bos: bool = False
    original_architecture: str = ""
    model_name: str = ""
    device: Any = "cpu"
    dtype: torch.dtype = torch.float32
    # --- multimodal -------------------------------------------------------------------------------
    tie_word_embeddings: bool = False
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tokens: TokenIds | None = None
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    position_id_per_seconds: int = 25
    seconds_per_chunk: float = 2.0
    spatial_merge_size: int = 2
    audio_sample_rate: int = 16000
    #: the media kinds the model takes (a vision-language base has no "audio")
    modalities: tuple[str, ...] = ("audio", "image", "video")
    #: position rules of the family (av_lens.layout.MediaSpec.rope_rules)
    rope_rules: str = "qwen2_5_omni"
    # --- architecture variants (defaults: the Qwen2 decoder of Qwen2.5-Omni / -VL) ------------------
    attn_bias: bool = True  # q/k/v projection biases
    qk_norm: bool = False  # RMSNorm over d_head on queries and keys before the rotary embedding (Qwen3)
    n_experts: int = 0  # > 0: sparse mixture-of-experts MLPs in the layers listed in moe_layers
    n_experts_per_tok: int = 0
    d_mlp_expert: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()
    n_deepstack: int = 0  # visual features added to the residual stream after blocks 0..n_deepstack-1
    audio_n_window: int = 0  # > 0: Qwen3-Omni's chunked audio-token count (n_window mel frames per half chunk)
    system_prompt: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.d_head:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to d_head/2 = {self.d_head // 2}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_key_value_heads
