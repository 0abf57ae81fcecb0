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
        return [{"value": float(v[i]), "batch": int(self.batch[i]), "sample": int(self.sample[i]),
                 "position": int(self.position[i]), "modality": Modality(int(self.modality[i])).name.lower(),
                 "time": float(self.time[i]), "label": self.labels[i]} for i in idx if float(v[i]) > 0]

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
    parts = {k: [] for k in ("acts", "batch", "sample", "position", "modality", "time")}
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
        lab = {b: lay.labels(b) for b in torch.unique(b_idx).tolist()}
        labels += [lab[int(b)][int(p)] for b, p in zip(b_idx, p_idx)]
    return FeatureActivations(*(torch.cat(parts[k]) for k in ("acts", "batch", "sample", "position", "modality",
                                                               "time")), labels)


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


def dashboard(fa: FeatureActivations, model, sae, features, *, k: int = 8):
    """An offline HTML view: per feature, density by modality, top-activating positions, logit effects."""
    from av_lens.views.html import View, esc

    dens = fa.density_by_modality()
    rows = []
    for f in features:
        d = " · ".join(f"{m} {float(v[f]):.3f}" for m, v in dens.items())
        top = "".join(f"<li>{esc(t['label'])} (sample {t['sample']}, pos {t['position']}): {t['value']:.3f}</li>"
                      for t in fa.top(f, k))
        logit = ", ".join(f"{esc(str(t))} {v:+.2f}" for t, v in logit_effects(model, sae, f, 5))
        rows.append(f"<div class='avl-feature'><h4>feature {f}</h4><p>density by modality: {esc(d)}</p>"
                    f"<p>promotes: {logit}</p><ol>{top}</ol></div>")
    title = f"Dictionary features at {sae.cfg.hook_name}"
    return View(f"<div class='avl-dashboard'><h3>{esc(title)}</h3>{''.join(rows)}</div>", title)
