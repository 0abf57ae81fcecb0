"""Attention heads of one layer in circuitsvis, over modality-pooled positions (no T^2 blow-up).

A 10 s clip is thousands of positions; a T x T pattern per head is unreadable and heavy. The view groups
positions into segments — each text/special token on its own, each media run (one item, one modality, and
for interleaved audio-in-video one 2 s chunk) as one segment — and shows, per head, the mean over a
segment's query positions of the attention mass they give each key segment (rows sum to one). The layer's
pattern is reduced inside its hook, so only [heads, segments, segments] leaves the forward. With
``crop=(start, stop)`` the plain per-position pattern of that window is shown instead.
"""

from __future__ import annotations

import math

import torch

from av_lens.layout import Modality
from av_lens.views.html import View, circuitsvis_element


def segments(layout, tokenizer=None, sample: int = 0, max_text: int = 200):
    """(segment id per position, labels): media runs pooled, text tokens kept apart (up to ``max_text``)."""
    T = layout.shape[1]
    seg = torch.full((T,), -1, dtype=torch.long)
    labels: list[str] = []
    ids = layout.token_ids[sample].tolist()
    real = layout.attention_mask[sample].bool()
    n_text = int((real & ~layout.mask("media")[sample]).sum())
    pool_text = n_text > max_text
    prev = None
    for p in range(T):
        if not bool(real[p]):
            continue
        m = int(layout.modality[sample, p])
        media = m in (int(Modality.AUDIO), int(Modality.IMAGE), int(Modality.VIDEO))
        key = (m, int(layout.item[sample, p])) if (media or pool_text) else ("tok", p)
        if key != prev or (media and p > 0 and int(layout.modality[sample, p - 1]) != m):
            labels.append("")
            start = p
            prev = key
        seg[p] = len(labels) - 1
        if media or pool_text:
            n = int((seg == len(labels) - 1).sum())
            t0, t1 = float(layout.time[sample, start]), float(layout.time[sample, p])
            tt = f"·{t0:.1f}-{t1:.1f}s" if math.isfinite(t0) else ""
            name = Modality(m).name.lower() if media else "text"
            item = f"#{int(layout.item[sample, p])}" if media else ""
            # circuitsvis drops every whitespace character from token labels, so "·" separates the parts
            labels[-1] = f"[{name}{item}·{n}tok{tt}]"
        else:
            w = tokenizer.convert_ids_to_tokens(ids[p]) if tokenizer is not None else str(ids[p])
            labels[-1] = w.replace("Ġ", " ").replace("Ċ", "\\n").replace("\n", "\\n")
    return seg, labels


def attention_heads(model, inputs, layer: int, *, sample: int = 0, crop: tuple[int, int] | None = None,
                    title: str | None = None) -> View:
    """circuitsvis AttentionHeads for ``layer``: modality-pooled (default) or a cropped position window."""
    from av_lens.analysis._common import check_layers

    (layer,) = check_layers(model, [layer], "attention view layer")
    inputs = model.to_input(inputs)
    layout = inputs.layout
    seg, labels = segments(layout, getattr(model, "tokenizer", None), sample)
    out: dict = {}

    def hook(pattern, hook):
        p = pattern[sample].float()  # [head, q, k] (this layer only)
        if crop is not None:
            a, b = crop
            out["A"] = p[:, a:b, a:b].cpu()
            return
        S = len(labels)
        s = seg.to(p.device)
        valid = s >= 0
        member = torch.zeros(S, p.shape[-1], device=p.device)
        member[s[valid], torch.nonzero(valid).squeeze(-1)] = 1.0
        rows = member / member.sum(-1, keepdim=True).clamp(min=1)
        out["A"] = torch.einsum("sq,hqk,uk->hsu", rows, p, member).cpu()

    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)], return_type=None)
    if crop is not None:
        tok = getattr(model, "tokenizer", None)
        ids = layout.token_ids[sample, crop[0]:crop[1]].tolist()
        labels = [tok.convert_ids_to_tokens(i) if tok is not None else str(i) for i in ids]
    title = title or f"Layer {layer} attention heads" + (" (modality-pooled)" if crop is None else f" (positions {crop[0]}-{crop[1] - 1})")
    html = circuitsvis_element("AttentionHeads", attention=out["A"].numpy(), tokens=labels,
                               attentionHeadNames=[f"L{layer}H{h}" for h in range(model.cfg.n_heads)])
    return View(html, title, needs_circuitsvis=True)
