"""The av-lens command line: reports on clips, the offline demo, knockout sweeps.

av-lens report writes one self-contained HTML file with every view of a clip or a factual/counterfactual pair
(a video file and audio files, or the built-in pair); av-lens demo is that report on the built-in pair with
the embedded model organism (docs/organism.md), offline, printing the file's path and a text summary.
av-lens sweep runs the study's knockout protocol (or attribution patching, --analysis atp) over many clip
pairs, sharded over torchrun ranks and resumable (av_lens.sweeps, docs/cluster.md).
The data path in one pass: media -> native encoders -> modality layout -> hooked backbone -> analyses -> views.

Nothing heavy is imported at module level: ``av-lens --help`` must not pay for torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from av_lens.errors import AVLensError

ORGANISM = "av-lens/organism"
DTYPES = ("fp32", "bf16", "fp16")

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


def check_device(name: str) -> None:
    """Refuse a --device that torch would not understand, before any model loads."""
    import re

    from av_lens.errors import InputError

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(name)):
        raise InputError(f"--device {name!r} is not a device", "pass cpu, cuda, cuda:N, mps or auto")


def _check_report_args(args) -> None:
    """Everything of ``report`` / ``demo`` that can be checked before a model loads."""
    from av_lens.errors import InputError
    from av_lens.hub import resolve_folder

    check_out(args.out, "file")
    check_device(getattr(args, "device", "cpu"))
    fps, side = getattr(args, "fps", 2.0), getattr(args, "max_side", 448)
    if not (0 < fps < float("inf")):
        raise InputError(f"--fps must be a positive number, got {fps}", "pass e.g. --fps 2")
    if side < 1:
        raise InputError(f"--max-side must be at least 1 pixel, got {side}", "pass e.g. --max-side 448")
    sae = getattr(args, "sae", None)
    if sae is not None and (not sae.strip() or not (Path(sae) / "cfg.json").is_file()):
        why = ("is empty" if not sae.strip() else "is a file, not a folder" if Path(sae).is_file() else
               "no such folder" if not Path(sae).is_dir() else "the folder has no cfg.json")
        raise InputError(f"--sae {sae or repr(sae)}: {why}",
                         "pass a folder written by SparseDictionary.save or SAELens's save_model "
                         "(cfg.json + sae_weights.safetensors)")
    for opt, name in (("--model", args.model), ("--base", args.base)):
        if name is None or (opt == "--base" and name == "none"):
            continue
        try:
            resolve_folder(name)
        except AVLensError as e:
            raise type(e)(f"{opt}: {e.problem}", e.fix) from None



DESCRIPTION = """\
TransformerLens-style interpretability for audio-visual LLMs.

  av-lens demo      the report on a built-in factual/counterfactual pair, on the embedded
                    model organism, offline (no download)
  av-lens report    the same self-contained HTML report for your own clip (mp4, webm, mkv,
                    wav, flac, mp3, ... decoded with PyAV)
  av-lens sweep     a knockout sweep over many clip pairs (torchrun-sharded, resumable)

Run "av-lens COMMAND --help" for a command's options."""

EPILOG = """\
examples:
  av-lens demo                                    writes av_lens_demo.html, prints a summary
  av-lens report --video clip.mp4                 your clip with its own soundtrack
  av-lens report --video clip.mp4 --counterfactual-audio other.wav
                                                  compare the clip with another soundtrack
  av-lens report --video long.mp4 --start 12 --duration 4
                                                  a 4-second window of a longer clip
  av-lens report --video clip.mp4 --model /ckpt/Qwen2.5-Omni-3B --device cuda --dtype bf16
  av-lens report --video clip.mp4 --sae my_sae/   add a sparse dictionary's features (SAELens format)
  torchrun --nproc-per-node 4 -m av_lens.cli sweep --model Qwen/Qwen2.5-Omni-7B --out runs/ko7b

docs: README.md, docs/organism.md (the organism), docs/cluster.md (sweeps), docs/errors.md"""

REPORT_DESCRIPTION = """\
Write one self-contained HTML report (open it in any browser, offline) for a clip, or for a
factual/counterfactual pair: the same frames with two soundtracks.

Clip length: the model hears at most its feature extractor's window (the embedded organism:
6 s). A longer clip is trimmed to that window, with a note; choose the window with --start and
--duration. A counterfactual soundtrack is trimmed or padded with silence to the clip's length,
with a note. Media are decoded and checked before any model loads.

Without --video the report runs on the built-in pair (a synthetic dog clip with its bark, and the
same frames with a bell's ring), as av-lens demo does, and says so."""

DEMO_DESCRIPTION = """\
The report on the built-in factual/counterfactual pair (a synthetic dog clip with its bark, and the
same frames with a bell's ring) with the embedded model organism and its base VLM: offline, about
a minute on 2 CPU cores. Writes the HTML report and prints a text summary."""

SWEEP_DESCRIPTION = """\
Run (or resume) the study's knockout protocol over many clip pairs into one table, or with
--analysis atp attribution patching of each pair (factual into counterfactual). Under torchrun
every rank takes a shard; rows are written as they finish, and a rerun skips what is done
(docs/cluster.md)."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; wider option column."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(100, max(60, _terminal_width())))

    def _split_lines(self, text, width):  # do not break "av-lens/organism" at its hyphen
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def _version() -> str:
    from av_lens import __version__

    return __version__


# --------------------------------------------------------------------------------------------- helpers
def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load(name: str | None, default: str, args=None):
    from av_lens import HookedAVTransformer

    kwargs = {}
    if args is not None:
        kwargs = {"dtype": _torch_dtype(args.dtype), "device": _device(args.device)}
    return HookedAVTransformer.from_pretrained(name or default, **kwargs)


def clip_limit_seconds(model: str | None) -> float | None:
    """The longest audio the model's feature extractor keeps, read from its processor config without loading
    anything heavy; None when the checkpoint is not a local folder (the model then checks the clip itself)."""
    name = model or ORGANISM
    from av_lens.organism import CHECKPOINTS, checkpoint_root

    folder = checkpoint_root() / CHECKPOINTS[name] if name in CHECKPOINTS else Path(name)
    for fname in ("processor_config.json", "preprocessor_config.json"):
        f = folder / fname
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            fe = cfg.get("feature_extractor", cfg)
            n, sr = fe.get("n_samples"), fe.get("sampling_rate")
            if n and sr:
                return float(n) / float(sr)
    return None


def _seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (x >= 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a non-negative, finite number of seconds")
    return x


def load_user_clip(args, log=print):
    """Decode and check the user's media (before any model loads); trim to the model's window with a note."""
    import numpy as np

    from av_lens.errors import InputError
    from av_lens.media import load_audio, load_clip
    from av_lens.report import ClipMedia

    if args.duration is not None and args.duration <= 0:
        raise InputError(f"--duration {args.duration:g} is not a positive number of seconds",
                         "pass e.g. --duration 4 (or leave it out: the model's window)")
    limit = clip_limit_seconds(args.model)
    if args.duration is not None and limit is not None and args.duration > limit + 1e-6:
        raise InputError(f"--duration {args.duration:g} s is longer than the {limit:g} s this model hears",
                         f"pass --duration {limit:g} or less")
    window = args.duration if args.duration is not None else limit
    start = args.start or 0.0
    # decode a little past the window, to tell whether anything was cut
    read = None if window is None else start + window + 0.25
    mc = load_clip(args.video, args.audio, fps=args.fps, max_side=args.max_side, max_seconds=read)
    frames, audio, sr = mc.frames, mc.audio, mc.sr
    total_audio = len(audio) / sr
    if start:
        if start >= total_audio:
            raise InputError(f"--start {start:g} s is past the end of the clip ({total_audio:.2f} s of audio)",
                             f"pass a --start below {total_audio:.2f}")
        frames = frames[int(round(start * mc.fps)):]
        audio = audio[int(round(start * sr)):]
    if window is not None:
        n_audio, n_frames = int(round(window * sr)), max(1, int(window * mc.fps + 1e-6))
        cut = len(audio) > n_audio or len(frames) > n_frames
        if cut:
            audio, frames = audio[:n_audio], frames[:n_frames]
            why = (f"--duration {window:g} s" if args.duration is not None
                   else f"the model hears at most {window:g} s; choose the window with --start/--duration")
            log(f"note: the clip is trimmed to {start:g}-{start + len(audio) / sr:.2f} s ({why})")
    if len(frames) == 0 or len(audio) == 0:
        raise InputError(f"the window {start:g} s + {window} s of {args.video!r} holds no frames or no audio",
                         "pass a smaller --start, or a longer clip")
    clip = ClipMedia(np.ascontiguousarray(frames), mc.fps, audio, "factual" if args.counterfactual_audio else "clip")
    cf = None
    if args.counterfactual_audio:
        other = load_audio(args.counterfactual_audio, sr=sr, max_seconds=start + len(audio) / sr + 0.25)
        other = other[int(round(start * sr)):] if start and len(other) > start * sr else other
        n = len(audio)
        if len(other) != n:
            verb = "padded with silence" if len(other) < n else "trimmed"
            log(f"note: the counterfactual soundtrack ({len(other) / sr:.2f} s) is {verb} to the clip's "
                f"{n / sr:.2f} s so both inputs have the same positions")
            other = other[:n] if len(other) > n else np.concatenate([other, np.zeros(n - len(other), other.dtype)])
        cf = ClipMedia(clip.frames, mc.fps, other, "counterfactual")
    return clip, cf


# -------------------------------------------------------------------------------------------- commands
def report(args) -> int:
    """Write the HTML report for a clip (or a factual/counterfactual pair) and print its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    _check_report_args(args)
    if args.threads is not None and args.threads < 1:
        from av_lens.errors import InputError

        raise InputError(f"--threads {args.threads} is not a positive number of threads", "pass e.g. --threads 1")
    if args.video is None:
        if args.audio or args.counterfactual_audio:
            from av_lens.errors import InputError

            raise InputError("--audio / --counterfactual-audio need a --video to go with",
                             "pass --video FILE (its own soundtrack is used unless --audio is given)")
        from av_lens.report import builtin_pair

        clip, cf = builtin_pair()
        if args.cmd == "report":
            print("no --video given: running on the built-in pair, as av-lens demo does "
                  "(pass --video FILE for your own clip)")
        print("input: the built-in pair (a synthetic dog clip with its bark, and with a bell's ring)")
    else:
        clip, cf = load_user_clip(args)
    # models load after the arguments and media are checked, so a bad input is refused at once
    from transformers.utils import logging as hf_logging

    import torch

    from av_lens.report import build_report

    hf_logging.disable_progress_bar()
    threads = args.threads
    if threads is None and args.model in (None, ORGANISM) and "OMP_NUM_THREADS" not in os.environ:
        threads = 1  # a 1.2 M-parameter model gains nothing from threads, and loses much on a busy machine
    if threads:
        torch.set_num_threads(threads)
    sae = None
    if args.sae is not None:  # read before the models load: a broken dictionary is refused at once
        from av_lens.sae import SparseDictionary

        sae = SparseDictionary.load(args.sae)
    model = _load(args.model, ORGANISM, args)
    base = None
    if args.base != "none":
        default_base = "av-lens/organism-base" if args.model in (None, ORGANISM) else None
        if args.base or default_base:
            base = _load(args.base, default_base, args)
    summary = build_report(model, clip, cf, base=base, out=args.out, progress=not args.quiet,
                           probe_clips=0 if args.no_probes else 48, sae=sae)
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


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``av-lens`` argument parser (tests enumerate its options)."""
    parser = _Parser(prog="av-lens", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"av-lens {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, helptext, desc in (
            ("demo", "the report on the built-in pair, on the embedded organism, offline", DEMO_DESCRIPTION),
            ("report", "an HTML report for your own clip (or a factual/counterfactual pair)", REPORT_DESCRIPTION)):
        d = sub.add_parser(name, help=helptext, description=desc, formatter_class=_Formatter,
                           epilog=EPILOG.split("\n\n")[0] if name == "report" else None)
        g = d.add_argument_group("model")
        g.add_argument("--model", default=None, metavar="M",
                       help="checkpoint folder, hub id or embedded name (default: av-lens/organism)")
        g.add_argument("--base", default=None, metavar="M",
                       help="base model for the token-shift view; 'none' to skip (default: av-lens/organism-base "
                            "for the organism, none otherwise)")
        g.add_argument("--device", default="cpu", metavar="D",
                       help="cpu, cuda, cuda:N, or auto (a GPU if there is one) (default: %(default)s)")
        g.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights and activations (default: %(default)s)")
        g.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch (default: 1 for the embedded organism unless OMP_NUM_THREADS is "
                            "set, torch's default otherwise)")
        o = d.add_argument_group("output")
        o.add_argument("--out", default="av_lens_demo.html" if name == "demo" else "av_lens_report.html", metavar="FILE",
                       help="the HTML file to write (default: %(default)s)")
        o.add_argument("--no-probes", action="store_true",
                       help="skip the linear-probe stage (probes trained on the organism's labelled synthetic clips, "
                            "not on your clip)")
        o.add_argument("--quiet", action="store_true", help="no progress bar")
        o.add_argument("--sae", default=None, metavar="DIR",
                       help="a sparse dictionary folder (SAELens format: cfg.json + sae_weights.safetensors) trained "
                            "on this model: adds its features most active on the clip, with frame thumbnails and "
                            "waveform snippets")
        if name == "report":
            m = d.add_argument_group("media")
            m.add_argument("--video", default=None, metavar="FILE",
                           help="video file (mp4, webm, mkv, mov, ...); its soundtrack is used unless --audio "
                                "(default: the built-in pair)")
            m.add_argument("--audio", default=None, metavar="FILE",
                           help="audio file (wav, flac, mp3, ...) to use as the clip's soundtrack")
            m.add_argument("--counterfactual-audio", default=None, metavar="FILE",
                           help="another soundtrack for the same frames: the report then compares the pair "
                                "(trimmed or padded with silence to the clip's length)")
            m.add_argument("--start", type=_seconds, default=0.0, metavar="S",
                           help="seconds to skip at the start of the clip (default: %(default)g)")
            m.add_argument("--duration", type=_seconds, default=None, metavar="S",
                           help="seconds to keep from --start (default: the model's window, 6 s for the organism; "
                                "longer clips are trimmed with a note)")
            m.add_argument("--fps", type=float, default=2.0, help="frames per second sampled from the video "
                                                                 "(default: %(default)g)")
            m.add_argument("--max-side", type=int, default=448, metavar="PX",
                           help="downscale frames so the longer side fits (default: %(default)d)")
    s = sub.add_parser("sweep", help="knockout sweep over many clip pairs (torchrun-sharded, resumable)",
                       description=SWEEP_DESCRIPTION, formatter_class=_Formatter)
    s.add_argument("--model", default=ORGANISM, metavar="M", help="checkpoint folder, hub id or embedded name "
                                                                   "(default: %(default)s)")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: per-rank row files, sweep.json, table.jsonl (required)")
    s.add_argument("--pairs", type=int, default=16, help="organism clip pairs, ignored with --manifest (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the organism pairs (default: %(default)s)")
    s.add_argument("--question", default="describe", help="organism question: describe, hear or see (default: %(default)s)")
    s.add_argument("--manifest", default=None, metavar="FILE",
                   help="JSONL of real clip pairs (see av_lens.sweeps.manifest_samples) instead of organism pairs")
    s.add_argument("--windows", default=None, help="knockout windows as half-open start:stop layer ranges "
                                                   "(Python slices), e.g. 0:2,2:4 = layers 0-1 and 2-3; a lone N is "
                                                   "layer N (default: every single layer)")
    s.add_argument("--knockouts", default="generated:video,generated:audio",
                   help="query:keys groups to cut (default: %(default)s)")
    s.add_argument("--conditions", default="factual,counterfactual", help="which clip of each pair (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=4, metavar="N", help="tokens generated per item (default: %(default)s)")
    s.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default: %(default)s)")
    s.add_argument("--device", default="auto", help="auto (this rank's GPU by LOCAL_RANK, else cpu), cpu, cuda:N "
                                                    "(default: %(default)s)")
    s.add_argument("--gpus-per-rank", type=int, default=1, metavar="N",
                   help="with --device auto: spread each rank's model over this many GPUs (default: %(default)s)")
    a = s.add_argument_group("attribution (--analysis atp)")
    a.add_argument("--analysis", default="knockout", choices=("knockout", "atp"),
                   help="knockout: the study's knockout protocol; atp: attribution patching (AtP) of each pair, "
                        "factual into counterfactual, one row per pair (default: %(default)s)")
    a.add_argument("--components", default="resid_pre,attn_out,mlp_out,z",
                   help="with --analysis atp: the nodes to estimate, comma-separated (default: %(default)s)")
    a.add_argument("--atp-metric", default="logit_diff", choices=("logit_diff", "caption"),
                   help="with --analysis atp: logit of the factual sound's word minus the counterfactual's, or the "
                        "factual caption's teacher-forced log-probability (default: %(default)s)")
    a.add_argument("--atp-star", action="store_true",
                   help="with --analysis atp: AtP* (q/k patterns recomputed, GradDrop magnitudes; L more passes)")
    s.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "demo":
        args.video = args.audio = args.counterfactual_audio = None
    try:
        return sweep(args) if args.cmd == "sweep" else report(args)
    except AVLensError as e:
        print(f"av-lens {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
