"""Hook hygiene: no hook outlives an exception, and analyses leave no state behind."""

import pytest
import torch

from av_lens.analysis import (AttentionFlow, LogitLens, head_ablation_hooks, knockout_hooks, knockout_sweep,
                              logit_lens, sliding_windows)
from conftest import cases


def clean(model) -> bool:
    return model.run_state is None and not any(hp.has_hooks() for hp in model.hook_dict.values())


class Boom(Exception):
    pass


def boom(*_, **__):
    raise Boom()


def test_exception_in_a_forward_hook_leaves_no_hook(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    with pytest.raises(Boom):
        model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, "text", "video") + [("blocks.1.hook_resid_post", boom)])
    assert clean(model)
    with pytest.raises(Boom):
        model.run_with_hooks(inp, fwd_hooks=[("blocks.0.attn.hook_attn_mask", boom)])
    assert clean(model)


def test_exception_during_generate_leaves_no_hook(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    calls = {"n": 0}

    def fail_at_step_2(x, hook):
        if model.run_state.query_start > 0:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Boom()

    flow = AttentionFlow(model, "generated")
    with pytest.raises(Boom):
        model.generate(inp, max_new_tokens=5, stop_at_eos=False,
                       fwd_hooks=flow.hooks() + [("blocks.0.hook_resid_post", fail_at_step_2)])
    assert clean(model)


def test_exception_in_a_sweep_metric_leaves_no_hook(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    n = {"k": 0}

    def metric(logits, _):
        n["k"] += 1
        if n["k"] == 2:
            raise Boom()
        return logits[0, -1, 0]

    with pytest.raises(Boom):
        knockout_sweep(model, inp, "last_prompt", "video", sliding_windows(model.cfg.n_layers, 1), metric, progress=False)
    assert clean(model)


def test_analyses_in_sequence_leave_no_state(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    ref = model(inp)
    first = logit_lens(model, inp, "audio", k=3).top_probs
    model.generate(inp, max_new_tokens=3, fwd_hooks=head_ablation_hooks(model, [(0, 1)]) + LogitLens(model, "audio").hooks())
    model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, "last_prompt", "audio"))
    assert clean(model)
    torch.testing.assert_close(model(inp), ref, atol=0, rtol=0)           # the model is unchanged
    torch.testing.assert_close(logit_lens(model, inp, "audio", k=3).top_probs, first, atol=0, rtol=0)  # same table again
