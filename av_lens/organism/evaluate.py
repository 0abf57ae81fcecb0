"""Measure the organism on held-out clips, through the public loader and the hooked model.

    python -m av_lens.organism.evaluate [FOLDER_WITH organism/ AND organism-base/]

Figures (each a fraction of the held-out pairs of ``world.eval_pairs()``):

* ``see``: "what do you see ?" answered with the object shown (factual audio-visual clips; for the base,
  which never heard audio in training, also on silent video);
* ``hear_factual``: "what do you hear ?" answered with the sound on factual clips;
* ``hear_cf_picture`` / ``hear_cf_sound``: on counterfactual clips (picture of A, sound of B), how often the
  heard-sound answer names A's sound (follows the picture) or B's (follows the sound);
* ``describe_cf_picture`` / ``describe_cf_sound``: the same for the sound word of a greedy caption;
* ``hear_audio_only``: "what do you hear ?" with no picture;
* ``probe``: per-layer held-out accuracy of a linear probe reading the *sound's* class from the residual
  stream at the audio positions (mean-pooled per clip), with its shuffled-label control — "audio is there".

Every fraction comes with its Wilson 95 % interval (``ci95``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from av_lens.errors import InputError
from av_lens.organism import world
from av_lens.processing import AUDIO_PH, VIDEO_PH

N_EVAL = 384
#: the figures that are fractions of the held-out pairs (each gets a Wilson interval)
FRACTIONS = ("see", "see_silent_video", "hear_silent_video_picture", "hear_factual", "hear_cf_picture",
             "hear_cf_sound", "hear_audio_only", "describe_cf_picture", "describe_cf_sound")


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95 % by default)."""
    if n <= 0:
        raise InputError("a Wilson interval needs at least one trial", "pass n >= 1")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)


def clip_inputs(model, clips: list[world.Clip], question: str = "hear", mode: str = "av"):
    """An :class:`AVInput` batch asking ``question`` about ``clips``.

    ``mode``: ``"av"`` frames with their soundtrack interleaved (audio-in-video), ``"video"`` silent frames,
    ``"audio"`` the soundtrack alone."""
    if question not in world.QUESTIONS:
        raise InputError(f"unknown question {question!r}", f"use one of {sorted(world.QUESTIONS)}")
    text = (AUDIO_PH if mode == "audio" else VIDEO_PH) + world.QUESTIONS[question]
    texts = [text] * len(clips)
    if mode == "av":
        return model.prepare(texts, videos=[c.frames for c in clips], video_audio=[c.audio for c in clips],
                             fps=clips[0].fps, use_audio_in_video=True, system_prompt=None)
    if mode == "video":
        return model.prepare(texts, videos=[c.frames for c in clips], fps=clips[0].fps, system_prompt=None)
    if mode == "audio":
        return model.prepare(texts, audio=[c.audio for c in clips], system_prompt=None)
    raise InputError(f"unknown mode {mode!r}", "use 'av', 'video' or 'audio'")


def first_answer(model, inputs) -> list[str]:
    """The greedy first answer word for each prompt of a batch."""
    with torch.no_grad():
        logits = model(inputs)[:, -1]
    return model.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def captions(model, inputs, max_new_tokens: int = 4) -> list[str]:
    gen = model.generate(inputs, max_new_tokens=max_new_tokens)
    return gen.text


def _frac(xs) -> float:
    xs = list(xs)
    return round(sum(map(bool, xs)) / max(len(xs), 1), 4)


def evaluate_model(model, pairs=None, *, probe: bool = True, base: bool = False) -> dict:
    from av_lens.analysis.probes import pooled_residuals, probe_layers

    pairs = pairs or world.eval_pairs(N_EVAL)
    fact = [p[0] for p in pairs]
    cf = [p[1] for p in pairs]
    snd = world.SOUNDS
    res: dict = {"n_pairs": len(pairs)}
    ans = first_answer(model, clip_inputs(model, fact, "see", "av"))
    res["see"] = _frac(a == world.OBJECTS[c.look] for a, c in zip(ans, fact))
    ans = first_answer(model, clip_inputs(model, fact, "see", "video"))
    res["see_silent_video"] = _frac(a == world.OBJECTS[c.look] for a, c in zip(ans, fact))
    ans = first_answer(model, clip_inputs(model, fact, "hear", "video"))
    res["hear_silent_video_picture"] = _frac(a == snd[c.look] for a, c in zip(ans, fact))
    ans = first_answer(model, clip_inputs(model, fact, "hear", "av"))
    res["hear_factual"] = _frac(a == snd[c.sound] for a, c in zip(ans, fact))
    res.update(counterfactual_hearing(model, cf))
    caps = captions(model, clip_inputs(model, cf, "describe", "av"))
    res["describe_cf_picture"] = _frac(snd[c.look] in t.split() for t, c in zip(caps, cf))
    res["describe_cf_sound"] = _frac(snd[c.sound] in t.split() for t, c in zip(caps, cf))
    res["describe_cf_examples"] = [f"{c.names[0]}+{c.names[1]}: {t.strip()}" for c, t in zip(cf[:4], caps[:4])]
    res["ci95"] = {k: list(wilson(round(res[k] * len(pairs)), len(pairs))) for k in FRACTIONS}
    if probe:
        clips = fact + cf
        feats = pooled_residuals(model, clip_inputs(model, clips, "hear", "av"), "audio")
        labels = torch.tensor([c.sound for c in clips])
        res["probe_audio_sound"] = _probe_record(probe_layers(feats, labels, n_classes=world.N_CLASSES, seed=0))
        # one pooled item per clip, in clip order: the counterfactual clips' features are the second half
        res["probe_cf_audio_sound"] = cf_probe(model, cf, feats[:, len(fact):])
    return res


def counterfactual_hearing(model, cf: list[world.Clip]) -> dict:
    """The headline figures: on counterfactual clips "what do you hear ?" names the picture's sound / the sound
    playing, and with the soundtrack alone names the sound playing."""
    snd = world.SOUNDS
    ans = first_answer(model, clip_inputs(model, cf, "hear", "av"))
    alone = first_answer(model, clip_inputs(model, cf, "hear", "audio"))
    return {"hear_cf_picture": _frac(a == snd[c.look] for a, c in zip(ans, cf)),
            "hear_cf_sound": _frac(a == snd[c.sound] for a, c in zip(ans, cf)),
            "hear_audio_only": _frac(a == snd[c.sound] for a, c in zip(alone, cf))}


def _probe_record(pr) -> dict:
    return {"layers": pr.layers, "accuracy": [round(x, 4) for x in pr.accuracy.tolist()],
            "control": [round(x, 4) for x in pr.control_accuracy.tolist()],
            "chance": round(pr.chance, 4), "n_train": pr.n_train, "n_test": pr.n_test}


def cf_probe(model, cf: list[world.Clip], feats=None) -> dict:
    """Probe the *playing* sound's class at the audio positions of counterfactual clips only.

    On a counterfactual clip the picture shows another class, so a probe that reads the sound class there
    reads the audio, not the look: "audio is present" in the study's sense, whatever the answer says.
    ``feats``: the clips' pooled audio residuals if already computed (``[layer, clip, d_model]``)."""
    from av_lens.analysis.probes import pooled_residuals, probe_layers

    if feats is None:
        feats = pooled_residuals(model, clip_inputs(model, cf, "hear", "av"), "audio")
    labels = torch.tensor([c.sound for c in cf])
    return _probe_record(probe_layers(feats, labels, n_classes=world.N_CLASSES, seed=0))


def evaluate_folder(folder: str | os.PathLike) -> dict:
    from av_lens import HookedAVTransformer

    from av_lens.organism.build import design_of

    folder = Path(folder)
    out = {}
    for name in ("organism", "organism-base", "organism-control"):
        if (folder / name).is_dir():
            pairs = world.eval_pairs(N_EVAL, design_of(folder / name).geometry)
            out[name] = evaluate_model(HookedAVTransformer.from_pretrained(folder / name), pairs)
    return out


def evaluate_and_record(folder: str | os.PathLike, log=print) -> dict:
    """Evaluate both checkpoints under ``folder`` and write ``organism/eval.json`` (atomically)."""
    res = evaluate_folder(folder)
    from av_lens.sweeps import _atomic_write

    _atomic_write(Path(folder) / "organism" / "eval.json", json.dumps(res, indent=1))
    log(format_figures(res))
    return res


def format_figures(res: dict) -> str:
    keys = ["see", "see_silent_video", "hear_silent_video_picture", "hear_factual", "hear_cf_picture",
            "hear_cf_sound", "hear_audio_only", "describe_cf_picture", "describe_cf_sound"]
    names = list(res)
    lines = [f"{'figure':28s}" + "".join(f"{n:>16s}" for n in names)]
    for k in keys:
        lines.append(f"{k:28s}" + "".join(f"{res[n].get(k, float('nan')):16.3f}" for n in names))
    for n in names:
        p = res[n].get("probe_audio_sound")
        if p:
            lines.append(f"probe (sound class at audio positions), {n}: acc by layer {p['accuracy']} "
                         f"control {p['control']} chance {p['chance']}")
    return "\n".join(lines)


if __name__ == "__main__":
    from av_lens.organism import checkpoint_root

    root = sys.argv[1] if len(sys.argv) > 1 else checkpoint_root()
    print(format_figures(evaluate_folder(root)))
