"""Plots as inline SVG: attention by layer, knockout curves, patching heatmaps, probe accuracy.

No plotting library and no script: each plot is a small SVG string, so a report stays one offline file and a
notebook shows it without a kernel extension. Values are also in each element's ``<title>`` (hover).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from av_lens.views.html import COLOURS, View, esc

_PALETTE = ["#2563eb", "#ea580c", "#059669", "#7c3aed", "#0d9488", "#dc2626", "#ca8a04", "#6b7280"]


def _colour(name: str, i: int) -> str:
    return COLOURS.get(name.split()[0].lower(), _PALETTE[i % len(_PALETTE)]) if name.split() else _PALETTE[i % 8]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi], about ``n`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw - 1e-12)
    first = math.floor(lo / step + 1e-9) * step
    ticks, v = [], first
    while v < hi + step * 0.999:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _tick_label(v: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / 10 ** math.floor(math.log10(step)), 6) == 2.5 else 0)
    return f"{v:.{decimals}f}"


def line_plot(x_labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str = "", y_label: str = "",
              x_label: str = "", hlines: Mapping[str, float] | None = None, width: int = 560, height: int = 280,
              y_range: tuple[float, float] | None = None) -> str:
    """An SVG line chart: one polyline per series over categorical x positions."""
    ml, mr, mt, mb = 56, 150, 28, 44
    W, H = width - ml - mr, height - mt - mb
    vals = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    vals += list((hlines or {}).values())
    lo, hi = y_range if y_range else (min(vals + [0.0]), max(vals + [1e-9]))
    if hi - lo < 1e-9:
        hi = lo + 1
    ticks = nice_ticks(lo, hi)
    if not y_range:  # widen the axis to round values
        lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    n = max(len(x_labels), 2)
    X = lambda i: ml + W * i / (n - 1)  # noqa: E731
    Y = lambda v: mt + H * (1 - (v - lo) / (hi - lo))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="avl-plot" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{ml}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    for v in ticks:
        if lo - 1e-9 <= v <= hi + 1e-9:
            out.append(f'<line x1="{ml}" x2="{ml + W}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e5e7eb"/>'
                       f'<text x="{ml - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{_tick_label(v, ticks)}</text>')
    step = max(1, len(x_labels) // 12)
    for i, lab in enumerate(x_labels):
        if i % step == 0:
            out.append(f'<text x="{X(i):.1f}" y="{mt + H + 16}" text-anchor="middle">{esc(lab)}</text>')
    out.append(f'<text x="{ml + W / 2}" y="{height - 6}" text-anchor="middle">{esc(x_label)}</text>')
    out.append(f'<text x="14" y="{mt + H / 2}" transform="rotate(-90 14 {mt + H / 2})" text-anchor="middle">'
               f"{esc(y_label)}</text>")
    for j, (name, v) in enumerate((hlines or {}).items()):
        out.append(f'<line x1="{ml}" x2="{ml + W}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#111827" '
                   f'stroke-dasharray="5,4"><title>{esc(name)}: {v:.4f}</title></line>'
                   f'<text x="{ml + W - 4}" y="{Y(v) - 4:.1f}" text-anchor="end" fill="#111827">{esc(name)}</text>')
    for j, (name, ys) in enumerate(series.items()):
        c = _colour(name, j)
        pts = [(X(i), Y(y)) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
        out.append(f'<polyline class="avl-series" fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for (a, b), (i, y) in zip(pts, [(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]):
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"><title>{esc(name)} @ '
                       f"{esc(x_labels[i])}: {y:.4f}</title></circle>")
        ly = mt + 14 + 16 * j
        out.append(f'<rect x="{ml + W + 10}" y="{ly - 9}" width="10" height="10" fill="{c}"/>'
                   f'<text x="{ml + W + 24}" y="{ly}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str = "",
            diverging: bool = True, cell: int = 34, fmt: str = "{:.2f}") -> str:
    """An SVG heatmap with the value written in each cell (blue negative, red positive when diverging)."""
    m = torch.as_tensor(matrix, dtype=torch.float32)
    R, C = m.shape
    ml, mt = 70, 40
    width, height = max(ml + C * cell + 20, 12 + int(7.5 * len(title))), mt + R * cell + 10  # room for the title
    finite = m[torch.isfinite(m)]
    span = float(finite.abs().max()) if diverging and len(finite) else 1.0
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="avl-plot" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="10"><text x="4" y="14" font-size="13" font-weight="600">'
           f"{esc(title)}</text>"]
    for j, c in enumerate(col_labels):
        out.append(f'<text x="{ml + j * cell + cell / 2}" y="{mt - 6}" text-anchor="middle">{esc(c)}</text>')
    for i, r in enumerate(row_labels):
        out.append(f'<text x="{ml - 6}" y="{mt + i * cell + cell / 2 + 4}" text-anchor="end">{esc(r)}</text>')
        for j in range(C):
            v = float(m[i, j])
            if not math.isfinite(v):
                fill = "#f3f4f6"
            elif diverging:
                a = min(abs(v) / (span or 1), 1.0)
                fill = f"rgba(220,38,38,{a:.3f})" if v > 0 else f"rgba(37,99,235,{a:.3f})"
            else:
                a = (v - lo) / ((hi - lo) or 1)
                fill = f"rgba(37,99,235,{a:.3f})"
            out.append(f'<rect class="avl-cell" x="{ml + j * cell}" y="{mt + i * cell}" width="{cell - 1}" '
                       f'height="{cell - 1}" fill="{fill}"><title>{esc(row_labels[i])}, {esc(col_labels[j])}: '
                       f'{v:.4f}</title></rect><text x="{ml + j * cell + cell / 2}" y="{mt + i * cell + cell / 2 + 3}" '
                       f'text-anchor="middle">{fmt.format(v) if math.isfinite(v) else ""}</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------- analysis views
def attention_by_layer(flow, *, title: str = "Attention mass per layer by key modality") -> View:
    """The study's figure: mean attention (over heads, queries, samples) to each key group, per layer."""
    m = flow.by_layer()
    series = {g: m[:, i].tolist() for i, g in enumerate(flow.groups) if float(m[:, i].abs().max()) > 0}
    unit = "mean attention per key token" if flow.per_token else "share of attention mass"
    svg = line_plot([str(l) for l in flow.layers], series, title=title, x_label="layer", y_label=unit)
    return View(svg, title)


def knockout_curves(sweeps: Mapping, *, title: str = "Attention knockout", y_label: str = "metric value") -> View:
    """Metric per knockout window, one curve per sweep, each sweep's baseline as a dashed line."""
    first = next(iter(sweeps.values()))
    labels = [f"{w.start}:{w.stop}" for w in first.windows]  # half-open, as the windows
    series = {name: s.values.float().reshape(len(s.windows), -1).mean(-1).tolist() for name, s in sweeps.items()}
    baselines = {f"no knockout ({name})" if len(sweeps) > 1 else "no knockout": float(s.baseline.float().mean())
                 for name, s in sweeps.items()}
    if len(set(round(v, 9) for v in baselines.values())) == 1:
        baselines = {"no knockout": next(iter(baselines.values()))}
    return View(line_plot(labels, series, title=title, x_label="knocked-out layers", y_label=y_label,
                          hlines=baselines), title)


def patching_heatmap(result, component: str, *, recovered: bool = True, title: str | None = None) -> View:
    """Layer x modality-set heatmap of a patching result (fraction of the clean-corrupted gap recovered); an
    :class:`~av_lens.analysis.attribution.AttributionResult` is drawn the same way, titled by its method."""
    m = result.recovered(component) if recovered else result[component]
    if m.ndim == 3:  # per head: mean over heads
        m = m.mean(1)
    how = getattr(result, "method", "Patching")
    title = title or f"{how} {component}: {'fraction recovered' if recovered else 'metric'}"
    if how != "Patching" and title == f"{how} {component}: fraction recovered":
        title += " (estimated)"
    return View(heatmap(m, [f"layer {l}" for l in result.layers], result.sets, title=title), title)


def probe_accuracy(results, *, title: str = "Linear probe accuracy by layer") -> View:
    """Held-out probe accuracy per layer (with the shuffled-label control and chance)."""
    if not isinstance(results, Mapping):
        results = {"probe": results}
    first = next(iter(results.values()))
    series = {}
    for name, r in results.items():
        series[f"{name}"] = r.accuracy.tolist()
        series[f"{name} (control)"] = r.control_accuracy.tolist()
    labels = ["emb" if l == 0 else str(l - 1) for l in first.layers]
    return View(line_plot(labels, series, title=title, x_label="residual after layer (emb = embeddings)",
                          y_label="held-out accuracy", hlines={"chance": first.chance}, y_range=(0, 1)), title)
