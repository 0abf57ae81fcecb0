"""Cost of training and splicing a sparse dictionary against the plain forward, in one run.

Rows (one random-weight Qwen2.5-Omni thinker of the given LM dims; an audio-visual prompt; a TopK dictionary of
``--expansion`` x d_model features at ``blocks.{L//2}.hook_resid_post``, all positions):

* ``collect`` — the forward that captures the training rows / a plain forward (time);
* ``train step`` — rows per second of dictionary training (Adam, minibatch ``--minibatch``), with the plain
  forward's tokens per second beside it;
* ``spliced forward`` (error term on) / plain forward (time);
* peak memory growth of a spliced forward vs a plain forward (CPU: VmHWM; CUDA: max allocated).

    python benchmarks/bench_sae.py --quick            # tiny dims, checks the script
    python benchmarks/bench_sae.py                    # Qwen2.5-0.5B LM dims
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


def main(argv=None) -> int:
    import numpy as np
    import torch

    from av_lens import HookedAVTransformer
    from av_lens.sae import DictionaryConfig, SparseDictionary, collect_rows, splice
    from av_lens.sae.training import _loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, layers=24, width=896, heads=14, kv=2, ffn=4864, vocab=151936)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--minibatch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.quick:
        a.layers, a.width, a.heads, a.kv, a.ffn, a.vocab, a.seconds, a.repeats, a.minibatch = 2, 64, 4, 2, 128, 512, 2.0, 1, 128
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build_from_args(tmp, a)
        model = HookedAVTransformer.from_pretrained(tmp)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (int(2 * a.seconds), 56, 56, 3), dtype=np.uint8)
    wav = (0.1 * rng.standard_normal(int(16000 * a.seconds))).astype(np.float32)
    inp = model.encode(model.prepare("describe the picture and the sound", videos=[frames], video_audio=[wav],
                                     fps=2.0, use_audio_in_video=True))
    hook = f"blocks.{a.layers // 2}.hook_resid_post"
    sae = SparseDictionary(DictionaryConfig(d_in=a.width, d_sae=a.expansion * a.width, architecture="topk", k=a.k,
                                            hook_name=hook))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    X, _, _ = collect_rows(model, inp, hook, "all")
    var = ((X - X.mean(0)) ** 2).sum(-1).mean()
    n_tok = X.shape[0]

    def plain():
        with torch.no_grad():
            model(inp)

    def collect():
        collect_rows(model, inp, hook, "all")

    def step():
        idx = torch.randint(0, n_tok, (a.minibatch,))
        loss, _ = _loss(sae, X[idx], X[idx], 0.0, var)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def spliced():
        with torch.no_grad(), splice(model, sae):
            model(inp)

    def t(fn):
        s = time.perf_counter()
        fn()
        return time.perf_counter() - s

    for fn in (plain, collect, step, spliced):
        fn()
    rows = []
    P, C, S, T = [], [], [], []
    for _ in range(a.repeats):
        P.append(t(plain)); C.append(t(collect)); S.append(t(spliced)); T.append(t(step))  # noqa: E702
    med = statistics.median
    rows.append({"row": "collect training rows / plain forward (time)", "ratio": med(c / p for c, p in zip(C, P))})
    rows.append({"row": "spliced forward, error term on / plain forward (time)", "ratio": med(s / p for s, p in zip(S, P))})
    rows.append({"row": f"training rows/s (minibatch {a.minibatch}) vs plain forward tokens/s",
                 "ratio": (a.minibatch / med(T)) / (n_tok / med(P)),
                 "note": f"{a.minibatch / med(T):,.0f} rows/s vs {n_tok / med(P):,.0f} tokens/s"})
    with torch.no_grad():
        b0 = peak_start()
        model(inp)
        g_plain = peak_read() - b0
        b1 = peak_start()
        with splice(model, sae):
            model(inp)
        g_spl = peak_read() - b1
    rows.append({"row": "spliced forward peak growth / plain forward's", "ratio": g_spl / g_plain if g_plain >= 1 else None,
                 "note": f"spliced +{g_spl:.0f} MB, plain +{g_plain:.0f} MB"})
    head = (f"dictionary cost: LM {a.layers} layers x d{a.width}, {n_tok} tokens, TopK {a.expansion}x (k {a.k}) at "
            f"{hook}, cpu, {a.repeats} rounds")
    print(head)
    for r in rows:
        v = f"{r['ratio']:8.2f}" if r["ratio"] is not None else f"{'-':>8}"
        print(f"{r['row']:<72} {v}  {r.get('note', '')}")
    if a.json:
        Path(a.json).write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
