"""Token embedding and unembedding, with TransformerLens's weight names.

``Embed.W_E`` is [d_vocab, d_model]. ``Unembed.W_U`` is a [d_model, d_vocab_out] *view* of the stored
[d_vocab_out, d_model] matrix (the layout transformers' lm_head uses, so the matmul runs as a plain linear
layer); with tied embeddings the unembedding reads the embedding's parameter. Qwen has no unembedding bias:
``b_U`` is a zero buffer so TransformerLens helpers that read it work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab_out: int, tied_to: Embed | None = None):
        super().__init__()
        self._tied_to = [tied_to] if tied_to is not None else None  # list: do not register twice
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(d_vocab_out, d_model))
        self.register_buffer("b_U", torch.zeros(d_vocab_out), persistent=False)

    @property
    def weight_matrix(self) -> Float[Tensor, "d_vocab_out d_model"]:
        return self._tied_to[0].W_E if self._tied_to is not None else self.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab_out"]:
        return self.weight_matrix.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab_out"]:
        return F.linear(x, self.weight_matrix)
