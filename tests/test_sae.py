"""Sparse dictionaries: the three activations against their definitions, the SAELens-format round trip,
splicing exactness and hook points, training determinism and resumption, feature reading."""

import json

import pytest
import torch

from av_lens.errors import CheckpointError, InputError
from av_lens.sae import (DictionaryConfig, SparseDictionary, explained_variance, feature_activations,
                         logit_effects, reconstruction_report, splice, train_dictionary)
from conftest import cases, padded_batch

HOOK = "blocks.1.hook_resid_post"


def _sae(model, arch="topk", **kw):
    cfg = DictionaryConfig(d_in=model.cfg.d_model, d_sae=96, architecture=arch, k=kw.pop("k", 5), hook_name=HOOK, **kw)
    return SparseDictionary(cfg, seed=1)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_activation_functions_follow_their_definitions(model, arch):
    sae = _sae(model, arch)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    x = torch.randn(7, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = sae.encode(x)
    if arch == "relu":
        torch.testing.assert_close(acts, pre.clamp_min(0))
    elif arch == "topk":
        assert ((acts > 0).sum(-1) <= 5).all()
        top = pre.topk(5, dim=-1)
        torch.testing.assert_close(acts.gather(-1, top.indices), top.values.clamp_min(0))
    else:
        torch.testing.assert_close(acts, torch.where(pre > 0.05, pre, torch.zeros_like(pre)))
    torch.testing.assert_close(sae.decode(acts), acts @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_saelens_format_round_trip(model, tmp_path, arch):
    sae = _sae(model, arch, model_name="tiny")
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    # SAELens 6.x's SAEConfig.to_dict fields (sae_lens/saes/sae.py)
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "metadata"):
        assert key in cfg, key
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch) and cfg["metadata"]["hook_name"] == HOOK
    from safetensors.torch import load_file
    names = set(load_file(str(folder / "sae_weights.safetensors")))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    back = SparseDictionary.load(folder)
    for k, v in sae.state().items():
        assert torch.equal(v, back.state()[k])
    assert back.cfg.to_saelens() == sae.cfg.to_saelens()
    # an older SAELens config (fields at the top level) reads the same
    old = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "hook_name": HOOK, "model_name": "tiny",
           "architecture": cfg["architecture"], "apply_b_dec_to_input": True, "dtype": "torch.float32",
           "activation_fn_kwargs": {"k": 5} if arch == "topk" else {}}
    (folder / "cfg.json").write_text(json.dumps(old))
    assert SparseDictionary.load(folder).cfg.hook_name == HOOK


def test_load_refusals(model, tmp_path):
    with pytest.raises(CheckpointError, match="not a dictionary folder"):
        SparseDictionary.load(tmp_path)
    folder = _sae(model).save(tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 7
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        SparseDictionary.load(folder)
    with pytest.raises(InputError, match="k"):
        DictionaryConfig(d_in=4, d_sae=8, architecture="topk", k=0)


def test_splice_with_error_term_is_exact_and_exposes_hook_points(model, media):
    inp = padded_batch(model, media)
    sae = _sae(model, "relu")
    plain = model(inp)
    plain_cached, _ = model.run_with_cache(inp)   # a full cache takes the explicit attention path
    with splice(model, sae) as s:
        assert torch.equal(model(inp), plain)
        logits, cache = model.run_with_cache(inp)
        assert torch.equal(logits, plain_cached)
        acts = cache[f"{HOOK}.hook_sae_acts_post"]
        assert acts.shape == (*inp.layout.shape, 96)
        # zero every feature: the model then sees only the error term (x - reconstruction)
        zeroed = model.run_with_hooks(inp, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", lambda a, hook: a * 0)])
        assert (zeroed - plain).abs().max() > 1e-4
    assert f"{HOOK}.hook_sae_acts_post" not in model.hook_dict
    with splice(model, sae, use_error_term=False):
        recon_logits = model(inp)
    _, c = model.run_with_cache(inp, names_filter=lambda n: n == HOOK)

    def replace(a, hook):
        return sae.decode(sae.encode(a))

    real = inp.attention_mask.bool()          # the splice leaves padding alone
    torch.testing.assert_close(recon_logits[real], model.run_with_hooks(inp, fwd_hooks=[(HOOK, replace)])[real])


def test_splice_at_a_selector_only(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    sae = _sae(model, "relu")
    with splice(model, sae, at="audio", use_error_term=False):
        ours = model(inp)
    m = inp.layout.mask("audio")

    def replace(a, hook):
        return torch.where(m[..., None], sae.decode(sae.encode(a)), a)

    torch.testing.assert_close(ours, model.run_with_hooks(inp, fwd_hooks=[(HOOK, replace)]))
    with pytest.raises(InputError, match="already spliced"):
        with splice(model, sae):
            splice(model, sae)


def test_training_is_deterministic_and_resumable(model, media, tmp_path):
    batches = [model.prepare(**cases(media)["video_with_audio"]), model.prepare(**cases(media)["audio"])]
    kw = dict(at="audio", d_sae=64, architecture="topk", k=4, tokens=256 * 12, minibatch=256, seed=3, progress=False)
    a = train_dictionary(model, batches, HOOK, **kw)
    b = train_dictionary(model, batches, HOOK, **kw)
    for k, v in a.state().items():
        assert torch.equal(v, b.state()[k]), k
    c = train_dictionary(model, batches, HOOK, **kw, checkpoint=tmp_path / "ck", checkpoint_every=6)
    assert (tmp_path / "ck" / "dictionary" / "cfg.json").is_file()
    state = torch.load(tmp_path / "ck" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 12
    for k, v in a.state().items():
        assert torch.equal(v, c.state()[k]), k
    from av_lens.sae import collect_rows
    X, _, mods = collect_rows(model, batches[0], HOOK, "audio")
    assert explained_variance(a, X) > explained_variance(_sae(model), X)


def test_transcoder_predicts_another_hook(model, media):
    batches = [model.prepare(**cases(media)["video_with_audio"])]
    tc = train_dictionary(model, batches, "blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out",
                          at="all", d_sae=64, architecture="relu", tokens=256 * 10, seed=0, progress=False)
    assert tc.cfg.is_transcoder and tc.cfg.d_out == model.cfg.d_model


def test_features_and_reports(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    sae = _sae(model, "relu")
    fa = feature_activations(model, sae, [inp], at="media")
    assert fa.acts.shape[0] == int(inp.layout.mask("media").sum())
    dens = fa.density_by_modality()
    assert set(dens) == {"audio", "video"}
    f = int(fa.acts.sum(0).argmax())
    top = fa.top(f, 3)
    assert top and top[0]["value"] == pytest.approx(float(fa.acts[:, f].max()))
    assert len(logit_effects(model, sae, f, 4)) == 4
    rep = reconstruction_report(model, sae, inp, groups=("audio", "video"))
    assert set(rep) == {"audio", "video"} and all(0 <= v["positions"] for v in rep.values())
    from av_lens.sae import dashboard
    assert "feature" in dashboard(fa, model, sae, [f])._repr_html_()


def test_reconstruction_report_against_hand_written_replacement_hooks(model, media):
    """CE recovered = (CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean) on the model's own greedy next
    tokens, recomputed with plain hooks that write the reconstruction (or zeros) at the group's positions."""
    import torch.nn.functional as F

    inp = model.prepare(**cases(media)["video_with_audio"])
    sae = _sae(model, "relu")
    rep = reconstruction_report(model, sae, inp, groups=("audio", "video"))
    with torch.no_grad():
        clean = model(inp)
        tgt = clean.argmax(-1)[:, :-1].flatten()
        ce = lambda lg: float(F.cross_entropy(lg[:, :-1].flatten(0, 1), tgt))  # noqa: E731
        for g in ("audio", "video"):
            m = inp.layout.mask(g)

            def recon(a, hook, m=m):
                out = a.clone()
                out[m] = sae.decode(sae.encode(a[m]))
                return out

            spliced = ce(model.run_with_hooks(inp, fwd_hooks=[(sae.cfg.hook_name, recon)]))
            zero = ce(model.run_with_hooks(inp, fwd_hooks=[(sae.cfg.hook_name,
                                                            lambda a, hook, m=m: a * (~m)[..., None])]))
            want = (zero - spliced) / (zero - ce(clean))
            assert rep[g]["positions"] == int(m.sum())
            assert rep[g]["ce_spliced"] == pytest.approx(spliced, abs=1e-5)
            assert rep[g]["ce_zero_ablated"] == pytest.approx(zero, abs=1e-5)
            assert rep[g]["ce_recovered"] == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_organism_study_reconstructs_and_finds_sound_features():
    """The recorded organism figures (docs/sae_organism_study.json) come back on a rerun with the same seed."""
    from pathlib import Path

    from av_lens.sae.organism_study import organism_sae_study

    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the recorded run used one thread; matmul sums depend on the split
    try:
        r = organism_sae_study()
    finally:
        torch.set_num_threads(threads)
    rec = json.loads((Path(__file__).resolve().parents[1] / "docs" / "sae_organism_study.json").read_text())
    assert r["explained_variance_test"] >= 0.9 and r["splice_max_abs_logit_diff"] == 0.0
    assert abs(r["explained_variance_test"] - rec["explained_variance_test"]) <= 0.01
    # On the recording CPU the rerun is bit-identical; on another one float sums differ, SAE training takes
    # another path and a class may pick another feature, so the figures are compared, not the feature ids
    # (measured on a second CPU: selection AUROC within 0.03 per class, held-out mean within 0.03).
    assert [c["class"] for c in r["classes"]] == [c["class"] for c in rec["classes"]]
    for a, b in zip(r["classes"], rec["classes"]):
        assert abs(a["auroc_selection_cf"] - b["auroc_selection_cf"]) <= 0.05, (a["class"], a, b)
    mean = lambda cs: sum(c["auroc_counterfactual"] for c in cs) / len(cs)  # noqa: E731
    assert abs(mean(r["classes"]) - mean(rec["classes"])) <= 0.04
    assert all(c["auroc_counterfactual"] >= 0.9 for c in r["classes"]), r["classes"]   # recorded: 0.98-1.00
    # the dictionary keeps the model's loss where it was trained (audio positions), not where it was not
    for cond in ("factual", "counterfactual"):
        got, want = r["reconstruction"][cond], rec["reconstruction"][cond]
        assert got["audio"]["ce_recovered"] >= 0.95 and got["video"]["explained_variance"] < 0
        assert abs(got["audio"]["ce_recovered"] - want["audio"]["ce_recovered"]) <= 0.05, (cond, got, want)
        # where it was not trained the figure depends on the SAE's training path, so on another CPU it moves more
        # (measured on a third CPU: video 0.83 / 0.84 vs recorded 0.78 / 0.80, text 0.79 / 0.76 vs 0.67 / 0.62);
        # what must hold is that it stays well below the audio positions'
        for g in ("video", "text"):
            assert got[g]["ce_recovered"] <= got["audio"]["ce_recovered"] - 0.1, (cond, g, got[g], got["audio"])
            assert abs(got[g]["ce_recovered"] - want[g]["ce_recovered"]) <= 0.15, (cond, g, got[g], want[g])


# ------------------------------------------------------------------------------ media in the feature dashboard
@pytest.fixture(scope="module")
def organism_fa():
    from av_lens import HookedAVTransformer
    from av_lens.organism import world
    from av_lens.organism.evaluate import clip_inputs

    org = HookedAVTransformer.from_pretrained("av-lens/organism")
    clips = [cf for _, cf in world.eval_pairs(2)]
    inp = clip_inputs(org, clips, "hear", "av")
    sae = SparseDictionary(DictionaryConfig(d_in=64, d_sae=16, hook_name="blocks.3.hook_resid_post"), seed=3)
    return org, sae, clips, inp, feature_activations(org, sae, [inp], at="audio|video")


def test_feature_rows_carry_span_and_patch_by_hand_count(organism_fa):
    """The organism's layout, counted by hand: chunk 0 holds video positions 5..36 (two temporal patches of
    4 x 4 merged cells, 1 s each at 2 fps) then audio 37..40 (0.5 s per token)."""
    _, _, _, inp, fa = organism_fa
    row = lambda p: int(((fa.sample == 0) & (fa.position == p)).nonzero()[0, 0])  # noqa: E731
    for p, t, box in ((5, 0.0, (0, 0, .25, .25)), (5 + 5, 0.0, (.25, .25, .5, .5)), (5 + 15, 0.0, (.75, .75, 1, 1)),
                      (5 + 16, 1.0, (0, 0, .25, .25)), (5 + 16 + 6, 1.0, (.25, .5, .5, .75))):
        i = row(p)
        assert float(fa.time[i]) == t and float(fa.span[i]) == 1.0 and fa.box[i].tolist() == list(box), p
    for p in (37, 40, 109, 112):
        i = row(p)
        assert float(fa.span[i]) == 0.5 and torch.isnan(fa.box[i]).all() and int(fa.item[i]) == 0
    assert float(fa.time[row(38)]) == 0.5
    # a layout whose 3-D positions are 1-D (t = h = w) has no spatial grid: no box, never a guess
    import dataclasses

    from av_lens.sae.features import _spans_and_boxes
    lay = inp.layout
    flat = dataclasses.replace(lay, position_ids=lay.position_ids[:1].expand(3, -1, -1).clone())
    _, box = _spans_and_boxes(flat)
    assert torch.isnan(box).all()


def test_dashboard_shows_the_frame_at_each_tokens_time_and_the_waveform_around_it(organism_fa):
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    from av_lens.organism import world
    from av_lens.sae import dashboard
    from av_lens.views.media import frame_index, waveform_snippet

    org, sae, clips, _, fa = organism_fa
    # stand-in media with the clips' shapes, every frame one flat grey level (20 * index): a thumbnail's colour
    # then says which frame it shows
    coded = [world.Clip(c.look, c.sound, np.stack([np.full(c.frames.shape[1:], 20 * i, np.uint8)
                                                   for i in range(len(c.frames))]), c.audio) for c in clips]
    video_feature = int(fa.acts[fa.modality == 3].sum(0).argmax())
    html = dashboard(fa, org, sae, [video_feature], k=6, media=coded)._repr_html_()
    tops = [t for t in fa.top(video_feature, 6)]
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == sum(t["modality"] == "video" for t in tops) > 0
    for t, b64 in zip([t for t in tops if t["modality"] == "video"], imgs):
        im = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)
        want = 20 * frame_index(t["time"], t["span"], world.FPS, len(coded[0].frames))
        assert abs(np.median(im) - want) <= 1, (t, np.median(im), want)   # the frame at the token's time
        assert (np.abs(im - [250, 204, 21]).sum(-1) < 30).any()            # its patch is outlined
    # the waveform snippet shades the token's span, and an impulse inside the span lands inside the shading
    wav = np.zeros(16000 * 6, np.float32)
    wav[int(2.25 * 16000)] = 1.0
    svg = waveform_snippet(wav, 2.0, 0.5, width=120)
    x, w = (float(v) for v in re.search(r'<rect x="([\d.]+)" y="0" width="([\d.]+)"', svg).groups())
    pts = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg).group(1).split()]
    peak_x = min(pts, key=lambda p: p[1])[0]
    assert x <= peak_x <= x + w and (x, w) == (40.0, 40.0)   # window 1.5-3.0 s: the span is its middle third


def test_dashboard_refuses_media_that_does_not_match_the_rows(organism_fa):
    import dataclasses

    from av_lens.sae import dashboard

    org, sae, clips, inp, fa = organism_fa
    with pytest.raises(InputError, match="holds 1 clip"):
        dashboard(fa, org, sae, [0], media=clips[:1])
    two = feature_activations(org, sae, [inp, inp], at="audio")
    with pytest.raises(InputError, match="flat list"):
        dashboard(two, org, sae, [0], media=clips)
    assert "batch 1, sample" in dashboard(two, org, sae, [int(two.acts.sum(0).argmax())])._repr_html_()
    with pytest.raises(InputError, match="not a clip"):            # bare arrays are not clips
        dashboard(fa, org, sae, [0], media=[[c.frames for c in clips]])
    empty = dataclasses.replace(fa, acts=fa.acts[:0], batch=fa.batch[:0], sample=fa.sample[:0])
    with pytest.raises(InputError, match="no rows"):
        dashboard(empty, org, sae, [0], media=clips)


def test_dashboard_takes_one_clip_per_media_item_and_the_clips_sample_rate(organism_fa):
    """Two videos in one prompt: one clip for the sample is refused (it would show item 0's frames for item 1);
    a list of clips, one per item, shows each item's own frames. A clip's ``sr`` sets the waveform's time axis."""
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    from av_lens.media import MediaClip
    from av_lens.sae import dashboard
    from av_lens.organism import world

    org, sae, clips, _, _ = organism_fa
    grey = lambda v: np.full(clips[0].frames.shape, v, np.uint8)  # noqa: E731
    from av_lens.processing import VIDEO_PH

    inp = org.prepare(VIDEO_PH * 2 + "what do you see ?", videos=[grey(10), grey(200)], fps=world.FPS)
    fa = feature_activations(org, sae, [inp], at="video")
    assert set(fa.item.tolist()) == {0, 1}
    one = world.Clip(0, 0, grey(10), clips[0].audio)
    with pytest.raises(InputError, match="2 media items"):
        dashboard(fa, org, sae, [0], media=[one])
    two = [[[one, world.Clip(0, 0, grey(200), clips[0].audio)]]]
    both = torch.minimum(fa.acts[fa.item == 0].max(0).values, fa.acts[fa.item == 1].max(0).values)
    f = int(both.argmax())
    assert float(both[f]) > 0
    html = dashboard(fa, org, sae, [f], k=len(fa.acts), media=two)._repr_html_()
    tops = fa.top(f, len(fa.acts))
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    for t, b64 in zip(tops, imgs):
        level = np.median(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L")))
        assert abs(level - (10 if t["item"] == 0 else 200)) <= 1, (t, level)
    assert {t["item"] for t in tops} == {0, 1}
    # a 24 kHz clip: an impulse at 2.25 s lies in the span [2.0, 2.5) of an audio token at 2.0 s
    from av_lens.sae.features import _snippet

    wav = np.zeros(24000 * 6, np.float32)
    wav[int(2.25 * 24000)] = 1.0
    svg = _snippet({"modality": "audio", "time": 2.0, "span": 0.5, "box": (float("nan"),) * 4},
                   MediaClip(grey(0), world.FPS, wav, 24000, "test"))
    x, w = (float(v) for v in re.search(r'<rect x="([\d.]+)" y="0" width="([\d.]+)"', svg).groups())
    pts = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg).group(1).split()]
    assert x <= min(pts, key=lambda p: p[1])[0] <= x + w
