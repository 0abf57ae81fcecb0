"""Representational similarity: linear CKA across layers, between modality position sets or two runs.

Linear centred kernel alignment (Kornblith et al. 2019) compares two representations of the same n examples,
X [n, d1] and Y [n, d2], independently of rotations and isotropic scaling:

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X Xᵀ,  L = Y Yᵀ

With the biased HSIC on centred features this is ``||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)``. The debiased
variant uses the unbiased HSIC estimator (Song et al. 2012), which removes the upward bias that makes CKA of
unrelated high-dimensional features look large at small n ("Anatomy of the Modality Gap" reports both).

Both need only sums over examples: ``XᵀX``, ``YᵀY``, ``XᵀY``, the feature sums, and per-example squared norms
— so :class:`CKAAccumulator` streams over any number of clips while holding d x d matrices, never the
activations. :func:`cka_matrix` pools each clip's residual stream at a selector (mean over the selected
positions, per sample or per media item) and fills a layer x layer CKA matrix:

    res = cka_matrix(model, batches, "audio", "video")     # audio positions' layers vs video positions' layers
    res = cka_matrix(model, batches, "audio")               # audio positions, layer vs layer
    res = cka_matrix(model, batches, "audio", model_b=base) # the same positions in two models (two runs)

Memory: one accumulator per layer pair, each O((d1 + d2)²) doubles; restrict ``layers`` / ``layers_b`` at
real-model widths.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import SelectorLike


def _gram_terms_direct(X: Tensor, Y: Tensor, debiased: bool) -> Tensor:
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) from the n x n Gram matrices: the reference formula."""
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    K, L = X @ X.T, Y @ Y.T
    if not debiased:
        H = torch.eye(n, dtype=X.dtype) - 1.0 / n
        Kc, Lc = H @ K @ H, H @ L @ H
        return torch.stack([(Kc * Lc).sum(), (Kc * Kc).sum(), (Lc * Lc).sum()])

    def hsic_u(A, B):
        A = A.clone().fill_diagonal_(0)
        B = B.clone().fill_diagonal_(0)
        one = torch.ones(n, dtype=A.dtype)
        t = (A * B).sum() + (one @ A @ one) * (one @ B @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ A @ B @ one)
        return t / (n * (n - 3))

    return torch.stack([hsic_u(K, L), hsic_u(K, K), hsic_u(L, L)])


def linear_cka(X: Float[Tensor, "n d1"], Y: Float[Tensor, "n d2"], *, debiased: bool = False) -> float:
    """Linear CKA of two representations of the same ``n`` examples (rows), computed from Gram matrices."""
    _check_pair(X, Y, debiased)
    h = _gram_terms_direct(X, Y, debiased)
    return _ratio(h, float((X.double() ** 2).sum()) ** 2, float((Y.double() ** 2).sum()) ** 2)


def _check_pair(X: Tensor, Y: Tensor, debiased: bool) -> None:
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise InputError(f"CKA needs [n, d] matrices with the same n; got {tuple(X.shape)} and {tuple(Y.shape)}",
                         "pass one row per example in both, in the same order")
    need = 4 if debiased else 2
    if X.shape[0] < need:
        raise InputError(f"{'debiased ' if debiased else ''}CKA needs at least {need} examples, got {X.shape[0]}",
                         "pool more clips")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise InputError("CKA features contain NaN or Inf", "check the activations")


def _ratio(h: Tensor, scale_x: float, scale_y: float) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); a side whose self-HSIC is at rounding level relative to its
    raw second moment squared (``scale_*``) is constant across the examples, and CKA is then undefined."""
    kk, ll = float(h[1]), float(h[2])
    if kk <= 1e-12 * scale_x or ll <= 1e-12 * scale_y:
        raise InputError("CKA is undefined: one representation is constant across the examples",
                         "compare representations that vary across clips")
    return float(h[0]) / (kk * ll) ** 0.5


class CKAAccumulator:
    """Streaming linear CKA: feed row-aligned batches of X and Y with :meth:`update`, read :meth:`value`."""

    def __init__(self, d1: int, d2: int, *, debiased: bool = False):
        self.debiased = debiased
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.n = 0
        self.Cxx, self.Cyy, self.Cxy = z(d1, d1), z(d2, d2), z(d1, d2)
        self.Sx, self.Sy = z(d1), z(d2)
        # per-example squared norms a_i = |x_i|², b_i = |y_i|² and their weighted sums (debiased terms)
        self.sa, self.sb, self.saa, self.sbb, self.sab = 0.0, 0.0, 0.0, 0.0, 0.0
        self.Sax, self.Sbx, self.Say, self.Sby = z(d1), z(d1), z(d2), z(d2)

    def update(self, X: Tensor, Y: Tensor) -> "CKAAccumulator":
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise InputError(f"CKA batches need [n, d] with the same n; got {tuple(X.shape)}, {tuple(Y.shape)}",
                             "pass row-aligned batches")
        if X.shape[1] != self.Cxx.shape[0] or Y.shape[1] != self.Cyy.shape[0]:
            raise InputError(f"CKA batch widths {X.shape[1]}, {Y.shape[1]} differ from the accumulator's "
                             f"{self.Cxx.shape[0]}, {self.Cyy.shape[0]}", "feed the same representations")
        if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
            raise InputError("CKA features contain NaN or Inf", "check the activations")
        X, Y = X.double(), Y.double()
        a, b = (X * X).sum(1), (Y * Y).sum(1)
        self.n += X.shape[0]
        self.Cxx += X.T @ X
        self.Cyy += Y.T @ Y
        self.Cxy += X.T @ Y
        self.Sx += X.sum(0)
        self.Sy += Y.sum(0)
        self.sa += float(a.sum()); self.sb += float(b.sum())  # noqa: E702
        self.saa += float((a * a).sum()); self.sbb += float((b * b).sum()); self.sab += float((a * b).sum())  # noqa: E702
        self.Sax += a @ X; self.Sbx += b @ X; self.Say += a @ Y; self.Sby += b @ Y  # noqa: E702
        return self

    def _terms(self) -> Tensor:
        n = self.n
        need = 4 if self.debiased else 2
        if n < need:
            raise InputError(f"{'debiased ' if self.debiased else ''}CKA needs at least {need} examples, got {n}",
                             "pool more clips")
        fro = lambda C: float((C * C).sum())  # noqa: E731
        if not self.debiased:
            mx, my = self.Sx / n, self.Sy / n
            cxy = self.Cxy - n * torch.outer(mx, my)
            cxx = self.Cxx - n * torch.outer(mx, mx)
            cyy = self.Cyy - n * torch.outer(my, my)
            return torch.tensor([fro(cxy), fro(cxx), fro(cyy)], dtype=torch.float64)

        def hsic_u(C_uv, sa, sb, sab, S_u, S_v, Sb_u, Sa_v):
            # K~ = K - diag(a), L~ = L - diag(b); tr(K~L~), 1'K~1 1'L~1, 1'K~L~1 from feature sums
            tr = fro(C_uv) - sab
            ones_k = float(S_u @ S_u) - sa
            ones_l = float(S_v @ S_v) - sb
            kl = float(S_u @ C_uv @ S_v) - float(Sb_u @ S_u) - float(Sa_v @ S_v) + sab
            return (tr + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * kl) / (n * (n - 3))

        kl = hsic_u(self.Cxy, self.sa, self.sb, self.sab, self.Sx, self.Sy, self.Sbx, self.Say)
        kk = hsic_u(self.Cxx, self.sa, self.sa, self.saa, self.Sx, self.Sx, self.Sax, self.Sax)
        ll = hsic_u(self.Cyy, self.sb, self.sb, self.sbb, self.Sy, self.Sy, self.Sby, self.Sby)
        return torch.tensor([kl, kk, ll], dtype=torch.float64)

    def value(self) -> float:
        return _ratio(self._terms(), self.sa ** 2, self.sb ** 2)


@dataclass
class CKAResult:
    """CKA between the layers of representation A (rows) and of representation B (columns)."""

    layers_a: list[int]
    layers_b: list[int]
    cka: Tensor           # [layer_a, layer_b]
    a: str
    b: str
    n: int
    debiased: bool

    def table(self) -> str:
        corner = "A \\ B"
        head = f"{corner:>6} " + " ".join(f"{l:>6d}" for l in self.layers_b)
        rows = [f"{'debiased ' if self.debiased else ''}linear CKA, A = {self.a}, B = {self.b}, n = {self.n}", head]
        rows += [f"{la:6d} " + " ".join(f"{float(v):6.3f}" for v in self.cka[i]) for i, la in enumerate(self.layers_a)]
        return "\n".join(rows)

    def view(self, title: str | None = None):
        from av_lens.views.html import View
        from av_lens.views.plots import heatmap

        title = title or f"Linear CKA: {self.a} (rows) vs {self.b} (columns) by layer"
        svg = heatmap(self.cka, [f"{self.a} {l}" for l in self.layers_a], [str(l) for l in self.layers_b],
                      title=title, diverging=False, cell=36)
        return View(svg, title)


def cka_matrix(model, batches: Iterable, a: SelectorLike = "audio", b: SelectorLike | None = None, *,
               model_b=None, batches_b: Iterable | None = None, layers: Sequence[int] | None = None,
               layers_b: Sequence[int] | None = None, per_item: bool = False, debiased: bool = False,
               progress: bool = False) -> CKAResult:
    """Layer x layer CKA between the residuals at ``a`` and at ``b`` (default ``a``), streamed over ``batches``.

    Each example is one sample (or, with ``per_item``, one media item — then both sides must have the same
    number of items per batch) mean-pooled over the selected positions. ``model_b`` / ``batches_b`` give
    side B its own model or inputs (two runs: the base vs the organism, factual vs counterfactual clips);
    ``batches_b`` must then yield batches aligned with ``batches``. Layers index the residual stream
    (0 = embeddings, l = after block l-1)."""
    from tqdm.auto import tqdm

    from av_lens.analysis.probes import pooled_residuals

    b = a if b is None else b
    model_b = model if model_b is None else model_b
    la = list(range(model.cfg.n_layers + 1)) if layers is None else [int(l) for l in layers]
    lb = list(range(model_b.cfg.n_layers + 1)) if layers_b is None else [int(l) for l in layers_b]
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise InputError("cka_matrix got no batches", "pass a list of input batches (several clips each)")
    other = batches if batches_b is None else list(batches_b)
    if len(other) != len(batches):
        raise InputError(f"batches_b has {len(other)} batches but batches has {len(batches)}",
                         "pass row-aligned batches for both sides")
    acc = [[CKAAccumulator(model.cfg.d_model, model_b.cfg.d_model, debiased=debiased) for _ in lb] for _ in la]
    n = 0
    for xa, xb in tqdm(list(zip(batches, other)), desc="CKA", disable=not progress):
        fa = pooled_residuals(model, xa, a, per_item=per_item, layers=la)
        fb = pooled_residuals(model_b, xb, b, per_item=per_item, layers=lb)
        if fa.shape[1] != fb.shape[1]:
            raise InputError(f"side A pooled {fa.shape[1]} examples from a batch but side B {fb.shape[1]}",
                             "every sample needs positions in both selectors (use per_item=False, or inputs with "
                             "the same media items on both sides)")
        n += fa.shape[1]
        for i in range(len(la)):
            for j in range(len(lb)):
                acc[i][j].update(fa[i], fb[j])
    cka = torch.full((len(la), len(lb)), float("nan"))
    undefined = []
    for i in range(len(la)):
        for j in range(len(lb)):
            try:
                cka[i, j] = acc[i][j].value()
            except InputError:
                undefined.append((la[i], lb[j]))
    if undefined:
        warnings.warn(f"CKA is undefined (NaN) for {len(undefined)} layer pair(s), e.g. {undefined[:4]}: one side is "
                      "constant across the examples there (e.g. the same token's embedding at layer 0). Leave those "
                      "layers out with layers= / layers_b=.", stacklevel=2)
    return CKAResult(la, lb, cka, str(a), str(b), n, debiased)
