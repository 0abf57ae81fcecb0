"""Multi-device placement (av_lens.placement, ``model.place``), tested without GPUs.

1. The planner on ``meta`` models at full Qwen2.5-Omni-7B thinker size and at a 32B-class dense size: every
   part gets a device, blocks are contiguous and in device order, budgets hold, the split is as balanced as
   any contiguous split can be (checked by brute force), and impossible budgets are refused with a fix.
2. Execution over distinct device *names* on CPU ("cpu", "cpu:1", "cpu:2"; a ``.to("cpu:1")`` copies):
   every boundary move is recorded through ``placement.to_device``, and logits, a full cache, knockout
   (prefill and generation), patching and generation are bit-identical to the unplaced model.

``scripts/check_multi_gpu.py`` runs the execution checks on real GPUs.
"""

from __future__ import annotations


import pytest
import torch

from av_lens import HookedAVTransformer, InputError
from av_lens import placement as P
from av_lens.analysis import counterfactual_pair, knockout_hooks, logit_lens, patch_by_modality
from conftest import cases, padded_batch

# ------------------------------------------------------------------------------------------------ planner
TOKENS = dict(vision_start_token_id=151652, vision_end_token_id=151653, audio_start_token_id=151647,
              audio_end_token_id=151648)
#: the released 7B thinker's towers (Qwen2.5-Omni-7B config.json)
VISION_7B = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, depth=32, out_hidden_size=3584)


def thinker_config(**text):
    from transformers import Qwen2_5OmniThinkerConfig

    dims = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064)
    dims.update(text)
    return Qwen2_5OmniThinkerConfig(text_config=dims, audio_config=dict(output_dim=dims["hidden_size"]),
                                    vision_config={**VISION_7B, "out_hidden_size": dims["hidden_size"]}, **TOKENS)


@pytest.fixture(scope="module")
def meta7b():
    return P.meta_model(thinker_config(), dtype="bf16")


@pytest.fixture(scope="module")
def meta32b():  # Qwen2.5-32B-class dense text dims with the 7B towers
    return P.meta_model(thinker_config(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                       num_key_value_heads=8, intermediate_size=27648), dtype="bf16")


def _items(model):
    """Bytes in forward order: first-device part (embedding, towers; a tied unembedding), blocks, final part."""
    sizes = P.part_bytes(model)
    tied = model.unembed.weight is None
    head = sum(sizes[p] for p in P.parts(model) if not p.startswith("blocks.") and p not in ("ln_final", "unembed"))
    head += sizes["unembed"] if tied else 0
    tail = sizes["ln_final"] + (0 if tied else sizes["unembed"])
    return [head] + [sizes[f"blocks.{i}"] for i in range(len(model.blocks))] + [tail]


def brute_force_best(items, caps):
    """The smallest achievable max(load / budget) over all contiguous in-order splits with the first item on
    the first device, by exhaustive dynamic programming over (items placed, devices used)."""
    n, inf = len(items), float("inf")
    prefix = [0]
    for x in items:
        prefix.append(prefix[-1] + x)
    best = [0.0] + [inf] * n  # best[k]: first k items on the devices so far
    for j, cap in enumerate(caps):
        new = [inf] * (n + 1)
        for k in range(n + 1):
            for k0 in range(k + 1):
                if j == 0 and (k0 > 0 or k == 0):  # the first device holds item 0
                    continue
                load = prefix[k] - prefix[k0]
                if best[k0] < inf and load <= cap:
                    new[k] = min(new[k], max(best[k0], load / cap))
        best = new
    return best[n]


def check_plan(model, budgets, plan):
    devs = list(budgets)
    caps = [P.parse_bytes(b) for b in budgets.values()]
    assert set(plan) == set(P.parts(model))  # every part assigned
    assert set(plan.values()) <= set(devs)
    head = [p for p in P.parts(model) if not p.startswith("blocks.") and p not in ("ln_final", "unembed")]
    assert {plan[p] for p in head} == {devs[0]}  # embedding and towers on the first device
    order = [devs.index(plan[f"blocks.{i}"]) for i in range(len(model.blocks))]
    assert order == sorted(order)  # contiguous, in device order
    assert devs.index(plan["ln_final"]) >= order[-1]
    assert plan["unembed"] == (plan["embed"] if model.unembed.weight is None else plan["ln_final"])
    loads = P.device_loads(model, plan)
    assert sum(loads.values()) == sum(_items(model))  # every byte placed exactly once
    for d, c in zip(devs, caps):
        assert loads.get(d, 0) <= c, (d, loads.get(d, 0), c)
    achieved = max(loads.get(d, 0) / c for d, c in zip(devs, caps))
    assert achieved <= brute_force_best(_items(model), caps) * (1 + 1e-9)  # as balanced as any contiguous split
    return loads


@pytest.mark.parametrize("budgets", [
    {"cuda:0": "10GiB", "cuda:1": "10GiB"},
    {"cuda:0": "6GiB", "cuda:1": "6GiB", "cuda:2": "6GiB"},
    {"cuda:0": "5GiB", "cuda:1": "5GiB", "cuda:2": "5GiB", "cuda:3": "5GiB"},
    {"cuda:0": "24GiB", "cuda:1": "8GiB"},
    {"cuda:0": 70 * 2**30, "cuda:1": 70e9},
])
def test_plan_7b_thinker_on_meta(meta7b, budgets):
    assert meta7b.cfg.n_layers == 28 and meta7b.cfg.d_model == 3584 and meta7b.cfg.d_vocab == 152064
    assert all(p.device.type == "meta" for p in meta7b.parameters())
    total = sum(_items(meta7b))
    assert 8.5e9 < total / 2 < 9.5e9  # ~8.9 B parameters in bf16: the released thinker's size
    loads = check_plan(meta7b, budgets, P.plan_device_map(meta7b, budgets))
    if len(set(P.parse_bytes(b) for b in budgets.values())) == 1:  # equal budgets: every device is used
        assert len(loads) == len(budgets)


@pytest.mark.parametrize("budgets", [
    {f"cuda:{i}": "20GiB" for i in range(4)},
    {"cuda:0": "70GiB", "cuda:1": "70GiB"},
    {f"cuda:{i}": "11GiB" for i in range(8)},
])
def test_plan_32b_class_model_on_meta(meta32b, budgets):
    assert meta32b.cfg.n_layers == 64
    total = sum(_items(meta32b))
    assert 60 * 2**30 < total < 70 * 2**30  # ~33 B parameters in bf16
    check_plan(meta32b, budgets, P.plan_device_map(meta32b, budgets))


@pytest.fixture(scope="module")
def meta30b_moe():
    """The Qwen3-Omni-30B-A3B thinker on the meta device: 48 MoE layers of 128 experts (the published sizes)."""
    from transformers import Qwen3OmniMoeThinkerConfig

    tc = Qwen3OmniMoeThinkerConfig(
        text_config=dict(vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=48,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20],
                                          "interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[8, 16, 24]),
        audio_config=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          output_dim=2048),
        audio_token_id=151675, image_token_id=151655, video_token_id=151656, audio_start_token_id=151669,
        audio_end_token_id=151670, vision_start_token_id=151652, vision_end_token_id=151653, position_id_per_seconds=13,
    )
    return P.meta_model(tc, dtype="bf16")


@pytest.mark.parametrize("budgets", [
    {"cuda:0": "40GiB", "cuda:1": "40GiB"},
    {f"cuda:{i}": "20GiB" for i in range(4)},
])
def test_plan_qwen3_omni_30b_moe_on_meta(meta30b_moe, budgets):
    m = meta30b_moe
    assert m.cfg.moe_layers == tuple(range(48)) and m.cfg.n_experts == 128 and m.cfg.n_deepstack == 3
    total = sum(_items(m))
    assert 28e9 < total / 2 < 34e9  # ~30 B parameters (all experts), in bf16
    loads = check_plan(m, budgets, P.plan_device_map(m, budgets))
    assert len(loads) == len(budgets)


def test_plan_refuses_budgets_that_cannot_hold_the_model(meta7b):
    with pytest.raises(InputError, match="do not fit.*Fix: add devices"):
        P.plan_device_map(meta7b, {"cuda:0": "8GiB", "cuda:1": "8GiB"})
    # enough in total, but the first device cannot hold the embedding and the towers (3.5 GiB)
    with pytest.raises(InputError, match="first device must hold the embedding"):
        P.plan_device_map(meta7b, {"cuda:0": "3GiB", "cuda:1": "40GiB"})
    with pytest.raises(InputError, match="no devices"):
        P.plan_device_map(meta7b, {})
    with pytest.raises(InputError, match="cannot read '12 parsecs'.*Fix:"):
        P.plan_device_map(meta7b, {"cuda:0": "12 parsecs"})


def test_plan_on_a_tied_model_keeps_the_unembedding_with_the_embedding(tiny_dirs):
    model = P.meta_model(tiny_dirs["mqa_tied"], dtype="fp32")
    assert model.unembed.weight is None
    sizes = _items(model)
    budgets = {"cuda:0": sizes[0] + sizes[1], "cuda:1": sum(sizes)}  # room for the embedding and one block
    plan = P.plan_device_map(model, budgets)
    check_plan(model, budgets, plan)
    assert plan["blocks.1"] == "cuda:1" and plan["unembed"] == plan["embed"] == "cuda:0"


# ------------------------------------------------------------------------------------------------ execution
MAP3 = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu:1", "blocks.2": "cpu:2"}


@pytest.fixture(scope="module")
def pair3(tiny_dirs):
    """(unplaced, placed over cpu / cpu:1 / cpu:2) copies of the 3-layer tiny model."""
    a = HookedAVTransformer.from_pretrained(tiny_dirs["gqa4_3layers"])
    b = HookedAVTransformer.from_pretrained(tiny_dirs["gqa4_3layers"]).place(MAP3)
    return a, b


@pytest.fixture
def moves(monkeypatch):
    """Every boundary move of a placed forward: (shape, destination)."""
    log = []
    real = P.to_device

    def record(x, device):
        log.append((tuple(x.shape), str(device)))
        return real(x, device)
    monkeypatch.setattr(P, "to_device", record)
    return log


def expected_moves(device_map, n_layers, resid_shape, ctx_shapes):
    """The moves a forward must make: the residual at each change of device, the rotary tables and the mask
    once per device newly entered (derived from the map, not written out)."""
    out, here, seen = [], device_map["embed"], {device_map["embed"]}
    for part in [f"blocks.{i}" for i in range(n_layers)]:
        d = device_map[part]
        if d != here:
            out.append((resid_shape, str(d)))
            here = d
        if d not in seen:
            seen.add(d)
            out += [(s, str(d)) for s in ctx_shapes]
    for part in ("ln_final", "unembed"):
        d = device_map[part]
        if d != here:
            out.append((resid_shape, str(d)))
            here = d
    return out


def test_place_records_the_map_and_the_input_device(pair3):
    _, b = pair3
    assert b.device == torch.device("cpu") and b.cfg.device == torch.device("cpu")
    assert b.device_map["blocks.1"] == torch.device("cpu:1") and b.device_map["unembed"] == torch.device("cpu:2")
    assert b.device_map["audio_tower"] == b.device_map["embed"]
    assert "cpu:1: blocks 1-1" in P.summary(b, {k: str(v) for k, v in b.device_map.items()})


def test_placed_logits_are_identical_and_every_boundary_move_is_made(pair3, media, moves):
    a, b = pair3
    for name in ("video_with_audio", "text"):
        inp = a.prepare(**cases(media)[name])
        moves.clear()
        with torch.no_grad():
            la, lb = a(inp), b(inp)
        assert torch.equal(la, lb)
        B, T = inp.input_ids.shape
        d_head = a.cfg.d_head
        ctx = [(B, T, d_head), (B, T, d_head)]  # cos, sin; no mask without padding
        assert moves == expected_moves(b.device_map, 3, (B, T, a.cfg.d_model), ctx)
        assert len(moves) == 2 + 2 * 2  # two boundaries: residual + cos + sin each
    inp = padded_batch(a, media)  # padding: the additive mask moves too
    moves.clear()
    with torch.no_grad():
        assert torch.equal(a(inp), b(inp))
    B, T = inp.input_ids.shape
    ctx = [(B, T, a.cfg.d_head), (B, T, a.cfg.d_head), (B, 1, T, T)]
    assert moves == expected_moves(b.device_map, 3, (B, T, a.cfg.d_model), ctx)
    with torch.no_grad():  # the loss reads the targets on the logits' device
        assert torch.equal(a(inp, return_type="loss"), b(inp, return_type="loss"))


def test_placed_full_cache_is_identical(pair3, media):
    a, b = pair3
    inp = a.prepare(**cases(media)["video_with_audio"])
    with torch.no_grad():
        la, ca = a.run_with_cache(inp)
        lb, cb = b.run_with_cache(inp, device="cpu")  # TransformerLens gathers onto one device
    assert torch.equal(la, lb)
    assert set(ca.keys()) == set(cb.keys()) and len(ca) > 20 * 3
    for k in ca.keys():
        assert torch.equal(ca[k], cb[k]), k
    assert cb.layout is inp.layout


def test_placed_knockout_prefill_and_generation_are_identical(pair3, media, moves):
    a, b = pair3
    inp = a.prepare(**cases(media)["video_with_audio"])
    with torch.no_grad():
        plain = a(inp)
        ka = a.run_with_hooks(inp, fwd_hooks=knockout_hooks(a, "last_prompt", "video", range(0, 3)))
        kb = b.run_with_hooks(inp, fwd_hooks=knockout_hooks(b, "last_prompt", "video", range(0, 3)))
    assert not torch.equal(ka, plain)  # the knockout changes something
    assert torch.equal(ka, kb)
    moves.clear()
    ga = a.generate(inp, max_new_tokens=4, stop_at_eos=False, return_logits=True,
                    fwd_hooks=knockout_hooks(a, "generated", "video", range(1, 3)))
    gb = b.generate(inp, max_new_tokens=4, stop_at_eos=False, return_logits=True,
                    fwd_hooks=knockout_hooks(b, "generated", "video", range(1, 3)))
    assert torch.equal(ga.new_tokens, gb.new_tokens)
    assert all(torch.equal(x, y) for x, y in zip(ga.logits, gb.logits))
    # prefill + 3 decoding steps, each crossing both boundaries (the KV cache stays on its layer's device)
    assert sum(1 for s, d in moves if s[-1] == a.cfg.d_model) == 2 * 4


def test_placed_patching_and_logit_lens_are_identical(pair3, media):
    a, b = pair3
    res = []
    for m in (a, b):
        pair = counterfactual_pair(m, media["video"], media["wav5"], media["wav3"], "Describe.", system_prompt=None)
        res.append(patch_by_modality(m, pair.factual, pair.counterfactual, lambda logits: logits[0, -1, :5].sum(),
                                     components=("resid_pre", "attn_out", "z"), sets=("audio", "video"),
                                     progress=False))
    assert res[0].corrupted != res[0].clean
    for comp in ("resid_pre", "attn_out", "z"):
        assert torch.equal(res[0][comp], res[1][comp]), comp
    inp = a.prepare(**cases(media)["audio"])
    la, lb = (logit_lens(m, inp, "audio", targets=[5, 7], k=3) for m in (a, b))
    assert torch.equal(la.top_ids, lb.top_ids) and torch.equal(la.target_prob, lb.target_prob)


def test_tied_placed_model_unembeds_on_the_embedding_device(tiny_dirs, media, moves):
    a = HookedAVTransformer.from_pretrained(tiny_dirs["mqa_tied"])
    b = HookedAVTransformer.from_pretrained(tiny_dirs["mqa_tied"]).place({"embed": "cpu", "blocks.0": "cpu",
                                                                          "blocks.1": "cpu:1"})
    assert b.device_map["ln_final"] == torch.device("cpu:1") and b.device_map["unembed"] == torch.device("cpu")
    inp = a.prepare(**cases(media)["image"])
    with torch.no_grad():
        assert torch.equal(a(inp), b(inp))
    B, T = inp.input_ids.shape
    assert moves[-1] == ((B, T, a.cfg.d_model), "cpu")  # back to the shared matrix for the unembedding
    ga, gb = a.generate(inp, max_new_tokens=3), b.generate(inp, max_new_tokens=3)
    assert torch.equal(ga.sequences, gb.sequences)


def test_hooks_do_not_outlive_an_error_in_a_placed_forward(pair3, media):
    _, b = pair3
    inp = b.prepare(**cases(media)["audio"])

    def boom(x, hook):
        raise RuntimeError("hook failed on the second device")
    with pytest.raises(RuntimeError, match="second device"):
        b.generate(inp, max_new_tokens=2, fwd_hooks=[("blocks.2.hook_resid_pre", boom), *knockout_hooks(b, "generated",
                                                                                                      "audio", [1])])
    with pytest.raises(RuntimeError, match="second device"):
        b.run_with_hooks(inp, fwd_hooks=[("blocks.1.attn.hook_z", boom)])
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in b.hook_dict.values())
    assert b.run_state is None


def test_to_one_device_clears_the_map(tiny_dirs, media):
    m = HookedAVTransformer.from_pretrained(tiny_dirs["gqa4_3layers"]).place(MAP3)
    assert m.device_map is not None
    m.to("cpu")
    assert m.device_map is None
    m.place({"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "blocks.2": "cpu"})
    assert m.device_map is None  # one device: no routing at all


@pytest.mark.parametrize("bad, message", [
    ({"embed": "cpu", "blocks.0": "cpu", "blocks.9": "cpu"}, "parts this model does not have: \\['blocks.9'\\]"),
    ({"embed": "cpu", "blocks.0": "cpu"}, "leaves \\['blocks.1', 'blocks.2'\\] without a device"),
    ({**MAP3, "audio_tower": "cpu:1"}, "puts 'audio_tower' on cpu:1 but the embedding on cpu"),
    ({**MAP3, "blocks.1": "cuda:7"}, "uses cuda:7 but this machine has"),
    ({**MAP3, "blocks.1": "gpu one"}, "'gpu one' is not a device"),
    ("everywhere", "unknown device map 'everywhere'"),
])
def test_bad_device_maps_are_refused(tiny_dirs, bad, message):
    m = HookedAVTransformer.from_pretrained(tiny_dirs["gqa4_3layers"])
    with pytest.raises(InputError, match=message + ".*Fix: "):
        m.place(bad)
    assert m.device_map is None


def test_tied_unembedding_elsewhere_is_refused(tiny_dirs):
    m = HookedAVTransformer.from_pretrained(tiny_dirs["mqa_tied"])
    with pytest.raises(InputError, match="embeddings are tied.*Fix: map 'unembed' to cpu"):
        m.place({"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu:1", "unembed": "cpu:1"})


def test_from_pretrained_with_a_device_map_streams_weights_onto_the_placed_parts(tiny_dirs, pair3, media):
    a, b = pair3
    c = HookedAVTransformer.from_pretrained(tiny_dirs["gqa4_3layers"], device_map=MAP3)
    assert c.device_map == b.device_map
    inp = a.prepare(**cases(media)["video_with_audio"])
    with torch.no_grad():
        assert torch.equal(a(inp), c(inp))


def test_model_does_not_import_placement():
    """The placement code depends on the model, not the reverse: the model asks the router it is given."""
    import ast
    from pathlib import Path

    import av_lens.model as model_module

    tree = ast.parse(Path(model_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and "placement" in m for m in imported)
    from av_lens.placement import apply_device_map

    assert model_module.HookedAVTransformer.placer is apply_device_map
