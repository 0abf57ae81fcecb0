"""Token-level views: the modality strip of an input, logit-lens grids, token-shift colouring.

The strip shows every position coloured by its modality tag; media runs longer than ``collapse_over``
positions fold into one chip ("video 0 · 32 tokens · 0.00-0.50 s") so that a 4,000-token clip stays
readable. Hovering any chip shows index, kind, time and 3-D position.
"""

from __future__ import annotations

import math

import torch

from av_lens.layout import Modality
from av_lens.views.html import COLOURS, View, esc


def _kind(layout, b: int, p: int) -> str:
    if bool(layout.is_generated[b, p]):
        return "generated"
    return Modality(int(layout.modality[b, p])).name.lower()


def _legend(kinds) -> str:
    return '<div class="avl-legend">' + "".join(
        f'<span><i style="background:{COLOURS[k]}"></i>{esc(k)}</span>' for k in kinds) + "</div>"


def token_strip(layout, tokenizer=None, *, sample: int = 0, collapse_over: int = 8,
                title: str = "Input by modality") -> View:
    """Every position of ``sample`` coloured by modality, media runs collapsed, with times for audio/video."""
    ids = layout.token_ids[sample].tolist()
    T = len(ids)
    chips, kinds = [], []
    p = 0
    while p < T:
        kind = _kind(layout, sample, p)
        item = int(layout.item[sample, p])
        q = p
        while q + 1 < T and _kind(layout, sample, q + 1) == kind and int(layout.item[sample, q + 1]) == item:
            q += 1
        n = q - p + 1
        if kind not in kinds:
            kinds.append(kind)
        t0, t1 = float(layout.time[sample, p]), float(layout.time[sample, q])
        times = f" · {t0:.2f}-{t1:.2f} s" if math.isfinite(t0) else ""
        if kind in ("audio", "image", "video") and n > collapse_over:
            pos = layout.position_ids[:, sample, p].tolist()
            chips.append(f'<span class="avl-tok" data-kind="{kind}" style="background:{COLOURS[kind]}" '
                         f'title="positions {p}-{q}, {kind} item {item}, 3-D position from {pos}{times}">'
                         f"{esc(kind)} {item} · {n} tokens{esc(times)}</span>")
            p = q + 1
            continue
        for i in range(p, q + 1):
            word = (tokenizer.convert_ids_to_tokens(ids[i]) if tokenizer is not None and ids[i] >= 0 else str(ids[i]))
            word = word.replace("\n", "\\n").replace("Ġ", " ").replace("Ċ", "\\n")
            t = float(layout.time[sample, i])
            tt = f", t={t:.2f} s" if math.isfinite(t) else ""
            chips.append(f'<span class="avl-tok" data-kind="{kind}" style="background:{COLOURS[kind]}" '
                         f'title="position {i}, {kind}{tt}, 3-D position {layout.position_ids[:, sample, i].tolist()}">'
                         f"{esc(word)}</span>")
        p = q + 1
    html = _legend(kinds) + f'<div class="avl-strip">{"".join(chips)}</div>'
    return View(html, title)


def logit_lens_grid(lens, layout=None, *, max_columns: int = 48, title: str = "Logit lens",
                    outline_k: int = 1) -> View:
    """Layers x selected positions; each cell the top-1 token, shaded by its probability; cells where a
    lens target is in the top ``outline_k`` (default: is the top-1 token) are outlined."""
    L, P = lens.top_ids.shape[:2]
    cols = list(range(P)) if P <= max_columns else torch.linspace(0, P - 1, max_columns).round().long().tolist()
    tok = lens.tokenizer
    hits = lens.hits(outline_k) if lens.targets else torch.zeros(L, P, dtype=torch.bool)
    head = ["<tr><th>layer</th>"]
    for c in cols:
        b, p = lens.positions[c]
        label = f"{p}"
        if layout is not None:
            t = float(layout.time[b, p])
            label += f"<br>{t:.2f}s" if math.isfinite(t) else ""
        head.append(f"<th>{label}</th>")
    rows = ["".join(head) + "</tr>"]
    for li, layer in enumerate(lens.layers):
        cells = [f"<th>{'emb' if layer == -1 else layer}</th>"]
        for c in cols:
            tid = int(lens.top_ids[li, c, 0])
            prob = float(lens.top_probs[li, c, 0])
            word = tok.convert_ids_to_tokens(tid) if tok is not None else str(tid)
            top = ", ".join(f"{w} {p:.2f}" for w, p in lens.top_tokens(layer, c)) if tok is not None else ""
            cls = ' class="hit"' if bool(hits[li, c]) else ""
            cells.append(f'<td{cls} style="background:rgba(234,88,12,{min(prob, 1):.2f})" title="{esc(top)}">'
                         f"{esc(word)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = "" if len(cols) == P else f'<p class="avl-note">{len(cols)} of {P} positions shown, evenly spaced.</p>'
    tnote = ""
    if lens.targets and tok is not None:
        tnote = (f'<p class="avl-note">Outlined: a target ({esc(", ".join(tok.convert_ids_to_tokens(lens.targets)))}) '
                 + ("is the top-1 token" if outline_k == 1 else f"is in the top {outline_k}") + "; hover a cell for its top "
                 f"{lens.top_ids.shape[-1]}.</p>")
    return View(f'<div style="overflow-x:auto"><table class="avl-grid">{"".join(rows)}</table></div>{note}{tnote}',
                title)


_SHIFT = {"unshifted": "#059669", "marginal": "#ca8a04", "shifted": "#dc2626"}


def token_shift(result, *, title: str = "Token shift against the base model") -> View:
    """The output tokens coloured by the base model's rank of them (green top-1, amber 2-3, red shifted)."""
    chips = []
    for s, cat, r, kl, p in zip(result.strings, result.category, result.ranks.tolist(), result.kl.tolist(),
                                result.base_prob.tolist()):
        chips.append(f'<span class="avl-tok" data-kind="{cat}" style="background:{_SHIFT[cat]}" '
                     f'title="base rank {r}, base p={p:.3f}, KL {kl:.3f}">{esc(s.replace(chr(10), chr(92) + "n"))}</span>')
    legend = '<div class="avl-legend">' + "".join(
        f'<span><i style="background:{c}"></i>{k}</span>' for k, c in _SHIFT.items()) + "</div>"
    fr = result.fractions()
    summary = ", ".join(f"{k} {v:.0%}" for k, v in fr.items() if isinstance(v, float) and math.isfinite(v))
    return View(legend + f'<div class="avl-strip">{"".join(chips)}</div><p class="avl-note">{esc(summary)}; '
                         f"mean KL {result.mean_kl:.3f}</p>", title)
