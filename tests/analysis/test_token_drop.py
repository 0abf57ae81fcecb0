"""Token-drop curves against knockouts from layer L built by hand, in prefill and in generation."""

import pytest
import torch

from av_lens import S
from av_lens.analysis.knockout import knockout_hooks, token_drop_sweep
from av_lens.errors import InputError
from conftest import cases


def test_token_drop_equals_knockout_from_layer(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    metric = lambda logits, _: logits[:, -1].log_softmax(-1)[:, 3]  # noqa: E731
    res = token_drop_sweep(model, inp, "audio", metric, progress=False)
    n = model.cfg.n_layers
    assert [list(w) for w in res.windows] == [list(range(l, n)) for l in range(n)]
    for i, l in enumerate(range(n)):
        hooks = knockout_hooks(model, S.all - S.audio, "audio", range(l, n))
        ref = metric(model.run_with_hooks(inp, fwd_hooks=hooks), inp)
        torch.testing.assert_close(res.values[i], ref)
    torch.testing.assert_close(res.baseline, metric(model(inp), inp))
    assert (res.values[0] - res.baseline).abs().max() > 1e-4


def test_token_drop_under_generation(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    metric = lambda gen, _: gen.new_tokens.float()  # noqa: E731
    res = token_drop_sweep(model, inp, "video", metric, start_layers=[1], generate=dict(max_new_tokens=3))
    hooks = knockout_hooks(model, S.all - S.video, "video", range(1, model.cfg.n_layers))
    ref = model.generate(inp, max_new_tokens=3, fwd_hooks=hooks).new_tokens.float()
    torch.testing.assert_close(res.values[0], ref)


def test_token_drop_refuses_absent_tokens(model, media):
    with pytest.raises(InputError, match="matches no position"):
        token_drop_sweep(model, model.prepare(**cases(media)["audio"]), "video", lambda l, i: l.sum(),
                         progress=False)
