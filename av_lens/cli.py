"""The ``av-lens`` command line.

``av-lens report`` writes one self-contained HTML file with every view of a clip or a factual/counterfactual
pair (video file + audio files, or the built-in pair); ``av-lens demo`` is that report on the built-in pair
with the embedded model organism (docs/organism.md), offline, printing the file's path and a text summary.
``av-lens sweep`` runs the study's knockout protocol over many clip pairs, sharded over ``torchrun`` ranks and
resumable (av_lens.sweeps, docs/cluster.md).
The data path in one pass: media -> native encoders -> modality layout -> hooked backbone -> analyses -> views.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from av_lens.errors import AVLensError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option like every other refused input: ``av-lens <command>: <problem>.
    Fix: <fix>`` on stderr, exit status 2 (after the usage line), never a traceback."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        fix = f"run `{self.prog} --help` for the options and the values they take"
        if "required" in message:
            fix = f"add the missing option(s); {fix}"
        elif "invalid" in message:
            fix = f"give the option a value of the right type; {fix}"
        elif "unrecognized" in message or "ignored explicit argument" in message:
            fix = f"check the spelling (flags such as --quiet take no value); {fix}"
        self.exit(2, f"{self.prog}: {message.rstrip('.')}. Fix: {fix}\n")


def check_out(path: str, kind: str = "file") -> None:
    """Refuse an output path that cannot be written, before any computation: a directory (or file) where the
    other is wanted, a parent that is a file, a missing or read-only folder, an empty path."""
    from pathlib import Path

    from av_lens.errors import InputError

    if not str(path).strip():
        raise InputError("--out is empty", "pass an output path, e.g. --out report.html")
    p = Path(path).expanduser()
    if kind == "file" and p.is_dir():
        raise InputError(f"--out {str(p)!r} is a directory, not a file",
                         f"pass a file path, e.g. --out {str(p / 'av_lens_report.html')!r}")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise InputError(f"--out {str(p)!r} is a file, not a folder", "pass a folder path (it is created if missing)")
    anc = p if kind == "folder" else p.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise InputError(f"--out {str(p)!r} lies under {str(anc)!r}, which is a file", "pass a path in a folder")
    if kind == "file" and not p.parent.exists():
        raise InputError(f"the folder of --out {str(p)!r} does not exist", f"create it first (mkdir -p {p.parent})")
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=anc, prefix=".av_lens_write_check_")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"cannot write to {str(anc)!r} for --out {str(p)!r} ({e.strerror or e})",
                         "pass an --out in a folder you can write to") from None


def _check_report_args(args) -> None:
    """Everything of ``report`` / ``demo`` that can be checked before a model loads."""
    from av_lens.errors import InputError
    from av_lens.loading import resolve_folder

    check_out(args.out, "file")
    fps, side = getattr(args, "fps", 2.0), getattr(args, "max_side", 448)
    if not (0 < fps < float("inf")):
        raise InputError(f"--fps must be a positive number, got {fps}", "pass e.g. --fps 2")
    if side < 1:
        raise InputError(f"--max-side must be at least 1 pixel, got {side}", "pass e.g. --max-side 448")
    for opt, name in (("--model", args.model), ("--base", args.base)):
        if name is None or (opt == "--base" and name == "none"):
            continue
        try:
            resolve_folder(name)
        except AVLensError as e:
            raise type(e)(f"{opt}: {e.problem}", e.fix) from None


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
    _check_report_args(args)
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


def sweep(args) -> int:
    """Run (or resume) a knockout sweep; under torchrun every rank calls this and rank 0 writes the table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from av_lens import sweeps

    hf_logging.disable_progress_bar()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        sweeps.run(args, log=log)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``av-lens`` argument parser (tests enumerate its options)."""
    parser = _Parser(prog="av-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
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
    s = sub.add_parser("sweep", help="knockout sweep over many clip pairs (torchrun-sharded, resumable) into one table")
    s.add_argument("--model", default="av-lens/organism", help="checkpoint folder, hub id or embedded name")
    s.add_argument("--out", required=True, help="output folder: per-rank row files, sweep.json, table.jsonl")
    s.add_argument("--pairs", type=int, default=16, help="organism clip pairs (ignored with --manifest)")
    s.add_argument("--seed", type=int, default=0, help="seed of the organism pairs")
    s.add_argument("--question", default="describe", help="organism question (describe, hear, see)")
    s.add_argument("--manifest", default=None, help="JSONL of real clip pairs (see av_lens.sweeps.manifest_samples)")
    s.add_argument("--windows", default=None, help="knockout windows as half-open start:stop layer ranges "
                                                   "(Python slices), e.g. 0:2,2:4 = layers 0-1 and 2-3; a lone N is "
                                                   "layer N (default: every single layer)")
    s.add_argument("--knockouts", default="generated:video,generated:audio", help="query:keys groups to cut")
    s.add_argument("--conditions", default="factual,counterfactual")
    s.add_argument("--max-new-tokens", type=int, default=4)
    s.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16")
    s.add_argument("--device", default="auto", help="auto (this rank's GPU by LOCAL_RANK, else cpu), cpu, cuda:N")
    s.add_argument("--gpus-per-rank", type=int, default=1, help="with --device auto: spread each rank's model "
                                                                 "over this many GPUs (planned device map)")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "sweep":
        try:
            return sweep(args)
        except AVLensError as e:
            print(f"av-lens {args.cmd}: {e}", file=sys.stderr)
            return 2
    if args.cmd == "demo":
        args.video = args.audio = args.counterfactual_audio = None
    try:
        return report(args)
    except AVLensError as e:
        print(f"av-lens {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
