"""Reading a dictionary's features by modality: density, top-activating positions, class AUROC, logit effects.

    fa = feature_activations(model, sae, batches, at="audio")   # rows: (sample, position, modality, time, acts)
    fa.density_by_modality()                                     # [feature, modality] fraction of rows active
    fa.top(feature, 10)                                          # where it fires most, with label and time
    fa.class_auroc(labels_per_row)                               # [feature, class] one-vs-rest AUROC
    logit_effects(model, sae, feature, k=10)                     # tokens its decoder row promotes via W_U
    dashboard(fa, model, sae, features=[...])                    # an offline HTML view (Jupyter, reports)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import Modality, SelectorLike


@dataclass
class FeatureActivations:
    acts: Tensor          # [row, d_sae]
    batch: Tensor         # [row] which input batch
    sample: Tensor        # [row] sample within the batch
    position: Tensor      # [row]
    modality: Tensor      # [row] Modality values
    time: Tensor          # [row] seconds (media positions; NaN otherwise)
    labels: list[str]     # [row] layout labels ("<audio 0 · 1.20 s>"-like)
    item: Tensor | None = None   # [row] media item within its sample (-1: text and markers)
    span: Tensor | None = None   # [row] seconds until the next time stamp of the same item (NaN: no time)
    box: Tensor | None = None    # [row, 4] spatial patch of image / video rows as fractions of the picture
                                 # (top, left, bottom, right); NaN where there is none

    def density_by_modality(self) -> dict[str, Tensor]:
        out = {}
        for m in torch.unique(self.modality).tolist():
            rows = self.modality == m
            out[Modality(m).name.lower()] = (self.acts[rows] > 0).float().mean(0)
        return out

    def top(self, feature: int, k: int = 10) -> list[dict]:
        self._check(feature)
        v = self.acts[:, feature]
        idx = v.argsort(descending=True)[:k].tolist()
        nan = float("nan")
        return [{"value": float(v[i]), "batch": int(self.batch[i]), "sample": int(self.sample[i]),
                 "position": int(self.position[i]), "modality": Modality(int(self.modality[i])).name.lower(),
                 "time": float(self.time[i]), "label": self.labels[i],
                 "item": int(self.item[i]) if self.item is not None else -1,
                 "span": float(self.span[i]) if self.span is not None else nan,
                 "box": tuple(self.box[i].tolist()) if self.box is not None else (nan,) * 4}
                for i in idx if float(v[i]) > 0]

    def pooled(self, how: str = "max") -> tuple[Tensor, Tensor, Tensor]:
        """Per clip (batch, sample): the max (or mean) of each feature over the clip's rows; returns
        (acts [clip, d_sae], batch [clip], sample [clip]). A class is a property of the clip, and a sound with
        gaps (bursts, beats) leaves silent positions, so per-clip pooling is the natural unit for class AUROC."""
        if how not in ("max", "mean"):
            raise InputError(f"unknown pooling {how!r}", "use 'max' or 'mean'")
        key = self.batch * (int(self.sample.max()) + 1) + self.sample
        uniq = torch.unique(key)
        acts = torch.stack([(self.acts[key == u].max(0).values if how == "max" else self.acts[key == u].mean(0))
                            for u in uniq.tolist()])
        first = torch.stack([(key == u).nonzero()[0, 0] for u in uniq.tolist()])
        return acts, self.batch[first], self.sample[first]

    def class_auroc(self, labels: Tensor, n_classes: int | None = None, *, pool: str | None = None) -> Tensor:
        """[feature, class]: AUROC of each feature's activation for "the row belongs to class c"."""
        from av_lens.analysis.probes import auroc

        labels = torch.as_tensor(labels).long()
        acts = self.acts if pool is None else self.pooled(pool)[0]
        if labels.shape[0] != acts.shape[0]:
            raise InputError(f"{labels.shape[0]} labels for {acts.shape[0]} {'rows' if pool is None else 'clips'}",
                             "pass one label per row (or, with pool=, per clip in batch/sample order)")
        k = int(n_classes or int(labels.max()) + 1)
        out = torch.full((acts.shape[1], k), float("nan"))
        for c in range(k):
            y = labels == c
            if y.all() or not y.any():
                continue
            for f in range(acts.shape[1]):
                out[f, c] = auroc(acts[:, f], y)
        return out

    def _check(self, feature: int) -> None:
        if not 0 <= feature < self.acts.shape[1]:
            raise InputError(f"feature {feature} is not one of 0..{self.acts.shape[1] - 1}", "pass a feature index")


@torch.no_grad()
def feature_activations(model, sae, batches, at: SelectorLike = "all") -> FeatureActivations:
    """Encode ``sae.cfg.hook_name`` at ``at``'s positions for every batch (one forward each)."""
    from av_lens.analysis._common import selector_mask

    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    parts = {k: [] for k in ("acts", "batch", "sample", "position", "modality", "time", "item", "span", "box")}
    labels: list[str] = []
    name = sae.cfg.hook_name
    for bi, x in enumerate(batches):
        x = model.to_input(x)
        lay = x.layout
        m = selector_mask(lay, at, "feature")
        _, cache = model.run_with_cache(x, names_filter=lambda n: n == name)
        acts = sae.encode(cache[name][m.to(cache[name].device)].float().cpu())
        b_idx, p_idx = m.nonzero(as_tuple=True)
        parts["acts"].append(acts)
        parts["batch"].append(torch.full_like(b_idx, bi))
        parts["sample"].append(b_idx)
        parts["position"].append(p_idx)
        parts["modality"].append(lay.modality[m])
        parts["time"].append(lay.time[m].float())
        parts["item"].append(lay.item[m])
        span, box = _spans_and_boxes(lay)
        parts["span"].append(span[m])
        parts["box"].append(box[m])
        lab = {b: lay.labels(b) for b in torch.unique(b_idx).tolist()}
        labels += [lab[int(b)][int(p)] for b, p in zip(b_idx, p_idx)]
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return FeatureActivations(cat["acts"], cat["batch"], cat["sample"], cat["position"], cat["modality"],
                              cat["time"], labels, cat["item"], cat["span"], cat["box"])


def _spans_and_boxes(lay) -> tuple[Tensor, Tensor]:
    """Per position of a layout: the seconds until the next distinct time stamp of the same media item (the
    token's span; the last one takes the previous step; NaN without a time) and, for image / video tokens
    whose 3-D positions form a full height x width grid (Qwen-style M-RoPE), the token's spatial cell as
    fractions of the picture. Layouts without such a grid (1-D positions) get NaN boxes, never a guess."""
    B, T = lay.modality.shape
    span = torch.full((B, T), float("nan"))
    box = torch.full((B, T, 4), float("nan"))
    media = (int(Modality.AUDIO), int(Modality.IMAGE), int(Modality.VIDEO))
    for b in range(B):
        for mod in media:
            for it in torch.unique(lay.item[b][lay.modality[b] == mod]).tolist():
                sel = ((lay.modality[b] == mod) & (lay.item[b] == it)).nonzero().squeeze(-1)
                t = lay.time[b, sel].double()
                if torch.isfinite(t).all() and len(sel):
                    uniq = torch.unique(t)
                    if len(uniq) > 1:
                        steps = uniq[1:] - uniq[:-1]
                        nxt = torch.cat([steps, steps[-1:]])
                        span[b, sel] = nxt[torch.searchsorted(uniq, t)].float()
                if mod == int(Modality.AUDIO):
                    continue
                h = lay.position_ids[1, b, sel].long()
                w = lay.position_ids[2, b, sel].long()
                dh, dw = h - h.min(), w - w.min()
                hm, wm = int(dh.max()) + 1, int(dw.max()) + 1
                cells = torch.bincount(dh * wm + dw, minlength=hm * wm)
                if len(cells) != hm * wm or not bool((cells == cells[0]).all()) or cells[0] == 0:
                    continue   # not a full grid: no box rather than a wrong one
                box[b, sel] = torch.stack([dh / hm, dw / wm, (dh + 1) / hm, (dw + 1) / wm], -1).float()
    return span, box


@torch.no_grad()
def logit_effects(model, sae, feature: int, k: int = 10) -> list[tuple[str, float]]:
    """The tokens a feature's decoder row promotes most through the unembedding (``W_dec[f] @ W_U``; no final
    norm — the direct logit effect, as SAELens dashboards show it)."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise InputError(f"feature {feature} is not one of 0..{sae.cfg.d_sae - 1}", "pass a feature index")
    eff = sae.W_dec[feature].to(model.W_U.dtype) @ model.W_U.to(sae.W_dec.device)
    top = eff.topk(k)
    toks = model.tokenizer.convert_ids_to_tokens(top.indices.tolist())
    return list(zip(toks, top.values.tolist()))


def _is_clip(x) -> bool:
    return getattr(x, "frames", None) is not None or getattr(x, "audio", None) is not None


def _media_lookup(fa: FeatureActivations, media):
    """``media`` as a function (batch, sample, item) -> clip, or None.

    Accepted: one list per batch of one entry per sample, or (all rows from batch 0) a flat list of entries.
    An entry is a clip (its frames and soundtrack serve the sample's video item 0 and the audio interleaved in
    it) or a list of clips, one per media item of the sample (item i of either modality takes clip i)."""
    if media is None:
        return None
    media = list(media)
    flat = not media or _is_clip(media[0])
    if flat:
        if int(fa.batch.max()) > 0:
            raise InputError(f"media is a flat list of {len(media)} clips, but the activations come from "
                             f"{int(fa.batch.max()) + 1} batches",
                             "pass one list of clips per batch: media=[[clip, ...], [clip, ...]]")
        media = [media]
    for b, per_batch in enumerate(media):
        for s_, entry in enumerate(per_batch):
            for clip in (entry if isinstance(entry, (list, tuple)) else [entry]):
                if not _is_clip(clip):
                    raise InputError(f"media[{b}][{s_}] is a {type(clip).__name__}, not a clip",
                                     "pass clip objects with .frames (T, H, W, 3) uint8 / .fps and .audio (mono), "
                                     "such as av_lens.media.load_clip's clips or the organism's world.Clip; "
                                     "not bare frame or waveform arrays")
    need: dict = {}
    for b, s_, it in zip(fa.batch.tolist(), fa.sample.tolist(),
                         (fa.item if fa.item is not None else torch.zeros_like(fa.batch)).tolist()):
        need[(b, s_)] = max(need.get((b, s_), 0), it + 1)
    for (b, s_), items in need.items():
        if b >= len(media) or len(media[b]) <= s_:
            have = len(media[b]) if b < len(media) else 0
            raise InputError(f"media for batch {b} holds {have} clip(s), but its activations come from sample {s_}",
                             "pass one clip (with .frames / .fps / .audio) per sample, in the batch's order")
        entry = media[b][s_]
        if not isinstance(entry, (list, tuple)) and items > 1:
            raise InputError(f"batch {b} sample {s_} has {items} media items of one modality but one clip was given",
                             "pass a list of clips for that sample, one per media item, in the prompt's order")
        if isinstance(entry, (list, tuple)) and len(entry) < items:
            raise InputError(f"batch {b} sample {s_} has {items} media items but {len(entry)} clips were given",
                             "pass one clip per media item, in the prompt's order")

    def lookup(b, s_, item):
        entry = media[b][s_]
        return entry[max(item, 0)] if isinstance(entry, (list, tuple)) else entry
    return lookup


def _sample_rate(clip) -> int:
    for name in ("sr", "sample_rate"):
        if getattr(clip, name, None):
            return int(getattr(clip, name))
    return 16000


def _snippet(t: dict, clip) -> str:
    """A thumbnail (video rows) or waveform (audio rows) for one top-activating position, '' otherwise (text,
    image rows: an image has no time stamp to pick a frame by)."""
    import math

    from av_lens.views import media as vm

    if clip is None or not math.isfinite(t["time"]):
        return ""
    if t["modality"] == "video" and getattr(clip, "frames", None) is not None:
        frames = clip.frames
        box = None
        if all(math.isfinite(v) for v in t["box"]):
            H, W = frames.shape[1], frames.shape[2]
            box = (t["box"][0] * H, t["box"][1] * W, t["box"][2] * H, t["box"][3] * W)
        return vm.frame_thumbnail(frames, float(clip.fps), t["time"], t["span"], box)
    if t["modality"] == "audio" and getattr(clip, "audio", None) is not None:
        return vm.waveform_snippet(clip.audio, t["time"], t["span"], sample_rate=_sample_rate(clip))
    return ""


def dashboard(fa: FeatureActivations, model, sae, features, *, k: int = 8, media=None, names=None):
    """An offline HTML view: per feature, density by modality, top-activating positions, logit effects.

    ``media``: the clips the activations came from — one list of clip objects per batch (``.frames`` (T, H, W, 3)
    uint8 at ``.fps``, ``.audio`` at ``.sr`` (or ``.sample_rate``, default 16 kHz); :func:`av_lens.media.load_clip`'s
    clips, the organism's ``world.Clip``), or a flat list for a single batch; a sample with several media items
    takes a list of clips, one per item. Then every top video position shows its frame with the token's patch
    outlined, and every audio position the waveform around it with the token's span shaded (image and text rows
    get no picture).
    ``names``: one name per batch (e.g. "factual", "counterfactual"), shown with each position; without it,
    positions from several batches are marked "batch b"."""
    from av_lens.views.html import View, esc

    if len(fa.batch) == 0:
        raise InputError("the feature activations hold no rows (the selector matched no position)",
                         "compute them with a selector that matches positions of the inputs")
    clip_of = _media_lookup(fa, media)
    n_batches = int(fa.batch.max()) + 1
    if names is not None and len(names) < n_batches:
        raise InputError(f"{len(names)} names for {n_batches} batches", "pass one name per batch")

    def where(t):
        src = (f"{names[t['batch']]}, " if names is not None else f"batch {t['batch']}, " if n_batches > 1 else "")
        return f"{src}sample {t['sample']}, pos {t['position']}"

    dens = fa.density_by_modality()
    rows = []
    for f in features:
        d = " · ".join(f"{m} {float(v[f]):.3f}" for m, v in dens.items())
        top = "".join(f"<li>{_snippet(t, clip_of(t['batch'], t['sample'], t['item']) if clip_of else None)} "
                      f"{esc(t['label'])} ({esc(where(t))}): {t['value']:.3f}</li>"
                      for t in fa.top(f, k))
        logit = ", ".join(f"{esc(str(t))} {v:+.2f}" for t, v in logit_effects(model, sae, f, 5))
        rows.append(f"<div class='avl-feature'><h4>feature {f}</h4><p>density by modality: {esc(d)}</p>"
                    f"<p>promotes: {logit}</p><ol>{top}</ol></div>")
    title = f"Dictionary features at {sae.cfg.hook_name}"
    return View(f"<div class='avl-dashboard'><h3>{esc(title)}</h3>{''.join(rows)}</div>", title)
