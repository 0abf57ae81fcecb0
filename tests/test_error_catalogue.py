"""The error catalogue: bad inputs across media, processor inputs, layout, hooks, loading, analyses and the CLI,
each answered by an error whose message names the problem and, after ``Fix:``, what to do instead.

One table (``CASES``), one parametrized test. Each case builds the bad input and triggers the error; the test
checks the exception type, that the message has exactly one ``Fix:``, and the fragments on each side of it.
``docs/errors.md`` documents the same cases, by id (:func:`test_docs_list_every_case` keeps them in sync).
CLI cases run ``python -m av_lens.cli`` in a subprocess and expect exit status 2 with the message on stderr.

Separately, :func:`test_failed_report_save_leaves_nothing_half_written` and
:func:`test_failed_checkpoint_save_leaves_nothing_half_written` make a save fail midway and check that the target
folder holds no partial or temporary file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from av_lens import AVLensError, AVLensWarning, CheckpointError, HookedAVTransformer, HookNameError, InputError, LayoutError, MediaError
from av_lens.analysis import (AttentionFlow, KeywordScorer, attention_flow, LinearProbe, LLMJudgeScorer, counterfactual_pair,
                              fidelity, head_ablation_hooks, knockout_hooks, knockout_sweep, logit_lens,
                              patch_by_modality, path_patch_hooks, pooled_residuals, probe_layers, require_aligned,
                              sliding_windows, token_shift)
from av_lens.analysis.pairs import JudgeReplyError
from av_lens.media import load_audio, load_clip, load_video
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs
from av_lens import utils as _tl_utils
from av_lens.placement import plan_device_map
from av_lens.weights import process_weights as _process_weights
from av_lens.sweeps import SweepError, gather, parse_windows, study_items
from conftest import cases, padded_batch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


class CLIExit(Exception):
    """The message an ``av-lens`` command printed on stderr when it exited with status 2 (a refused input)."""


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # media | inputs | layout | hooks | loading | analyses | cli
    build: Callable[[SimpleNamespace], object]  # gets the context (model, media, files, tmp); triggers the error
    exc: type[BaseException]
    problem: tuple[str, ...]  # fragments that must appear before "Fix:"
    fix: tuple[str, ...]  # fragments that must appear after "Fix:"


# ------------------------------------------------------------------------------------------------ helpers
def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=rate)
        s.layout = "mono"
        f = av.AudioFrame.from_ndarray((np.clip(samples, -1, 1) * 32767).astype(np.int16)[None], format="s16",
                                       layout="mono")
        f.sample_rate = rate
        for p in [*s.encode(f), *s.encode()]:
            c.mux(p)
    return path


def _write_silent_film(path: Path, n: int = 4, fps: int = 2) -> Path:
    """An mp4 with a video stream and no audio stream."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _checkpoint(ctx, name: str, edit: Callable[[Path], None]) -> Path:
    """A copy of the tiny checkpoint, broken by ``edit``."""
    d = ctx.tmp / "ckpt" / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ctx.tiny_dir, d)
    edit(d)
    return d


def _bare_folder(ctx, name: str, config: str | None) -> Path:
    d = ctx.tmp / "ckpt" / name
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(config)
    return d


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")


def _edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        w = load_file(d / "model.safetensors")
        change(w)
        save_file(w, d / "model.safetensors")
    return edit


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda w: w.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda w: w.__delitem__(key)


_AUDIO_LLMS: dict = {}


def _audio_llm(ctx, family: str):
    """A tiny Qwen2-Audio or Audio Flamingo 3 (built once)."""
    if family not in _AUDIO_LLMS:
        from av_lens.testing.tiny_audio import save_tiny_audioflamingo3, save_tiny_qwen2_audio

        save = save_tiny_qwen2_audio if family == "qwen2_audio" else save_tiny_audioflamingo3
        _AUDIO_LLMS[family] = HookedAVTransformer.from_pretrained(save(ctx.tmp / "ckpt" / family))
    return _AUDIO_LLMS[family]


_AV_FAMILIES: dict = {}


def _av_family(ctx, name: str):
    """A tiny video-SALMONN-2+ ("salmonn"), VideoLLaMA2-AV ("vl2") or its vision-only base ("vl2_base"), built once."""
    if name not in _AV_FAMILIES:
        from av_lens.testing.tiny_salmonn import save_tiny_video_salmonn2
        from av_lens.testing.tiny_videollama2 import save_tiny_videollama2

        d = ctx.tmp / "ckpt" / name
        folder = (save_tiny_video_salmonn2(d) if name == "salmonn" else save_tiny_videollama2(d, audio=name == "vl2"))
        _AV_FAMILIES[name] = HookedAVTransformer.from_pretrained(folder)
    return _AV_FAMILIES[name]


def _vl2_vocab_too_small(ctx) -> Path:
    """A tiny VideoLLaMA2 folder whose vocabulary has no room above the tokenizer for av_lens's media ids."""
    from av_lens.testing.tiny_videollama2 import save_tiny_videollama2

    d = save_tiny_videollama2(ctx.tmp / "ckpt" / "vl2_full_vocab")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] - 7  # one id above the tokenizer's last
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _without(inp, *drop: str) -> dict:
    """The processor dict behind an AVInput, minus some entries."""
    return {k: v for k, v in inp.hf_kwargs().items() if k not in ("use_audio_in_video", *drop)}


def _drop_position(inp, token: int, which: int = 0) -> dict:
    """The processor dict of ``inp`` with the ``which``-th occurrence of ``token`` cut out of the text."""
    data = _without(inp)
    ids = data["input_ids"]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[int((ids[0] == token).nonzero()[which])] = False
    data["input_ids"], data["attention_mask"] = ids[:, keep], data["attention_mask"][:, keep]
    return data


def _load(path, **kw):
    return HookedAVTransformer.from_pretrained(path, **kw)


def _offline(fn):
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
        return fn()


def _identity(x, hook):
    return x


def _cache(ctx, *names: str):
    return ctx.model.run_with_cache(ctx.text, names_filter=list(names))[1]


def _toy_features(n: int = 20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, n, 8, generator=g), torch.arange(n) % 2


def _long_and_short(ctx):
    kw = dict(text="Describe.", videos=[ctx.media["video"]], use_audio_in_video=True)
    return (ctx.model.prepare(video_audio=[ctx.media["wav5"]], **kw),
            ctx.model.prepare(video_audio=[ctx.media["wav3"]], **kw))


def _metric(logits):
    return logits[0, -1, 0]


def _with_env(env: dict, fn):
    with mock.patch.dict(os.environ, env):
        return fn()


def _with_inf(ctx, key: str) -> torch.Tensor:
    w = load_file(ctx.tiny_dir / "model.safetensors")[key].clone()
    w.view(-1)[7] = float("inf")
    return w


def _silent_hub():
    """snapshot_download that never returns (an endpoint that accepts and never answers), with a 0.5 s limit."""
    import threading

    never = threading.Event()
    with mock.patch("huggingface_hub.snapshot_download", side_effect=lambda *a, **k: never.wait(30)):
        try:
            return _with_env({"AV_LENS_HUB_TIMEOUT": "0.5", "HF_HUB_OFFLINE": "0"}, lambda: _load("someone/slow-model"))
        finally:
            never.set()


def _short_context(ctx, fn, n: int = 16):
    with mock.patch.object(ctx.model.cfg, "n_ctx", n):
        return fn()


def _metric2(logits, inputs):
    return logits[0, -1, 0]


# --------------------------------------------------------------------------------------------------- CLI
#: CLI case id -> its arguments (given the context); all of them start together on the first CLI case
CLI = {
    "cli-audio-without-video": lambda ctx: ["report", "--audio", str(ctx.files["tone"])],
    "cli-video-not-a-media-file": lambda ctx: ["report", "--video", str(ctx.files["notes"])],
    "cli-model-missing-folder": lambda ctx: ["demo", "--model", str(ctx.tmp / "no_such_model")],
    "cli-sae-missing-folder": lambda ctx: ["demo", "--sae", str(ctx.tmp / "no_such_sae")],
    "cli-sweep-window-outside-layers": lambda ctx: ["sweep", "--windows", "0:9", "--out", str(ctx.tmp / "sweep-out")],
    "cli-out-is-a-directory": lambda ctx: ["demo", "--out", str(ctx.tmp)],
    "cli-out-under-a-file": lambda ctx: ["report", "--out", str(ctx.files["notes"] / "report.html")],
    "cli-sweep-out-is-a-file": lambda ctx: ["sweep", "--out", str(ctx.files["notes"])],
    "cli-sweep-knockout-selector-typo": lambda ctx: ["sweep", "--knockouts", "generated:vidoe",
                                                     "--out", str(ctx.tmp / "sweep-typo")],
    "cli-sweep-knockout-matches-nothing": lambda ctx: ["sweep", "--knockouts", "generated:image", "--pairs", "1",
                                                       "--out", str(ctx.tmp / "sweep-image")],
    "cli-sweep-window-old-form": lambda ctx: ["sweep", "--windows", "0-3", "--out", str(ctx.tmp / "sweep-old")],
    "cli-option-bad-type": lambda ctx: ["sweep", "--pairs", "many", "--out", str(ctx.tmp / "sweep-type")],
    "cli-report-fps-zero": lambda ctx: ["report", "--fps", "0", "--out", str(ctx.tmp / "r.html")],
    "cli-report-duration-over-window": lambda ctx: ["report", "--video", str(ctx.files["tone"]), "--duration", "9"],
    "cli-report-threads-zero": lambda ctx: ["demo", "--threads", "0"],
}


def _cli(case_id: str) -> Callable[[SimpleNamespace], None]:
    def build(ctx) -> None:
        if not ctx.cli:  # each run imports torch (~6 s); run them side by side
            for cid, args in CLI.items():
                cwd = ctx.tmp / "cli" / cid
                cwd.mkdir(parents=True)
                ctx.cli[cid] = (cwd, args(ctx)[0], subprocess.Popen(
                    [sys.executable, "-m", "av_lens.cli", *args(ctx)], cwd=cwd, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}))
        cwd, cmd, proc = ctx.cli[case_id]
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"exit status {proc.returncode}; stderr:\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        assert not list(cwd.iterdir()), f"the failed command left {list(cwd.iterdir())}"
        lines = [l for l in err.splitlines() if l.startswith(f"av-lens {cmd}: ")]
        assert len(lines) == 1, err[-3000:]
        raise CLIExit(lines[0])
    return build


# ------------------------------------------------------------------------------------------------- cases
TOK = SimpleNamespace(audio=3, audio_bos=4, audio_eos=5)  # the tiny tokenizer's ids (checked in the ctx fixture)

CASES: list[Case] = [
    # ---- media: files (av_lens.media) -------------------------------------------------------------------
    Case("media-missing-file", "media", lambda ctx: load_video(ctx.tmp / "nope.mp4"),
         MediaError, ("video file", "nope.mp4", "does not exist"), ("check the path", "working directory")),
    Case("media-directory-as-file", "media", lambda ctx: load_clip(ctx.tmp),
         MediaError, ("is a directory, not a file",), ("path of a media file",)),
    Case("media-not-a-media-file", "media", lambda ctx: load_clip(ctx.files["notes"]),
         MediaError, ("cannot decode video file", "notes.mp4", "not a readable media file"),
         ("FFmpeg can read", "ffprobe")),
    Case("media-audio-file-as-video", "media", lambda ctx: load_video(ctx.files["tone"]),
         MediaError, ("tone.wav", "has no video stream", "audio only"), ("pass a video file", "--audio / audio_path=")),
    Case("media-video-without-soundtrack", "media", lambda ctx: load_clip(ctx.files["film"]),
         MediaError, ("silent_film.mp4", "has no audio stream"), ("separate audio file", "--audio / audio_path=")),
    Case("media-silent-soundtrack", "media", lambda ctx: load_audio(ctx.files["silence"]),
         MediaError, ("silence.wav", "is silent", "meaningless"), ("that has sound", "allow_silent=True")),
    Case("media-load-fps-zero", "media", lambda ctx: load_video(ctx.files["film"], fps=0),
         MediaError, ("fps must be a positive number", "got 0"), ("fps=2.0",)),
    # ---- media: arrays given to model.prepare ----------------------------------------------------------------
    Case("prepare-audio-is-a-path", "media", lambda ctx: ctx.model.prepare("x", audio=["clip.wav"]),
         MediaError, ("audio[0] is a str, not a waveform",), ("decode the file first", "16 kHz")),
    Case("prepare-audio-stereo", "media",
         lambda ctx: ctx.model.prepare("x", audio=[np.stack([ctx.media["wav3"]] * 2)]),
         MediaError, ("audio[0] has shape (2, 48000)", "mono waveform is 1-D"), ("mix the channels down to mono",)),
    Case("prepare-audio-empty", "media", lambda ctx: ctx.model.prepare("x", audio=[np.zeros(0, np.float32)]),
         MediaError, ("audio[0] is empty (0 samples)",), ("at least 40 ms",)),
    Case("prepare-audio-wrong-sample-rate", "media",
         lambda ctx: ctx.model.prepare("x", audio=[(ctx.media["wav3"], 44100)]),
         MediaError, ("44100 Hz", "expects 16000 Hz"), ("resample it to 16000 Hz",)),
    Case("prepare-audio-integer-samples", "media", lambda ctx: ctx.model.prepare("x", audio=[np.ones(16000, np.int16)]),
         MediaError, ("integer samples (int16)",), ("convert to float in [-1, 1]", "32768")),
    Case("prepare-audio-too-long", "media", lambda ctx: ctx.model.prepare("x", audio=[np.zeros(16000 * 31, np.float32)]),
         MediaError, ("lasts 31.0 s", "feature extractor keeps 30 s"), ("trim or split", "at most 30 s")),
    Case("prepare-video-four-channels", "media",
         lambda ctx: ctx.model.prepare("x", videos=[np.zeros((4, 56, 56, 4), np.uint8)]),
         MediaError, ("videos[0] has 4 channels",), ("RGB frames (T, H, W, 3)",)),
    Case("prepare-video-channels-first", "media",
         lambda ctx: ctx.model.prepare("x", videos=[np.zeros((4, 3, 56, 56), np.uint8)]),
         MediaError, ("videos[0] has shape (4, 3, 56, 56) (channels first)",), ("transpose to (T, H, W, 3)",)),
    Case("prepare-video-single-frame", "media", lambda ctx: ctx.model.prepare("x", videos=[ctx.media["image"]]),
         MediaError, ("videos[0] has shape (56, 56, 3)", "T x H x W x 3"), ("stack the frames", "(T, H, W, 3)")),
    Case("prepare-fps-zero", "media", lambda ctx: ctx.model.prepare("x", videos=[ctx.media["video"]], fps=0),
         MediaError, ("fps must be positive, got 0",), ("frame rate of the given frames",)),
    Case("prepare-fps-nan", "media", lambda ctx: ctx.model.prepare("x", videos=[ctx.media["video"]], fps=float("nan")),
         MediaError, ("fps must be positive, got nan",), ("frame rate of the given frames",)),
    Case("prepare-soundtracks-missing", "media",
         lambda ctx: ctx.model.prepare("x", videos=[ctx.media["video"]], use_audio_in_video=True),
         MediaError, ("use_audio_in_video=True with 1 video(s) but 0 soundtrack(s)",),
         ("one waveform per video in video_audio=[...]", "use_audio_in_video=False")),
    Case("prepare-more-audio-placeholders-than-clips", "media",
         lambda ctx: ctx.model.prepare("<|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>Hi",
                                       videos=[ctx.media["video"]], video_audio=[ctx.media["wav5"]],
                                       use_audio_in_video=True),
         MediaError, ("more <|AUDIO|> placeholders than the 0 audio clip(s)",), ("one clip per placeholder",)),
    Case("prepare-placeholder-without-media", "media",
         lambda ctx: ctx.model.prepare("<|vision_bos|><|IMAGE|><|vision_eos|>What is this?"),
         MediaError, ("processor rejected these inputs", "<|IMAGE|>", "no images"),
         ("each placeholder has its media",)),
    # ---- processor output / model inputs ---------------------------------------------------------------------
    Case("input-dict-without-input_ids", "inputs", lambda ctx: ctx.model({"attention_mask": torch.ones(1, 3)}),
         InputError, ("no 'input_ids'",), ("processor(text=..., return_tensors='pt')",)),
    Case("input-float-input_ids", "inputs", lambda ctx: ctx.model({"input_ids": torch.rand(1, 4)}),
         InputError, ("input_ids must be integer token ids", "torch.float32"), ("torch.long", "not embeddings")),
    Case("input-attention-mask-shape", "inputs",
         lambda ctx: ctx.model({"input_ids": torch.tensor([[20, 21, 22]]),
                                "attention_mask": torch.ones(1, 4, dtype=torch.long)}),
         InputError, ("attention_mask has shape (1, 4) but input_ids has (1, 3)",),
         ("attention_mask returned with these input_ids",)),
    Case("input-features-without-feature-mask", "inputs",
         lambda ctx: ctx.model(_without(ctx.audio, "feature_attention_mask")),
         InputError, ("input_features without feature_attention_mask",), ("feature_attention_mask", "each clip's length")),
    Case("input-token-outside-vocabulary", "inputs", lambda ctx: ctx.model(torch.tensor([[20, 5000]])),
         InputError, ("token ids range over [20, 5000]", "vocabulary has 400 entries"), ("this model's tokenizer",)),
    Case("input-wrong-device", "inputs",
         lambda ctx: ctx.model(dataclasses.replace(ctx.audio, input_ids=ctx.audio.input_ids.to("meta"))),
         InputError, ("'input_ids' is on meta but the model is on cpu",), ("inputs.to(model.cfg.device)",)),
    Case("input-encoder-outputs-wrong-dtype", "inputs",
         lambda ctx: ctx.model(ctx.encoded.with_encoder_outputs(
             {"audio": ctx.encoded.encoder_outputs["audio"].double()})),
         InputError, ("precomputed audio encoder outputs are torch.float64", "runs in torch.float32"),
         ("model.encode(inputs)",)),
    Case("input-not-an-input", "inputs", lambda ctx: ctx.model(3.5),
         InputError, ("cannot run the model on a float",), ("AVInput from model.prepare(...)",)),
    Case("input-no-text", "inputs", lambda ctx: ctx.model.prepare(None, audio=[ctx.media["wav3"]]),
         InputError, ("prepare() needs a text prompt",), ("text=",)),
    Case("input-generate-zero-tokens", "inputs", lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=0),
         InputError, ("max_new_tokens must be at least 1, got 0",), ("one or more tokens",)),
    Case("input-string-not-one-token", "inputs", lambda ctx: ctx.model.to_single_token("hello world foo"),
         InputError, ("'hello world foo' is", "tokens", "not one"), ("a string the tokenizer keeps whole", "token id")),
    # ---- layout and selectors --------------------------------------------------------------------------------
    Case("layout-unknown-selector", "layout", lambda ctx: ctx.audio.layout.mask("sound"),
         LayoutError, ("unknown selector 'sound'",), ("'audio'", "'all but video'")),
    Case("layout-empty-selector", "layout", lambda ctx: ctx.audio.layout.positions(""),
         LayoutError, ("empty selector string",), ("'audio'", "| & - ~ or 'but'")),
    Case("layout-not-a-selector", "layout", lambda ctx: ctx.audio.layout.mask(3),
         LayoutError, ("cannot use int 3 as a position selector",), ("'all but video'", "av_lens.S selector")),
    Case("layout-placeholder-count-mismatch", "layout", lambda ctx: ctx.model(_drop_position(ctx.audio, TOK.audio)),
         LayoutError, ("audio item 0 has 74 placeholder tokens", "300 mel frames gives 75"),
         ("model.prepare(...)", "expands each placeholder")),
    Case("layout-media-without-placeholder", "layout",
         lambda ctx: ctx.model({**_without(ctx.image, "input_ids", "attention_mask"),
                                "input_ids": torch.tensor([[20, 21, 22]])}),
         LayoutError, ("1 image input(s) given but the text has 0 image placeholder block(s)",),
         ("add one placeholder block per image input",)),
    Case("layout-missing-end-marker", "layout", lambda ctx: ctx.model(_drop_position(ctx.audio, TOK.audio_eos)),
         LayoutError, ("expected <|audio_eos|> after audio item 0",), ("close every media block", "<|audio_eos|>")),
    Case("layout-placeholder-without-start-marker", "layout", lambda ctx: ctx.model(torch.tensor([[20, TOK.audio, 21]])),
         LayoutError, ("placeholder <|AUDIO|> at index 1 is not preceded by its start marker",),
         ("<|audio_bos|><|AUDIO|><|audio_eos|>",)),
    Case("layout-input-ids-3d", "layout", lambda ctx: ctx.model(torch.ones(1, 2, 3, dtype=torch.long)),
         LayoutError, ("input_ids must be [batch, pos], got shape (1, 2, 3)",), ("[batch, pos]", "not embeddings")),
    Case("layout-sample-out-of-range", "layout", lambda ctx: ctx.audio.layout.positions("audio", batch=3),
         LayoutError, ("sample 3 is out of range", "holds 1 sample(s)"), ("batch= in 0..0",)),
    Case("layout-selector-matches-nothing", "layout",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "video", [range(0, 1)], lambda l, i: 0.0,
                                    progress=False),
         InputError, ("key selector 'video' matches no position of this input",),
         ("choose positions that exist here", "'audio': 75")),
    Case("layout-generated-outside-generate", "layout",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "generated", "audio", [range(0, 1)], lambda l, i: 0.0,
                                    progress=False),
         InputError, ("query selector 'generated' matches no position",),
         ("'generated' positions exist only inside generate()", "AVInput.extend()")),
    # ---- hooks -------------------------------------------------------------------------------------------------
    Case("hook-unknown-name", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("blocks.0.hook_resid_pots", _identity)]),
         HookNameError, ("unknown hook name 'blocks.0.hook_resid_pots'",),
         ("did you mean 'blocks.0.hook_resid_post'", "model.hook_dict.keys()")),
    Case("hook-add-hook-unknown-name", "hooks", lambda ctx: ctx.model.add_hook("hook_audio_embd", _identity),
         HookNameError, ("unknown hook name 'hook_audio_embd'",), ("did you mean 'hook_audio_embed'",)),
    Case("hook-names-filter-unknown", "hooks",
         lambda ctx: ctx.model.run_with_cache(ctx.text, names_filter=["blocks.0.attn.hook_patern"]),
         HookNameError, ("unknown hook name 'blocks.0.attn.hook_patern'",), ("did you mean 'blocks.0.attn.hook_pattern'",)),
    Case("hook-not-in-cache", "hooks", lambda ctx: _cache(ctx, "blocks.0.hook_resid_post")["blocks.1.hook_resid_post"],
         HookNameError, ("hook 'blocks.1.hook_resid_post' was not cached in this run", "holds 1 activations"),
         ("names_filter=", "names_filter=None")),
    Case("hook-cache-unknown-name", "hooks", lambda ctx: _cache(ctx, "blocks.0.hook_resid_post")["blocks.9.hook_resid_post"],
         HookNameError, ("unknown hook name 'blocks.9.hook_resid_post'",), ("did you mean", "'blocks.1.hook_resid_post'")),
    Case("hook-called-outside-forward", "hooks",
         lambda ctx: knockout_hooks(ctx.model, "last_prompt", "audio", [0])[0][1](torch.zeros(1, 1, 4, 4), None),
         InputError, ("needs model.run_state", "only exists while the model runs"),
         ("model.run_with_hooks / run_with_cache / generate",)),
    Case("hook-ablation-outside-forward", "hooks",
         lambda ctx: head_ablation_hooks(ctx.model, [(0, 0)], query="audio")[0][1](torch.zeros(1, 4, 4, 16), None),
         InputError, ("head-ablation hook ran outside a model forward", "run_state is not set"),
         ("model.run_with_hooks", "model.generate(fwd_hooks=...)")),
    # ---- audio-visual models not in transformers (video-SALMONN-2+, VideoLLaMA2-AV) -----------------------------
    Case("salmonn-av-batch-with-an-image", "layout",
         lambda ctx: _av_family(ctx, "salmonn").prepare("Describe.", videos=[ctx.media["video"]],
                                                        video_audio=[ctx.media["wav5"]], images=[ctx.media["image"]]),
         LayoutError, ("video-SALMONN-2+ input mixes videos with audio and images", "get_rope_index"),
         ("run videos with audio in a separate batch",)),
    Case("videollama2-base-given-audio", "inputs",
         lambda ctx: _av_family(ctx, "vl2_base").prepare("Describe.", videos=[ctx.media["video"]],
                                                         video_audio=[ctx.media["wav5"]]),
         InputError, ("has no audio tower", "vision-only release"),
         ("drop audio= and video_audio=", "VideoLLaMA2.1-7B-AV")),
    Case("videollama2-unknown-aspect-ratio", "inputs",
         lambda ctx: _av_family(ctx, "vl2").prepare("Describe.", videos=[ctx.media["video"]],
                                                    processor_kwargs={"aspect_ratio": "crop"}),
         InputError, ("aspect_ratio='crop'",), ("{'aspect_ratio': None}", "{'aspect_ratio': 'pad'}")),
    Case("videollama2-vocab-without-room", "loading",
         lambda ctx: _load(_vl2_vocab_too_small(ctx)),
         CheckpointError, ("that av_lens reserves for media positions are real tokens",),
         ("use the checkpoint's own tokenizer",)),
    # ---- audio-only LLMs (Qwen2-Audio, Audio Flamingo 3) ----------------------------------------------------
    Case("audio-llm-given-an-image", "inputs",
         lambda ctx: _audio_llm(ctx, "qwen2_audio").prepare("What is this?", images=[ctx.media["image"]]),
         InputError, ("Qwen2AudioForConditionalGeneration", "takes audio only"),
         ("drop images= / videos= / video_audio=", "Qwen2.5-Omni")),
    Case("af3-two-clips-in-one-prompt", "inputs",
         lambda ctx: _audio_llm(ctx, "audioflamingo3").prepare("<sound><sound>Compare.", chat=False,
                                                               audio=[ctx.media["wav3"], ctx.media["wav3"]]),
         InputError, ("Audio Flamingo 3's processor takes one clip per prompt", "[2] <sound> placeholders"),
         ("one clip per prompt",)),
    # ---- loading checkpoints -----------------------------------------------------------------------------------
    Case("load-folder-without-config", "loading", lambda ctx: _load(_bare_folder(ctx, "empty", None)),
         CheckpointError, ("has no config.json",), ("transformers checkpoint folder",)),
    Case("load-config-not-json", "loading",
         lambda ctx: _load(_bare_folder(ctx, "badjson", '{"model_type": "qwen2_5_om')),
         CheckpointError, ("config.json is not valid JSON",), ("truncated or corrupt", "config.json again")),
    Case("load-unknown-model-type", "loading",
         lambda ctx: _load(
             _bare_folder(ctx, "custom", json.dumps({"model_type": "my_custom_avllm",
                                                     "auto_map": {"AutoModel": "modeling_custom.CustomAV"}}))),
         CheckpointError, ("holds a my_custom_avllm checkpoint", "not a supported audio-visual model"),
         ("model_type is one of ['audioflamingo3', 'gemma3n', 'phi4_multimodal', 'phi4mm', 'qwen2_5_omni', "
          "'qwen2_5_omni_thinker', 'qwen2_5_vl', 'qwen2_audio', 'qwen3_omni_moe', 'qwen3_omni_moe_thinker', "
          "'videollama2_qwen2']",)),
    Case("load-phi4mm-config-incomplete", "loading",
         lambda ctx: _load(_bare_folder(ctx, "phi4mm", json.dumps({"model_type": "phi4mm", "hidden_size": 64}))),
         CheckpointError, ("this phi4mm config.json lacks 'embd_layer'",),
         ("complete config.json of microsoft/Phi-4-multimodal-instruct",)),
    Case("load-text-only-llm", "loading",
         lambda ctx: _load(
             _bare_folder(ctx, "llama", json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))),
         CheckpointError, ("holds a llama checkpoint", "LlamaForCausalLM"), ("Qwen/Qwen2.5-Omni-3B",)),
    Case("load-pickle-weights-only", "loading",
         lambda ctx: _load(_checkpoint(ctx, "pickle", _pickle_only)),
         CheckpointError, ("only pickled weights (*.bin / *.pt)",),
         ("convert them to safetensors", "safe_serialization=True")),
    Case("load-no-weights", "loading",
         lambda ctx: _load(_checkpoint(ctx, "noweights", lambda d: (d / "model.safetensors").unlink())),
         CheckpointError, ("has no *.safetensors weights",), ("complete checkpoint folder",)),
    Case("load-truncated-safetensors", "loading",
         lambda ctx: _load(_checkpoint(ctx, "truncated", _truncate)),
         CheckpointError, ("cannot read model.safetensors",), ("truncated or corrupt", "download it again")),
    Case("load-weight-shape-mismatch", "loading",
         lambda ctx: _load(
             _checkpoint(ctx, "shape", _edit_weights(_set("model.norm.weight", torch.ones(3))))),
         CheckpointError, ("'model.norm.weight' has shape (3,) but the config implies (64,)",),
         ("config.json and the weights belong to different models",)),
    Case("load-missing-tensor", "loading",
         lambda ctx: _load(
             _checkpoint(ctx, "missing", _edit_weights(_drop("model.layers.1.mlp.up_proj.weight")))),
         CheckpointError, ("lacks 1 tensors the model needs", "model.layers.1.mlp.up_proj.weight"),
         ("download it again or pick the matching folder",)),
    Case("load-unexpected-tensor", "loading",
         lambda ctx: _load(
             _checkpoint(ctx, "extra", _edit_weights(_set("model.layers.7.mlp.up_proj.weight", torch.ones(3))))),
         CheckpointError, ("1 tensors this qwen2_5_omni model does not use", "model.layers.7"),
         ("config.json belongs to these weights",)),
    Case("load-file-instead-of-folder", "loading", lambda ctx: _load(ctx.tiny_dir / "config.json"),
         CheckpointError, ("config.json' is a file, not a checkpoint folder",), ("folder that holds config.json",)),
    Case("load-missing-local-folder", "loading", lambda ctx: _load("./no/such/checkpoint"),
         CheckpointError, ("no checkpoint folder at './no/such/checkpoint'",), ("existing local folder", "hub id")),
    Case("load-unknown-hub-id-offline", "loading",
         lambda ctx: _offline(lambda: _load("nobody-here/no-such-avllm")),
         CheckpointError, ("could not find 'nobody-here/no-such-avllm' locally or on the model hub",),
         ("huggingface-cli download nobody-here/no-such-avllm", "local folder")),
    Case("load-unknown-dtype", "loading", lambda ctx: _load(ctx.tiny_dir, dtype="fp8"),
         CheckpointError, ("unknown dtype 'fp8'",), ("'bf16'", "torch.dtype")),
    Case("load-unavailable-device", "loading", lambda ctx: _load(ctx.tiny_dir, device="cuda:64"),
         CheckpointError, ("device 'cuda:64' was asked for", "usable CUDA device(s)"), ("device='cpu'",)),
    Case("load-unknown-model-config", "loading",
         lambda ctx: _load(ctx.tiny_dir, model_config="Qwen9-Omni"),
         CheckpointError, ("no model config named 'Qwen9-Omni'",), ("Qwen2.5-Omni-3B", "YAML file")),
    Case("load-checkpoint-not-matching-model-config", "loading",
         lambda ctx: _load(ctx.tiny_dir, model_config="Qwen2.5-Omni-3B"),
         CheckpointError, ("does not match the Qwen2.5-Omni-3B model config",
                           "n_layers: checkpoint 2, Qwen2.5-Omni-3B spec 36"),
         ("load the right checkpoint", "model_config=None")),
    # ---- analyses ---------------------------------------------------------------------------------------------
    Case("knockout-layers-outside-model", "analyses",
         lambda ctx: knockout_hooks(ctx.model, "generated", "video", range(20, 36)),
         InputError, ("knockout layers [20, 21,", "outside the model's blocks 0..1"), ("range(2)",)),
    Case("knockout-query-left-without-keys", "analyses",
         lambda ctx: ctx.model.run_with_hooks(ctx.audio, fwd_hooks=knockout_hooks(ctx.model, "text", "all", [0])),
         InputError, ("knockout 'text' -> 'all' leaves query position", "no key to attend to"),
         ("exclude the blocked keys from the query group",)),
    Case("knockout-window-wider-than-model", "analyses", lambda ctx: sliding_windows(ctx.model.cfg.n_layers, 4),
         InputError, ("window width 4 does not fit in 2 layers",), ("1 <= width <= 2",)),
    Case("knockout-sweep-no-windows", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "audio", [], lambda l, i: 0.0, progress=False),
         InputError, ("no knockout windows given",), ("sliding_windows(model.cfg.n_layers, 4)",)),
    Case("flow-empty-key-groups", "analyses", lambda ctx: AttentionFlow(ctx.model, keys={}),
         InputError, ("no key groups given",), ("keys={'audio': 'audio'",)),
    Case("flow-unknown-method", "analyses", lambda ctx: AttentionFlow(ctx.model, method="fast"),
         InputError, ("unknown attention-flow method 'fast'",), ("method='rows' or 'pattern'",)),
    Case("flow-query-never-seen", "analyses",
         lambda ctx: _flow_without_generated(ctx),
         InputError, ("no position matched the query selector 'generated'",), ("flow.hooks()", "generate()")),
    Case("lens-target-outside-vocabulary", "analyses",
         lambda ctx: logit_lens(ctx.model, ctx.audio, "audio", targets=[10 ** 7]),
         InputError, ("target token ids [10000000] are outside the vocabulary (size 400)",),
         ("model.to_single_token(...)",)),
    Case("lens-hits-without-targets", "analyses", lambda ctx: logit_lens(ctx.model, ctx.audio, "audio").hits(),
         InputError, ("this lens has no targets",), ("targets=[...]",)),
    Case("lens-k-zero", "analyses", lambda ctx: logit_lens(ctx.model, ctx.audio, "audio", k=0),
         InputError, ("k must be at least 1, got 0",), ("k=10",)),
    Case("probe-label-count-mismatch", "analyses", lambda ctx: probe_layers(_toy_features()[0], _toy_features()[1][:10]),
         InputError, ("20 pooled items but 10 labels",), ("one label per media item",)),
    Case("probe-too-few-items", "analyses", lambda ctx: probe_layers(_toy_features(2)[0], _toy_features(2)[1]),
         InputError, ("2 items are too few to split into train and test",), ("pool more clips (>= 10)",)),
    Case("probe-not-fitted", "analyses", lambda ctx: LinearProbe(4).predict(torch.zeros(3, 4)),
         InputError, ("the probe is not fitted",), ("call fit(X, y) first",)),
    Case("probe-residual-layer-outside", "analyses", lambda ctx: pooled_residuals(ctx.model, ctx.audio, "audio", layers=[9]),
         InputError, ("residual layers [9] are outside 0..2",), ("0 (embeddings) to 2",)),
    Case("patch-misaligned-inputs", "analyses", lambda ctx: patch_by_modality(ctx.model, *_long_and_short(ctx), _metric),
         InputError, ("clean input has 160 positions and the corrupted 110",),
         ("position-aligned inputs", "counterfactual_pair")),
    Case("patch-unknown-component", "analyses",
         lambda ctx: patch_by_modality(ctx.model, ctx.audio, ctx.audio, _metric, components=("resid",)),
         InputError, ("unknown patching components ['resid']",), ("'resid_pre'",)),
    Case("patch-path-cache-lacks-pattern", "analyses",
         lambda ctx: path_patch_hooks(ctx.model, _cache(ctx, "blocks.0.hook_resid_post"), 0, "audio", "text"),
         InputError, ("the clean cache lacks blocks.0.attn.hook_pattern",), ("path_patch_cache_filter(layer)",)),
    Case("ablation-head-out-of-range", "analyses", lambda ctx: head_ablation_hooks(ctx.model, [(0, 4)]),
         InputError, ("head 4 (layer 0) is out of range", "4 heads"), ("use heads 0..3",)),
    Case("ablation-empty-heads", "analyses", lambda ctx: head_ablation_hooks(ctx.model, []),
         InputError, ("no heads to ablate (heads is empty)",), ("(layer, head) pairs",)),
    Case("ablation-mean-without-reference", "analyses", lambda ctx: head_ablation_hooks(ctx.model, [(0, 0)], mode="mean"),
         InputError, ("mode='mean' needs a reference batch",), ("reference=model.prepare(...)", "mode='zero'")),
    Case("token-shift-given-a-batch", "analyses",
         lambda ctx: token_shift(ctx.model, ctx.model, ctx.model.prepare(["a b", "c"]), output_tokens=[1, 2]),
         InputError, ("token_shift takes one prompt, got a batch of 2",), ("token_shift_batch(...)",)),
    Case("token-shift-output-outside-vocabulary", "analyses",
         lambda ctx: token_shift(ctx.model, ctx.model, ctx.text, output_tokens=[10 ** 6]),
         InputError, ("output token ids [1000000] lie outside the shared vocabulary",), ("AVLLM's tokenizer",)),
    Case("pairs-require-aligned-on-misaligned-pair", "analyses",
         lambda ctx: require_aligned(counterfactual_pair(ctx.model, ctx.media["video"], ctx.media["wav5"],
                                                         ctx.media["wav3"], "What do you hear?", align=False)),
         InputError, ("not position-aligned", "factual 161 tokens (audio 125", "counterfactual 111 tokens (audio 75"),
         ("counterfactual_pair(..., align=True)",)),
    Case("pairs-judge-reply-unparsable", "analyses",
         lambda ctx: LLMJudgeScorer(lambda prompt: "I cannot say how similar these are.").score("a dog", "a bell"),
         JudgeReplyError, ("could not read a score from the judge's reply", "I cannot say"), ('{"score": 85',)),
    Case("pairs-judge-not-callable", "analyses", lambda ctx: LLMJudgeScorer("gpt-4"),
         InputError, ("judge must be a callable prompt -> reply, got a str",), ("lambda prompt:",)),
    Case("pairs-fidelity-count-mismatch", "analyses",
         lambda ctx: fidelity(["a dog barks"], ["dog", "bell"], KeywordScorer(world.SOUNDS)),
         InputError, ("1 captions but 2 references",), ("one reference per caption",)),
    Case("organism-unknown-clip-mode", "analyses",
         lambda ctx: clip_inputs(ctx.model, [world.make_clip(0, 1, np.random.default_rng(0))], "hear", mode="both"),
         InputError, ("unknown mode 'both'",), ("'av', 'video' or 'audio'",)),
    Case("organism-unknown-question", "analyses", lambda ctx: world.answer("smell", 0, 0),
         InputError, ("unknown question 'smell'",), ("'describe', 'hear', 'see'",)),
    Case("placement-budgets-too-small", "inputs",
         lambda ctx: plan_device_map(ctx.model, {"cuda:0": "1KiB", "cuda:1": "1KiB"}),
         InputError, ("do not fit in the budgets", "cuda:0: 0.00 GiB"), ("add devices or raise their budgets",)),
    Case("placement-unknown-part", "inputs",
         lambda ctx: ctx.model.place({"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "blocks.7": "cpu"}),
         InputError, ("the device map names parts this model does not have: ['blocks.7']",), ("'blocks.0'..'blocks.1'",)),
    Case("sweep-rows-missing", "analyses",
         lambda ctx: gather(ctx.tmp / "sweep-empty", study_items(1, [range(0, 1)], conditions=("factual",), knockouts=())),
         SweepError, ("lacks rows for 1 of 1 items: '0/factual/none'",), ("rerun the same sweep command",)),
    # ---- TransformerLens surface (docs/tl_compat.md) ------------------------------------------------------------
    Case("tl-refactor-rotary", "loading",
         lambda ctx: HookedAVTransformer.from_pretrained(ctx.tiny_dir, refactor_factored_attn_matrices=True),
         InputError, ("refactor_factored_attn_matrices=True cannot be applied", "rotary"),
         ("leave refactor_factored_attn_matrices=False",)),
    Case("tl-weights-unsupported-architecture", "loading",
         lambda ctx: _process_weights(SimpleNamespace(stream=object(), cfg=SimpleNamespace(
             n_experts=0, original_architecture="Gemma3nForConditionalGeneration")), fold_ln=True),
         InputError, ("weight processing", "not implemented for Gemma3nForConditionalGeneration"),
         ("load it unprocessed (the default)",)),
    Case("tl-split-input-unsupported-architecture", "hooks",
         lambda ctx: HookedAVTransformer._set_split_input(SimpleNamespace(stream=object(), cfg=SimpleNamespace(
             original_architecture="Gemma3nForConditionalGeneration")), "use_attn_in", True),
         InputError, ("use_attn_in is not available for Gemma3nForConditionalGeneration",),
         ("blocks.{l}.hook_resid_pre",)),
    Case("tl-hook-behind-switch", "hooks", lambda ctx: ctx.model.add_hook("blocks.0.hook_q_input", lambda x, hook: x),
         InputError, ("'blocks.0.hook_q_input' runs only with use_split_qkv_input on",),
         ("model.set_use_split_qkv_input(True)",)),
    Case("tl-media-rows-not-media", "hooks",
         lambda ctx: ctx.model.run_with_cache(ctx.audio)[1].media_rows("blocks.0.hook_resid_post", 0),
         InputError, ("'blocks.0.hook_resid_post' is not laid out one row per media token",),
         ("hook_{audio,image,video}_embed",)),
    Case("tl-to-str-tokens-batch", "inputs", lambda ctx: ctx.model.to_str_tokens(torch.full((2, 3), 20)),
         InputError, ("to_str_tokens takes one sequence of token ids, got shape (2, 3)",), ("tokens[i]",)),
    Case("tl-to-string-3d", "inputs", lambda ctx: ctx.model.to_string(torch.full((1, 2, 3), 20)),
         InputError, ("to_string takes [batch, pos], [pos] or one token id, got shape (1, 2, 3)",),
         ("index the extra dimensions away",)),
    Case("tl-token-position-absent", "inputs",
         lambda ctx: ctx.model.get_token_position(399, torch.tensor([[20, 21]])),
         InputError, ("token 399 (id 399) does not occur in the input",), ("model.to_str_tokens(input)",)),
    Case("tl-token-position-batch", "inputs", lambda ctx: ctx.model.get_token_position(20, torch.full((2, 3), 20)),
         InputError, ("get_token_position takes one sequence, got shape (2, 3)",), ("inputs[i]",)),
    Case("tl-token-position-mode", "inputs",
         lambda ctx: ctx.model.get_token_position(20, torch.tensor([[20, 21]]), mode="middle"),
         InputError, ("mode must be 'first' or 'last', got 'middle'",), ("mode='first'",)),
    Case("tl-cat-unequal-lengths", "inputs", lambda ctx: torch.cat([ctx.audio, ctx.text]),
         InputError, ("cannot concatenate inputs of", "positions"), ("equal length",)),
    Case("tl-cat-encoded-and-not", "inputs", lambda ctx: torch.cat([ctx.audio, ctx.encoded]),
         InputError, ("cannot concatenate an encoded input with one that is not encoded",),
         ("model.encode(...) on all of them",)),
    Case("tl-select-model-specific-input", "inputs",
         lambda ctx: dataclasses.replace(ctx.audio, extra={"image_sizes": torch.zeros(1)})[0],
         InputError, ("cannot be split by sample",), ("prepare each sample separately",)),
    Case("tl-test-prompt-batch", "inputs", lambda ctx: _tl_utils.test_prompt(torch.cat([ctx.audio, ctx.audio]), "x",
                                                                            ctx.model, print_details=False),
         InputError, ("test_prompt takes one prompt, got a batch of 2",), ("inputs[i]",)),
    Case("tl-generate-return-type", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, return_type="text"),
         InputError, ("return_type must be 'str', 'tokens', 'input' or None, got 'text'",),
         ("None returns a Generation",)),
    # ---- CLI (python -m av_lens.cli; exit status 2, message on stderr) -----------------------------------------
    Case("cli-audio-without-video", "cli", _cli("cli-audio-without-video"),
         CLIExit, ("av-lens report:", "--audio / --counterfactual-audio need a --video"), ("--video FILE",)),
    Case("cli-video-not-a-media-file", "cli", _cli("cli-video-not-a-media-file"),
         CLIExit, ("cannot decode video file", "notes.mp4"), ("FFmpeg can read",)),
    Case("cli-model-missing-folder", "cli", _cli("cli-model-missing-folder"),
         CLIExit, ("av-lens demo:", "no checkpoint folder at", "no_such_model"), ("existing local folder",)),
    Case("cli-sae-missing-folder", "cli", _cli("cli-sae-missing-folder"),
         CLIExit, ("av-lens demo:", "--sae", "no_such_sae", "no such folder"), ("SparseDictionary.save",)),
    Case("cli-sweep-window-outside-layers", "cli", _cli("cli-sweep-window-outside-layers"),
         CLIExit, ("av-lens sweep:", "the window '0:9' is outside the model's layers 0:8"), ("windows within 0:8",)),
    Case("cli-report-duration-over-window", "cli", _cli("cli-report-duration-over-window"),
         CLIExit, ("av-lens report:", "--duration 9 s is longer than the 6 s this model hears"), ("--duration 6 or less",)),
    Case("cli-report-threads-zero", "cli", _cli("cli-report-threads-zero"),
         CLIExit, ("av-lens demo:", "--threads 0 is not a positive number of threads"), ("--threads 1",)),
]


# ---- second reliability pass (issue 15) ---------------------------------------------------------------------
def _warned(fn) -> Callable[[SimpleNamespace], object]:
    """Run ``fn(ctx)`` with AVLensWarning turned into an error, so a warning case raises like an error case."""
    def build(ctx):
        with warnings.catch_warnings():
            warnings.simplefilter("error", AVLensWarning)
            return fn(ctx)
    return build


def _frames(dtype, value, shape=(4, 56, 56, 3)):
    a = np.full(shape, value, dtype=dtype)
    return a


def _vid(ctx, frames):
    return ctx.model.prepare("x", videos=[frames])


def _img(ctx, img):
    return ctx.model.prepare("x", images=[img])


CASES += [
    # ---- media value ranges ---------------------------------------------------------------------------------
    Case("prepare-video-float-unit-range", "media", _warned(lambda ctx: _vid(ctx, _frames(np.float32, 0.5))),
         AVLensWarning, ("videos[0] holds float pixels in [0.5, 0.5]", "0..255 scale", "almost black"),
         ("(frames * 255).astype(np.uint8)",)),
    Case("prepare-video-bool-frames", "media", lambda ctx: _vid(ctx, _frames(bool, True)),
         MediaError, ("videos[0] has bool pixels",), ("uint8 RGB values in 0..255",)),
    Case("prepare-video-int-above-255", "media", lambda ctx: _vid(ctx, _frames(np.int32, 300)),
         MediaError, ("videos[0] has pixel values in [300, 300], outside 0..255 (int32)",), ("np.clip(frames, 0, 255)",)),
    Case("prepare-video-negative-pixels", "media", lambda ctx: _vid(ctx, _frames(np.float32, -1.0)),
         MediaError, ("videos[0] has pixel values in [-1, -1], outside 0..255",), ("uint8 RGB values",)),
    Case("prepare-video-nan-pixels", "media", lambda ctx: _vid(ctx, _frames(np.float32, np.nan)),
         MediaError, ("videos[0] has NaN or infinite pixel values",), ("np.nan_to_num",)),
    Case("prepare-video-is-a-path", "media", lambda ctx: _vid(ctx, "clip.mp4"),
         MediaError, ("videos[0] is a str ('clip.mp4'), not an array of frames",), ("av_lens.media.load_video(path)",)),
    Case("prepare-video-ragged-frames", "media",
         lambda ctx: _vid(ctx, [np.zeros((56, 56, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)]),
         MediaError, ("videos[0] is a list of frames of different shapes",), ("resize every frame",)),
    Case("prepare-image-float-unit-range", "media", _warned(lambda ctx: _img(ctx, _frames(np.float64, 1.0, (56, 56, 3)))),
         AVLensWarning, ("images[0] holds float pixels in [1, 1]", "almost black"), ("* 255",)),
    Case("prepare-image-bool", "media", lambda ctx: _img(ctx, _frames(bool, False, (56, 56, 3))),
         MediaError, ("images[0] has bool pixels",), ("mask.astype(np.uint8) * 255",)),
    Case("prepare-image-int-above-255", "media", lambda ctx: _img(ctx, _frames(np.int64, 4095, (56, 56, 3))),
         MediaError, ("images[0] has pixel values in [4095, 4095], outside 0..255 (int64)",), ("uint8 RGB values",)),
    Case("prepare-image-nan-pixels", "media", lambda ctx: _img(ctx, _frames(np.float32, np.inf, (56, 56, 3))),
         MediaError, ("images[0] has NaN or infinite pixel values",), ("np.nan_to_num",)),
    Case("prepare-image-is-a-path", "media", lambda ctx: _img(ctx, Path("cat.png")),
         MediaError, ("images[0] is a PosixPath ('cat.png'), not an image",), ("PIL.Image.open(path).convert('RGB')",)),
    Case("prepare-audio-int16-scale-floats", "media",
         lambda ctx: ctx.model.prepare("x", audio=[ctx.media["wav3"] * 32768]),
         MediaError, ("audio[0] has float samples up to", "float audio lies in [-1, 1]", "int16-scale"),
         ("wav / 32768",)),
    Case("prepare-audio-stereo-channels-last", "media",
         lambda ctx: ctx.model.prepare("x", audio=[np.stack([ctx.media["wav3"]] * 2, axis=1)]),
         MediaError, ("audio[0] has shape (48000, 2) (samples x 2 channels)",), ("wav.mean(axis=1)", "not axis 0")),
    Case("prepare-video-audio-int16-scale", "media",
         lambda ctx: ctx.model.prepare("x", videos=[ctx.media["video"]], video_audio=[ctx.media["wav5"] * 20000]),
         MediaError, ("video_audio[0] has float samples up to",), ("wav / 32768",)),
    # ---- layer windows: half-open ranges only --------------------------------------------------------------
    Case("window-list-is-ambiguous", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "audio", [[0, 1]], _metric2, progress=False),
         InputError, ("the knockout window [0, 1] is ambiguous", "layers 0..1 (first-last)", "layers 0..0 (half-open)"),
         ("range(0, 2) for layers 0..1", "range(0, 1)", "half-open Python ranges")),
    Case("window-empty-range", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "audio", [range(1, 1)], _metric2, progress=False),
         InputError, ("the knockout window 1:1 is empty",), ("range(1, 2) for layer 1 alone",)),
    Case("window-outside-layers", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "audio", [range(0, 9)], _metric2, progress=False),
         InputError, ("the knockout window 0:9 is outside the model's layers 0:2",), ("within 0:2", "last layer is 1")),
    Case("window-string-old-form", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "audio", ["0-1"], _metric2, progress=False),
         InputError, ("cannot read the knockout window '0-1'",), ("'0:4' for layers 0..3",)),
    Case("window-with-step", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "last_prompt", "audio", [range(0, 2, 2)], _metric2, progress=False),
         InputError, ("has step 2",), ("contiguous range(start, stop)",)),
    Case("sweep-items-tuple-window", "analyses", lambda ctx: study_items(1, [(0, 1)]),
         InputError, ("the knockout window (0, 1) is ambiguous",), ("range(0, 2) for layers 0..1",)),
    Case("sweep-parse-windows-old-form", "analyses", lambda ctx: parse_windows("0-3", 4),
         InputError, ("the window '0-3' uses the old first-last form",), ("--windows 0:4 for layers 0..3",)),
    # ---- hook values and returns ----------------------------------------------------------------------------
    Case("hook-returns-numpy", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("blocks.0.hook_resid_post",
                                                                   lambda x, hook: x.detach().numpy())]),
         InputError, ("the hook on 'blocks.0.hook_resid_post' returned a ndarray, not a torch.Tensor",),
         ("torch.as_tensor(a, dtype=x.dtype, device=x.device)",)),
    Case("hook-returns-wrong-shape", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x[:, :-1])]),
         InputError, ("the hook on 'blocks.0.hook_resid_post' returned shape (1, ", "but the activation has (1, "),
         ("a tensor of the activation's shape",)),
    Case("hook-returns-wrong-dtype", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x.double())]),
         InputError, ("the hook on 'blocks.1.hook_mlp_out' returned dtype torch.float64 but the activation is torch.float32",),
         ("out.to(x.dtype)",)),
    Case("hook-returns-a-number", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("hook_embed", lambda x, hook: 0.0)]),
         InputError, ("the hook on 'hook_embed' returned a float, not a torch.Tensor",), ("or None to leave it",)),
    Case("hook-attn-mask-returns-bool", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("blocks.0.attn.hook_attn_mask",
                                                                   lambda m, hook: m == 0)]),
         InputError, ("'blocks.0.attn.hook_attn_mask' returned a bool mask", "additive", "no longer causal"),
         ("mask.masked_fill(block, torch.finfo(mask.dtype).min)",)),
    Case("hook-not-callable", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("blocks.0.hook_resid_post", "zero")]),
         InputError, ("the hook given for 'blocks.0.hook_resid_post' is a str",), ("fn(activation, hook)",)),
    Case("hook-add-hook-not-callable", "hooks", lambda ctx: ctx.model.add_hook("hook_embed", None),
         InputError, ("the hook given for 'hook_embed' is a NoneType",), ("fn(activation, hook)",)),
    Case("hook-single-pair-not-list", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=("hook_embed", _identity)),
         InputError, ("fwd_hooks is one (name, hook) pair, not a list of pairs",), ("fwd_hooks=[('hook_embed', fn)]",)),
    Case("hook-pair-malformed", "hooks",
         lambda ctx: ctx.model.run_with_hooks(ctx.text, fwd_hooks=[("hook_embed", _identity, "extra")]),
         InputError, ("fwd_hooks[0] is", "not a (name, hook) pair"), ("fwd_hooks=[('blocks.0.hook_resid_post', fn)",)),
    Case("hook-generate-returns-wrong-shape", "hooks",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=2,
                                        fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x[:1, :1, :3])]),
         InputError, ("the hook on 'blocks.1.hook_resid_post' returned shape (1, 1, 3)",), ("activation's shape",)),
    # ---- context length and generation arguments --------------------------------------------------------------
    Case("input-longer-than-context", "inputs", lambda ctx: _short_context(ctx, lambda: ctx.model(ctx.text)),
         InputError, ("the input has", "tokens (positions up to", "past the model's context of 16 positions"),
         ("shorten the prompt", "fewer frames")),
    Case("input-generate-past-context", "inputs",
         lambda ctx: _short_context(ctx, lambda: ctx.model.generate(ctx.model.prepare("Hi", chat=False),
                                                                    max_new_tokens=40), n=32),
         InputError, ("max_new_tokens=40 would reach position", "past the model's context of 32 positions"),
         ("lower max_new_tokens to at most",)),
    Case("input-long-prompt-text", "inputs",
         lambda ctx: ctx.model.generate(ctx.model.prepare("hello world " * 3000), max_new_tokens=1),
         InputError, ("past the model's context of 4096 positions",), ("shorten the prompt",)),
    Case("generate-negative-temperature", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, temperature=-1.0),
         InputError, ("temperature must be >= 0, got -1.0",), ("do_sample=False for greedy",)),
    Case("generate-nan-temperature", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, temperature=float("nan")),
         InputError, ("temperature must be a finite number, got nan",), ("temperature=0.7",)),
    Case("generate-zero-temperature-sampling", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, temperature=0),
         InputError, ("do_sample=True with temperature=0",), ("do_sample=False",)),
    Case("generate-top-p-above-one", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, top_p=1.5),
         InputError, ("top_p must lie in (0, 1], got 1.5",), ("top_p=0.9",)),
    Case("generate-top-p-zero", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, top_p=0.0),
         InputError, ("top_p must lie in (0, 1], got 0.0",), ("top_p=0.9",)),
    Case("generate-negative-top-k", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, top_k=-5),
         InputError, ("top_k must be a non-negative integer or None, got -5",), ("top_k=50",)),
    Case("generate-float-top-k", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample=True, top_k=2.5),
         InputError, ("top_k must be a non-negative integer or None, got 2.5",), ("top_k=50",)),
    Case("generate-float-max-new-tokens", "inputs", lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=4.0),
         InputError, ("max_new_tokens must be an integer, got 4.0 (float)",), ("max_new_tokens=32",)),
    Case("generate-do-sample-not-bool", "inputs",
         lambda ctx: ctx.model.generate(ctx.text, max_new_tokens=1, do_sample="yes"),
         InputError, ("do_sample must be True or False, got 'yes'",), ("do_sample=True",)),
    # ---- loading ------------------------------------------------------------------------------------------------
    Case("load-name-none", "loading", lambda ctx: _load(None),
         CheckpointError, ("the model name is None (NoneType), not a folder or hub id",), ("'Qwen/Qwen2.5-Omni-3B'",)),
    Case("load-name-empty", "loading", lambda ctx: _load(""),
         CheckpointError, ("the model name is empty", "would load the working directory"), ("a checkpoint folder",)),
    Case("load-name-not-a-string", "loading", lambda ctx: _load(3),
         CheckpointError, ("the model name is 3 (int)",), ("'av-lens/organism'",)),
    Case("load-dtype-int8", "loading", lambda ctx: _load(ctx.tiny_dir, dtype=torch.int8),
         CheckpointError, ("dtype torch.int8 cannot hold the model's weights",), ("torch.bfloat16", "quantised")),
    Case("load-dtype-float8", "loading", lambda ctx: _load(ctx.tiny_dir, dtype=torch.float8_e4m3fn),
         CheckpointError, ("dtype torch.float8_e4m3fn cannot hold",), ("torch.float32",)),
    Case("load-dtype-not-a-string", "loading", lambda ctx: _load(ctx.tiny_dir, dtype=16),
         CheckpointError, ("dtype must be a string or a torch.dtype, got 16",), ("dtype='bf16'",)),
    Case("load-index-json-cut-off", "loading",
         lambda ctx: _load(_checkpoint(ctx, "index-cut", lambda d: (d / "model.safetensors.index.json").write_text(
             '{"metadata": {"total_size": 1}, "weight_map": {"model.norm.weight": "model-0000'))),
         CheckpointError, ("model.safetensors.index.json is not a valid safetensors index", "JSONDecodeError"),
         ("truncated or corrupt", "download model.safetensors.index.json again")),
    Case("load-index-json-without-weight-map", "loading",
         lambda ctx: _load(_checkpoint(ctx, "index-nomap", lambda d: (d / "model.safetensors.index.json").write_text(
             '{"metadata": {}}'))),
         CheckpointError, ("is not a valid safetensors index (KeyError",), ("download model.safetensors.index.json",)),
    Case("load-tokenizer-truncated", "loading",
         lambda ctx: _load(_checkpoint(ctx, "tok-cut", lambda d: (d / "tokenizer.json").write_text(
             (d / "tokenizer.json").read_text()[:500]))),
         CheckpointError, ("tokenizer.json is not valid JSON",), ("truncated or corrupt", "download tokenizer.json again")),
    Case("load-tokenizer-vocabulary-missing", "loading",
         lambda ctx: _load(_checkpoint(ctx, "tok-missing", lambda d: (d / "tokenizer.json").unlink())),
         CheckpointError, ("has tokenizer_config.json but no tokenizer vocabulary",), ("download is incomplete",)),
    Case("load-processor-config-truncated", "loading",
         lambda ctx: _load(_checkpoint(ctx, "proc-cut", lambda d: [(d / f).write_text("{") for f in
                                                                   ("processor_config.json", "preprocessor_config.json")
                                                                   if (d / f).exists()])),
         CheckpointError, ("config.json is not valid JSON",), ("truncated or corrupt",)),
    Case("load-weights-nan", "loading",
         lambda ctx: _load(_checkpoint(ctx, "nan", _edit_weights(_set("model.norm.weight", torch.full((64,), float("nan")))))),
         CheckpointError, ("tensor 'model.norm.weight' in model.safetensors holds 64 NaN value(s)",),
         ("the weights are corrupt", "re-export")),
    Case("load-weights-inf", "loading",
         lambda ctx: _load(_checkpoint(ctx, "inf", _edit_weights(
             _set("model.layers.0.mlp.up_proj.weight", _with_inf(ctx, "model.layers.0.mlp.up_proj.weight"))))),
         CheckpointError, ("'model.layers.0.mlp.up_proj.weight' in model.safetensors holds 1 infinite value(s)",),
         ("download or re-export the checkpoint",)),
    Case("load-hub-never-answers", "loading", lambda ctx: _silent_hub(),
         CheckpointError, ("did not answer within 0.5 s while looking up 'someone/slow-model'",),
         ("raise AV_LENS_HUB_TIMEOUT", "huggingface-cli download someone/slow-model")),
    Case("load-hub-timeout-setting-invalid", "loading",
         lambda ctx: _with_env({"AV_LENS_HUB_TIMEOUT": "-1", "HF_HUB_OFFLINE": "0"}, lambda: _load("someone/model")),
         CheckpointError, ("AV_LENS_HUB_TIMEOUT='-1' is not a positive number of seconds",), ("AV_LENS_HUB_TIMEOUT=30",)),
    # ---- analyses that would match nothing, degenerate analysis input -----------------------------------------
    Case("knockout-keys-absent-in-run", "analyses",
         lambda ctx: ctx.model.run_with_hooks(ctx.audio, fwd_hooks=knockout_hooks(ctx.model, "text", "image", [0])),
         InputError, ("the knockout key selector 'image' matches no position of the running input",
                      "would change nothing"), ("choose positions that exist here", "'image': 0")),
    Case("knockout-generated-query-outside-generate", "analyses",
         lambda ctx: ctx.model.run_with_hooks(ctx.audio, fwd_hooks=knockout_hooks(ctx.model, "generated", "audio", [0])),
         InputError, ("the knockout query selector 'generated' matches no position",),
         ("'generated' positions exist only inside generate()",)),
    Case("knockout-keys-absent-in-generate", "analyses",
         lambda ctx: ctx.model.generate(ctx.audio, max_new_tokens=2,
                                        fwd_hooks=knockout_hooks(ctx.model, "generated", "video", [0])),
         InputError, ("the knockout key selector 'video' matches no position of the running input",),
         ("'video': 0",)),
    Case("knockout-sweep-generate-query-absent", "analyses",
         lambda ctx: knockout_sweep(ctx.model, ctx.audio, "video", "audio", [range(0, 1)], _metric2,
                                    generate=dict(max_new_tokens=1), progress=False),
         InputError, ("the query selector 'video' matches no position of this input",), ("'video': 0",)),
    Case("ablation-query-absent-in-run", "analyses",
         lambda ctx: ctx.model.run_with_hooks(ctx.audio, fwd_hooks=head_ablation_hooks(ctx.model, [(0, 0)], query="image")),
         InputError, ("the head-ablation query selector Sel(image) matches no position",), ("'image': 0",)),
    Case("ablation-generated-query-outside-generate", "analyses",
         lambda ctx: ctx.model.run_with_hooks(ctx.audio, fwd_hooks=head_ablation_hooks(ctx.model, [(0, 0)],
                                                                                       query="generated")),
         InputError, ("the head-ablation query selector Sel(generated) matches no position",),
         ("exist only inside generate()",)),
    Case("flow-key-group-absent", "analyses",
         _warned(lambda ctx: attention_flow(ctx.model, ctx.audio, "last_prompt", keys={"pic": "image"})),
         AVLensWarning, ("the attention-flow key group 'pic' ('image') matches no position", "mass is 0"),
         ("drop the group",)),
    Case("probe-one-class", "analyses", lambda ctx: probe_layers(_toy_features()[0], torch.zeros(20, dtype=torch.long)),
         InputError, ("all 20 labels are the same class (0)", "trivially 1"), ("at least two classes",)),
    Case("probe-nan-features", "analyses",
         lambda ctx: probe_layers(_toy_features()[0].index_fill(1, torch.tensor([3]), float("nan")), _toy_features()[1]),
         InputError, ("the features hold NaN or infinite values (items [3])",), ("drop those items",)),
    Case("probe-negative-labels", "analyses", lambda ctx: probe_layers(_toy_features()[0], _toy_features()[1] - 1),
         InputError, ("labels must be class indices >= 0, got -1",), ("torch.unique(y, return_inverse=True)",)),
    Case("probe-fractional-labels", "analyses",
         lambda ctx: probe_layers(_toy_features()[0], _toy_features()[1].float() + 0.5),
         InputError, ("labels must be class indices, got non-integer values",), ("map the labels to 0..n_classes-1",)),
    Case("probe-features-2d", "analyses", lambda ctx: probe_layers(_toy_features()[0][0], _toy_features()[1]),
         InputError, ("features must be [layer, item, d_model], got shape (20, 8)",), ("features[None]",)),
    Case("probe-pooled-partly-empty-batch", "analyses",
         _warned(lambda ctx: pooled_residuals(ctx.model, padded_batch(ctx.model, ctx.media), "video")),
         AVLensWarning, ("selector 'video' matches no position in sample(s) [0]",), ("fine for a mixed batch",)),
    Case("lens-target-not-a-token-id", "analyses", lambda ctx: logit_lens(ctx.model, ctx.audio, "audio", targets=[2.5]),
         InputError, ("target 2.5 is not a token id",), ("integer ids or the words",)),
    Case("lens-target-word-not-one-token", "analyses",
         lambda ctx: logit_lens(ctx.model, ctx.audio, "audio", targets=["zzqqxx vvbb"]),
         InputError, ("'zzqqxx vvbb' is not one token",), ("pick a word the tokenizer keeps whole",)),
    # ---- CLI (second pass) --------------------------------------------------------------------------------------
    Case("cli-out-is-a-directory", "cli", _cli("cli-out-is-a-directory"),
         CLIExit, ("av-lens demo:", "--out", "is a directory, not a file"), ("pass a file path",)),
    Case("cli-out-under-a-file", "cli", _cli("cli-out-under-a-file"),
         CLIExit, ("av-lens report:", "lies under", "notes.mp4', which is a file"), ("a path in a folder",)),
    Case("cli-sweep-out-is-a-file", "cli", _cli("cli-sweep-out-is-a-file"),
         CLIExit, ("av-lens sweep:", "is a file, not a folder"), ("folder path",)),
    Case("cli-sweep-knockout-selector-typo", "cli", _cli("cli-sweep-knockout-selector-typo"),
         CLIExit, ("av-lens sweep: --knockouts 'generated:vidoe': unknown selector 'vidoe'",), ("'video'",)),
    Case("cli-sweep-knockout-matches-nothing", "cli", _cli("cli-sweep-knockout-matches-nothing"),
         CLIExit, ("the knockout generated:image cannot act", "matches no position of sample 0",
                   "equal the rows without knockout"), ("choose positions these samples have",)),
    Case("cli-sweep-window-old-form", "cli", _cli("cli-sweep-window-old-form"),
         CLIExit, ("av-lens sweep: the window '0-3' uses the old first-last form",), ("--windows 0:4",)),
    Case("cli-option-bad-type", "cli", _cli("cli-option-bad-type"),
         CLIExit, ("av-lens sweep: argument --pairs: invalid int value: 'many'",), ("av-lens sweep --help",)),
    Case("cli-report-fps-zero", "cli", _cli("cli-report-fps-zero"),
         CLIExit, ("av-lens report: --fps must be a positive number, got 0.0",), ("--fps 2",)),
    Case("generate-right-padded-batch", "inputs",
         lambda ctx: ctx.model.generate({"input_ids": torch.tensor([[20, 21, 22], [20, 21, 0]]),
                                         "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}, max_new_tokens=1),
         InputError, ("the input is right-padded (sample(s) [1]", "continue those samples after their pads"),
         ("pad on the left", "padding_side = 'left'")),
    Case("knockout-layers-an-int", "analyses", lambda ctx: knockout_hooks(ctx.model, "text", "audio", 1),
         InputError, ("knockout layers must be a list or range of layer indices, got 1",), ("[1] for one layer",)),
    Case("media-load-max-seconds-negative", "media", lambda ctx: load_video(ctx.files["film"], max_seconds=-1),
         MediaError, ("max_seconds must be positive, got -1",), ("max_seconds=30",)),
]

def _d(ctx):
    return torch.zeros(ctx.model.cfg.n_layers + 1, ctx.model.cfg.d_model)


def _sink_result(ctx):
    from av_lens.analysis import scan_sinks
    return scan_sinks(ctx.model, ctx.audio, layers=[0])


CASES += [
    # ---- steering, representations, attribution (issues 18 and 19) -----------------------------------------
    Case("steering-matches-nothing", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["steer"]).steer(ctx.model, ctx.audio, _d(ctx), "video",
                                                                           layers=[0]),
         InputError, ("the steering selector 'video' matched no position",), ("pick positions that exist",)),
    Case("steering-direction-shape", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["steering_hooks"]).steering_hooks(
             ctx.model, torch.zeros(3), layers=[0]),
         InputError, ("the steering direction has shape (3,)",), ("build it with mean_difference",)),
    Case("steering-unknown-point", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["steering_hooks"]).steering_hooks(
             ctx.model, _d(ctx), layers=[0], point="attn_out"),
         InputError, ("unknown steering point 'attn_out'",), ("use one of",)),
    Case("cka-too-few-examples", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["linear_cka"]).linear_cka(
             torch.randn(3, 2), torch.randn(3, 2), debiased=True),
         InputError, ("debiased CKA needs at least 4 examples",), ("pool more clips",)),
    Case("cka-constant-representation", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["linear_cka"]).linear_cka(
             torch.ones(6, 2), torch.randn(6, 2)),
         InputError, ("one representation is constant",), ("compare representations that vary",)),
    Case("auroc-one-class", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["auroc"]).auroc(torch.rand(5), torch.ones(5, dtype=bool)),
         InputError, ("AUROC needs both classes",), ("use a test split that contains both classes",)),
    Case("regression-probe-constant-target", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["regression_probe_layers"]).regression_probe_layers(
             torch.randn(1, 20, 3), torch.ones(20)),
         InputError, ("every regression target has the same value",), ("use targets that vary",)),
    Case("sinks-threshold-range", "analyses", lambda ctx: _sink_result(ctx).sinks(threshold=0),
         InputError, ("sink threshold must be in (0, 1], got 0",), ("use e.g. 0.3",)),
    Case("attribution-metric-not-scalar", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["attribution_patch"]).attribution_patch(
             ctx.model, ctx.audio, ctx.audio, lambda logits: logits[:, -1, :2], sets=("audio",)),
         InputError, ("the attribution metric must return a scalar tensor",), ("reduce over the batch",)),
    Case("position-map-unmatched", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["position_map"]).position_map(ctx.text, ctx.audio),
         InputError, ("corrupted positions have no clean counterpart",), ("pass unmatched='skip'",)),
    Case("edge-attribution-ig-steps", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["edge_attribution"]).edge_attribution(
             ctx.model, ctx.audio, ctx.audio, lambda logits: logits[:, -1, 0].mean(), ig_steps=0),
         InputError, ("ig_steps must be a positive integer or None, got 0",), ("use None for EAP",)),
    Case("edge-attribution-ig-path", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["edge_attribution"]).edge_attribution(
             ctx.model, ctx.audio, ctx.audio, lambda logits: logits[:, -1, 0].mean(), ig_steps=2, ig_path="edges"),
         InputError, ("unknown ig_path 'edges'",), ("use ig_path='input' (EAP-IG) or 'edge' (per-edge IG)",)),
    Case("attribution-recompute-qk-with-map", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["attribution_patch"]).attribution_patch(
             ctx.model, ctx.audio, ctx.audio, lambda logits: logits[:, -1, 0].mean(), components=("q",),
             sets=("audio",), recompute_qk=True,
             position_map=__import__("av_lens.analysis", fromlist=["position_map"]).position_map(ctx.audio, ctx.audio)),
         InputError, ("recompute_qk needs position-aligned inputs",), ("use recompute_qk=False with a position map",)),
    Case("attribution-no-grad-drop", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["attribution_patch"]).attribution_patch(
             ctx.model, ctx.audio, ctx.audio, lambda logits: logits[:, -1, 0].mean(), sets=("audio",)).magnitude("z"),
         InputError, ("this result has no GradDrop magnitudes",), ("run attribution_patch(..., grad_drop=True)",)),
    Case("sae-unknown-architecture", "analyses",
         lambda ctx: __import__("av_lens.sae", fromlist=["DictionaryConfig"]).DictionaryConfig(
             d_in=4, d_sae=8, architecture="gated"),
         InputError, ("unknown dictionary architecture 'gated'",), ("use 'relu' (SAELens: 'standard'), 'topk'",)),
    Case("sae-topk-without-k", "analyses",
         lambda ctx: __import__("av_lens.sae", fromlist=["DictionaryConfig"]).DictionaryConfig(
             d_in=4, d_sae=8, architecture="topk", k=None),
         InputError, ("a TopK dictionary needs 1 <= k <= d_sae (8), got k=None",), ("pass e.g. k=8",)),
    Case("sae-load-not-a-folder", "loading",
         lambda ctx: __import__("av_lens.sae", fromlist=["SparseDictionary"]).SparseDictionary.load(ctx.tmp),
         CheckpointError, ("is not a dictionary folder (it needs cfg.json and sae_weights.safetensors)",),
         ("pass the folder SAELens's save_model or SparseDictionary.save wrote",)),
    Case("sae-splice-unknown-hook", "hooks",
         lambda ctx: __import__("av_lens.sae", fromlist=["splice"]).splice(
             ctx.model, __import__("av_lens.sae", fromlist=["SparseDictionary"]).SparseDictionary(
                 __import__("av_lens.sae", fromlist=["DictionaryConfig"]).DictionaryConfig(
                     d_in=4, d_sae=8, hook_name="blocks.99.hook_resid_post"))),
         HookNameError, ("the dictionary reads 'blocks.99.hook_resid_post', which this model does not have",),
         ("train or load a dictionary for one of model.hook_dict's names",)),
    Case("attribution-teacher-forced-empty-answer", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["teacher_forced"]).teacher_forced(
             ctx.audio, ctx.audio, torch.zeros(1, 0, dtype=torch.long)),
         InputError, ("the answer has shape (1, 0)",), ("pass [n] or [batch, n] token ids, n >= 1",)),
    Case("token-drop-matches-nothing", "analyses",
         lambda ctx: __import__("av_lens.analysis", fromlist=["token_drop_sweep"]).token_drop_sweep(
             ctx.model, ctx.audio, "video", lambda logits, inputs: logits.sum(), progress=False),
         InputError, ("the key selector 'video' matches no position",), ("choose positions that exist here",)),
]


def _flow_without_generated(ctx):
    flow = AttentionFlow(ctx.model, "generated")
    ctx.model.run_with_hooks(ctx.text, fwd_hooks=flow.hooks())
    return flow.result()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ctx(model, tiny_dir, media, tmp_path_factory):
    tok = model.cfg.tokens
    assert (tok.audio, tok.audio_bos, tok.audio_eos) == (TOK.audio, TOK.audio_bos, TOK.audio_eos)
    tmp = tmp_path_factory.mktemp("catalogue")
    files = tmp / "files"
    files.mkdir()
    (files / "notes.mp4").write_text("these are notes, not a video\n" * 20)
    t = np.arange(16000) / 16000
    c = SimpleNamespace(
        model=model, tiny_dir=tiny_dir, media=media, tmp=tmp, cli={},
        files={"notes": files / "notes.mp4",
               "tone": _write_wav(files / "tone.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)),
               "silence": _write_wav(files / "silence.wav", np.zeros(16000, np.float32)),
               "film": _write_silent_film(files / "silent_film.mp4")},
        text=model.prepare("Hello world, what is in this video?"),
        audio=model.prepare(**cases(media)["audio"]),
        image=model.prepare(**cases(media)["image"]),
    )
    c.encoded = model.encode(c.audio)
    yield c
    for _, _, proc in c.cli.values():  # runs started here but not waited for (e.g. under -k)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---------------------------------------------------------------------------------------------------- tests
def test_catalogue_is_complete():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    areas = {c.area for c in CASES}
    assert areas == {"media", "inputs", "layout", "hooks", "loading", "analyses", "cli"}
    assert len(CASES) >= 36
    assert set(CLI) == {c.id for c in CASES if c.area == "cli"}
    assert all(c.problem and c.fix for c in CASES), "every case checks both the problem and the fix"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_answered_clearly(case, ctx):
    with pytest.raises(case.exc) as info:
        case.build(ctx)
    err = info.value
    assert type(err) is case.exc, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg.count("Fix:") == 1, msg
    problem, fix = msg.split("Fix:")
    for frag in case.problem:
        assert frag in problem, f"{frag!r} not in the problem part: {problem!r}"
    for frag in case.fix:
        assert frag in fix, f"{frag!r} not in the fix part: {fix!r}"
    assert len(fix.strip()) >= 10, f"no real fix: {msg!r}"
    if isinstance(err, AVLensError):
        assert err.fix and err.problem.rstrip(".") in problem
    # nothing hooked stays attached after an error inside a forward
    assert not any(hp.fwd_hooks for hp in ctx.model.hook_dict.values())
    assert ctx.model.run_state is None


def test_docs_list_every_case():
    text = DOCS.read_text(encoding="utf-8").split("## The catalogue", 1)[1]
    rows = [l for l in text.splitlines() if l.startswith("|") and not set(l) <= set("|-: ")]
    assert rows and rows[0].startswith("| area |"), "docs/errors.md: no catalogue table after '## The catalogue'"
    documented = []
    for row in rows[1:]:  # after the header
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])]
        assert len(cells) == 5, f"a docs/errors.md row should have 5 cells: {row}"
        m = re.fullmatch(r"`([a-z0-9_-]+)`", cells[-1])
        assert m, f"the last column of a docs/errors.md row should be a `case-id`: {row}"
        documented.append((cells[0], m.group(1), *(c.replace("\\|", "|") for c in cells[2:4])))
    by_id = {c.id: c for c in CASES}
    ids = [row[1] for row in documented]
    assert len(ids) == len(set(ids)), "a case is documented twice"
    assert set(ids) == set(by_id), (f"missing from docs/errors.md: {sorted(set(by_id) - set(ids))}; "
                                    f"documented but not tested: {sorted(set(ids) - set(by_id))}")
    for area, i, problem, fix in documented:  # the docs quote what the test checks
        case = by_id[i]
        assert area == case.area, f"{i}: docs say area {area!r}, the test {case.area!r}"
        for frag in case.problem:
            assert frag in problem, f"{i}: docs/errors.md's problem cell lacks {frag!r}"
        for frag in case.fix:
            assert frag in fix, f"{i}: docs/errors.md's fix cell lacks {frag!r}"
    readme = (DOCS.parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"({len(CASES)} bad inputs" in readme, f"README.md should say the catalogue has {len(CASES)} bad inputs"


# ------------------------------------------------------------------------------------- nothing half-written
class _DiskFull(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


@pytest.mark.parametrize("stage", ["render", "write", "rename"])
def test_failed_report_save_leaves_nothing_half_written(tmp_path, monkeypatch, stage):
    """A report whose save fails while rendering, halfway through writing or at the final rename leaves the
    previous report untouched and no temporary file beside it."""
    from av_lens.views import html as html_mod
    from av_lens.views.html import Page

    out = tmp_path / "report.html"
    out.write_text("the previous report")
    page = Page("av_lens report").add("<p>" + "x" * 100_000 + "</p>", heading="a section")
    if stage == "render":
        def broken_view(self):
            raise RuntimeError("a view failed to render")
        monkeypatch.setattr(Page, "html", broken_view)
    elif stage == "write":
        real_fdopen = os.fdopen

        class HalfWritten:  # the disk fills up halfway through the page
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, s):
                self.f.write(s[: len(s) // 2])
                self.f.flush()
                raise _DiskFull()
        monkeypatch.setattr(html_mod.os, "fdopen", lambda fd, *a, **kw: HalfWritten(real_fdopen(fd, *a, **kw)))
    else:
        def refuse(src, dst):
            assert Path(src).stat().st_size > 100_000  # the whole page was written to the temporary file
            raise _DiskFull()
        monkeypatch.setattr(html_mod.os, "replace", refuse)
    with pytest.raises((RuntimeError, OSError)):
        page.save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert out.read_text() == "the previous report"
    # and into an empty folder: no file at all
    fresh = tmp_path / "fresh"
    with pytest.raises((RuntimeError, OSError)):
        page.save(fresh / "report.html")
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize("stage", ["weights", "processor", "meta"])
def test_failed_checkpoint_save_leaves_nothing_half_written(tmp_path, stage):
    """save_checkpoint failing midway (a weight file half written, the processor failing, metadata that is not
    JSON) leaves the previous checkpoint as it was and no temporary folder beside it."""
    from av_lens.organism.train import save_checkpoint

    class Model:
        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)
            if stage == "weights":
                raise _DiskFull()

    class Processor:
        def save_pretrained(self, folder):
            (Path(folder) / "preprocessor_config.json").write_text("{")
            if stage == "processor":
                raise _DiskFull()

    meta = {"steps": 10, "curriculum": object() if stage == "meta" else "vlm-then-av"}
    target = tmp_path / "organism"
    target.mkdir()
    (target / "organism.json").write_text('{"previous": true}')
    with pytest.raises((OSError, TypeError)):
        save_checkpoint(Model(), Processor(), target, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["organism"]
    assert [p.name for p in target.iterdir()] == ["organism.json"]
    assert json.loads((target / "organism.json").read_text()) == {"previous": True}
    # a first save that fails leaves no folder at all
    with pytest.raises((OSError, TypeError)):
        save_checkpoint(Model(), Processor(), tmp_path / "new" / "organism", meta)
    assert list((tmp_path / "new").iterdir()) == []
