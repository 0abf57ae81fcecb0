"""The hooked backbone's parts, one small file each: norm, embedding, attention, MLP, block, unembedding,
and the hook-point wrappers around the native audio and vision encoders."""

from av_lens.components.attention import Attention
from av_lens.components.block import TransformerBlock
from av_lens.components.embed import Embed, Unembed
from av_lens.components.encoders import EncoderHooks
from av_lens.components.mlp import GatedMLP
from av_lens.components.moe import SparseMoE
from av_lens.components.rms_norm import RMSNorm

__all__ = ["Attention", "TransformerBlock", "Embed", "Unembed", "EncoderHooks", "GatedMLP", "RMSNorm", "SparseMoE"]
