"""The ``av-lens`` command line.

``av-lens demo`` runs the whole data path offline — media, native encoders, modality layout, hooked
backbone, cache, a modality-level analysis, generation — and prints what it saw. Until the trained model
organism lands it runs on a tiny RANDOM-weight Qwen2.5-Omni thinker built on the spot (and says so):
the numbers show the machinery, not model behaviour. ``--model`` runs it on any checkpoint folder or hub id.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _synthetic_clip(seconds: float = 4.0, fps: float = 2.0, side: int = 56):
    """A red square sliding right, and a 440 Hz tone with a 3 Hz tremolo (16 kHz mono)."""
    import numpy as np

    n = int(seconds * fps)
    frames = np.zeros((n, side, side, 3), np.uint8)
    for t in range(n):
        x = int(4 + t * (side - 20) / max(n - 1, 1))
        frames[t, 20:36, x:x + 16] = (220, 40, 40)
    ts = np.arange(int(seconds * 16000)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 440 * ts) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * ts))).astype(np.float32)
    return frames, wav


def attention_mass_hooks(model, layout, query_sel="last_prompt"):
    """Hooks that reduce each layer's pattern inside the forward to the mass the query positions give to
    audio / video / other keys (no pattern is kept). Returns (hooks, result dict layer -> [3])."""
    import torch

    masks = [layout.mask(s)[0] for s in ("audio", "video", "all but audio|video")]
    q = layout.positions(query_sel)
    out: dict[int, torch.Tensor] = {}

    def hook(pattern, hook):
        p = pattern[0, :, q].float().mean(dim=(0, 1))  # mean over heads and queries -> [key]
        out[int(hook.name.split(".")[1])] = torch.stack([p[m.to(p.device)].sum() for m in masks]).cpu()

    return [(lambda n: n.endswith("attn.hook_pattern"), hook)], out


def demo(model_path: str | None = None, max_new_tokens: int = 8) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from av_lens import HookedAVTransformer

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="av_lens_demo_") as tmp:
        if model_path is None:
            from av_lens.testing.tiny import TinySpec, save_tiny_qwen2_5_omni

            print("NOTE: no trained model is embedded yet, so this demo runs on a tiny RANDOM-weight "
                  "Qwen2.5-Omni thinker\n      (real architecture and processor, meaningless weights). "
                  "The numbers show the machinery, not model behaviour.\n")
            model_path = str(save_tiny_qwen2_5_omni(os.path.join(tmp, "tiny"), TinySpec(n_layers=4)))
        model = HookedAVTransformer.from_pretrained(model_path)
        cfg = model.cfg
        print(f"model: {cfg.model_name if not cfg.model_name.startswith(tmp) else 'tiny random thinker'} | "
              f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_key_value_heads} kv), "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
        frames, wav = _synthetic_clip()
        inputs = model.prepare("Describe what you see and hear.", videos=[frames], video_audio=[wav],
                               use_audio_in_video=True)
        L = inputs.layout
        print(f"\ninput: a 4 s clip (8 frames at 2 fps, 56x56) with its 4 s soundtrack, use_audio_in_video=True")
        print(f"tokens: {L.counts()}")
        print("\nmodality layout (run-length):\n" + L.summary())
        hooks, mass = attention_mass_hooks(model, L)
        with torch.no_grad():
            logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
            model.run_with_hooks(inputs, fwd_hooks=hooks)
        print("\nattention mass from the last prompt token, mean over heads (reduced inside the forward):")
        print(f"{'layer':>5s} {'audio':>8s} {'video':>8s} {'other':>8s}")
        for layer in sorted(mass):
            a, v, o = mass[layer].tolist()
            print(f"{layer:5d} {a:8.3f} {v:8.3f} {o:8.3f}")
        audio_pos = L.positions("audio")
        last = cfg.n_layers - 1
        resid = cache[f"blocks.{last}.hook_resid_post"][0, audio_pos]
        print(f"\ncache: {len(cache)} activations; audio positions at layer {last}: {tuple(resid.shape)}, "
              f"mean norm {resid.norm(dim=-1).mean():.3f}")
        gen = model.generate(inputs, max_new_tokens=max_new_tokens, stop_at_eos=False)
        print(f"\ngreedy continuation ({max_new_tokens} tokens): {gen.new_tokens[0].tolist()} -> {gen.text[0]!r}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="av-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the data path end to end, offline, and print what it saw")
    d.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny random thinker)")
    d.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.model, args.max_new_tokens)
    return 2


if __name__ == "__main__":
    sys.exit(main())
