"""Linear CKA: the streaming accumulator against the Gram-matrix formula, invariances, debiasing, and the
layer x layer matrix against features pooled from a full cache."""

import numpy as np
import pytest
import torch

from av_lens.analysis.similarity import CKAAccumulator, cka_matrix, linear_cka
from av_lens.errors import InputError
from conftest import cases


def _xy(n=40, d1=7, d2=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g, dtype=torch.float64) + 3.0
    Y = X[:, :d2] @ torch.randn(d2, d2, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, d2, generator=g,
                                                                                               dtype=torch.float64)
    return X, Y


def _direct(X, Y):
    """Kornblith et al.'s closed form on centred features: ||Y'X||² / (||X'X|| ||Y'Y||)."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return float((Y.T @ X).norm() ** 2 / ((X.T @ X).norm() * (Y.T @ Y).norm()))


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_equals_gram_formula(debiased):
    X, Y = _xy()
    acc = CKAAccumulator(7, 5, debiased=debiased)
    for i in range(0, 40, 7):
        acc.update(X[i:i + 7], Y[i:i + 7])
    assert acc.n == 40
    assert abs(acc.value() - linear_cka(X, Y, debiased=debiased)) < 1e-10
    if not debiased:
        assert abs(acc.value() - _direct(X, Y)) < 1e-10


def test_invariances_and_identity():
    X, Y = _xy(seed=1)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    base = linear_cka(X, Y)
    assert abs(linear_cka(X, Y @ Q) - base) < 1e-10          # orthogonal transform
    assert abs(linear_cka(3.7 * X, Y) - base) < 1e-10        # isotropic scaling
    assert abs(linear_cka(X + 5.0, Y) - base) < 1e-10        # translation (centring)
    assert abs(linear_cka(X, X) - 1.0) < 1e-12
    # not invariant to an anisotropic scaling
    assert abs(linear_cka(X, Y * torch.tensor([1, 1, 1, 1, 30.0], dtype=torch.float64)) - base) > 1e-3


def test_debiased_removes_the_small_n_bias_of_unrelated_features():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 200, generator=g, dtype=torch.float64)
    Y = torch.randn(20, 200, generator=g, dtype=torch.float64)
    assert linear_cka(X, Y) > 0.5          # biased CKA of independent wide features looks large
    assert abs(linear_cka(X, Y, debiased=True)) < 0.15


def test_cka_matrix_matches_pooled_cache_features(model, media):
    rng = np.random.default_rng(7)
    t = np.arange(16000 * 4) / 16000

    def clip(i):  # tones of different pitch and loudness, frames of different brightness
        wav = (0.05 * (i + 1) * np.sin(2 * np.pi * 300 * (i + 1) * t) + 0.01 * rng.standard_normal(len(t)))
        frames = np.clip(rng.integers(0, 60, (8, 56, 56, 3)) + 40 * i, 0, 255).astype(np.uint8)
        return model.prepare(text="Describe.", videos=[frames], video_audio=[wav.astype(np.float32)],
                             use_audio_in_video=True)

    batches = [clip(i) for i in range(5)]
    res = cka_matrix(model, batches, "audio", "video", layers=[0, 1, 2], layers_b=[1, 2])
    assert res.cka.shape == (3, 2) and res.n == 5
    feats = {"audio": [], "video": []}
    for x in batches:
        _, c = model.run_with_cache(x)
        for sel in feats:
            m = x.layout.mask(sel)[0]
            feats[sel].append(torch.stack([c["blocks.0.hook_resid_pre"][0][m].mean(0)] +
                                          [c[f"blocks.{l}.hook_resid_post"][0][m].mean(0) for l in range(2)]))
    A, V = torch.stack(feats["audio"]), torch.stack(feats["video"])   # [n, resid, d]
    for i, la in enumerate([0, 1, 2]):
        for j, lb in enumerate([1, 2]):
            assert abs(float(res.cka[i, j]) - linear_cka(A[:, la], V[:, lb])) < 1e-5
    same = cka_matrix(model, batches, "audio", layers=[1, 2], layers_b=[1, 2], model_b=model)
    torch.testing.assert_close(same.cka.diagonal(), torch.ones(2), atol=1e-6, rtol=0)
    assert "CKA" in res.table() and "<svg" in res.view()._repr_html_()


def test_constant_layers_are_nan_with_a_warning(model, media):
    batches = [model.prepare(**cases(media)["audio"]), model.prepare(**cases(media)["video_with_audio"]),
               model.prepare(**cases(media)["image_video_audio"])]
    with pytest.warns(UserWarning, match="undefined"):
        res = cka_matrix(model, batches, "media", "last_prompt", layers=[1], layers_b=[0, 1])
    assert torch.isnan(res.cka[0, 0]) and torch.isfinite(res.cka[0, 1])  # the last token's embedding is constant


def test_refusals(model, media):
    with pytest.raises(InputError, match="at least 4"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    with pytest.raises(InputError, match="same n"):
        linear_cka(torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(InputError, match="constant"):
        linear_cka(torch.ones(6, 2), torch.randn(6, 2))
    with pytest.raises(InputError, match="no batches"):
        cka_matrix(model, [], "audio")
    with pytest.raises(InputError, match="matches no position"):
        cka_matrix(model, [model.prepare(**cases(media)["audio"])], "video")
