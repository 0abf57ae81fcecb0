"""Sinks and massive activations against brute force over a full cache (patterns and residuals)."""

import pytest
import torch

from av_lens.analysis.sinks import scan_sinks
from av_lens.errors import InputError
from conftest import cases, padded_batch


@pytest.mark.parametrize("which", ["video_with_audio", "padded"])
def test_received_shares_and_maxima_match_a_full_cache(model, media, which):
    inp = padded_batch(model, media) if which == "padded" else model.prepare(**cases(media)[which])
    res = scan_sinks(model, inp)
    _, cache = model.run_with_cache(inp)
    real = inp.attention_mask.bool()
    B, T = real.shape
    for l in range(model.cfg.n_layers):
        pat = cache[f"blocks.{l}.attn.hook_pattern"]            # [batch, head, q, k]
        for b in range(B):
            for k in range(T):
                if not real[b, k]:
                    continue
                qs = [q for q in range(k, T) if real[b, q]]
                ref = pat[b][:, qs, k].mean(-1)
                torch.testing.assert_close(res.received[b, l, :, k], ref, atol=1e-5, rtol=1e-5)
    for i in range(model.cfg.n_layers + 1):
        r = cache["blocks.0.hook_resid_pre"] if i == 0 else cache[f"blocks.{i - 1}.hook_resid_post"]
        for b in range(B):
            a = r[b][real[b]].abs()
            torch.testing.assert_close(res.max_abs[b, i][real[b]], a.max(-1).values)
            assert float(res.median_abs[b, i]) == pytest.approx(float(a.median()), rel=1e-6)
    # the detector: brute force over the cache's shares
    thr = float(res.received.max()) * 0.8
    got = {(r["sample"], r["layer"], r["head"], r["position"]) for r in res.sinks(thr)}
    want = {(b, l, h, k) for b in range(B) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)
            for k in range(T) if real[b, k] and float(res.received[b, l, h, k]) >= thr}
    assert got == want and got
    for r in res.sinks(thr):
        assert r["label"] == inp.layout.labels(r["sample"])[r["position"]]


def test_massive_activation_detected_where_planted(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    p = int(inp.layout.positions("audio")[3])

    def plant(resid, hook):
        resid = resid.clone()
        resid[0, p, 7] = 1e4
        return resid

    hooks = [("blocks.0.hook_resid_post", plant)]
    with model.hooks(fwd_hooks=hooks):
        res = scan_sinks(model, inp)
    rows = res.massive(ratio=100.0)
    assert rows and rows[0]["position"] == p and rows[0]["dim"] == 7 and rows[0]["modality"] == "audio"
    assert {r["resid"] for r in rows if r["position"] == p} >= {1}
    summary = res.by_modality(ratio=100.0)
    assert summary["audio"]["massive"][1] >= 1
    shares = sum(torch.tensor(v["attention_share"]) for v in summary.values())
    torch.testing.assert_close(shares, torch.ones(model.cfg.n_layers), atol=1e-4, rtol=0)  # a partition
    assert "massive" in res.table()


def test_thresholds_are_checked(model, media):
    res = scan_sinks(model, model.prepare(**cases(media)["audio"]), layers=[0])
    with pytest.raises(InputError, match="threshold"):
        res.sinks(threshold=0)
    with pytest.raises(InputError, match="ratio"):
        res.massive(ratio=1)
