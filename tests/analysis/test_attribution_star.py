"""AtP*'s two fixes against exact patching: q/k nodes with the attention pattern recomputed equal patching when the
patched head's softmax is the model's only non-linearity (plain AtP does not); GradDrop's magnitudes equal the
mean |effect| of exact patching with each layer's outputs frozen, on the affine-pinned model."""

import copy

import pytest
import torch

from av_lens.analysis.attribution import attribution_patch
from av_lens.analysis.patching import patch_by_modality
from av_lens.errors import InputError
from test_attribution import SETS, _freeze_hooks, _metric, _organism_pairs, _pair


def _pin_all_but(model, inputs, layer):
    """Pin every norm scale, MLP gate and every attention pattern except ``layer``'s: the metric is then linear in
    that layer's pattern, so recomputing the pattern and linearising from there is exact."""
    keep = f"blocks.{layer}.attn.hook_pattern"
    return [(n, f) for n, f in _freeze_hooks(model, inputs) if n != keep]


@pytest.fixture(scope="module")
def sharp(model):
    """The tiny model with queries scaled up 30x: its random heads attend sharply (near-saturated softmaxes), the
    case a first-order estimate through the softmax gets wrong."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for b in m.blocks:
            b.attn.q_proj.weight.mul_(30)
            if b.attn.q_proj.bias is not None:
                b.attn.q_proj.bias.mul_(30)
    return m


@pytest.mark.parametrize("layer", [0, 1])
def test_recomputed_qk_equals_patching_when_the_softmax_is_the_only_nonlinearity(sharp, media, layer):
    model = sharp
    clean, corrupted = _pair(model, media)
    with model.hooks(fwd_hooks=_pin_all_but(model, corrupted, layer)):
        star = attribution_patch(model, clean, corrupted, _metric, components=("q", "k", "v"), sets=SETS,
                                 layers=[layer], recompute_qk=True)
        plain = attribution_patch(model, clean, corrupted, _metric, components=("q", "k"), sets=SETS,
                                  layers=[layer])
        exact = patch_by_modality(model, clean, corrupted, _metric, components=("q", "k", "v"), sets=SETS,
                                  layers=[layer], progress=False)
    assert star.effect("q").shape == (1, model.cfg.n_heads, 3)
    assert star.effect("k").shape == (1, model.cfg.n_key_value_heads, 3)
    for c, size in (("q", 3e-4), ("k", 3e-3)):
        e = exact[c] - exact.corrupted
        assert e.abs().max() > size
        torch.testing.assert_close(star.effect(c), e, atol=1e-5, rtol=1e-4)
    # the first-order estimate through the sharp softmax is off by over 100x the tolerance above
    assert (plain.effect("k") - (exact["k"] - exact.corrupted)).abs().max() > 2e-3
    torch.testing.assert_close(star.effect("v"), exact["v"] - exact.corrupted, atol=1e-5, rtol=1e-4)
    assert star.method == "AtP (q/k recomputed)"


def test_plain_atp_of_values_equals_patching_on_the_affine_model(model, media):
    clean, corrupted = _pair(model, media)
    with model.hooks(fwd_hooks=_freeze_hooks(model, corrupted)):
        atp = attribution_patch(model, clean, corrupted, _metric, components=("v",), sets=SETS)
        exact = patch_by_modality(model, clean, corrupted, _metric, components=("v",), sets=SETS, progress=False)
    torch.testing.assert_close(atp["v"], exact["v"], atol=1e-5, rtol=1e-4)
    assert (exact["v"] - exact.corrupted).abs().max() > 1e-3


def _frozen_patch(model, clean_cache, corr_cache, corrupted, comp, layer, set_mask, frozen):
    """The metric after patching ``comp`` at ``layer`` and ``set_mask`` with layer ``frozen``'s attention and MLP
    outputs held at their corrupted values (the freeze applied after the patch, so it wins at its own layer)."""
    name = f"blocks.{layer}.hook_{comp}"

    def patch(act, hook):
        act = act.clone()
        act[set_mask] = clean_cache[name][set_mask]
        return act

    hooks = [(name, patch)]
    for a in ("attn_out", "mlp_out"):
        n = f"blocks.{frozen}.hook_{a}"
        hooks.append((n, lambda act, hook, v=corr_cache[n]: v.clone()))
    with torch.no_grad():
        return float(_metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)))


def test_grad_drop_equals_mean_abs_of_frozen_layer_patching_on_the_affine_model(model, media):
    clean, corrupted = _pair(model, media)
    comps = ("resid_pre", "attn_out", "mlp_out")
    L = model.cfg.n_layers
    with model.hooks(fwd_hooks=_freeze_hooks(model, corrupted)):
        res = attribution_patch(model, clean, corrupted, _metric, components=comps, sets=SETS, grad_drop=True)
        names = lambda n: any(n.endswith("hook_" + c) for c in comps) and n.startswith("blocks.")  # noqa: E731
        _, cc = model.run_with_cache(clean, names_filter=names)
        with torch.no_grad():
            base, kc = model.run_with_cache(corrupted, names_filter=names)
        base = float(_metric(base))
        for c in comps:
            want = torch.zeros(L, len(SETS))
            for l in range(L):
                for s, sel in enumerate(SETS):
                    m = corrupted.layout.mask(sel)
                    want[l, s] = sum(abs(_frozen_patch(model, cc, kc, corrupted, c, l, m, f) - base)
                                     for f in range(L)) / (L - 1)
            torch.testing.assert_close(res.magnitude(c), want, atol=1e-5, rtol=1e-4)
    assert res.magnitude("resid_pre").max() > 1e-3
    assert res.method == "AtP + GradDrop"


    assert "|effect|~" in res.table("attn_out", by="grad_drop")


def test_atp_star_refusals(model, media):
    from av_lens.analysis.position_map import position_map

    clean, corrupted = _pair(model, media)
    with pytest.raises(InputError, match="position-aligned"):
        attribution_patch(model, clean, corrupted, _metric, components=("q",), recompute_qk=True,
                          position_map=position_map(clean, corrupted))
    res = attribution_patch(model, clean, corrupted, _metric, components=("q",))
    with pytest.raises(InputError, match="GradDrop"):
        res.magnitude("q")
    with pytest.raises(InputError, match="ranking"):
        res.top(3, "q", by="size")


def test_edge_ig_converges_to_path_patching_as_steps_grow(sharp, media):
    """Integrating along each edge converges to exact edge patching (midpoint rule: error ~ 1/k^2); EAP and the
    input-path EAP-IG stay off by far more on this sharp-attention model."""
    from av_lens.analysis.attribution import edge_attribution
    from av_lens.analysis.patching import path_patch

    model = sharp
    clean, corrupted = _pair(model, media)
    with torch.no_grad():
        c0 = float(_metric(model(corrupted)))

    def metric(logits):  # curved around the corrupted run (a cubic: the midpoint rule is not exact for it)
        x = 30 * (_metric(logits) - c0)
        return x + x ** 3
    senders = ("audio", "video")
    exact = torch.stack([path_patch(model, clean, corrupted, metric, s, "last_prompt", layers=[0],
                                    heads_per_layer=True) for s in senders], -1)[..., None]    # [1, h, s, 1]
    kw = dict(senders=senders, receivers=("last_prompt",), layers=[0])
    eap = edge_attribution(model, clean, corrupted, metric, **kw)
    want = exact - eap.corrupted
    assert want.abs().max() > 1e-3
    err = {k: float((edge_attribution(model, clean, corrupted, metric, ig_steps=k, ig_path="edge", **kw).effects
                     - want).abs().max()) for k in (1, 2, 8)}
    eap_err = float((eap.effects - want).abs().max())
    input_ig = float((edge_attribution(model, clean, corrupted, metric, ig_steps=8, **kw).effects - want).abs().max())
    assert err[2] < 0.3 * err[1] and err[8] < 0.03 * err[1], err          # the midpoint rule's 1/k^2
    assert eap_err > 10 * err[8] and input_ig > 10 * err[8], (eap_err, input_ig, err)
    res = edge_attribution(model, clean, corrupted, metric, ig_steps=2, ig_path="edge", **kw)
    assert "edge IG (2 steps per edge)" in res.table()
    with pytest.raises(InputError, match="ig_path"):
        edge_attribution(model, clean, corrupted, metric, ig_steps=2, ig_path="edges", **kw)
    with pytest.raises(InputError, match="needs ig_steps"):
        edge_attribution(model, clean, corrupted, metric, ig_path="edge", **kw)


def organism_atp_star_vs_patching(n_pairs=6, seed=3):
    """Per pair: q/k nodes (layer x head x set) — Spearman rho and mean |error| of plain AtP and of AtP's
    recomputed patterns against exact patching; resid_pre / attn_out / mlp_out nodes — rho of GradDrop's
    magnitudes and of |AtP| against |exact|, and how many of exact patching's 10 largest nodes each puts in its
    own 10 largest."""
    from av_lens import HookedAVTransformer
    from test_attribution import _ranks

    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    rho = lambda a, b: float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])  # noqa: E731
    top = lambda x: set(x.abs().argsort(descending=True)[:10].tolist())  # noqa: E731
    rows = []
    for clean, corrupted, metric in _organism_pairs(model, n_pairs, seed):
        comps = ("resid_pre", "attn_out", "mlp_out")
        plain = attribution_patch(model, clean, corrupted, metric, components=comps + ("q", "k"), sets=SETS)
        star = attribution_patch(model, clean, corrupted, metric, components=comps + ("q", "k"), sets=SETS,
                                 recompute_qk=True, grad_drop=True)
        ex = patch_by_modality(model, clean, corrupted, metric, components=comps + ("q", "k"), sets=SETS,
                               progress=False)
        E = torch.cat([(ex[c] - ex.corrupted).flatten() for c in ("q", "k")])
        P = torch.cat([plain.effect(c).flatten() for c in ("q", "k")])
        S = torch.cat([star.effect(c).flatten() for c in ("q", "k")])
        En = torch.cat([(ex[c] - ex.corrupted).flatten() for c in comps])
        An = torch.cat([plain.effect(c).flatten() for c in comps])
        Gn = torch.cat([star.magnitude(c).flatten() for c in comps])
        rows.append({"qk_rho_atp": rho(P, E), "qk_rho_star": rho(S, E),
                     "qk_err_atp": float((P - E).abs().mean()), "qk_err_star": float((S - E).abs().mean()),
                     "qk_top10_atp": len(top(P) & top(E)), "qk_top10_star": len(top(S) & top(E)),
                     "node_rho_abs_atp": rho(An.abs(), En.abs()), "node_rho_graddrop": rho(Gn, En.abs()),
                     "node_top10_atp": len(top(An) & top(En)), "node_top10_graddrop": len(top(Gn) & top(En))})
    return rows


def organism_edges_vs_path_patching(seed=3, steps=(1, 2, 4, 8)):
    """First pair of the table: every (layer, head, {audio, video, text} -> last prompt) edge; mean and max
    |error| against exact path patching of EAP, input-path EAP-IG and per-edge IG at each step count."""
    from av_lens import HookedAVTransformer
    from av_lens.analysis.attribution import edge_attribution
    from av_lens.analysis.patching import path_patch

    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    clean, corrupted, metric = _organism_pairs(model, 1, seed)[0]
    kw = dict(senders=SETS, receivers=("last_prompt",))
    eap = edge_attribution(model, clean, corrupted, metric, **kw)
    exact = torch.stack([path_patch(model, clean, corrupted, metric, s, "last_prompt", heads_per_layer=True)
                         for s in SETS], -1)[..., None] - eap.corrupted
    err = lambda r: (float((r.effects - exact).abs().mean()), float((r.effects - exact).abs().max()))  # noqa: E731
    out = {"exact_max": float(exact.abs().max()), "EAP": err(eap)}
    for k in steps:
        out[f"EAP-IG {k}"] = err(edge_attribution(model, clean, corrupted, metric, ig_steps=k, **kw))
        out[f"edge IG {k}"] = err(edge_attribution(model, clean, corrupted, metric, ig_steps=k, ig_path="edge", **kw))
    return out


def test_attribution_results_as_tidy_frames_and_patching_heatmaps(model, media):
    from av_lens import views

    clean, corrupted = _pair(model, media)
    res = attribution_patch(model, clean, corrupted, _metric, components=("resid_pre", "z", "k"), sets=SETS,
                            grad_drop=True)
    df = res.to_frame()
    L, H, KV = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads
    assert len(df) == L * 3 + L * H * 3 + L * KV * 3
    row = df[(df.component == "z") & (df.layer == 1) & (df["index"] == 2) & (df.set == "video")].iloc[0]
    assert row.effect == pytest.approx(float(res.effect("z")[1, 2, 1])) and row.unit == "head"
    assert row.grad_drop == pytest.approx(float(res.magnitude("z")[1, 2, 1]))
    assert set(df[df.component == "k"].unit) == {"kv_head"} and set(df[df.component == "resid_pre"]["index"]) == {-1}
    html = views.patching_heatmap(res, "resid_pre")._repr_html_()
    assert "AtP + GradDrop resid_pre: fraction recovered (estimated)" in html


@pytest.mark.slow
def test_atp_star_and_edge_ig_on_the_organism():
    """docs/analysis.md's AtP* and edge tables: recomputing q/k patterns never makes the estimate worse and ranks
    q/k nodes well; per-edge IG converges to path patching while EAP-IG does not."""
    rows = organism_atp_star_vs_patching()
    assert all(r["qk_err_star"] <= r["qk_err_atp"] + 1e-4 for r in rows), rows
    assert min(r["qk_rho_star"] for r in rows) >= 0.8 and min(r["qk_top10_star"] for r in rows) >= 8, rows
    e = organism_edges_vs_path_patching()
    errs = [e[f"edge IG {k}"][0] for k in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 0.05 * e["EAP"][0], e
    assert min(e[f"EAP-IG {k}"][0] for k in (1, 2, 4, 8)) > errs[0], e
