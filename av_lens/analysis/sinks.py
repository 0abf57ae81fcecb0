"""Attention sinks and massive activations, per modality.

Two phenomena 2026 papers on multimodal LLMs look for at media positions (cross-modal hubs, arXiv 2510.22603):

* an **attention sink** is a key position that absorbs a large share of the attention of the queries that can
  see it, whatever they ask (the first token, a marker, a few visual tokens);
* a **massive activation** (Sun et al. 2024) is a residual-stream entry orders of magnitude larger than the
  typical entry, usually in a few fixed dimensions, at a few positions.

    res = scan_sinks(model, inputs)                # one forward; patterns are reduced layer by layer
    res.sinks(threshold=0.3)                        # (sample, layer, head, position, label, share) rows
    res.massive(ratio=100.0)                        # (sample, layer, position, dim, value, ratio) rows
    res.by_modality(threshold=0.3)                  # per layer: sinks and massive positions per modality

Thresholds are relative, never model dimensions: a key is a sink in a head when the queries that see it give
it on average at least ``threshold`` of their attention (default 0.3); a position is massive in a layer when
its largest |activation| is at least ``ratio`` times the median |activation| of that layer's real positions
(default 100, Sun et al.'s "about 100x to 10,000x the median"). Both can be changed after the run: the result
keeps the per-key received share and the per-position maxima, not the patterns.

``received[b, l, h, k]`` is the mean over the real query rows q ≥ k of ``pattern[b, h, q, k]``; residuals are
read at ``blocks.{l}.hook_resid_post`` (index l + 1) and ``blocks.0.hook_resid_pre`` (index 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from av_lens.analysis._common import check_layers
from av_lens.errors import InputError
from av_lens.layout import Modality, ModalityLayout


@dataclass
class SinkResult:
    """Per-key attention received and per-position activation maxima of one forward."""

    received: Float[Tensor, "batch layer head pos"]   # mean attention share given to each key
    max_abs: Float[Tensor, "batch resid pos"]         # max_d |resid| per position
    max_dim: Tensor                                   # [batch, resid, pos] argmax dimension
    median_abs: Float[Tensor, "batch resid"]          # median |resid| over real positions and dims
    layers: list[int]
    layout: ModalityLayout

    def _label(self, b: int, p: int) -> str:
        return self.layout.labels(b)[p]

    def _modality(self, b: int, p: int) -> str:
        return Modality(int(self.layout.modality[b, p])).name.lower()

    def sinks(self, threshold: float = 0.3) -> list[dict]:
        """Every (sample, layer, head, key) whose received share is ≥ ``threshold``, largest first."""
        if not 0 < threshold <= 1:
            raise InputError(f"sink threshold must be in (0, 1], got {threshold}", "use e.g. 0.3")
        idx = (self.received >= threshold).nonzero().tolist()
        rows = [{"sample": b, "layer": self.layers[li], "head": h, "position": p, "label": self._label(b, p),
                 "modality": self._modality(b, p), "share": float(self.received[b, li, h, p])}
                for b, li, h, p in idx]
        return sorted(rows, key=lambda r: -r["share"])

    def ratio(self) -> Tensor:
        return self.max_abs / self.median_abs[..., None].clamp_min(1e-12)

    def massive(self, ratio: float = 100.0) -> list[dict]:
        """Every (sample, residual index, position) whose max |activation| is ≥ ``ratio`` x the layer median."""
        if ratio <= 1:
            raise InputError(f"massive-activation ratio must be > 1, got {ratio}", "use e.g. 100")
        r = self.ratio()
        real = self.layout.attention_mask.bool()[:, None, :].expand_as(r)
        idx = ((r >= ratio) & real).nonzero().tolist()
        rows = [{"sample": b, "resid": l, "position": p, "label": self._label(b, p), "modality": self._modality(b, p),
                 "dim": int(self.max_dim[b, l, p]), "value": float(self.max_abs[b, l, p]), "ratio": float(r[b, l, p])}
                for b, l, p in idx]
        return sorted(rows, key=lambda x: -x["ratio"])

    def by_modality(self, threshold: float = 0.3, ratio: float = 100.0) -> dict[str, dict[str, list[float]]]:
        """Per modality: attention received per layer (sum over its keys, mean over heads and samples, as a
        share of all attention), sink count per layer, massive-position count per residual index."""
        names = sorted({self._modality(b, p) for b in range(self.layout.batch_size)
                        for p in self.layout.attention_mask[b].nonzero().flatten().tolist()})
        out: dict[str, dict[str, list[float]]] = {}
        sinks, massive = self.sinks(threshold), self.massive(ratio)
        n_q = self._n_queries()
        for m in names:
            keymask = (self.layout.modality == int(Modality[m.upper()])) & self.layout.attention_mask.bool()
            # received[b,l,h,k] is a mean over the queries that see k; weight by how many do
            w = n_q[:, None, None, :] * keymask[:, None, None, :]
            n_real = self.layout.attention_mask.float().sum(-1)
            mass = (self.received * w).sum(-1) / n_real.clamp_min(1)[:, None, None]
            out[m] = {
                "attention_share": mass.mean((0, 2)).tolist(),
                "sinks": [sum(1 for r in sinks if r["layer"] == l and r["modality"] == m) for l in self.layers],
                "massive": [sum(1 for r in massive if r["resid"] == i and r["modality"] == m)
                            for i in range(self.max_abs.shape[1])],
            }
        return out

    def _n_queries(self) -> Tensor:
        return queries_seeing(self.layout.attention_mask.bool())

    def table(self, threshold: float = 0.3, ratio: float = 100.0, top: int = 10) -> str:
        rows = [f"attention sinks (share >= {threshold}):"]
        rows += [f"  layer {r['layer']:>2} head {r['head']:>2} sample {r['sample']} pos {r['position']:>4} "
                 f"{r['label']:<24} {r['share']:.3f}"
                 for r in self.sinks(threshold)[:top]] or ["  none"]
        rows.append(f"massive activations (>= {ratio:g}x the layer median):")
        rows += [f"  resid {r['resid']:>2} sample {r['sample']} pos {r['position']:>4} {r['label']:<24} "
                 f"dim {r['dim']:>4} {r['ratio']:.0f}x"
                 for r in self.massive(ratio)[:top]] or ["  none"]
        return "\n".join(rows)


def queries_seeing(real: Tensor) -> Tensor:
    """[batch, pos]: the number of real query rows at or after each real key (who can see it, causally)."""
    r = real.float()
    return r.flip(-1).cumsum(-1).flip(-1) * r


def scan_sinks(model, inputs, *, layers=None) -> SinkResult:
    """Run one forward and reduce every layer's pattern to per-key received shares and every residual to
    per-position maxima (nothing of size T² is kept across layers)."""
    inputs = model.to_input(inputs)
    layers = check_layers(model, layers, "sink layers")
    layout = inputs.layout
    B, T = layout.shape
    real = layout.attention_mask.bool()
    H, L = model.cfg.n_heads, model.cfg.n_layers
    received = torch.zeros(B, len(layers), H, T)
    max_abs = torch.zeros(B, L + 1, T)
    max_dim = torch.zeros(B, L + 1, T, dtype=torch.long)
    median = torch.zeros(B, L + 1)
    pos_of = {l: i for i, l in enumerate(layers)}
    n_q = queries_seeing(real)

    def pattern_hook(pattern, hook):
        l = int(hook.name.split(".")[1])
        p = pattern.detach().float().cpu() * real[:, None, :, None]               # drop padded query rows
        received[:, pos_of[l]] = p.sum(2) / n_q.clamp_min(1)[:, None, :]
        return None

    def resid_hook(resid, hook):
        i = 0 if hook.name == "blocks.0.hook_resid_pre" else int(hook.name.split(".")[1]) + 1
        a = resid.detach().float().abs().cpu()
        v, d = a.max(-1)
        max_abs[:, i], max_dim[:, i] = v * real, d
        for b in range(B):
            median[b, i] = a[b][real[b]].median()
        return None

    hooks = [(f"blocks.{l}.attn.hook_pattern", pattern_hook) for l in layers]
    hooks += [("blocks.0.hook_resid_pre", resid_hook)] + [(f"blocks.{l}.hook_resid_post", resid_hook) for l in range(L)]
    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=hooks, return_type=None)
    return SinkResult(received, max_abs, max_dim, median, layers, layout)
