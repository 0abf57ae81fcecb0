"""Backbone forward: av_lens vs transformers on the same random weights, measured in one run.

Prints one table of median wall times and ratios against transformers' eager and sdpa thinkers
(text-only prompts, so the towers do not run). Default size: Qwen2.5-0.5B language-model dimensions
(24 layers, width 896, 14 heads / 2 kv heads, FFN 4864), fp32 on the CPU.

    python benchmarks/bench_backbone.py --seq 512 --batch 1 --reps 3
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def build(folder, layers, width, heads, kv, ffn, vocab):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from av_lens.testing.tiny import TinySpec, build_tiny_processor, build_tiny_tokenizer, tiny_thinker_config

    tok = build_tiny_tokenizer()
    spec = TinySpec(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=kv, d_mlp=ffn,
                    mrope_section=(16, 24, 24) if width // heads == 128 else _sections(width // heads))
    cfg = tiny_thinker_config(spec, tok)
    cfg.text_config.vocab_size = vocab
    torch.manual_seed(0)
    Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval().save_pretrained(folder)
    build_tiny_processor(tok).save_pretrained(folder)


def _sections(d_head):
    half = d_head // 2
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


def timed(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=4864)
    ap.add_argument("--vocab", type=int, default=151936)
    a = ap.parse_args()
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as HF

    from av_lens import HookedAVTransformer

    with tempfile.TemporaryDirectory() as d:
        build(d, a.layers, a.width, a.heads, a.kv, a.ffn, a.vocab)
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
            lambda: ours.run_with_cache(inp, names_filter="blocks.10.hook_resid_post"), a.reps)
    e, s = rows["transformers eager"], rows["transformers sdpa"]
    print(f"backbone forward, {a.layers} layers x {a.width}, batch {a.batch}, seq {a.seq}, fp32, "
          f"{torch.get_num_threads()} threads, median of {a.reps}")
    print(f"{'variant':40s} {'seconds':>8s} {'/eager':>7s} {'/sdpa':>7s}")
    for k, v in rows.items():
        print(f"{k:40s} {v:8.3f} {v / e:7.2f} {v / s:7.2f}")


if __name__ == "__main__":
    main()
