"""The un-hooked inference fast paths (in-place arithmetic in norms, MLPs and residual sums; grouped explicit
attention) change no number, and never overwrite a tensor that a hook was handed."""

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from av_lens.components.inplace import may_overwrite
from conftest import cases, padded_batch


@pytest.fixture(scope="module", params=["image_video_audio", "padded"])
def inp(request, model, media):
    raw = padded_batch(model, media) if request.param == "padded" else model.prepare(**cases(media)["image_video_audio"])
    with torch.no_grad():
        return model.encode(raw)  # towers once; the backbone is what these tests exercise


def autograd_forward(model, inp, **kw):
    """The same run with autograd on: then no component writes in place (the reference)."""
    with torch.enable_grad():
        return model.run_with_hooks(inp, **kw).detach()


def test_plain_inference_equals_the_autograd_forward_bit_for_bit(model, inp):
    with torch.no_grad():
        assert may_overwrite()
        fast = model(inp)
    assert not may_overwrite()
    assert torch.equal(fast, autograd_forward(model, inp))


def hook_names(model):
    # (points behind a TransformerLens switch — hook_q_input, hook_attn_in, hook_mlp_in ... — refuse hooks while off)
    backbone = [n for n in model.hook_dict if n.startswith(("blocks.", "ln_final.", "hook_embed"))
                and n.rsplit(".", 1)[-1] not in model._SWITCHED]
    assert len(backbone) > 40
    return backbone


def test_no_hooked_tensor_is_overwritten_later(model, inp):
    """For every backbone hook point alone: what the hook was handed is, after the forward, still what it was
    when handed (a clone taken at the time), and the logits equal the autograd run's with the same hook."""
    for name in hook_names(model):
        kept = {}

        def keep(x, hook):
            kept["ref"], kept["clone"] = x, x.clone()

        with torch.no_grad():
            logits = model.run_with_hooks(inp, fwd_hooks=[(name, keep)])
        assert torch.equal(kept["ref"], kept["clone"]), name
        assert torch.equal(logits, autograd_forward(model, inp, fwd_hooks=[(name, lambda x, hook: None)])), name


@pytest.mark.parametrize("how", ["hook point hook", "producer module hook", "pre-hook", "global hook",
                                 "global pre-hook"])
def test_hooks_registered_outside_transformerlens_also_disable_overwriting(model, inp, how):
    """Plain PyTorch hooks keep references too: on hook points, on the modules whose output is a buffer the
    block sums into (attn, o_proj, mlp, down_proj, gate_proj), as pre-hooks, or registered globally."""
    kept = []
    b0, b1 = model.blocks[0], model.blocks[1]
    if how == "producer module hook":
        targets = {b0.attn, b0.attn.o_proj, b1.mlp, b1.mlp.down_proj, b0.mlp.gate_proj}
    elif how == "pre-hook" or how == "global pre-hook":
        targets = {b0.hook_attn_out, b1.hook_mlp_out, b1.mlp.hook_pre, b0.ln2.hook_normalized}
    else:
        targets = {b0.hook_attn_out, b1.mlp.hook_pre, b1.ln2.hook_normalized, b0.hook_mlp_out}

    def keep(module, args, out=None):
        if module in targets:
            x = args[0] if "pre" in how else out
            kept.append((x, x.clone()))

    if how == "global hook":
        handles = [register_module_forward_hook(keep)]
    elif how == "global pre-hook":
        handles = [register_module_forward_pre_hook(keep)]
    elif how == "pre-hook":
        handles = [t.register_forward_pre_hook(keep) for t in targets]
    else:
        handles = [t.register_forward_hook(keep) for t in targets]
    try:
        reference = autograd_forward(model, inp)  # under the same hooks (a global hook also sees hook_scale)
        kept.clear()
        with torch.no_grad():
            logits = model(inp)
    finally:
        for h in handles:
            h.remove()
    assert len(kept) == len(targets)
    for ref, clone in kept:
        assert torch.equal(ref, clone)
    assert torch.equal(logits, reference)


def test_grouped_explicit_attention_has_the_sdpa_gradients(model, inp):
    """Backward through the explicit path (scores scaled and masked in place) works and matches SDPA's."""
    real = inp.attention_mask.bool()
    grads = []
    for hooks in ([], [(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)]):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model.run_with_hooks(inp, fwd_hooks=hooks)
            logits[real].logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.q_proj.weight" in grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5), n


def test_an_edited_scale_takes_effect(model, inp):
    """Hooked, the norm divides by the scale the hook returns (un-hooked it multiplies by rsqrt)."""
    name = "blocks.1.ln1.hook_scale"
    with torch.no_grad():
        _, plain = model.run_with_cache(inp, names_filter="blocks.1.ln1.hook_normalized")
        model.add_hook(name, lambda x, hook: 2 * x)
        try:
            _, doubled = model.run_with_cache(inp, names_filter="blocks.1.ln1.hook_normalized")
        finally:
            model.reset_hooks()
    a, b = plain["blocks.1.ln1.hook_normalized"], doubled["blocks.1.ln1.hook_normalized"]
    assert torch.allclose(b, a / 2, rtol=1e-6, atol=1e-7) and not torch.allclose(a, b)


def test_caching_gives_the_plain_forwards_logits_bit_for_bit(model, inp):
    """Hooking hook_scale, norms, MLP and residual points (as a cache does) must not change any arithmetic. Only
    the hooks that switch attention's execution path (hook_attn_scores / hook_pattern: explicit attention;
    hook_result: per-head sum) change the order of floating-point operations; with them the logits agree to
    1e-5 (tests/test_hooks.py), not bit for bit."""
    switching = ("hook_attn_scores", "hook_pattern", "hook_result")
    with torch.no_grad():
        plain = model(inp)
        cached, cache = model.run_with_cache(inp, names_filter=lambda n: not n.endswith(switching))
    assert "blocks.0.ln1.hook_scale" in cache.cache_dict and "blocks.1.mlp.hook_post" in cache.cache_dict
    assert torch.equal(plain, cached)


def test_an_in_place_edit_of_the_scale_takes_effect(model, inp):
    name = "blocks.1.ln2.hook_scale"

    def double_in_place(x, hook):
        x.mul_(2)

    with torch.no_grad():
        returned = model.run_with_hooks(inp, fwd_hooks=[(name, lambda x, hook: 2 * x)])
        in_place = model.run_with_hooks(inp, fwd_hooks=[(name, double_in_place)])
        plain = model(inp)
    assert torch.equal(returned, in_place) and not torch.allclose(returned, plain)


def test_a_backward_hook_on_hook_scale_fires(model, inp):
    fired = []
    model.add_hook("blocks.0.ln1.hook_scale", lambda grad, hook: fired.append(grad[0].shape), dir="bwd")
    try:
        with torch.enable_grad():
            model(inp).sum().backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    assert fired and fired[0][-1] == 1


def test_a_hook_that_removes_itself_still_protects_what_it_kept(model, inp):
    """A capture-once hook: keeps the tensor, then removes its own handle while running."""
    kept = {}
    points = [model.blocks[0].hook_attn_out, model.blocks[1].mlp.hook_pre, model.blocks[1].hook_mlp_out,
              model.blocks[0].ln2.hook_normalized]
    handles = {}

    def once(module, args, out):
        kept[module] = (out, out.clone())
        handles.pop(module).remove()

    for p in points:
        handles[p] = p.register_forward_hook(once)
    with torch.no_grad():
        model(inp)
    assert not handles and len(kept) == len(points)
    for ref, clone in kept.values():
        assert torch.equal(ref, clone)


def test_a_user_set_activation_that_returns_its_input_is_not_overwritten(model, inp):
    """``mlp.act = identity`` (a linearised-MLP experiment): act is hook_pre's own tensor, cached."""
    mlp = model.blocks[1].mlp
    saved = mlp.act
    mlp.act = lambda x: x
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(inp, names_filter=["blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_pre_linear",
                                                               "blocks.1.mlp.hook_post"])
    finally:
        mlp.act = saved
    pre, lin, post = (cache[f"blocks.1.mlp.{h}"] for h in ("hook_pre", "hook_pre_linear", "hook_post"))
    assert torch.equal(post, pre * lin) and not torch.equal(pre, post)


def test_a_hook_may_return_a_broadcastable_pattern(model, inp):
    """A hook_pattern hook returning [batch, 1, q, k] (one pattern for all heads) is broadcast, as matmul did."""
    name = "blocks.1.attn.hook_pattern"
    with torch.no_grad():
        shared = model.run_with_hooks(inp, fwd_hooks=[(name, lambda x, hook: x.mean(1, keepdim=True))])
        expanded = model.run_with_hooks(inp, fwd_hooks=[(name, lambda x, hook: x.mean(1, keepdim=True).expand_as(x)
                                                         .clone())])
    assert torch.equal(shared, expanded)
