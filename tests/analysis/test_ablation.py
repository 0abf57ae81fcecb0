"""Head ablation hooks: each mode and restriction against an independent computation, in a forward and
inside generate(), the effect table, and argument errors."""

import dataclasses

import numpy as np
import pytest
import torch

from av_lens import InputError, LayoutError, S
from av_lens.analysis.ablation import head_ablation_hooks, head_effect_table
from conftest import cases, padded_batch

TOL = 1e-5


@pytest.fixture(scope="module")
def av(model, media):
    inp = model.encode(model.prepare(**cases(media)["video_with_audio"]))
    assert inp.layout.count("audio") and inp.layout.count("video")
    return inp


@pytest.fixture(scope="module")
def padded(model, media):
    """Two left-padded samples of different layouts (audio only; image + audio + video), encoded once."""
    return model.encode(padded_batch(model, media))


@pytest.fixture(scope="module")
def other_clip(model, media):
    """Same prompt and media sizes as ``av`` (so the same layout), different random media."""
    rng = np.random.default_rng(7)
    other = dict(media, video=rng.integers(0, 255, (8, 56, 56, 3), dtype=np.uint8),
                 wav5=(0.1 * rng.standard_normal(16000 * 5)).astype(np.float32))
    return model.encode(model.prepare(**cases(other)["video_with_audio"]))


def zname(layer):
    return f"blocks.{layer}.attn.hook_z"


def no_hooks_left(model):
    return not any(hp.has_hooks() or hp._forward_hooks for hp in model.hook_dict.values())


def run(model, inp, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(inp, fwd_hooks=list(hooks))


def set_z(layer, head, positions, value):
    """A hand-written hook_z edit: z[:, positions, head] = value (value broadcast over [batch, n_pos, d_head])."""
    def hook(z, hook):
        z = z.clone()
        z[:, positions, head] = value
        return z
    return zname(layer), hook


# ------------------------------------------------------------------------------------------- zero
def test_zero_ablation_equals_zeroed_output_weights(model, av):
    heads = [(0, 1), (1, 2), (1, 3)]
    dh = model.cfg.d_head
    clean = run(model, av)
    ablated = run(model, av, head_ablation_hooks(model, heads))
    saved = {l: model.blocks[l].attn.o_proj.weight.detach().clone() for l in (0, 1)}
    try:
        with torch.no_grad():
            for l, h in heads:
                model.blocks[l].attn.o_proj.weight[:, h * dh:(h + 1) * dh] = 0
            expected = model(av)
    finally:
        with torch.no_grad():
            for l, w in saved.items():
                model.blocks[l].attn.o_proj.weight.copy_(w)
    assert torch.equal(run(model, av), clean)  # weights restored
    assert (ablated - expected).abs().max() <= TOL
    assert (ablated - clean).abs().max() > 1e-3
    # the dict form names the same heads
    as_dict = run(model, av, head_ablation_hooks(model, {0: [1], 1: [3, 2]}))
    assert torch.equal(as_dict, ablated)


@pytest.mark.parametrize("which", ["video_with_audio", "padded"])
def test_query_restricted_zero_matches_manual_z_edit(model, av, padded, which):
    inp = av if which == "video_with_audio" else padded
    layer, head, query = 0, 1, ("video" if which == "video_with_audio" else "audio")
    clean = run(model, inp)
    ablated = run(model, inp, head_ablation_hooks(model, [(layer, head)], query=S.video if query == "video" else query))
    mask = inp.layout.mask(query)

    def manual(z, hook):
        z = z.clone()
        z[:, :, head][mask] = 0
        return z

    expected = run(model, inp, [(zname(layer), manual)])
    assert torch.equal(ablated, expected)
    assert (ablated - clean).abs().max() > 1e-4
    for b in range(inp.shape[0]):
        first = int(inp.layout.positions(query, b)[0])
        real = inp.attention_mask[b, :first].bool()  # (pad rows attend to everything and are not compared)
        assert real.any()
        assert torch.equal(ablated[b, :first][real], clean[b, :first][real])  # causal: earlier positions stay


# ------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("query", [None, "audio|text"])
def test_keys_restricted_zero_matches_brute_force(model, av, query):
    layer, head = 1, 2  # GQA: query head 2 reads kv head 1 (2 // n_rep), not 2 % n_kv = 0
    n_rep = model.cfg.n_rep
    assert n_rep == 2
    L = av.layout
    names = [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v", zname(layer)]
    with torch.no_grad():
        _, cache = model.run_with_cache(av, names_filter=names)
    pattern, v, z = (cache[n] for n in names)
    km = L.mask("video").float()
    qm = torch.ones(L.shape, dtype=torch.bool) if query is None else L.mask(query)
    expected = z.clone()
    for q in qm[0].nonzero().squeeze(-1).tolist():
        contrib = sum(pattern[0, head, q, k] * v[0, k, head // n_rep] for k in L.positions("video").tolist())
        expected[0, q, head] -= contrib
    assert (expected - z).abs().max() > 1e-4

    seen = {}
    hooks = head_ablation_hooks(model, [(layer, head)], keys="video", query=query)
    logits = run(model, av, hooks + [(zname(layer), lambda x, hook: seen.setdefault("z", x.clone()))])
    assert (seen["z"] - expected).abs().max() <= TOL
    assert torch.equal(seen["z"][:, :, [h for h in range(model.cfg.n_heads) if h != head]],
                       z[:, :, [h for h in range(model.cfg.n_heads) if h != head]])

    # the same edit written as a pattern knockout (no renormalisation), which feeds z = pattern @ v
    qpos, kpos = qm[0].nonzero().squeeze(-1), L.positions("video")

    def cut(p, hook):
        p = p.clone()
        p[0, head, qpos[:, None], kpos[None, :]] = 0
        return p

    assert km.sum() > 0
    manual = run(model, av, [(f"blocks.{layer}.attn.hook_pattern", cut)])
    assert (logits - manual).abs().max() <= TOL


# ------------------------------------------------------------------------------------------- mean / resample
@pytest.mark.parametrize("query", [None, "audio"])
def test_mean_ablation_uses_reference_mean(model, av, padded, query):
    layer, head = 1, 0
    ref = padded  # two samples, left-padded: pads must not enter the mean
    with torch.no_grad():
        _, cache = model.run_with_cache(ref, names_filter=[zname(layer)])
    where = ref.layout.mask("all" if query is None else query)
    assert not where.all()  # there are pads (or other modalities) to leave out
    mean = cache[zname(layer)][:, :, head][where].mean(0)
    positions = slice(None) if query is None else av.layout.positions(query)
    expected = run(model, av, [set_z(layer, head, positions, mean)])
    ablated = run(model, av, head_ablation_hooks(model, [(layer, head)], mode="mean", reference=ref, query=query))
    assert (ablated - expected).abs().max() <= TOL
    zeroed = run(model, av, head_ablation_hooks(model, [(layer, head)], query=query))
    assert (ablated - zeroed).abs().max() > 1e-4


def test_mean_ablation_of_a_key_contribution(model, av, other_clip):
    layer, head = 1, 2  # GQA: kv head 2 // n_rep = 1
    n_rep = model.cfg.n_rep
    names = [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v", zname(layer)]

    def audio_part(inp):
        with torch.no_grad():
            _, c = model.run_with_cache(inp, names_filter=names)
        p = c[names[0]][:, head] * inp.layout.mask("audio")[:, None, :].float()  # [batch, q, k]
        return torch.einsum("bqk,bkd->bqd", p, c[names[1]][:, :, head // n_rep]), c[names[2]]

    ref_part, _ = audio_part(other_clip)
    part, z = audio_part(av)
    expected_z = z.clone()
    expected_z[:, :, head] += ref_part[0].mean(0) - part  # query=None: every position, reference non-pad mean
    seen = {}
    hooks = head_ablation_hooks(model, [(layer, head)], mode="mean", keys="audio", reference=other_clip)
    run(model, av, hooks + [(zname(layer), lambda x, hook: seen.setdefault("z", x.clone()))])
    assert (seen["z"] - expected_z).abs().max() <= TOL


def test_resample_takes_the_aligned_reference_value(model, av, other_clip):
    layer, head = 0, 2
    with torch.no_grad():
        _, cache = model.run_with_cache(other_clip, names_filter=[zname(layer)])
    pos = av.layout.positions("video")
    expected = run(model, av, [set_z(layer, head, pos, cache[zname(layer)][0, pos, head])])
    hooks = head_ablation_hooks(model, [(layer, head)], mode="resample", reference=other_clip, query="video", seed=3)
    ablated = run(model, av, hooks)
    assert (ablated - expected).abs().max() <= TOL
    assert (ablated - run(model, av)).abs().max() > 1e-4


def test_resample_batch_against_itself_takes_another_sample(model, av, other_clip):
    layer, head = 1, 1
    batch = dataclasses.replace(
        av, input_ids=torch.cat([av.input_ids, other_clip.input_ids]),
        attention_mask=torch.cat([av.attention_mask, other_clip.attention_mask]),
        layout=dataclasses.replace(av.layout, **{f: torch.cat([getattr(av.layout, f), getattr(other_clip.layout, f)],
                                                              dim=1 if f == "position_ids" else 0)
                                                 for f in ("modality", "item", "time", "position_ids",
                                                           "attention_mask", "token_ids", "rope_deltas")}),
        encoder_outputs={k: torch.cat([av.encoder_outputs[k], other_clip.encoder_outputs[k]])
                         for k in av.encoder_outputs})
    seen = {}
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=[zname(layer)])
    z = cache[zname(layer)]
    hooks = head_ablation_hooks(model, [(layer, head)], mode="resample", reference=batch)
    run(model, batch, hooks + [(zname(layer), lambda x, hook: seen.setdefault("z", x.clone()))])
    assert torch.equal(seen["z"][0, :, head], z[1, :, head])
    assert torch.equal(seen["z"][1, :, head], z[0, :, head])


# ------------------------------------------------------------------------------------------- generation
def test_hooks_work_inside_generate(model, av):
    P = av.shape[1]
    hooks = head_ablation_hooks(model, [(0, 1), (1, 2)])
    gen = model.generate(av, max_new_tokens=1, stop_at_eos=False, fwd_hooks=hooks, return_logits=True)
    fwd = run(model, av, hooks)
    assert int(gen.new_tokens[0, 0]) == int(fwd[0, -1].argmax())
    assert (gen.logits[0] - fwd[:, -1]).abs().max() <= TOL
    assert (fwd[:, -1] - run(model, av)[:, -1]).abs().max() > 1e-4

    # query="generated": nothing to ablate in the prefill, the decoding steps are ablated; outside generate()
    # the hooks would change nothing, which is refused
    on_generated = head_ablation_hooks(model, [(0, 1), (1, 2)], query="generated")
    with pytest.raises(InputError, match="exist only inside generate"):
        run(model, av, on_generated)
    clean = model.generate(av, max_new_tokens=3, stop_at_eos=False, return_logits=True)
    abl = model.generate(av, max_new_tokens=3, stop_at_eos=False, return_logits=True, fwd_hooks=on_generated)
    assert torch.equal(abl.logits[0], clean.logits[0])
    assert (abl.logits[1] - clean.logits[1]).abs().max() > 1e-4
    assert no_hooks_left(model) and model.run_state is None
    assert abl.layout.positions("generated").tolist() == [P, P + 1, P + 2]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_decode_steps_match_a_full_forward(model, av, mode):
    """KV-cached decoding with keys-restricted ablation at generated queries gives the logits of one forward
    over the whole generated sequence with the same hooks."""
    hooks = head_ablation_hooks(model, [(0, 0), (1, 2)], keys="video", query="generated", mode=mode,
                                reference=av if mode == "mean" else None, reference_query="last_prompt")
    gen = model.generate(av, max_new_tokens=4, stop_at_eos=False, fwd_hooks=hooks, return_logits=True)
    media_ids = {model.cfg.tokens.audio, model.cfg.tokens.video, model.cfg.tokens.image}
    assert not set(gen.new_tokens.flatten().tolist()) & media_ids
    full = dataclasses.replace(av, input_ids=gen.sequences, attention_mask=torch.ones_like(gen.sequences),
                               layout=gen.layout)
    logits = run(model, full, hooks)
    P = av.shape[1]
    for i, step in enumerate(gen.logits):
        assert (logits[:, P - 1 + i] - step).abs().max() <= 1e-4
    plain = run(model, full)
    assert (logits[:, P:P + 3] - plain[:, P:P + 3]).abs().max() > 1e-4  # the generated queries were ablated


# ------------------------------------------------------------------------------------------- table
def metric_for(av):
    def metric(logits):
        return logits[0, -1].log_softmax(-1)[7]
    return metric


def test_head_effect_table_matches_single_ablations(model, av):
    metric = metric_for(av)
    table = head_effect_table(model, av, metric, progress=False)
    assert table.shape == (model.cfg.n_layers, model.cfg.n_heads)
    clean = float(metric(run(model, av)))
    for l, h in [(0, 3), (1, 1)]:
        single = float(metric(run(model, av, head_ablation_hooks(model, [(l, h)])))) - clean
        assert table[l, h] == pytest.approx(single, abs=1e-6)
    assert table.abs().max() > 1e-4

    keyed = head_effect_table(model, av, metric, keys="video", query="last_prompt", layers=[1], progress=False)
    assert torch.isnan(keyed[0]).all() and not torch.isnan(keyed[1]).any()
    single = float(metric(run(model, av, head_ablation_hooks(model, [(1, 2)], keys="video", query="last_prompt"))))
    assert keyed[1, 2] == pytest.approx(single - clean, abs=1e-5)


def test_no_hooks_left_after_a_failing_metric(model, av):
    calls = []

    def metric(logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("metric exploded")
        return logits[0, -1, 0]

    with pytest.raises(RuntimeError, match="metric exploded"):
        head_effect_table(model, av, metric, keys="audio", progress=False)
    assert len(calls) == 3
    assert no_hooks_left(model) and model.run_state is None


# ------------------------------------------------------------------------------------------- errors
def test_bad_arguments(model, av, padded, media):
    with pytest.raises(InputError, match=r"head 4 \(layer 0\) is out of range.*Fix: use heads 0\.\.3"):
        head_ablation_hooks(model, [(0, 4)])
    with pytest.raises(InputError, match="layer 2 is out of range: the model has 2 layers"):
        head_ablation_hooks(model, {2: [0]})
    for empty in ([], {}, {0: []}):
        with pytest.raises(InputError, match="empty"):
            head_ablation_hooks(model, empty)
    with pytest.raises(InputError, match=r"not a \(layer, head\) pair"):
        head_ablation_hooks(model, [(0, 1, 2)])
    with pytest.raises(InputError, match="unknown ablation mode 'noise'"):
        head_ablation_hooks(model, [(0, 0)], mode="noise")
    with pytest.raises(InputError, match="mode='mean' needs a reference"):
        head_ablation_hooks(model, [(0, 0)], mode="mean")
    with pytest.raises(LayoutError, match="unknown selector 'vidoe'"):
        head_ablation_hooks(model, [(0, 0)], query="vidoe")
    # selectors that match nothing
    with pytest.raises(InputError, match="query selector 'image' matches no position in the inputs"):
        head_effect_table(model, av, metric_for(av), query="image", progress=False)
    with pytest.raises(InputError, match="keys selector 'generated' matches no position in the inputs"):
        head_effect_table(model, av, metric_for(av), keys="generated", progress=False)
    audio_only = model.encode(model.prepare(**cases(media)["audio"]))
    with pytest.raises(InputError, match="selector 'video' matches no position in the reference"):
        head_ablation_hooks(model, [(0, 0)], mode="mean", reference=audio_only, query="video")
    with pytest.raises(InputError, match="selector 'generated' matches no position in the reference.*last_prompt"):
        head_ablation_hooks(model, [(0, 0)], mode="mean", reference=audio_only, query="generated")
    # resample needs aligned lengths; the error comes from inside the forward and leaves no hook behind
    hooks = head_ablation_hooks(model, [(0, 0)], mode="resample", reference=audio_only)
    with pytest.raises(InputError, match=rf"reference, which has {audio_only.shape[1]} positions, but this "
                                         rf"forward's sequence has {av.shape[1]}"):
        run(model, av, hooks)
    assert no_hooks_left(model) and model.run_state is None
    # and refuses to copy the reference's padding into real positions
    with pytest.raises(InputError, match="copy padding"):
        run(model, padded, head_ablation_hooks(model, [(0, 0)], mode="resample", reference=padded))
    assert no_hooks_left(model)
