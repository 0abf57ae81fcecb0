"""Parity of a hooked model with its transformers reference, as the adapter tests check it.

``assert_parity(ours, ref, inputs)`` runs both on the same input and asserts that the logits, the embeddings
(``hook_embed`` vs ``hidden_states[0]``) and every layer's residual stream agree within ``tol`` at the real
(non-pad) positions. transformers records a layer's output before Qwen3-Omni's deepstack addition, so where a
block has ``hook_deepstack`` that term is subtracted before comparing; its last hidden state is after the final
norm, so ``ln_final`` is applied to ours.
"""

from __future__ import annotations

import torch


def assert_parity(ours, ref, inputs, tol: float = 1e-4):
    """Assert logits and residuals match the reference model; returns our cache for further checks."""
    with torch.no_grad():
        logits, cache = ours.run_with_cache(inputs)
        out = ref(**ours.reference_kwargs(inputs), output_hidden_states=True)
    real = inputs.attention_mask.bool()
    d = (logits - out.logits)[real].abs().max().item()
    assert d <= tol, f"logits differ by {d}"
    d = (cache["hook_embed"] - out.hidden_states[0])[real].abs().max().item()
    assert d <= tol, f"embeddings differ by {d}"
    n = ours.cfg.n_layers
    for layer in range(n - 1):
        mine = cache[f"blocks.{layer}.hook_resid_post"]
        if f"blocks.{layer}.hook_deepstack" in cache:
            mine = mine - cache[f"blocks.{layer}.hook_deepstack"]
        d = (mine - out.hidden_states[layer + 1])[real].abs().max().item()
        assert d <= tol, f"layer {layer} residual differs by {d}"
    last = ours.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"])
    d = (last - out.hidden_states[n])[real].abs().max().item()
    assert d <= tol, f"final normalised residual differs by {d}"
    return cache
