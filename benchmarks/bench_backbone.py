"""Backbone forward: av_lens vs transformers on the same random weights, measured in one run.

Prints one table of median wall times and ratios against transformers' eager and sdpa thinkers
(text-only prompts, so the towers do not run). Default size: Qwen2.5-0.5B language-model dimensions
(24 layers, width 896, 14 heads / 2 kv heads, FFN 4864), fp32 on the CPU.

    python benchmarks/bench_backbone.py --seq 512 --batch 1 --reps 3
"""

import argparse
import tempfile

import torch
from common import add_model_args, build_from_args, timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    add_model_args(ap, layers=24, width=896, heads=14, kv=2, ffn=4864, vocab=151936)
    a = ap.parse_args()
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as HF

    from av_lens import HookedAVTransformer

    with tempfile.TemporaryDirectory() as d:
        build_from_args(d, a)
        ours = HookedAVTransformer.from_pretrained(d)
        eager = HF.from_pretrained(d, attn_implementation="eager").eval()
        sdpa = HF.from_pretrained(d, attn_implementation="sdpa").eval()
    ids = torch.randint(20, 390, (a.batch, a.seq))
    inp = ours.to_input(ids)
    hf_kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    pattern_hook = [(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)]
    rows = {}
    with torch.no_grad():
        rows["transformers eager"] = timed(lambda: eager(**hf_kw), a.reps)
        rows["transformers sdpa"] = timed(lambda: sdpa(**hf_kw), a.reps)
        rows["av_lens, no hooks (sdpa path)"] = timed(lambda: ours(inp), a.reps)
        rows["av_lens, hook on every hook_pattern"] = timed(lambda: ours.run_with_hooks(inp, fwd_hooks=pattern_hook), a.reps)
        rows["av_lens, cache of one resid_post"] = timed(
            lambda: ours.run_with_cache(inp, names_filter=f"blocks.{a.layers // 2}.hook_resid_post"), a.reps)
    e, s = rows["transformers eager"], rows["transformers sdpa"]
    print(f"backbone forward, {a.layers} layers x {a.width}, batch {a.batch}, seq {a.seq}, fp32, "
          f"{torch.get_num_threads()} threads, median of {a.reps}")
    print(f"{'variant':40s} {'seconds':>8s} {'/eager':>7s} {'/sdpa':>7s}")
    for k, v in rows.items():
        print(f"{k:40s} {v:8.3f} {v / e:7.2f} {v / s:7.2f}")


if __name__ == "__main__":
    main()
