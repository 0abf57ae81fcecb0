"""Analysis costs against their ideal, measured in one run: knockout sweeps, generation under a knockout, caching.

* knockout sweep of W windows (``knockout_sweep``: one encoder pass, a baseline pass, W knocked-out passes)
  vs the ideal: one encoder pass + (W + 1) language-model-only passes with precomputed encoder outputs;
* greedy generation tokens/s with generated->video knocked out in every layer vs plain generation;
* ``run_with_cache`` with one filtered hook and with the full cache: time, and peak-RSS growth (each in a
  fresh subprocess) vs a plain forward.

Random weights, fp32, CPU. Input: an audio-visual prompt (video + its soundtrack interleaved) padded with a
long text prompt to ``--text`` words.

    python benchmarks/bench_analysis.py --layers 8 --width 512 --windows 8
"""

import argparse
import json
import subprocess
import sys
import tempfile

from common import add_model_args, build_from_args, reset_peak, status_mb, timed


def av_prompt(model, text_words, seconds):
    """An audio-visual prompt: ``seconds`` of random video (2 fps, 56x56) with its soundtrack interleaved,
    and a text prompt of about ``text_words`` words; on the model's device."""
    import numpy as np

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (int(2 * seconds), 56, 56, 3), dtype=np.uint8)
    wav = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    prompt = " ".join(["describe the picture and the sound"] * max(1, text_words // 6))
    return model.prepare(prompt, videos=[frames], video_audio=[wav], fps=2.0, use_audio_in_video=True)


def setup(folder, text_words, seconds):
    import torch

    from av_lens import HookedAVTransformer

    torch.set_num_threads(2)
    model = HookedAVTransformer.from_pretrained(folder)
    return model, av_prompt(model, text_words, seconds)


def child(folder, mode, text_words, seconds):
    import torch

    model, inp = setup(folder, text_words, seconds)
    enc = model.encode(inp)
    before = reset_peak()
    with torch.no_grad():
        if mode == "plain":
            model(enc)
        elif mode == "one_hook":
            model.run_with_cache(enc, names_filter=f"blocks.{model.cfg.n_layers // 2}.hook_resid_post")
        elif mode == "full_cache":
            model.run_with_cache(enc)
    peak = status_mb("VmHWM")
    return {"mode": mode, "growth_mb": peak - before, "peak_mb": peak}


def main():
    ap = argparse.ArgumentParser()
    add_model_args(ap, layers=8, width=512, heads=8, kv=2, ffn=1536, vocab=32000)
    ap.add_argument("--text", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), float(a.child[3]))))
        return
    import torch

    from av_lens.analysis import knockout_hooks, knockout_sweep, sliding_windows

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_from_args(tmp, a)
        model, inp = setup(tmp, a.text, a.seconds)
        T = inp.shape[1]
        counts = inp.layout.counts()
        W = min(a.windows, a.layers)
        windows = sliding_windows(a.layers, 1)[:W]
        metric = lambda logits, _: logits[0, -1, 0]  # noqa: E731
        with torch.no_grad():
            t_enc = timed(lambda: model.encode(inp), a.reps)
            enc = model.encode(inp)
            t_lm = timed(lambda: model(enc), a.reps)
            t_sweep = timed(lambda: knockout_sweep(model, inp, "last_prompt", "video", windows, metric,
                                                    progress=False), a.reps)
            ideal = t_enc + (W + 1) * t_lm
            rows.append(("knockout sweep, %d windows (s)" % W, t_sweep, ideal, t_sweep / ideal))
            ko = knockout_hooks(model, "generated", "video")
            t_gen = timed(lambda: model.generate(enc, max_new_tokens=a.tokens, stop_at_eos=False), a.reps)
            t_gen_ko = timed(lambda: model.generate(enc, max_new_tokens=a.tokens, stop_at_eos=False, fwd_hooks=ko),
                             a.reps)
            rows.append(("generate %d tokens, G->V knocked out (tok/s)" % a.tokens, a.tokens / t_gen_ko,
                         a.tokens / t_gen, t_gen_ko / t_gen))
            t_one = timed(lambda: model.run_with_cache(enc, names_filter=f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"), a.reps)
            t_full = timed(lambda: model.run_with_cache(enc), a.reps)
            rows.append(("run_with_cache, one hook (s)", t_one, t_lm, t_one / t_lm))
            rows.append(("run_with_cache, full cache (s)", t_full, t_lm, t_full / t_lm))
        mem = {}
        for mode in ("plain", "one_hook", "full_cache"):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, mode, str(a.text), str(a.seconds)],
                                 capture_output=True, text=True, check=True)
            mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = mem["plain"]
    print(f"model: {a.layers} layers, width {a.width}, {a.heads} heads ({a.kv} kv), vocab {a.vocab}, random weights, "
          f"fp32, CPU 2 threads; input {T} tokens {counts}; medians of {a.reps}")
    print(f"{'measurement':48} {'av_lens':>10} {'baseline':>10} {'ratio':>7}   baseline")
    names = ["1 encoder pass + (W+1) LM-only passes", "plain generate", "plain forward", "plain forward"]
    for (name, v, b, r), bn in zip(rows, names):
        print(f"{name:48} {v:10.3f} {b:10.3f} {r:7.3f}   {bn}")
    for mode in ("one_hook", "full_cache"):
        m = mem[mode]
        print(f"{'peak RSS, ' + mode + ' (MB)':48} {m['peak_mb']:10.0f} {base['peak_mb']:10.0f} "
              f"{m['peak_mb'] / base['peak_mb']:7.3f}   plain forward (growth {m['growth_mb']:.0f} vs {base['growth_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
