"""Linear probes: the L-BFGS fit against an independent gradient-descent fit; pooling against a full cache."""

import pytest
import torch

from av_lens.analysis.probes import LinearProbe, pooled_residuals, probe_layers
from av_lens.errors import InputError
from conftest import cases, padded_batch


def toy(n=240, d=12, k=4, seed=0, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    X = centres[y] + noise * torch.randn(n, d, generator=g)
    return X, y


def test_lbfgs_fit_matches_gradient_descent_reference():
    X, y = toy()
    p = LinearProbe(4, l2=1e-2).fit(X, y)
    # independent fit: plain full-batch gradient descent on the same convex objective, same standardisation
    Xs = ((X - X.mean(0)) / X.std(0)).double()
    W = torch.zeros(12, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=0.5)
    for _ in range(3000):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xs @ W + b, y) + 1e-2 * (W ** 2).sum()
        loss.backward()
        opt.step()
    ours = p.objective(X.double(), y, p.W, p.b)
    assert float(ours) <= float(loss) + 1e-6
    torch.testing.assert_close(p.W, W.detach(), atol=2e-3, rtol=0)
    assert torch.equal(p.predict(X), (Xs @ W + b).argmax(-1))


def test_probe_layers_separable_vs_noise_and_control():
    X, y = toy(noise=0.3)
    noise = torch.randn(240, 12, generator=torch.Generator().manual_seed(5))
    res = probe_layers(torch.stack([noise, X]), y, seed=0)
    assert res.accuracy[1] > 0.95 and res.accuracy[0] < 0.5
    assert res.control_accuracy[1] < 0.5  # shuffled labels do not transfer to held-out items
    assert res.best_layer == 1 and res.n_test == 72 and "chance" in res.table()
    assert res.selectivity[1] > 0.45


def test_pooled_residuals_match_cache(model, media):
    inp = padded_batch(model, media)
    feats = pooled_residuals(model, inp, "audio")
    _, cache = model.run_with_cache(inp)
    L = inp.layout
    rows = []
    for b in range(2):
        m = L.mask("audio")[b]
        for k in torch.unique(L.item[b][m]).tolist():
            rows.append((b, m & (L.item[b] == k)))
    assert feats.shape == (model.cfg.n_layers + 1, len(rows), model.cfg.d_model)
    for li in range(model.cfg.n_layers + 1):
        name = "blocks.0.hook_resid_pre" if li == 0 else f"blocks.{li - 1}.hook_resid_post"
        for j, (b, m) in enumerate(rows):
            torch.testing.assert_close(feats[li, j], cache[name][b, m].mean(0), atol=1e-6, rtol=1e-5)
    per_sample = pooled_residuals(model, inp, "audio", per_item=False, layers=[0])
    assert per_sample.shape == (1, 2, model.cfg.d_model)


def test_bad_arguments(model, media):
    inp = model.prepare(**cases(media)["audio"])
    with pytest.raises(InputError, match="matches no position"):
        pooled_residuals(model, inp, "video")
    with pytest.raises(InputError, match="outside"):
        pooled_residuals(model, inp, "audio", layers=[9])
    X, y = toy()
    with pytest.raises(InputError, match="labels"):
        probe_layers(X[None], y[:10])
    with pytest.raises(InputError, match="too few"):
        probe_layers(X[None, :2], y[:2])
    with pytest.raises(InputError, match="not fitted"):
        LinearProbe(4).predict(X)
