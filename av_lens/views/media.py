"""Small inline pictures of the media behind a token position: a frame thumbnail for a video token (with the
token's spatial patch outlined), a waveform snippet for an audio token (with the token's time span shaded).

Both are self-contained HTML (a base64 PNG, an inline SVG), so a dashboard or report that carries them stays
one offline file. They need the clip the position came from (frames at ``fps``, a 16 kHz mono soundtrack) and
the token's time stamp and span, which :class:`av_lens.sae.FeatureActivations` records for every row.

    frame_thumbnail(frames, fps, t=2.0, span=1.0, box=(0, 28, 28, 56))   # '<img src="data:image/png;base64,...">'
    waveform_snippet(audio, t=1.5, span=0.5)                                # '<svg ...>'
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from av_lens.views.html import COLOURS, esc


def frame_index(t: float, span: float, fps: float, n_frames: int) -> int:
    """The frame shown for a video token that covers ``[t, t + span)`` seconds: the one at the span's middle
    (a Qwen-style temporal patch covers two frames), clamped to the clip."""
    mid = t + (span / 2 if math.isfinite(span) and span > 0 else 0.0)
    return int(min(max(math.floor(mid * fps + 1e-6), 0), n_frames - 1))


def frame_thumbnail(frames, fps: float, t: float, span: float = float("nan"), box=None, *, side: int = 72,
                    title: str = "") -> str:
    """An ``<img>`` of the frame at time ``t`` (``frames``: (T, H, W, 3) uint8), at most ``side`` pixels on its
    longer edge; ``box`` = (top, left, bottom, right) in the frame's own pixels is outlined."""
    from PIL import Image, ImageDraw

    frames = np.asarray(frames)
    i = frame_index(t, span, fps, len(frames))
    img = Image.fromarray(np.ascontiguousarray(frames[i]).astype(np.uint8))
    scale = side / max(img.size)
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    if box is not None:
        top, left, bottom, right = (round(v * scale) for v in box)
        ImageDraw.Draw(small).rectangle([left, top, max(left, right - 1), max(top, bottom - 1)],
                                        outline=(250, 204, 21), width=2)
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    src = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="avl-thumb" alt="frame {i}" title="{esc(title or f"frame {i} at {i / fps:.2f} s")}" '
            f'width="{small.width}" height="{small.height}" src="data:image/png;base64,{src}">')


def waveform_snippet(audio, t: float, span: float, *, sample_rate: int = 16000, context: float = 0.5,
                     width: int = 120, height: int = 28, title: str = "") -> str:
    """An inline SVG of the soundtrack from ``t - context`` to ``t + span + context`` seconds (min/max envelope,
    one column per pixel), the token's own span ``[t, t + span)`` shaded."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    span = span if math.isfinite(span) and span > 0 else 0.04
    t0, t1 = max(0.0, t - context), min(len(audio) / sample_rate, t + span + context)
    if t1 <= t0:
        t0, t1 = 0.0, len(audio) / sample_rate
    seg = audio[int(t0 * sample_rate):max(int(t1 * sample_rate), int(t0 * sample_rate) + 1)]
    peak = float(np.abs(audio).max()) or 1.0
    cols = np.array_split(seg, width) if len(seg) >= width else [seg[i:i + 1] for i in range(len(seg))]
    mid, half = height / 2, height / 2 - 1
    pts_hi = " ".join(f"{x},{mid - half * float(c.max()) / peak:.1f}" for x, c in enumerate(cols) if len(c))
    pts_lo = " ".join(f"{x},{mid - half * float(c.min()) / peak:.1f}" for x, c in reversed(list(enumerate(cols))) if len(c))
    px = lambda s: (s - t0) / (t1 - t0) * width  # noqa: E731
    x0, x1 = px(t), px(min(t + span, t1))
    return (f'<svg class="avl-wave" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'<title>{esc(title or f"{t0:.2f}-{t1:.2f} s; the token: {t:.2f}-{t + span:.2f} s")}</title>'
            f'<rect x="{x0:.1f}" y="0" width="{max(x1 - x0, 1):.1f}" height="{height}" fill="{COLOURS["audio"]}" '
            f'fill-opacity="0.18"/><polygon points="{pts_hi} {pts_lo}" fill="#374151"/></svg>')
