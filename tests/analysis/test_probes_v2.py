"""Probes v2: AUROC against a pairwise count, last-prompt-token features against a cache, ridge regression
probes against a direct least-squares solve."""

import numpy as np
import pytest
import torch

from av_lens.analysis.probes import (auroc, multiclass_auroc, pooled_residuals, probe_layers,
                                     regression_probe_layers)
from av_lens.errors import InputError
from conftest import cases, padded_batch


def _pairwise_auroc(s, y):
    pos, neg = s[y], s[~y]
    return float(((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean())


@pytest.mark.parametrize("seed", range(4))
def test_auroc_rank_formula_equals_pairwise_count(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 6, (50,), generator=g).double()       # many ties
    y = torch.rand(50, generator=g) < 0.4
    assert auroc(s, y) == pytest.approx(_pairwise_auroc(s, y), abs=1e-12)
    assert auroc(-s, y) == pytest.approx(1 - _pairwise_auroc(s, y), abs=1e-12)


def test_multiclass_auroc_is_the_mean_of_one_vs_rest():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(60, 3, generator=g).softmax(-1)
    y = torch.arange(60) % 3
    want = np.mean([_pairwise_auroc(p[:, c], y == c) for c in range(3)])
    assert multiclass_auroc(p, y) == pytest.approx(want, abs=1e-12)


def test_probe_layers_reports_auroc_and_control():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(200) % 2
    X = torch.randn(2, 200, 6, generator=g)
    X[0, :, 0] += 3 * y        # layer 0 separable, layer 1 noise
    res = probe_layers(X, y, seed=0)
    assert res.auroc[0] > 0.95 and abs(float(res.auroc[1]) - 0.5) < 0.2
    assert abs(float(res.control_auroc[0]) - 0.5) < 0.2
    assert "auroc" in res.table()


def test_auroc_refuses_one_class():
    with pytest.raises(InputError, match="both classes"):
        auroc(torch.rand(5), torch.ones(5, dtype=torch.bool))


def test_last_prompt_features_are_the_cache_at_the_last_prompt_token(model, media):
    inp = padded_batch(model, media)
    f = pooled_residuals(model, inp, "last_prompt", per_item=False)
    _, cache = model.run_with_cache(inp)
    assert f.shape == (model.cfg.n_layers + 1, 2, model.cfg.d_model)
    torch.testing.assert_close(f[0], cache["blocks.0.hook_resid_pre"][:, -1])
    torch.testing.assert_close(f[-1], cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1])


def test_regression_probe_matches_a_direct_ridge_solve():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2, 120, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    y = X[0] @ w + 0.1 * torch.randn(120, generator=g, dtype=torch.float64)
    res = regression_probe_layers(X, y, l2=1e-3, seed=0)
    assert res.r2[0] > 0.98 and res.r2[1] < 0.2 and res.control_r2[0] < 0.2
    # independent: numpy least squares on the augmented ridge system, same split and standardisation
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    te, tr = perm[:36].numpy(), perm[36:].numpy()
    A = X[0].numpy()
    mu, sd = A[tr].mean(0), A[tr].std(0, ddof=1)
    Z = (A - mu) / sd
    yc = y.numpy() - y.numpy()[tr].mean()
    lam = np.sqrt(1e-3 * len(tr))
    sol = np.linalg.lstsq(np.vstack([Z[tr], lam * np.eye(5)]), np.concatenate([yc[tr], np.zeros(5)]), rcond=None)[0]
    pred = Z[te] @ sol + y.numpy()[tr].mean()
    r2 = 1 - ((pred - y.numpy()[te]) ** 2).sum() / ((y.numpy()[te] - y.numpy()[te].mean()) ** 2).sum()
    assert float(res.r2[0]) == pytest.approx(r2, abs=1e-9)


def test_regression_probe_refusals():
    with pytest.raises(InputError, match="same value"):
        regression_probe_layers(torch.randn(1, 20, 3), torch.ones(20))
    with pytest.raises(InputError, match="targets"):
        regression_probe_layers(torch.randn(1, 20, 3), torch.ones(19))
