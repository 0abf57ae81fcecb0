"""The un-hooked inference fast paths (in-place arithmetic in norms, MLPs and residual sums; grouped explicit
attention) change no number, and never overwrite a tensor that a hook was handed."""

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

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
    backbone = [n for n in model.hook_dict if n.startswith(("blocks.", "ln_final.", "hook_embed"))]
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


@pytest.mark.parametrize("how", ["module hook", "global hook"])
def test_hooks_registered_outside_transformerlens_also_disable_overwriting(model, inp, how):
    kept = []
    targets = {model.blocks[0].hook_attn_out, model.blocks[1].mlp.hook_pre, model.blocks[1].ln2.hook_normalized,
               model.blocks[0].hook_mlp_out}

    def keep(module, args, out):
        if module in targets:
            kept.append((out, out.clone()))

    if how == "module hook":
        handles = [t.register_forward_hook(keep) for t in targets]
    else:
        handles = [register_module_forward_hook(keep)]
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
