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

from av_lens import AVLensError, CheckpointError, HookedAVTransformer, HookNameError, InputError, LayoutError, MediaError
from av_lens.analysis import (AttentionFlow, KeywordScorer, LinearProbe, LLMJudgeScorer, counterfactual_pair,
                              fidelity, head_ablation_hooks, knockout_hooks, knockout_sweep, logit_lens,
                              patch_by_modality, path_patch_hooks, pooled_residuals, probe_layers, require_aligned,
                              sliding_windows, token_shift)
from av_lens.analysis.pairs import JudgeReplyError
from av_lens.media import load_audio, load_clip, load_video
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs
from av_lens.placement import plan_device_map
from av_lens.sweeps import SweepError, gather, study_items
from conftest import cases

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


# --------------------------------------------------------------------------------------------------- CLI
#: CLI case id -> its arguments (given the context); all of them start together on the first CLI case
CLI = {
    "cli-audio-without-video": lambda ctx: ["report", "--audio", str(ctx.files["tone"])],
    "cli-video-not-a-media-file": lambda ctx: ["report", "--video", str(ctx.files["notes"])],
    "cli-model-missing-folder": lambda ctx: ["demo", "--model", str(ctx.tmp / "no_such_model")],
    "cli-sweep-window-outside-layers": lambda ctx: ["sweep", "--windows", "0-9", "--out", str(ctx.tmp / "sweep-out")],
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
         ("model_type is one of ['gemma3n', 'phi4_multimodal', 'qwen2_5_omni', 'qwen2_5_omni_thinker', 'qwen2_5_vl', 'qwen3_omni_moe', "
          "'qwen3_omni_moe_thinker']",)),
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
         lambda ctx: gather(ctx.tmp / "sweep-empty", study_items(1, [(0, 0)], conditions=("factual",), knockouts=())),
         SweepError, ("lacks rows for 1 of 1 items: '0/factual/none'",), ("rerun the same sweep command",)),
    # ---- CLI (python -m av_lens.cli; exit status 2, message on stderr) -----------------------------------------
    Case("cli-audio-without-video", "cli", _cli("cli-audio-without-video"),
         CLIExit, ("av-lens report:", "--audio / --counterfactual-audio need a --video"), ("--video FILE",)),
    Case("cli-video-not-a-media-file", "cli", _cli("cli-video-not-a-media-file"),
         CLIExit, ("cannot decode video file", "notes.mp4"), ("FFmpeg can read",)),
    Case("cli-model-missing-folder", "cli", _cli("cli-model-missing-folder"),
         CLIExit, ("av-lens demo:", "no checkpoint folder at", "no_such_model"), ("existing local folder",)),
    Case("cli-sweep-window-outside-layers", "cli", _cli("cli-sweep-window-outside-layers"),
         CLIExit, ("av-lens sweep:", "the window '0-9' is outside the model's layers 0..3"), ("windows within 0-3",)),
    Case("cli-report-duration-over-window", "cli", _cli("cli-report-duration-over-window"),
         CLIExit, ("av-lens report:", "--duration 9 s is longer than the 4 s this model hears"), ("--duration 4 or less",)),
    Case("cli-report-threads-zero", "cli", _cli("cli-report-threads-zero"),
         CLIExit, ("av-lens demo:", "--threads 0 is not a positive number of threads"), ("--threads 1",)),
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
