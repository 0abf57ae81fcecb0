"""The ``av-lens`` command line.

``av-lens demo`` runs the whole data path offline on the embedded model organism (a small trained
Qwen2.5-Omni thinker, docs/organism.md): synthetic media -> native encoders -> modality layout -> hooked
backbone -> analyses (attention flow, logit lens, knockout) -> a printed summary, on a factual clip and its
counterfactual (same picture, another class's sound).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def demo(model_path: str | None = None, max_new_tokens: int = 4, look: int = 0, sound: int = 1) -> int:
    """The study in miniature on the organism: a clip of ``look`` with its own sound and with ``sound``'s."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from av_lens import HookedAVTransformer
    from av_lens.analysis import attention_flow, knockout_hooks, logit_lens
    from av_lens.organism import world
    from av_lens.organism.evaluate import clip_inputs, first_answer

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    name = model_path or "av-lens/organism"
    model = HookedAVTransformer.from_pretrained(name)
    cfg = model.cfg
    print(f"model: {name} | {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
          f"({cfg.n_key_value_heads} kv), {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    rng = np.random.default_rng(2026)
    frames = world.frames(look, rng)
    fact = world.Clip(look, look, frames, world.sound(look, rng))
    cf = world.Clip(look, sound, frames, world.sound(sound, rng))
    print(f"clip: a {world.OBJECTS[look]} ({world.N_FRAMES} frames, {world.SIDE}x{world.SIDE}, {world.SECONDS:.0f} s) "
          f"with its own sound ({world.SOUNDS[look]}) = factual, and with a {world.SOUNDS[sound]} = counterfactual")
    inp = clip_inputs(model, [cf], "hear", "av")
    L = inp.layout
    print(f"\ntokens: {L.counts()}\nmodality layout (run-length):\n" + L.summary())

    print("\nanswers (greedy):")
    for tag, clip in (("factual", fact), ("counterfactual", cf)):
        see = first_answer(model, clip_inputs(model, [clip], "see", "av"))[0]
        hear = first_answer(model, clip_inputs(model, [clip], "hear", "av"))[0]
        cap = model.generate(clip_inputs(model, [clip], "describe", "av"), max_new_tokens=max_new_tokens).text[0]
        print(f"  {tag:15s} see -> {see:7s} hear -> {hear:7s} describe -> {cap.strip()!r}")

    flow = attention_flow(model, inp, "last_prompt", keys={"audio": "audio", "video": "video",
                                                           "text": "prompt - audio - video"})
    print("\nattention from the last prompt token (counterfactual 'what do you hear ?'), mean over heads:")
    print(flow.table())
    lens = logit_lens(model, inp, "audio", k=5, targets=[world.SOUNDS[sound], world.SOUNDS[look]])
    best = lens.target_rank.min(dim=1).values  # [layer, target]: best rank over audio positions
    print(f"\nlogit lens at the {L.count('audio')} audio positions: best rank of the sound playing "
          f"({world.SOUNDS[sound]}) / the picture's sound ({world.SOUNDS[look]}) by layer:")
    for l, (r_true, r_pic) in zip(lens.layers, best.tolist()):
        print(f"  layer {l}: {r_true:4d} / {r_pic:4d}")
    sid = model.to_single_token(world.SOUNDS[sound])
    print("\nknockout last prompt token -/-> video tokens from layer l on: p(sound playing) at the answer")
    with torch.no_grad():
        p0 = model(inp)[0, -1].softmax(-1)[sid]
        print(f"  no knockout: {p0:.3f}")
        for l in range(cfg.n_layers):
            logits = model.run_with_hooks(inp, fwd_hooks=knockout_hooks(model, "last_prompt", "video", range(l, cfg.n_layers)))
            print(f"  from layer {l}: {logits[0, -1].softmax(-1)[sid]:.3f} -> answers "
                  f"{model.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax()))}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="av-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the data path end to end, offline, and print what it saw")
    d.add_argument("--model", default=None, help="an organism-compatible checkpoint (default: av-lens/organism)")
    d.add_argument("--max-new-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.model, args.max_new_tokens)
    return 2


if __name__ == "__main__":
    sys.exit(main())
