"""Attribution patching against exact activation patching: equal on a linearised model, rank-correlated on the
organism; layout-aware position maps: identity = aligned patching, AV -> audio-only restores the audio run."""

import numpy as np
import pytest
import torch

from av_lens.analysis.attribution import attribution_patch
from av_lens.analysis.patching import patch_by_modality
from av_lens.analysis.position_map import PositionMap, position_map
from av_lens.errors import InputError
from conftest import cases

SETS = ("audio", "video", "text")


def _pair(model, media, seed=1):
    """Clean and corrupted inputs with the same layout: other frames and another soundtrack."""
    rng = np.random.default_rng(seed)
    t = np.arange(len(media["wav5"])) / 16000
    other = (0.8 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    frames = rng.integers(0, 255, media["video"].shape, dtype=np.uint8)
    c = cases(media)["video_with_audio"]
    return model.prepare(**c), model.prepare(**(c | {"video_audio": [other], "videos": [frames]}))


_W = {}


def _metric(logits):
    """A fixed random read-out of the last position's logits: sensitive to every logit of a random tiny model."""
    V = logits.shape[-1]
    if V not in _W:
        _W[V] = torch.randn(V, generator=torch.Generator().manual_seed(0))
    return (logits[:, -1] * _W[V].to(logits.dtype)).sum(-1).mean()


def _freeze_hooks(model, inputs):
    """Hooks that pin every norm scale, attention pattern and MLP gate to their values on ``inputs``: the model
    becomes affine in the residual stream, so first-order attribution is exact."""
    names = [n for n in model.hook_dict if n.endswith("hook_scale") or n.endswith("attn.hook_pattern")
             or n.endswith("mlp.hook_pre")]
    names = [n for n in names if not n.startswith(("audio_encoder", "image_encoder", "video_encoder"))]
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
    return [(n, (lambda act, hook, v=cache[n]: v.clone())) for n in names]


def test_atp_equals_patching_on_a_linearised_model(model, media):
    clean, corrupted = _pair(model, media)
    with model.hooks(fwd_hooks=_freeze_hooks(model, corrupted)):
        atp = attribution_patch(model, clean, corrupted, _metric,
                                components=("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "neurons"), sets=SETS)
        exact = patch_by_modality(model, clean, corrupted, _metric, components=("resid_pre", "resid_mid", "attn_out",
                                                                                 "mlp_out", "z"), sets=SETS,
                                  progress=False)
        # a few neurons by hand
        neuron_exact = []
        _, cc = model.run_with_cache(clean, names_filter=lambda n: n.endswith("mlp.hook_post"))
        m_audio = clean.layout.mask("audio")
        for l, n in ((0, 3), (1, 17)):
            def patch(post, hook, l=l, n=n):
                post = post.clone()
                post[..., n][m_audio] = cc[f"blocks.{l}.mlp.hook_post"][..., n][m_audio]
                return post
            neuron_exact.append(float(_metric(model.run_with_hooks(corrupted, fwd_hooks=[
                (f"blocks.{l}.mlp.hook_post", patch)]))))
    assert abs(atp.clean - exact.clean) < 1e-5 and abs(atp.corrupted - exact.corrupted) < 1e-5
    for comp in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z"):
        torch.testing.assert_close(atp[comp], exact[comp], atol=1e-5, rtol=1e-5)
        assert atp.effect(comp).abs().max() > 1e-3
    for (l, n), v in zip(((0, 3), (1, 17)), neuron_exact):
        assert float(atp["neurons"][l, n, 0]) == pytest.approx(v, abs=1e-5)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties within 1e-6 share their mean rank), for Spearman's rho."""
    x = x.double()
    r, o = torch.empty_like(x), x.argsort()
    s, i = x[o], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and float(s[j + 1] - s[i]) < 1e-6:
            j += 1
        r[o[i:j + 1]] = (i + j) / 2
        i = j + 1
    return r


def _organism_pairs(model, n_pairs, seed):
    """The picture counterfactuals of test_attribution's organism table: same sound, another object's frames."""
    from av_lens.organism import world
    from av_lens.organism.evaluate import clip_inputs

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_pairs):
        a = int(rng.integers(8))
        b = (a + 1 + int(rng.integers(7))) % 8
        sound = world.sound(a, rng)
        clean = clip_inputs(model, [world.Clip(a, a, world.frames(a, rng), sound)], "hear", "av")
        corrupted = clip_inputs(model, [world.Clip(b, a, world.frames(b, rng), sound)], "hear", "av")
        ta, tb = model.tokenizer.convert_tokens_to_ids([world.SOUNDS[a], world.SOUNDS[b]])
        out.append((clean, corrupted, lambda logits, ta=ta, tb=tb: (logits[:, -1, ta] - logits[:, -1, tb]).mean()))
    return out


def organism_atp_vs_patching(n_pairs=4, seed=3):
    """Per clip pair (same sound, another picture): Spearman rho between AtP and exact patching over the 36
    resid_pre / attn_out / mlp_out x layer x set nodes, signed and by magnitude, per component group, and the
    top-10 head overlap."""
    from av_lens import HookedAVTransformer

    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    rho = lambda a, b: float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])  # noqa: E731
    rows = []
    for clean, corrupted, metric in _organism_pairs(model, n_pairs, seed):
        comps = ("resid_pre", "attn_out", "mlp_out")
        atp = attribution_patch(model, clean, corrupted, metric, components=comps + ("z",), sets=SETS)
        ex = patch_by_modality(model, clean, corrupted, metric, components=comps + ("z",), sets=SETS, progress=False)
        A = torch.cat([atp.effect(c).flatten() for c in comps])
        E = torch.cat([(ex[c] - ex.corrupted).flatten() for c in comps])
        top = lambda x: set(x.abs().flatten().argsort(descending=True)[:10].tolist())  # noqa: E731
        part = lambda cs, r: torch.cat([(atp.effect(c) if r is atp else r[c] - r.corrupted).flatten()  # noqa: E731
                                        for c in cs])
        rows.append({"rho": rho(A, E), "rho_abs": rho(A.abs(), E.abs()),
                     "rho_resid_pre": rho(part(("resid_pre",), atp), part(("resid_pre",), ex)),
                     "rho_attn_mlp": rho(part(("attn_out", "mlp_out"), atp), part(("attn_out", "mlp_out"), ex)),
                     "rho_heads": rho(part(("z",), atp), part(("z",), ex)),
                     "top10_heads": len(top(atp.effect("z")) & top(ex["z"] - ex.corrupted))})
    return rows


@pytest.mark.slow
def test_atp_ranks_nodes_like_patching_on_the_organism():
    rows = organism_atp_vs_patching(n_pairs=6)
    assert min(r["rho_abs"] for r in rows) >= 0.85, rows
    assert min(r["rho_attn_mlp"] for r in rows) >= 0.9 and min(r["rho_heads"] for r in rows) >= 0.9, rows
    assert min(r["top10_heads"] for r in rows) >= 7, rows


def test_identity_map_equals_aligned_patching_bit_for_bit(model, media):
    clean, corrupted = _pair(model, media)
    pm = position_map(clean, corrupted)
    assert torch.equal(pm.src[..., 0], PositionMap.identity(clean.layout).src[..., 0])
    kw = dict(components=("resid_pre", "z"), sets=SETS, progress=False)
    a = patch_by_modality(model, clean, corrupted, _metric, **kw)
    b = patch_by_modality(model, clean, corrupted, _metric, position_map=pm, **kw)
    for c in ("resid_pre", "z"):
        assert torch.equal(a[c], b[c])
    atp_a = attribution_patch(model, clean, corrupted, _metric, sets=SETS)
    atp_b = attribution_patch(model, clean, corrupted, _metric, sets=SETS, position_map=pm)
    for c in atp_a.effects:
        assert torch.equal(atp_a.effect(c), atp_b.effect(c))


def test_av_to_audio_only_patching_restores_the_audio_run(model, media):
    """Patching the audio positions' layer-0 residual from an audio+video run into an audio-only run with
    another sound gives exactly the audio-only run of the clean sound: the map pairs audio tokens by time."""
    wav = media["wav5"]
    other = (0.8 * np.sin(2 * np.pi * 440 * np.arange(len(wav)) / 16000)).astype(np.float32)
    clean = model.prepare(**cases(media)["video_with_audio"])
    text = "What sound do you hear?"
    corrupted = model.prepare(text=text, audio=[other])
    target = model.prepare(text=text, audio=[wav])
    with pytest.raises(InputError, match="no clean counterpart"):
        position_map(clean, corrupted)                      # the prompts' text differs
    pm = position_map(clean, corrupted, unmatched="skip")
    assert pm.mapped[corrupted.layout.mask("audio")].all()
    res = patch_by_modality(model, clean, corrupted, _metric, components=("resid_pre",), sets=("audio",), layers=[0],
                            position_map=pm, progress=False)
    assert float(res["resid_pre"][0, 0]) == pytest.approx(float(_metric(model(target))), abs=1e-5)
    assert abs(float(_metric(model(target))) - res.corrupted) > 1e-3
    atp = attribution_patch(model, clean, corrupted, _metric, components=("resid_pre",), sets=("audio",),
                            position_map=pm)
    assert atp.effect("resid_pre").abs().max() > 0


def test_media_rules_for_clips_of_different_length(model, media):
    long = model.prepare(text="What sound?", audio=[media["wav5"]])
    short = model.prepare(text="What sound?", audio=[media["wav3"]])
    with pytest.raises(InputError, match="no clean counterpart"):
        position_map(short, long)                           # 5 s has audio tokens the 3 s clip lacks
    near = position_map(short, long, media="nearest")
    pool = position_map(short, long, media="pool")
    assert near.mapped.all() == pool.mapped.all()
    a_long = long.layout.mask("audio")[0]
    last_short = int(short.layout.positions("audio")[-1])
    assert int(near.src[0, a_long.nonzero()[-1, 0], 0]) == last_short   # beyond 3 s: the nearest (last) token
    skip = position_map(short, long, unmatched="skip")
    assert (~skip.mapped[0] & a_long).sum() > 0
    with pytest.raises(InputError, match="rule"):
        position_map(short, long, media="closest")
    with pytest.raises(InputError, match="samples"):
        position_map(short, model.prepare(text=["a", "b"]))
    with pytest.raises(InputError, match="position map"):
        patch_by_modality(model, long, short, _metric, sets=("audio",), position_map=skip, progress=False)


def test_attribution_refusals(model, media):
    clean, corrupted = _pair(model, media)
    with pytest.raises(InputError, match="scalar"):
        attribution_patch(model, clean, corrupted, lambda logits: logits[:, -1, :2])
    with pytest.raises(InputError, match="graph"):
        attribution_patch(model, clean, corrupted, lambda logits: torch.tensor(1.0))
    with pytest.raises(InputError, match="components"):
        attribution_patch(model, clean, corrupted, _metric, components=("rot_q",))
    with pytest.raises(InputError, match="matches no position"):
        attribution_patch(model, clean, corrupted, _metric, sets=("image",))


def test_edge_attribution_equals_path_patching_on_a_linearised_model(model, media):
    from av_lens.analysis.attribution import edge_attribution
    from av_lens.analysis.patching import path_patch

    clean, corrupted = _pair(model, media)
    with model.hooks(fwd_hooks=_freeze_hooks(model, corrupted)):
        eap = edge_attribution(model, clean, corrupted, _metric, senders=SETS, receivers=("last_prompt", "text"))
        ig = edge_attribution(model, clean, corrupted, _metric, senders=SETS, receivers=("last_prompt",), ig_steps=3)
        for r, recv in enumerate(("last_prompt", "text")):
            for s, send in enumerate(SETS):
                exact = path_patch(model, clean, corrupted, _metric, send, recv, heads_per_layer=True)
                torch.testing.assert_close(eap.effects[:, :, s, r], exact - eap.corrupted, atol=1e-5, rtol=1e-4)
    assert eap.effects.abs().max() > 1e-3
    # with the model affine the gradient is the same all along the interpolation: EAP-IG = EAP
    torch.testing.assert_close(ig.effects[..., 0], eap.effects[..., 0], atol=1e-5, rtol=1e-4)
    assert "->" in eap.table()


def test_edge_attribution_refusals(model, media):
    from av_lens.analysis.attribution import edge_attribution

    clean, corrupted = _pair(model, media)
    with pytest.raises(InputError, match="ig_steps"):
        edge_attribution(model, clean, corrupted, _metric, ig_steps=0)
    with pytest.raises(InputError, match="matches no position"):
        edge_attribution(model, clean, corrupted, _metric, senders=("image",))
    with pytest.raises(InputError, match="positions"):
        edge_attribution(model, clean, model.prepare(text="hi"), _metric)


def test_teacher_forced_answers_compose_with_attribution(model, media):
    from av_lens.analysis.attribution import teacher_forced

    clean, corrupted = _pair(model, media)
    gen = model.generate(clean, max_new_tokens=3, stop_at_eos=False)
    cx, kx, metric = teacher_forced(clean, corrupted, gen)
    assert cx.layout.count("generated") == 3
    # the metric is the answer's mean log-probability under one teacher-forced forward
    logits = model(cx)
    lp = logits[0, -4:-1].log_softmax(-1)
    want = lp[torch.arange(3), gen.new_tokens[0]].mean()
    assert float(metric(logits)) == pytest.approx(float(want), abs=1e-6)
    with model.hooks(fwd_hooks=_freeze_hooks(model, kx)):
        atp = attribution_patch(model, cx, kx, metric, components=("resid_pre",), sets=("audio", "video"))
        exact = patch_by_modality(model, cx, kx, metric, components=("resid_pre",), sets=("audio", "video"),
                                  progress=False)
    torch.testing.assert_close(atp["resid_pre"], exact["resid_pre"], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="answer"):
        teacher_forced(clean, corrupted, torch.zeros(1, 0, dtype=torch.long))
