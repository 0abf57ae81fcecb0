"""Cost of attribution patching against one forward + backward and against exhaustive patching, in one run.

Rows (one random-weight Qwen2.5-Omni thinker of the given LM dims, an audio-visual prompt: video + its
soundtrack interleaved + text; clean and corrupted differ in the soundtrack and the frames):

* ``AtP, every layer x head x set`` — ``attribution_patch(components=("resid_pre", "attn_out", "mlp_out", "z"),
  sets=(audio, video, text))`` / one forward + backward of the corrupted input (target <= 3);
* ``EAP, every layer x head x sender x receiver`` — ``edge_attribution`` / one forward + backward;
* ``exhaustive head patching`` — ``patch_by_modality(components=("z",))`` over the same layer x head x set nodes
  / one forward + backward (what AtP replaces; measured, not extrapolated);
* peak memory (CPU: VmHWM; CUDA: max allocated) of AtP / a plain forward, and AtP's peak growth.

Timing: each variant runs ``--repeats`` times after a warm-up, interleaved with the baseline; the row reports
the median ratio with its min-max.

    python benchmarks/bench_attribution.py --quick                 # tiny dims, checks the script (< 1 min)
    python benchmarks/bench_attribution.py --seconds 8             # 0.5B LM dims, ~300 tokens
    python benchmarks/bench_attribution.py --seconds 12 --frame-side 476 --repeats 1 --skip-exhaustive --skip-eap
                                                                    # ~3.8k tokens (3.5k video + 300 audio)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import add_model_args, build_from_args, peak_read, peak_start  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, layers=24, width=896, heads=14, kv=2, ffn=4864, vocab=151936)  # Qwen2.5-0.5B LM dims
    ap.add_argument("--seconds", type=float, default=8.0, help="clip length (2 fps video + soundtrack)")
    ap.add_argument("--text", type=int, default=24, help="words of text prompt")
    ap.add_argument("--frame-side", type=int, default=56,
                    help="frame height and width in pixels (56: 4 video tokens per second; 476: 289)")
    ap.add_argument("--skip-eap", action="store_true",
                    help="do not time EAP (it keeps every layer's attention pattern: 4 B x heads x tokens^2 each)")
    ap.add_argument("--star", action="store_true", help="also time AtP* (recompute_qk + grad_drop, q/k nodes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny dims and one repeat: checks the script")
    ap.add_argument("--skip-exhaustive", action="store_true", help="do not time exhaustive head patching")
    ap.add_argument("--exhaustive-layers", type=int, default=None, metavar="N",
                    help="time exhaustive head patching over the first N layers only (its cost is one forward per "
                         "node, so the row also gives the whole model's by scaling with the node count)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if a.quick:
        a.layers, a.width, a.heads, a.kv, a.ffn, a.vocab, a.seconds, a.repeats = 2, 64, 4, 2, 128, 512, 2.0, 1
    return a


def main(argv=None) -> int:
    import numpy as np
    import torch

    from av_lens import HookedAVTransformer
    from av_lens.analysis import attribution_patch, edge_attribution, patch_by_modality

    a = parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build_from_args(tmp, a)
        model = HookedAVTransformer.from_pretrained(tmp, device=a.device)
    if a.frame_side > 56:  # the tiny processor caps frames at 56 x 56 pixels: let larger frames through whole
        from transformers.image_utils import SizeDict

        vp = model.processor.video_processor
        vp.size = SizeDict(shortest_edge=vp.size.shortest_edge, longest_edge=a.frame_side * a.frame_side)
    rng = np.random.default_rng(0)
    n_frames = int(2 * a.seconds)
    prompt = " ".join(["describe the picture and the sound"] * max(1, a.text // 6))

    def clip():
        frames = rng.integers(0, 255, (n_frames, a.frame_side, a.frame_side, 3), dtype=np.uint8)
        wav = (0.1 * rng.standard_normal(int(16000 * a.seconds))).astype(np.float32)
        return model.prepare(prompt, videos=[frames], video_audio=[wav], fps=2.0, use_audio_in_video=True).to(a.device)

    clean, corrupted = model.encode(clip()), model.encode(clip())
    W = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(0)).to(a.device)
    metric = lambda logits: (logits[:, -1] * W).sum(-1).mean()  # noqa: E731
    sets = ("audio", "video", "text")

    def fwd_bwd():
        with torch.enable_grad():
            out = model.run_with_hooks(corrupted, fwd_hooks=[
                ("blocks.0.hook_resid_pre", lambda r, hook: r.detach().requires_grad_(True))])
            metric(out).backward()

    variants = {
        "AtP, every layer x head x set (resid_pre, attn_out, mlp_out, z)": lambda: attribution_patch(
            model, clean, corrupted, metric, components=("resid_pre", "attn_out", "mlp_out", "z"), sets=sets),
    }
    if not a.skip_eap:
        variants["EAP, every layer x head x {audio, video, text} -> last prompt"] = lambda: edge_attribution(
            model, clean, corrupted, metric, senders=sets, receivers=("last_prompt",))
    if a.star:
        variants["AtP*, every layer x head x set (+ q, k recomputed, GradDrop)"] = lambda: attribution_patch(
            model, clean, corrupted, metric, components=("resid_pre", "attn_out", "mlp_out", "z", "q", "k"), sets=sets,
            recompute_qk=True, grad_drop=True)
    if not a.skip_exhaustive:
        n_ex = a.exhaustive_layers or a.layers
        label = ("every layer x head x set" if n_ex == a.layers else
                 f"{n_ex} of {a.layers} layers x head x set (measured)")
        variants[f"exhaustive head patching, {label}"] = lambda: patch_by_modality(
            model, clean, corrupted, metric, components=("z",), sets=sets, progress=False, layers=list(range(n_ex)))
    rows = []
    fwd_bwd()
    for name, fn in variants.items():
        fn()  # warm-up
        ratios, base_t = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter(); fwd_bwd(); tb = time.perf_counter() - t0  # noqa: E702
            t0 = time.perf_counter(); fn(); tv = time.perf_counter() - t0  # noqa: E702
            ratios.append(tv / tb)
            base_t.append(tb)
        rows.append({"row": name + " / one forward+backward", "ratio": statistics.median(ratios),
                     "min": min(ratios), "max": max(ratios), "baseline_s": statistics.median(base_t),
                     "target": 3.0 if name.startswith("AtP,") else None})
        if "(measured)" in name:  # cost is linear in the number of nodes: the whole model's, scaled
            f = a.layers / (a.exhaustive_layers or a.layers)
            rows[-1]["note"] = f"x {f:g} for all {a.layers} layers: {statistics.median(ratios) * f:.0f}"
    with torch.no_grad():
        base0 = peak_start(a.device)
        model(corrupted)
        plain = peak_read(a.device) - base0
    base1 = peak_start(a.device)
    attribution_patch(model, clean, corrupted, metric, components=("resid_pre", "attn_out", "mlp_out", "z"), sets=sets)
    atp_peak = peak_read(a.device) - base1
    # a forward that fits in memory the process already holds shows no growth: no ratio then, only the figures
    rows.append({"row": "AtP peak memory growth / plain forward's", "ratio": atp_peak / plain if plain >= 1 else None,
                 "min": None, "max": None, "baseline_s": None, "target": None,
                 "note": f"AtP +{atp_peak:.0f} MB, forward +{plain:.0f} MB"})
    n_tokens = clean.layout.shape[1]
    head = (f"attribution cost: LM {a.layers} layers x d{a.width} ({a.heads} heads / {a.kv} kv), {n_tokens} tokens, "
            f"{a.device}, {a.repeats} rounds")
    print(head)
    print(f"{'row':<96} {'ratio':>7} {'range':>13} {'target':>7}")
    for r in rows:
        rng_s = f"{r['min']:.2f}-{r['max']:.2f}" if r["min"] is not None else ""
        tgt = f"<= {r['target']:g}" if r["target"] else ""
        ratio = f"{r['ratio']:7.2f}" if r["ratio"] is not None else f"{'-':>7}"
        print(f"{r['row']:<96} {ratio} {rng_s:>13} {tgt:>7} {r.get('note', '')}")
    if a.json:
        Path(a.json).write_text(json.dumps({"header": head, "tokens": n_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
