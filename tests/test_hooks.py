"""Hook points: names, shapes, the SDPA/explicit equivalence, encoder hooks, hygiene after errors."""

import pytest
import torch

from av_lens import HookNameError
from conftest import cases, padded_batch

TOL = 1e-5
LAYER_HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
               "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
               "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
               "mlp.hook_pre", "mlp.hook_post", "ln1.hook_scale", "ln1.hook_normalized"]
TOP_HOOKS = ["hook_embed", "hook_audio_embed", "hook_image_embed", "hook_video_embed", "ln_final.hook_normalized",
             "ln_final.hook_scale"] + [f"{e}.{h}" for e in ("audio_encoder", "image_encoder", "video_encoder")
                                        for h in ("hook_in", "blocks.0.hook_out", "hook_out")]


@pytest.fixture(scope="module")
def av(model, media):
    return model.prepare(**cases(media)["image_video_audio"])


def test_all_documented_hook_names_exist(model):
    names = set(model.hook_dict)
    for layer in range(model.cfg.n_layers):
        for h in LAYER_HOOKS:
            assert f"blocks.{layer}.{h}" in names
    for h in TOP_HOOKS:
        assert h in names


def test_full_cache_shapes(model, av):
    with torch.no_grad():
        _, cache = model.run_with_cache(av)
    B, P = av.shape
    cfg = model.cfg
    L = av.layout
    assert cache["blocks.0.attn.hook_q"].shape == (B, P, cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (B, P, cfg.n_key_value_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_pattern"].shape == (B, cfg.n_heads, P, P)
    assert cache["blocks.0.attn.hook_result"].shape == (B, P, cfg.n_heads, cfg.d_model)
    assert cache["blocks.0.mlp.hook_post"].shape == (B, P, cfg.d_mlp)
    assert cache["hook_audio_embed"].shape == (L.count("audio"), cfg.d_model)
    assert cache["hook_video_embed"].shape == (L.count("video"), cfg.d_model)
    assert cache["hook_image_embed"].shape == (L.count("image"), cfg.d_model)
    # what enters the stream is what the towers produced, at the placeholder positions
    assert torch.equal(cache["audio_encoder.hook_out"], cache["hook_audio_embed"])
    assert torch.equal(cache["hook_embed"][0, L.positions("video")], cache["hook_video_embed"])
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert pattern[0, :, 0, 1:].abs().max() == 0  # causal


@pytest.mark.parametrize("which", ["single", "padded"])
def test_explicit_attention_path_equals_sdpa(model, av, media, which):
    inp = av if which == "single" else padded_batch(model, media)
    real = inp.attention_mask.bool()
    with torch.no_grad():
        fast = model(inp)
        explicit = model.run_with_hooks(inp, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)])
        with_result = model.run_with_hooks(inp, fwd_hooks=[(lambda n: n.endswith("hook_result"), lambda x, hook: None)])
    assert (fast - explicit)[real].abs().max() <= TOL
    assert (fast - with_result)[real].abs().max() <= TOL


def test_head_result_sums_to_attn_out(model, av):
    with torch.no_grad():
        _, cache = model.run_with_cache(av, names_filter=["blocks.1.attn.hook_result", "blocks.1.hook_attn_out"])
    assert (cache["blocks.1.attn.hook_result"].sum(2) - cache["blocks.1.hook_attn_out"]).abs().max() <= TOL


def test_editing_hooks_changes_the_output(model, av):
    with torch.no_grad():
        base = model(av)
        zero_audio_layer = model.run_with_hooks(av, fwd_hooks=[("audio_encoder.blocks.0.hook_out", lambda x, hook: x * 0)])
        zero_pattern = model.run_with_hooks(av, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x * 0)])
    assert (base - zero_audio_layer).abs().max() > 1e-4
    assert (base - zero_pattern).abs().max() > 1e-4


def test_encoder_outputs_reused(model, av):
    calls = []
    with torch.no_grad():
        base = model(av)
        enc = model.encode(av)
        assert set(enc.encoder_outputs) == {"audio", "image", "video"}
        again = model.run_with_hooks(enc, fwd_hooks=[("audio_encoder.hook_out", lambda x, hook: calls.append(1))])
    assert calls == []  # the towers did not run again
    assert (base - again).abs().max() <= TOL


def test_run_state_visible_to_hooks(model, av):
    seen = []
    model.run_with_hooks(av, fwd_hooks=[("blocks.0.hook_resid_pre",
                                         lambda x, hook: seen.append(model.run_state.layout.count("video")))])
    assert seen == [av.layout.count("video")]
    assert model.run_state is None


def test_hooks_active_during_generation(model, av):
    shapes = []
    gen = model.generate(av, max_new_tokens=4, stop_at_eos=False,
                         fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: shapes.append(tuple(x.shape)))])
    P = av.shape[1]
    assert shapes[0] == (1, model.cfg.n_heads, P, P)
    assert shapes[1:] == [(1, model.cfg.n_heads, 1, P + k) for k in range(1, 4)]
    assert gen.new_tokens.shape == (1, 4)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_no_hook_survives_an_exception(model, av):
    def boom(x, hook):
        raise RuntimeError("boom")

    def cached():
        with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", boom)]):
            model.run_with_cache(av)

    runs = [
        lambda: model.run_with_hooks(av, fwd_hooks=[("blocks.1.hook_mlp_out", boom),
                                                    ("blocks.0.hook_resid_pre", lambda x, hook: None)]),
        cached,
        lambda: model.generate(av, max_new_tokens=3, fwd_hooks=[("blocks.1.hook_mlp_out", boom)]),
    ]
    for run in runs:
        with pytest.raises(RuntimeError, match="boom"):
            run()
        assert not any(hp.has_hooks() for hp in model.hook_dict.values())
        assert model.run_state is None


@pytest.mark.parametrize("call", ["run_with_hooks", "run_with_cache", "add_hook"])
def test_unknown_hook_name(model, av, call):
    with pytest.raises(HookNameError, match="did you mean 'blocks.0.attn.hook_pattern'"):
        if call == "run_with_hooks":
            model.run_with_hooks(av, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: None)])
        elif call == "run_with_cache":
            model.run_with_cache(av, names_filter=["blocks.0.attn.hook_patern"])
        else:
            model.add_hook("blocks.0.attn.hook_patern", lambda x, hook: None)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
