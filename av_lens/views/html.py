"""HTML plumbing for views: one object per view, pages that embed circuitsvis's bundle once, atomic saves.

A :class:`View` is an HTML fragment plus a flag saying whether it needs circuitsvis's JavaScript bundle.
In Jupyter its ``_repr_html_`` returns the fragment with the bundle inlined — offline, and without the
network probe circuitsvis's own ``RenderedHTML`` makes (it requests google.com to choose between its CDN
and its local bundle). A :class:`Page` collects views and writes one self-contained file that carries the
bundle once, however many circuitsvis views it holds; the file is written to a temporary sibling and
renamed, so a crash never leaves half a report.
"""

from __future__ import annotations

import html as _html
import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: modality colours used by every view (text, audio, image, video, special, pad, generated)
COLOURS = {
    "text": "#6b7280", "audio": "#ea580c", "image": "#059669", "video": "#2563eb", "special": "#7c3aed",
    "pad": "#d1d5db", "generated": "#0d9488", "other": "#6b7280",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#111827}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.avl-note{color:#4b5563;font-size:.9em;max-width:900px}
.avl-strip{line-height:2.1;font-family:ui-monospace,Menlo,monospace;font-size:12px}
.avl-tok{padding:2px 4px;margin:1px;border-radius:3px;color:#fff;white-space:pre}
.avl-legend span{display:inline-block;margin-right:12px;font-size:12px}
.avl-legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
table.avl-grid{border-collapse:collapse;font-family:ui-monospace,Menlo,monospace;font-size:11px}
table.avl-grid td,table.avl-grid th{border:1px solid #e5e7eb;padding:2px 4px;text-align:center}
table.avl-grid td.hit{outline:2px solid #dc2626}
img.avl-thumb,svg.avl-wave{vertical-align:middle;margin-right:6px;border:1px solid #e5e7eb}
pre.avl-summary{background:#f9fafb;border:1px solid #e5e7eb;padding:8px;font-size:12px;overflow-x:auto}
"""


def esc(x) -> str:
    return _html.escape(str(x), quote=True)


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's bundled browser script (the IIFE that defines the global ``CircuitsVis``)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        from av_lens.errors import AVLensError

        raise AVLensError(f"circuitsvis's bundled script is missing ({path})",
                          "reinstall circuitsvis (pip install --force-reinstall circuitsvis)")
    return path.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


_IDS = itertools.count()


def circuitsvis_element(component: str, **props) -> str:
    """A div plus the call that renders circuitsvis ``component`` into it (the bundle must be on the page)."""
    from circuitsvis.utils.convert_props import convert_props

    div = f"avl-cv-{next(_IDS)}"
    return (f'<div id="{div}" class="avl-cv" data-component="{esc(component)}" style="margin:12px 0"></div>\n'
            f"<script>CircuitsVis.render({json.dumps(div)}, CircuitsVis.{component}, {convert_props(props)});</script>")


@dataclass
class View:
    """An HTML fragment; ``needs_circuitsvis`` when it calls the circuitsvis bundle."""

    html: str
    title: str = ""
    needs_circuitsvis: bool = False

    def _repr_html_(self) -> str:
        head = f"<style>{CSS}</style>"
        if self.needs_circuitsvis:
            head += f"<script>{circuitsvis_bundle()}</script>"
        return head + self.html

    def __html__(self) -> str:
        return self._repr_html_()

    def save(self, path: str | os.PathLike) -> Path:
        page = Page(self.title or "av_lens view")
        page.add(self)
        return page.save(path)


class Page:
    """A self-contained HTML document of views (circuitsvis's bundle embedded once, no external request)."""

    def __init__(self, title: str, intro: str = ""):
        self.title, self.intro = title, intro
        self.parts: list[tuple[str, str, View | str]] = []

    def add(self, view: View | str, heading: str | None = None, note: str = "") -> "Page":
        self.parts.append((heading if heading is not None else getattr(view, "title", ""), note, view))
        return self

    def html(self) -> str:
        needs = any(isinstance(v, View) and v.needs_circuitsvis for _, _, v in self.parts)
        body = [f"<h1>{esc(self.title)}</h1>"]
        if self.intro:
            body.append(f'<p class="avl-note">{self.intro}</p>')
        for heading, note, view in self.parts:
            sec = ['<section class="avl-section">']
            if heading:
                sec.append(f"<h2>{esc(heading)}</h2>")
            if note:
                sec.append(f'<p class="avl-note">{note}</p>')
            sec.append(view.html if isinstance(view, View) else view)
            sec.append("</section>")
            body.append("\n".join(sec))
        script = f"<script>{circuitsvis_bundle()}</script>" if needs else ""
        # element ids in page order, so the same views give the same file (ids are unique per process)
        order: dict[str, str] = {}
        body = [re.sub(r"avl-cv-\d+", lambda m: order.setdefault(m.group(0), f"avl-cv-{len(order)}"), part)
                for part in body]
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
                f"<style>{CSS}</style>{script}</head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.html())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path
