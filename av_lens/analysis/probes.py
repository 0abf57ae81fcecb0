"""Linear probes on residuals at a modality's positions: is the information *there*?

The study's claim has two halves: audio semantics are present in the middle layers, and the output ignores
them. The first half is a decoding question — can a linear read-out recover, say, the sound's class from
the residual stream at the audio positions of layer l? — so a probe per layer answers it:

    feats = pooled_residuals(model, inputs, "audio")            # [n_layers + 1, n_items, d_model]
    result = probe_layers(feats, labels, seed=0)                 # held-out accuracy per layer
    result.accuracy, result.control_accuracy, result.selectivity

Features are pooled per media item (mean over that item's positions) *inside the forward* by hooks, so no
cache of the whole residual stream is kept. Layer index 0 is the input to block 0 (the embeddings: for audio
positions, the audio encoder's output); index l is ``blocks.{l-1}.hook_resid_post``.

A probe that reaches high accuracy may just be memorising; the control task (Hewitt & Liang 2019) refits
the same probe on labels shuffled across items — held-out accuracy then sits at chance, and *selectivity*
(accuracy minus control accuracy) is the figure to report.

The probe itself is multinomial logistic regression with an L2 penalty, fitted full-batch with L-BFGS on
standardised features: a convex problem, so the fit is deterministic and independent of initialisation.
Besides accuracy, every layer reports the held-out AUROC (binary: of the positive class's probability;
multinomial: the mean of the one-vs-rest AUROCs), computed by the rank formula of :func:`auroc`.

Any selector can be probed, not only media items. The 2026 papers' last-prompt-token probes are

    feats = pooled_residuals(model, inputs, "last_prompt", per_item=False)   # [n_layers + 1, batch, d_model]

and :func:`regression_probe_layers` fits ridge regressions for continuous targets (e.g. an event's time
from the audio positions), with R² on held-out items and the same shuffled control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import SelectorLike, as_selector


# ---------------------------------------------------------------------------------------------- features
def pooled_residuals(model, inputs, sel: SelectorLike, *, per_item: bool = True,
                     layers: list[int] | None = None) -> Float[Tensor, "layer item d_model"]:
    """Residual stream at ``sel``'s positions, mean-pooled per media item (``per_item``) or per sample.

    Returns ``[len(layers), n_items, d_model]``; ``layers`` index the residual stream (0 = embeddings,
    l = after block l-1; default all ``n_layers + 1``). Items are ordered by sample, then by position."""
    inputs = model.to_input(inputs)
    layout = inputs.layout
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers + 1)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise InputError(f"residual layers {bad} are outside 0..{n_layers}",
                         f"use 0 (embeddings) to {n_layers} (after the last block)")
    mask = layout.mask(as_selector(sel))
    if not mask.any():
        raise InputError(f"selector {sel!r} matches no position in this input",
                         f"pick a modality present in it: {layout.counts()}")
    lacking = (~mask.any(-1)).nonzero().squeeze(-1).tolist()
    if lacking:  # legitimate in a mixed batch, but those samples then give no item
        from av_lens.errors import warn

        warn(f"selector {sel!r} matches no position in sample(s) {lacking} of this batch, which give no pooled item",
             "fine for a mixed batch; otherwise give every sample the positions (labels must match the items kept)")
    # group id per (sample, position): one group per media item (or per sample)
    groups: list[tuple[int, Tensor]] = []
    for b in range(layout.batch_size):
        m = mask[b]
        if not m.any():
            continue
        if per_item:
            items = layout.item[b]
            for k in torch.unique(items[m]).tolist():
                groups.append((b, (m & (items == k)).nonzero().squeeze(-1)))
        else:
            groups.append((b, m.nonzero().squeeze(-1)))
    out = torch.empty(len(layers), len(groups), model.cfg.d_model)
    names = {("blocks.0.hook_resid_pre" if l == 0 else f"blocks.{l - 1}.hook_resid_post"): i for i, l in enumerate(layers)}

    def hook(resid, hook):
        i = names[hook.name]
        for g, (b, pos) in enumerate(groups):
            out[i, g] = resid[b, pos.to(resid.device)].float().mean(0).cpu()

    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=[(n, hook) for n in names], return_type=None)
    return out


# ------------------------------------------------------------------------------------------------- probe
class LinearProbe:
    """Multinomial logistic regression, L2-penalised, fitted with full-batch L-BFGS on standardised inputs.

    Minimises ``mean cross-entropy + l2 * ||W||^2`` (bias unpenalised)."""

    def __init__(self, n_classes: int, l2: float = 1e-3, max_iter: int = 200):
        self.n_classes, self.l2, self.max_iter = n_classes, l2, max_iter
        self.W: Tensor | None = None
        self.b: Tensor | None = None

    def _standardise(self, X: Tensor) -> Tensor:
        return (X - self.mu) / self.sd

    def objective(self, X: Tensor, y: Tensor, W: Tensor, b: Tensor) -> Tensor:
        logits = self._standardise(X) @ W + b
        return torch.nn.functional.cross_entropy(logits, y) + self.l2 * (W ** 2).sum()

    def fit(self, X: Float[Tensor, "n d"], y: Int[Tensor, "n"]) -> "LinearProbe":
        X, y = X.double(), y.long()
        if X.shape[0] != y.shape[0]:
            raise InputError(f"{X.shape[0]} feature rows but {y.shape[0]} labels", "pass one label per row")
        if int(y.min()) < 0 or int(y.max()) >= self.n_classes:
            raise InputError(f"labels must lie in 0..{self.n_classes - 1}, got {int(y.min())}..{int(y.max())}",
                             "map labels to class indices first")
        self.mu, self.sd = X.mean(0), X.std(0).clamp_min(1e-6)
        W = torch.zeros(X.shape[1], self.n_classes, dtype=X.dtype, requires_grad=True)
        b = torch.zeros(self.n_classes, dtype=X.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=self.max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.objective(X, y, W, b)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.W, self.b = W.detach(), b.detach()
        return self

    def logits(self, X: Tensor) -> Tensor:
        if self.W is None:
            raise InputError("the probe is not fitted", "call fit(X, y) first")
        return self._standardise(X.double()) @ self.W + self.b

    def predict(self, X: Tensor) -> Tensor:
        return self.logits(X).argmax(-1)

    def accuracy(self, X: Tensor, y: Tensor) -> float:
        return float((self.predict(X) == y.long()).double().mean())


# ------------------------------------------------------------------------------------------------- AUROC
def auroc(scores: Float[Tensor, "n"], labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), by the rank formula.

    AUROC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with tied scores given
    their average rank (Mann-Whitney U). Needs both classes present."""
    scores = torch.as_tensor(scores).double().flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if scores.shape != y.shape:
        raise InputError(f"{scores.numel()} scores but {y.numel()} labels", "pass one score per label")
    if not torch.isfinite(scores).all():
        raise InputError("AUROC scores contain NaN or Inf", "check the probe's features")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"AUROC needs both classes; got {n_pos} positives and {n_neg} negatives",
                         "use a test split that contains both classes (more items, or another seed)")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s)
    i, n = 0, len(s)
    while i < n:                       # average ranks over ties
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = torch.empty_like(ranks)
    r[order] = ranks
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multiclass_auroc(probs: Float[Tensor, "n k"], labels: Tensor) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``labels`` (both roles needed per class);
    NaN when fewer than two classes are present."""
    labels = torch.as_tensor(labels).long()
    if probs.shape[1] == 2:
        return auroc(probs[:, 1], labels == 1) if 0 < int(labels.sum()) < len(labels) else float("nan")
    vals = [auroc(probs[:, c], labels == c) for c in torch.unique(labels).tolist()
            if 0 < int((labels == c).sum()) < len(labels)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@dataclass
class ProbeResult:
    """Held-out accuracy per layer, with the shuffled-label control and the chance level."""

    layers: list[int]
    accuracy: Tensor          # [layer]
    control_accuracy: Tensor  # [layer]
    train_accuracy: Tensor    # [layer]
    chance: float             # accuracy of always predicting the most frequent training label
    n_train: int
    n_test: int
    auroc: Tensor | None = None          # [layer] held-out AUROC (macro one-vs-rest when multinomial)
    control_auroc: Tensor | None = None  # [layer] the same for the shuffled-label control

    @property
    def selectivity(self) -> Tensor:
        return self.accuracy - self.control_accuracy

    @property
    def best_layer(self) -> int:
        return self.layers[int(self.accuracy.argmax())]

    def table(self) -> str:
        au = self.auroc.tolist() if self.auroc is not None else [float("nan")] * len(self.layers)
        rows = [f"{'layer':>5} {'acc':>6} {'control':>8} {'train':>6} {'auroc':>6}"]
        rows += [f"{l:5d} {a:6.3f} {c:8.3f} {t:6.3f} {u:6.3f}" for l, a, c, t, u in
                 zip(self.layers, self.accuracy.tolist(), self.control_accuracy.tolist(), self.train_accuracy.tolist(),
                     au)]
        return "\n".join(rows + [f"chance {self.chance:.3f}  (train {self.n_train}, test {self.n_test})"])


def _split(n: int, test_fraction: float, seed: int, *, min_test: int) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded (test, train) split of ``n`` items and, from the same generator, the permutation that shuffles the
    labels of the control task."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}", "use e.g. 0.3")
    n_test = int(round(n * test_fraction))
    if n_test < min_test or n - n_test < 2:
        raise InputError(f"{n} items are too few to split into train and test", "pool more clips (>= 10)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return perm[:n_test], perm[n_test:], torch.randperm(n, generator=g)


def probe_layers(features: Float[Tensor, "layer n d"], labels: Int[Tensor, "n"], *, test_fraction: float = 0.3,
                 n_classes: int | None = None, l2: float = 1e-3, seed: int = 0,
                 layers: list[int] | None = None) -> ProbeResult:
    """Fit one probe per layer on a seeded train split; report held-out and control accuracy."""
    raw = torch.as_tensor(labels)
    if raw.is_floating_point() and not bool((raw == raw.round()).all()):
        raise InputError(f"labels must be class indices, got non-integer values such as {float(raw.flatten()[0]):g}",
                         "map the labels to 0..n_classes-1 (e.g. torch.unique(y, return_inverse=True)[1])")
    labels = raw.long()
    if features.ndim != 3:
        raise InputError(f"features must be [layer, item, d_model], got shape {tuple(features.shape)}",
                         "pass pooled_residuals(...) output (add a layer axis with features[None] for one layer)")
    L, n, _ = features.shape
    if n != labels.shape[0]:
        raise InputError(f"{n} pooled items but {labels.shape[0]} labels", "pass one label per media item")
    if not bool(torch.isfinite(features).all()):
        bad = (~torch.isfinite(features)).any(-1).any(0).nonzero().squeeze(-1).tolist()
        raise InputError(f"the features hold NaN or infinite values (items {bad[:5]})",
                         "drop those items or fix the run that produced them; a probe on them reports meaningless numbers")
    if labels.numel() and int(labels.min()) < 0:
        raise InputError(f"labels must be class indices >= 0, got {int(labels.min())}",
                         "map the labels to 0..n_classes-1 (e.g. torch.unique(y, return_inverse=True)[1])")
    if len(torch.unique(labels)) < 2:
        raise InputError(f"all {n} labels are the same class ({int(labels[0]) if n else 'none'}), so a probe has "
                         "nothing to separate and its accuracy is trivially 1", "pass items of at least two classes")
    test, train, shuffle = _split(n, test_fraction, seed, min_test=1)
    k = int(n_classes or int(labels.max()) + 1)
    control = labels[shuffle]
    acc, ctl, tr, au, cau = [], [], [], [], []
    for l in range(L):
        X = features[l]
        p = LinearProbe(k, l2).fit(X[train], labels[train])
        acc.append(p.accuracy(X[test], labels[test]))
        tr.append(p.accuracy(X[train], labels[train]))
        au.append(multiclass_auroc(p.logits(X[test]).softmax(-1), labels[test]))
        c = LinearProbe(k, l2).fit(X[train], control[train])
        ctl.append(c.accuracy(X[test], control[test]))
        cau.append(multiclass_auroc(c.logits(X[test]).softmax(-1), control[test]))
    chance = float((labels[test] == torch.bincount(labels[train], minlength=k).argmax()).double().mean())
    return ProbeResult(list(layers) if layers is not None else list(range(L)), torch.tensor(acc), torch.tensor(ctl),
                       torch.tensor(tr), chance, len(train), len(test), torch.tensor(au), torch.tensor(cau))


# ------------------------------------------------------------------------------------------- regression
@dataclass
class RegressionProbeResult:
    """Held-out R² of a ridge regression per layer, with the shuffled-target control."""

    layers: list[int]
    r2: Tensor            # [layer]
    control_r2: Tensor    # [layer]
    train_r2: Tensor      # [layer]
    n_train: int
    n_test: int

    def table(self) -> str:
        rows = [f"{'layer':>5} {'R2':>7} {'control':>8} {'train':>7}"]
        rows += [f"{l:5d} {a:7.3f} {c:8.3f} {t:7.3f}" for l, a, c, t in
                 zip(self.layers, self.r2.tolist(), self.control_r2.tolist(), self.train_r2.tolist())]
        return "\n".join(rows + [f"(train {self.n_train}, test {self.n_test})"])


def _ridge_r2(Xtr: Tensor, ytr: Tensor, Xte: Tensor, yte: Tensor, l2: float) -> tuple[float, float]:
    mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
    A, B = (Xtr - mu) / sd, (Xte - mu) / sd
    ym = ytr.mean()
    d = A.shape[1]
    w = torch.linalg.solve(A.T @ A + l2 * len(A) * torch.eye(d, dtype=A.dtype), A.T @ (ytr - ym))

    def r2(X, y):
        res = ((X @ w + ym - y) ** 2).sum()
        tot = ((y - y.mean()) ** 2).sum()
        return float(1 - res / tot) if float(tot) > 0 else float("nan")

    return r2(B, yte), r2(A, ytr)


def regression_probe_layers(features: Float[Tensor, "layer n d"], targets: Float[Tensor, "n"], *,
                            test_fraction: float = 0.3, l2: float = 1e-2, seed: int = 0,
                            layers: list[int] | None = None) -> RegressionProbeResult:
    """Ridge regression (standardised features, penalty ``l2 * n_train * ||w||^2``) per layer; held-out R²
    against a control fitted to targets shuffled across items."""
    y = torch.as_tensor(targets).double().flatten()
    L, n, _ = features.shape
    if n != y.shape[0]:
        raise InputError(f"{n} pooled items but {y.shape[0]} targets", "pass one target per item")
    if not torch.isfinite(y).all() or not torch.isfinite(features).all():
        raise InputError("regression probe features or targets contain NaN or Inf", "check the inputs")
    if float(y.std()) == 0:
        raise InputError("every regression target has the same value; R² is undefined",
                         "use targets that vary across items")
    test, train, shuffle = _split(n, test_fraction, seed, min_test=2)
    control = y[shuffle]
    r2, ctl, tr = [], [], []
    for l in range(L):
        X = features[l].double()
        te, trn = _ridge_r2(X[train], y[train], X[test], y[test], l2)
        r2.append(te)
        tr.append(trn)
        ctl.append(_ridge_r2(X[train], control[train], X[test], control[test], l2)[0])
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return RegressionProbeResult(list(layers) if layers is not None else list(range(L)), f64(r2), f64(ctl), f64(tr),
                                 len(train), len(test))
