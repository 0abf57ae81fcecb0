"""Attention flow at long context: peak memory against a plain forward, measured in the same run.

A study-like input — ~3,000 video tokens, 250 audio tokens and a text prompt (a 10 s clip of Qwen2.5-Omni) —
on a random-weight model, with precomputed encoder outputs so that only the backbone runs. Each mode runs
in a fresh subprocess; the figure is the growth of the process's peak RSS during the forward (and the
total peak). Modes:

* ``plain``: ``model(inputs)``, SDPA attention, no hooks;
* ``flow``: the same forward with :class:`AttentionFlow` hooks (query = text positions, all layers, rows method);
* ``flow_generated``: flow for the last prompt token (the study's generated-token query, one row per step);
* ``pattern``: for contrast, flow read from ``hook_pattern`` (the model materialises each layer's T x T pattern).

    python benchmarks/bench_attention_flow.py --video 3072 --audio 250 --layers 8 --width 512
"""

import argparse
import json
import subprocess
import sys
import tempfile

from common import add_model_args, build_from_args, reset_peak, status_mb


def long_input(model, n_video: int, n_audio: int):
    """A study-like AVInput (video, audio, text prompt) with precomputed random encoder outputs, on the model's
    device and in its dtype: ``n_video`` is rounded down to whole 256-token frames."""
    import torch

    from av_lens import AVInput

    tok = model.cfg.tokens
    t, side = max(1, n_video // 256), 32  # grid (t, 32, 32) -> t * 16 * 16 merged tokens
    n_video = t * 256
    n_mel = 4 * n_audio
    text = model.to_tokens("<|im_start|>user\nDescribe what you see and hear.<|im_end|>\n<|im_start|>assistant\n")[0].cpu()
    ids = torch.cat([text[:3], torch.tensor([tok.vision_bos] + [tok.video] * n_video + [tok.vision_eos]
                                            + [tok.audio_bos] + [tok.audio] * n_audio + [tok.audio_eos]), text[3:]])
    data = dict(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                video_grid_thw=torch.tensor([[t, side, side]]), video_second_per_grid=torch.tensor([0.5]),
                input_features=torch.zeros(1, 128, n_mel), feature_attention_mask=torch.ones(1, n_mel, dtype=torch.long))
    inp = AVInput.from_processor_output(data, tok)
    inp = AVInput(**{**{f: getattr(inp, f) for f in inp.__dataclass_fields__}, "input_features": None,
                     "feature_attention_mask": None})
    g = torch.Generator().manual_seed(0)
    dt = model.cfg.dtype
    inp = inp.with_encoder_outputs({"video": torch.randn(n_video, model.cfg.d_model, generator=g).to(dt),
                                    "audio": torch.randn(n_audio, model.cfg.d_model, generator=g).to(dt)})
    return inp.to(model.device)


def flow_hooks(model, mode: str) -> list:
    """The hooks of one mode: plain (none), flow (query = text, rows), flow_generated (last prompt token, rows),
    pattern (query = text, read from hook_pattern)."""
    from av_lens.analysis.attention_flow import AttentionFlow

    if mode == "plain":
        return []
    query, method = {"flow": ("text", "rows"), "flow_generated": ("last_prompt", "rows"),
                     "pattern": ("text", "pattern")}[mode]
    return AttentionFlow(model, query, method=method).hooks()


def child(folder: str, mode: str, n_video: int, n_audio: int) -> dict:
    import torch

    from av_lens import HookedAVTransformer

    torch.set_num_threads(2)
    model = HookedAVTransformer.from_pretrained(folder)
    inp = long_input(model, n_video, n_audio)
    hooks = flow_hooks(model, mode)
    before = reset_peak()
    with torch.no_grad():
        model.run_with_hooks(inp, fwd_hooks=hooks, return_type=None)
    peak = status_mb("VmHWM")
    return {"mode": mode, "tokens": inp.shape[1], "before_mb": before, "peak_mb": peak, "growth_mb": peak - before}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", type=int, default=3072)
    ap.add_argument("--audio", type=int, default=250)
    add_model_args(ap, layers=8, width=512, heads=8, kv=2, ffn=1536, vocab=32000)
    ap.add_argument("--modes", default="plain,flow,flow_generated,pattern")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_from_args(tmp, a)
        rows = []
        for mode in a.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, mode, str(a.video), str(a.audio)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"model: {a.layers} layers, width {a.width}, {a.heads} heads ({a.kv} kv), random weights, fp32, CPU; "
          f"{base['tokens']} tokens ({a.video} video, {a.audio} audio)")
    print(f"{'mode':>16} {'peak MB':>9} {'growth MB':>10} {'peak / plain':>13} {'growth / plain':>15}")
    for r in rows:
        print(f"{r['mode']:>16} {r['peak_mb']:9.0f} {r['growth_mb']:10.0f} {r['peak_mb'] / base['peak_mb']:13.3f} "
              f"{r['growth_mb'] / base['growth_mb']:15.3f}")


if __name__ == "__main__":
    main()
