"""Parity of a model placed over several GPUs against the same model on one GPU (run on a machine with >= 2).

    python scripts/check_multi_gpu.py                                   # tiny random thinker, fp32
    python scripts/check_multi_gpu.py --model Qwen/Qwen2.5-Omni-7B --dtype bf16 --budget 20GiB

The reference is the model on cuda:0; the placed copy is planned over the visible GPUs with
``plan_device_map`` (``--budget`` per GPU; default: what makes the blocks spread over all of them) and loaded
with ``from_pretrained(device_map=...)``. Checked, as tests/test_placement.py does on CPU with device names:
logits (prefill, padded batch), a full ``run_with_cache`` gathered onto cuda:0, a knockout in the prefill and
in greedy generation, activation patching by modality, and the logit lens. Prints each maximum |difference|
(0 means bit-identical) and exits 1 if any exceeds ``--tol`` (default 0: the same kernels run on every GPU of
one kind, so the numbers should be equal), or if fewer than 2 GPUs are visible.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny random 3-layer thinker)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--budget", default=None, help="weight budget per GPU, e.g. 20GiB (default: spread evenly)")
    ap.add_argument("--tol", type=float, default=0.0)
    ap.add_argument("--devices", default=None, help="comma-separated device names instead of the visible GPUs "
                                                     "(e.g. cpu,cpu:1 to dry-run this script without GPUs)")
    a = ap.parse_args(argv)
    if a.devices:
        devices = a.devices.split(",")
    else:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    if len(devices) < 2:
        print(f"needs at least 2 visible CUDA devices, found {len(devices)}: nothing checked")
        return 1
    d0 = devices[0]

    from av_lens import HookedAVTransformer
    from av_lens import placement as P
    from av_lens.analysis import counterfactual_pair, knockout_hooks, logit_lens, patch_by_modality

    if a.model is None:
        from av_lens.testing.tiny import TinySpec, save_tiny_qwen2_5_omni

        name = save_tiny_qwen2_5_omni(tempfile.mkdtemp(), TinySpec(n_layers=4, d_model=96, n_heads=8, n_kv_heads=2,
                                                                    head_dim=12, mrope_section=(2, 2, 2), seed=3))
    else:
        name = a.model
    meta = P.meta_model(name, a.dtype)
    sizes = P.part_bytes(meta)
    budget = a.budget or int(sum(sizes.values()) / len(devices) + 2 * max(sizes.values()))
    plan = P.plan_device_map(meta, {d: budget for d in devices})
    print(P.summary(meta, plan))
    ref = HookedAVTransformer.from_pretrained(name, dtype=a.dtype, device=d0)
    placed = HookedAVTransformer.from_pretrained(name, dtype=a.dtype, device_map=plan)
    assert placed.device_map is not None and len(set(placed.device_map.values())) >= 2, "the plan uses one GPU"

    rng = np.random.default_rng(0)
    wav5 = (0.1 * rng.standard_normal(16000 * 5)).astype(np.float32)
    wav3 = (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)
    video = rng.integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    inp = ref.prepare("Describe what you see and hear.", videos=[video], video_audio=[wav5], use_audio_in_video=True)
    padded = ref.prepare(["Hello there, what is this?", "Hi"], chat=False)
    worst = {}

    def diff(what, x, y):
        d = float((x.float().to(d0) - y.float().to(d0)).abs().max()) if x.numel() else 0.0
        worst[what] = d
        print(f"{what:40s} max |diff| {d:.3g}")

    with torch.no_grad():
        diff("logits", ref(inp), placed(inp))
        diff("logits, padded batch", ref(padded), placed(padded))
        la, ca = ref.run_with_cache(inp)
        lb, cb = placed.run_with_cache(inp, device=d0)
        assert set(ca.keys()) == set(cb.keys())
        diff("run_with_cache (every hook)", torch.stack([(ca[k].float() - cb[k].float()).abs().max() for k in ca.keys()]),
             torch.zeros(len(ca), device=d0))
        L = ref.cfg.n_layers
        ko = lambda m: knockout_hooks(m, "last_prompt", "video", range(0, L))  # noqa: E731
        diff("knockout last_prompt->video, prefill", ref.run_with_hooks(inp, fwd_hooks=ko(ref)),
             placed.run_with_hooks(inp, fwd_hooks=ko(placed)))
    gk = lambda m: knockout_hooks(m, "generated", "video", range(L // 2, L))  # noqa: E731
    ga = ref.generate(inp, max_new_tokens=8, fwd_hooks=gk(ref), return_logits=True, stop_at_eos=False)
    gb = placed.generate(inp, max_new_tokens=8, fwd_hooks=gk(placed), return_logits=True, stop_at_eos=False)
    diff("knockout generated->video, generate: tokens", ga.new_tokens, gb.new_tokens)
    diff("knockout generated->video, step logits", torch.stack(ga.logits), torch.stack(gb.logits))
    res = []
    for m in (ref, placed):
        pair = counterfactual_pair(m, video, wav5, wav3, "Describe.", system_prompt=None)
        res.append(patch_by_modality(m, pair.factual, pair.counterfactual, lambda lg: lg[0, -1, :5].float().sum(),
                                     components=("resid_pre", "attn_out", "z"), sets=("audio", "video"), progress=False))
    for comp in ("resid_pre", "attn_out", "z"):
        diff(f"patch_by_modality {comp}", res[0][comp], res[1][comp])
    la, lb = (logit_lens(m, inp, "audio", targets=[5, 7], k=3) for m in (ref, placed))
    diff("logit lens target probabilities", la.target_prob, lb.target_prob)
    bad = {k: v for k, v in worst.items() if v > a.tol}
    print("OK: placed == single-GPU" if not bad else f"FAILED (> tol {a.tol}): {bad}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
