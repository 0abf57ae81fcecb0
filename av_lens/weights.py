"""TransformerLens's weight processing for RMSNorm models, on request (``from_pretrained(..., fold_ln=True)``).

av_lens loads the checkpoint's weights unprocessed by default — activations, head ablations and patching are
those of the original model — whereas TransformerLens's ``HookedTransformer.from_pretrained`` processes them
by default. Each option here has TL 3's meaning for a model with RMSNorm (``normalization_type="RMS"``):

* ``fold_ln``: each RMSNorm's weight is folded into the linear maps that read it — ``W_Q, W_K, W_V <- diag(w1) W``
  (ln1), ``W_gate, W_in <- diag(w2) W`` (ln2), ``W_U <- diag(w_final) W_U`` — and the norms keep only the
  normalisation (weight 1; ``cfg.normalization_type = "RMSPre"``). Logits are unchanged. With tied embeddings
  the unembedding becomes its own matrix (``W_E`` is not changed).
* ``center_writing_weights``: TL centres the weights that write to the residual stream only for LayerNorm
  models (an RMSNorm does not remove the mean); for RMSNorm TL skips it with a warning, and so does av_lens.
* ``center_unembed``: ``W_U <- W_U - mean over the vocabulary`` (and ``b_U`` likewise). Logits shift by a
  per-position constant; log-probabilities are unchanged.
* ``fold_value_biases``: the value biases move into the output bias, ``b_O <- b_O + sum_h b_V[h] W_O[h]``,
  ``b_V <- 0`` (exact, since attention rows sum to one). Logits are unchanged, but ``hook_v``/``hook_z`` no longer
  contain the bias, so zero-ablating a head at ``hook_z`` removes a different amount (see the notes).
* ``refactor_factored_attn_matrices``: refused, as TL refuses it for rotary models (the QK circuit depends on
  the relative position).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from av_lens.errors import InputError


def process_weights(model, *, fold_ln: bool = False, center_writing_weights: bool = False,
                    center_unembed: bool = False, fold_value_biases: bool = False,
                    refactor_factored_attn_matrices: bool = False):
    """Apply TransformerLens's weight processing to ``model`` in place (see the module docstring); returns it."""
    if refactor_factored_attn_matrices:
        raise InputError("refactor_factored_attn_matrices=True cannot be applied to a model with rotary position "
                         "embeddings (its QK circuit depends on the relative position; TransformerLens refuses it too)",
                         "leave refactor_factored_attn_matrices=False; build FactoredMatrix(W_Q, W_K^T) per head "
                         "yourself for an analysis at fixed positions")
    if not (fold_ln or center_writing_weights or center_unembed or fold_value_biases):
        return model
    cfg = model.cfg
    if model.stream is not None or cfg.n_experts:
        raise InputError(f"weight processing (fold_ln=, fold_value_biases=, center_unembed=) is not implemented for "
                         f"{cfg.original_architecture} (AltUp streams or mixture-of-experts MLPs)",
                         "load it unprocessed (the default); fold by hand where an analysis needs it")
    with torch.no_grad():
        if fold_ln:
            _fold_ln(model)
        if center_writing_weights:
            warnings.warn("center_writing_weights=True is skipped: the model uses RMSNorm, which does not remove the "
                          "mean, so centring the writing weights would change its outputs (TransformerLens skips it "
                          "for RMSNorm models too)", stacklevel=3)
        if fold_value_biases:
            _fold_value_biases(model)
        if center_unembed:
            W = _own_unembed(model)
            W.sub_(W.mean(0, keepdim=True))  # stored [vocab, d_model]: the mean over the vocabulary
            model.unembed.b_U.sub_(model.unembed.b_U.mean())
    cfg.extra["weight_processing"] = {"fold_ln": fold_ln, "center_writing_weights": False,
                                      "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}
    return model


def _own_unembed(model) -> torch.Tensor:
    """The unembedding's own weight matrix [vocab, d_model], untied from the embedding first if needed."""
    u = model.unembed
    if u._tied_to is not None:
        u.weight = nn.Parameter(u._tied_to[0].W_E.detach().clone())
        u._tied_to = None
        model.cfg.tie_word_embeddings = False
    return u.weight


def _fold_norm(norm, *linears: nn.Linear) -> None:
    w = norm.w.detach()
    for lin in linears:
        lin.weight.mul_(w.to(lin.weight.dtype)[None, :])
    norm.w.fill_(1.0)


def _fold_ln(model) -> None:
    for block in model.blocks:
        _fold_norm(block.ln1, block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)
        _fold_norm(block.ln2, block.mlp.gate_proj, block.mlp.up_proj)
    W = _own_unembed(model)
    W.mul_(model.ln_final.w.detach().to(W.dtype)[None, :])
    model.ln_final.w.fill_(1.0)
    model.cfg.normalization_type = "RMSPre"


def _fold_value_biases(model) -> None:
    for block in model.blocks:
        attn = block.attn
        if attn.v_proj.bias is None:
            continue
        b_V = attn.b_V  # [head, d_head], repeated over each key/value group
        shift = torch.einsum("hd,hdm->m", b_V.float(), attn.W_O.float()).to(attn.o_proj.weight.dtype)
        if attn.o_proj.bias is None:
            attn.o_proj.bias = nn.Parameter(torch.zeros(attn.o_proj.out_features, dtype=attn.o_proj.weight.dtype,
                                                        device=attn.o_proj.weight.device))
        attn.o_proj.bias.add_(shift)
        attn.v_proj.bias.zero_()
