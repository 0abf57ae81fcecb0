"""The ``av-lens`` command line.

``av-lens report`` writes one self-contained HTML file with every view of a clip or a factual/counterfactual
pair (video file + audio files, or the built-in pair); ``av-lens demo`` is that report on the built-in pair
with the embedded model organism (docs/organism.md), offline, printing the file's path and a text summary.
The data path in one pass: media -> native encoders -> modality layout -> hooked backbone -> analyses -> views.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from av_lens.errors import AVLensError


def _load(name: str | None, default: str):
    from av_lens import HookedAVTransformer

    return HookedAVTransformer.from_pretrained(name or default)


def report(args) -> int:
    """Write the HTML report for a clip (or a factual/counterfactual pair) and print its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from av_lens.report import ClipMedia, build_report, builtin_pair

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if args.video is None:
        if args.audio or args.counterfactual_audio:
            from av_lens.errors import InputError

            raise InputError("--audio / --counterfactual-audio need a --video to go with",
                             "pass --video FILE (its own soundtrack is used unless --audio is given)")
        clip, cf = builtin_pair()
        print("input: the built-in pair (a synthetic dog clip with its bark, and with a bell's ring)")
    else:
        from av_lens.media import load_audio, load_clip

        mc = load_clip(args.video, args.audio, fps=args.fps, max_side=args.max_side)
        clip = ClipMedia(mc.frames, mc.fps, mc.audio, "factual" if args.counterfactual_audio else "clip")
        cf = None
        if args.counterfactual_audio:
            other = load_audio(args.counterfactual_audio)
            from av_lens.analysis.pairs import match_length

            other, _ = match_length(other, len(mc.audio))
            cf = ClipMedia(mc.frames, mc.fps, other, "counterfactual")
    # models load after the arguments and media are checked, so a bad input is refused at once
    model = _load(args.model, "av-lens/organism")
    base = None
    if args.base != "none":
        default_base = "av-lens/organism-base" if args.model in (None, "av-lens/organism") else None
        if args.base or default_base:
            base = _load(args.base, default_base)
    summary = build_report(model, clip, cf, base=base, out=args.out, progress=not args.quiet)
    print(summary.text())
    print(f"done in {time.perf_counter() - t0:.1f} s; open {summary.path} in a browser")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="av-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("demo", "the report on the built-in factual/counterfactual pair, offline, with a summary"),
                           ("report", "write one self-contained HTML report for a clip or a factual/counterfactual pair")):
        d = sub.add_parser(name, help=helptext)
        d.add_argument("--model", default=None, help="checkpoint folder, hub id or embedded name (default: av-lens/organism)")
        d.add_argument("--base", default=None, help="base model for the token-shift view (default for the organism: "
                                                   "av-lens/organism-base; 'none' to skip)")
        d.add_argument("--out", default="av_lens_demo.html" if name == "demo" else "av_lens_report.html")
        d.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "report":
            d.add_argument("--video", default=None, help="video file (mp4, webm, ...); its soundtrack is used unless --audio")
            d.add_argument("--audio", default=None, help="audio file (wav, flac, ...) to use as the clip's soundtrack")
            d.add_argument("--counterfactual-audio", default=None, help="another soundtrack for the same frames: "
                                                                        "the report then compares the pair")
            d.add_argument("--fps", type=float, default=2.0, help="frame sampling rate")
            d.add_argument("--max-side", type=int, default=448, help="downscale frames so the longer side fits")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        args.video = args.audio = args.counterfactual_audio = None
    try:
        return report(args)
    except AVLensError as e:
        print(f"av-lens {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
