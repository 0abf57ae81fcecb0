"""Steering the organism's hearing: does adding (sound A − sound B) at the audio positions make it hear A?

    python -m av_lens.organism.steering [--clips 16] [--seed 7]

For every class pair (B, A = the next class), the direction is the mean residual at the audio positions of
audio-only clips of A minus that of clips of B (:func:`~av_lens.analysis.steering.mean_difference`, per
residual-stream index). Fresh audio-only clips of B are asked "what do you hear ?"; the direction is added at
their audio positions in one layer at a time, at several coefficients, and the table reports how often the
greedy answer becomes A's sound word ("flip") — beside the same sweep with a random direction of equal norm
per layer (the control). Directions are built on clips of one seed stream and tested on another.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from av_lens.organism import world

COEFFS = (0.5, 1.0, 2.0, 4.0)


def steering_study(model, *, n_clips: int = 16, seed: int = 7, coeffs=COEFFS, pairs=None,
                   progress: bool = False) -> dict:
    """Flip rates [layer, coeff] of the mean-difference direction and of the random control, averaged over
    class pairs (B -> A); also the rate at which the answer stays B."""
    from av_lens.analysis.steering import mean_difference, random_direction_like, steering_sweep
    from av_lens.organism.evaluate import clip_inputs

    rng = np.random.default_rng(seed)
    pairs = pairs or [((c + 1) % world.N_CLASSES, c) for c in range(world.N_CLASSES)]   # (A, B)
    L = model.cfg.n_layers
    tot = {k: torch.zeros(L, len(coeffs)) for k in ("flip", "random_flip", "stays", "random_stays")}
    base_ok = 0.0

    def clips(c):
        return clip_inputs(model, [world.make_clip(c, c, rng) for _ in range(n_clips)], "hear", "audio")

    for a, b in pairs:
        d = mean_difference(model, clips(a), clips(b), at="audio")
        test = clips(b)
        ta = model.tokenizer.convert_tokens_to_ids(world.SOUNDS[a])
        tb = model.tokenizer.convert_tokens_to_ids(world.SOUNDS[b])
        metric = lambda logits, _: torch.stack([(logits[:, -1].argmax(-1) == t).float() for t in (ta, tb)])  # noqa
        for name, dd in (("", d), ("random_", random_direction_like(d, seed=a * 31 + b))):
            sw = steering_sweep(model, test, dd, "audio", layers=range(L), coeffs=coeffs, metric=metric,
                                progress=progress)
            v = sw.values.mean(-1)                      # [layer, coeff, 2]
            tot[name + "flip"] += v[..., 0] / len(pairs)
            tot[name + "stays"] += v[..., 1] / len(pairs)
        base_ok += float(sw.baseline[1].mean()) / len(pairs)
    return {"n_clips": n_clips, "n_pairs": len(pairs), "seed": seed, "coeffs": list(coeffs), "layers": list(range(L)),
            "unsteered_hears_B": round(base_ok, 4), **{k: v.round(decimals=4).tolist() for k, v in tot.items()}}


def format_steering(res: dict) -> str:
    rows = [f"Steering (sound A - sound B) at the audio positions of audio-only clips of B; {res['n_pairs']} class "
            f"pairs x {res['n_clips']} clips; unsteered answer B: {res['unsteered_hears_B']:.2f}",
            "", "| layer | " + " | ".join(f"×{c:g}: A (random)" for c in res["coeffs"]) + " |",
            "|---" * (len(res["coeffs"]) + 1) + "|"]
    for l in res["layers"]:
        rows.append(f"| {l} | " + " | ".join(f"{res['flip'][l][j]:.2f} ({res['random_flip'][l][j]:.2f})"
                                             for j in range(len(res["coeffs"]))) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from av_lens import HookedAVTransformer

    ap = argparse.ArgumentParser(description="Steer the organism's audio positions from one sound to another.")
    ap.add_argument("--model", default="av-lens/organism", help="checkpoint name or folder (default: the organism)")
    ap.add_argument("--clips", type=int, default=16, help="clips per class for each direction and test set")
    ap.add_argument("--seed", type=int, default=7, help="seed of the clip stream (default 7)")
    ap.add_argument("--json", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    model = HookedAVTransformer.from_pretrained(args.model)
    res = steering_study(model, n_clips=args.clips, seed=args.seed)
    print(format_steering(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
