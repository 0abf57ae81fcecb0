"""Counterfactual audio-visual pairs, and how faithfully a caption reports what was heard.

The study's manipulation keeps a video's frames and swaps its soundtrack for another clip's: a *factual*
input (frames + their own sound) and a *counterfactual* one (same frames + another sound). Whether the
model's caption follows the picture or the sound measures how much the audio is used; patching activations
between the two inputs localises where it is (or is not) used.

Patching position by position needs the two inputs to be **aligned**: the same number of tokens, the same
modality at every position (and so the same 3-D positions). With ``use_audio_in_video=True`` the audio token
count follows the soundtrack's length, so :func:`counterfactual_pair` trims (or pads with silence) the swapped
soundtrack to the factual one's length by default, then checks the two layouts and records the verdict::

    pair = counterfactual_pair(model, frames, audio, other_audio, "Describe what you see and hear.", fps=2.0)
    require_aligned(pair)                  # raises InputError naming both token counts if not aligned
    pairs = organism_pairs(model, n=16, seed=0)   # from the synthetic world, references in pair.meta

Caption fidelity is a pluggable score in [0, 1] of a caption against a reference description
(:class:`CaptionScorer`): :class:`KeywordScorer` counts the reference's keywords of a closed vocabulary
(the organism's sound words) that the caption contains; :class:`LLMJudgeScorer` asks a judge model that the
user supplies as a plain callable, with a CLAIR-style prompt (Chan et al. 2023), and parses its 0-100 score.
:func:`fidelity` scores many captions at once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from av_lens.errors import InputError
from av_lens.inputs import AVInput
from av_lens.layout import Modality


# -------------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class Pair:
    """A factual input and its counterfactual (same frames, another soundtrack)."""

    factual: AVInput
    counterfactual: AVInput
    aligned: bool      # same token count and the same modality at every position
    note: str          # what was done to align them, or why they are not aligned
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. classes and reference captions (organism_pairs)


def _waveform(x: Any) -> tuple[np.ndarray, int | None]:
    """(samples, sample rate or None) from a waveform or a ``(waveform, sample_rate)`` pair; dtype unchanged."""
    sr = None
    if isinstance(x, tuple) and len(x) == 2 and np.isscalar(x[1]):
        x, sr = x
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    return arr, sr


def match_length(wav: Any, n_samples: int) -> tuple[Any, str]:
    """``wav`` trimmed, or padded at the end with silence, to ``n_samples``; and a note saying which."""
    arr, sr = _waveform(wav)
    if arr.ndim != 1:
        return wav, ""  # not a mono waveform: let prepare() report it
    n = arr.shape[0]
    if n == n_samples:
        return wav, ""
    if n > n_samples:
        out, note = arr[:n_samples], f"counterfactual soundtrack trimmed from {n} to {n_samples} samples"
    else:
        out = np.concatenate([arr, np.zeros(n_samples - n, dtype=arr.dtype)])
        note = f"counterfactual soundtrack padded with {n_samples - n} samples of silence to {n_samples}"
    return (out if sr is None else (out, sr)), note


def layout_difference(a: AVInput, b: AVInput) -> str:
    """Empty if ``a`` and ``b`` are position-aligned (same length, same modality and 3-D position at every
    position, per sample); else what differs, naming the token counts."""
    la, lb = a.layout, b.layout
    if la.shape != lb.shape:
        ca, cb = la.counts(), lb.counts()
        return (f"token counts differ: factual {la.shape[1]} tokens (audio {ca['audio']}, video {ca['video']}) vs "
                f"counterfactual {lb.shape[1]} tokens (audio {cb['audio']}, video {cb['video']})")
    if not torch.equal(la.modality, lb.modality):
        b_, p = (la.modality != lb.modality).nonzero()[0].tolist()
        return (f"both have {la.shape[1]} tokens but the modalities differ first at sample {b_} position {p} "
                f"({Modality(int(la.modality[b_, p])).name.lower()} vs {Modality(int(lb.modality[b_, p])).name.lower()})")
    if not torch.equal(la.position_ids, lb.position_ids):
        return f"both have {la.shape[1]} tokens with the same modalities, but their 3-D positions differ"
    return ""


def counterfactual_pair(model, frames: Any, audio: Any, other_audio: Any, question_text: str, fps: float = 2.0, *,
                        align: bool = True, system_prompt: str | None = "default",
                        meta: dict[str, Any] | None = None) -> Pair:
    """The factual input (``frames`` with ``audio`` interleaved, ``use_audio_in_video=True``) and the
    counterfactual (the same frames with ``other_audio``).

    With ``align=True`` the swapped soundtrack is trimmed, or padded with silence, to the factual soundtrack's
    length so both inputs have the same tokens at the same positions. ``pair.aligned`` records whether they
    do; with ``align=False`` and soundtracks of different lengths it is usually False (see ``pair.note``).
    ``question_text`` is the user turn (the video placeholder is added unless it is already there).
    """
    note = ""
    if align:
        fact_wav, _ = _waveform(audio)
        if fact_wav.ndim == 1:
            other_audio, note = match_length(other_audio, fact_wav.shape[0])
    kw = dict(videos=[frames], use_audio_in_video=True, fps=fps, system_prompt=system_prompt)
    factual = model.prepare(question_text, video_audio=[audio], **kw)
    counterfactual = model.prepare(question_text, video_audio=[other_audio], **kw)
    diff = layout_difference(factual, counterfactual)
    if diff:
        note = f"{note}; {diff}" if note else diff
    elif not note:
        note = "soundtracks of equal length"
    return Pair(factual, counterfactual, aligned=not diff, note=note, meta=dict(meta or {}))


def require_aligned(pair: Pair) -> Pair:
    """``pair`` if its inputs are position-aligned, else an :class:`InputError` saying how they differ."""
    if not pair.aligned:
        raise InputError(f"the factual and counterfactual inputs are not position-aligned ({pair.note})",
                         "build the pair with counterfactual_pair(..., align=True), which trims or pads the swapped "
                         "soundtrack to the factual one's length")
    return pair


def organism_pairs(model, n: int, seed: int, *, question: str = "describe", align: bool = True) -> list[Pair]:
    """``n`` pairs from the organism's synthetic world (:func:`av_lens.organism.world.clip_pairs`).

    Each is asked ``world.QUESTIONS[question]`` about the clip's frames with its soundtrack interleaved
    (at ``world.FPS``, no system prompt, as the organism was trained). ``pair.meta`` holds the classes
    (``look``, ``sound``, ``counterfactual_sound``) and the reference answers (``factual_answer``,
    ``counterfactual_answer``; e.g. "dog and bark" / "dog and ring")."""
    from av_lens.organism import world

    if question not in world.QUESTIONS:
        raise InputError(f"unknown question {question!r}", f"use one of {sorted(world.QUESTIONS)}")
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}", "ask for one or more pairs")
    out = []
    for fact, cf in world.clip_pairs(n, seed):
        meta = {"look": fact.look, "sound": fact.sound, "counterfactual_sound": cf.sound,
                "factual_answer": world.answer(question, fact.look, fact.sound),
                "counterfactual_answer": world.answer(question, cf.look, cf.sound)}
        out.append(counterfactual_pair(model, fact.frames, fact.audio, cf.audio, world.QUESTIONS[question],
                                       fps=world.FPS, align=align, system_prompt=None, meta=meta))
    return out


# ------------------------------------------------------------------------------------------------ scorers
@runtime_checkable
class CaptionScorer(Protocol):
    """Scores how faithfully a caption describes a reference, from 0 (not at all) to 1 (fully)."""

    def score(self, caption: str, reference: str) -> float: ...


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, inner apostrophes); punctuation separates words."""
    return _WORD.findall(text.lower())


class KeywordScorer:
    """Fraction of the reference's keywords (entries of ``vocabulary`` found in it) that the caption contains.

    Matching is on whole words, case-insensitive ("ring" does not match "ringing" or "bring"); an entry of
    several words matches the same words in sequence. ``mode="jaccard"`` also penalises vocabulary keywords
    the caption names but the reference does not: |ref ∩ cap| / |ref ∪ cap|.
    """

    def __init__(self, vocabulary: Sequence[str], mode: Literal["recall", "jaccard"] = "recall"):
        if isinstance(vocabulary, str):
            raise InputError("the keyword vocabulary is one string", "pass a list of keywords, e.g. world.SOUNDS")
        self.vocabulary = tuple(dict.fromkeys(tuple(words(v)) for v in vocabulary if words(v)))
        if not self.vocabulary:
            raise InputError("the keyword vocabulary is empty", "pass the closed set of words to look for")
        if mode not in ("recall", "jaccard"):
            raise InputError(f"unknown mode {mode!r}", "use 'recall' or 'jaccard'")
        self.mode = mode

    def keywords(self, text: str) -> set[str]:
        """The vocabulary entries that occur in ``text``."""
        w = words(text)
        found = set()
        for kw in self.vocabulary:
            k = len(kw)
            if any(tuple(w[i:i + k]) == kw for i in range(len(w) - k + 1)):
                found.add(" ".join(kw))
        return found

    def score(self, caption: str, reference: str) -> float:
        ref = self.keywords(reference)
        if not ref:
            raise InputError(f"the reference {reference!r} contains none of the scorer's keywords",
                             "pass references written in the scorer's vocabulary, or a vocabulary that covers them")
        cap = self.keywords(caption)
        if self.mode == "jaccard":
            return len(ref & cap) / len(ref | cap)
        return len(ref & cap) / len(ref)


#: A CLAIR-style prompt (Chan et al. 2023, "CLAIR: Evaluating Image Captions with Large Language Models"),
#: adapted to audio-visual clips. ``{candidate}`` and ``{reference}`` are filled in.
CLAIR_TEMPLATE = (
    "You are trying to tell if a candidate caption is describing the same audio-visual clip (what is seen "
    "and what is heard) as a reference caption.\n"
    "Candidate caption:\n{candidate}\n"
    "Reference caption:\n{reference}\n"
    "On a precise scale from 0 to 100, how likely is it that the candidate caption is describing the same "
    "clip as the reference caption? (JSON format, with a key \"score\", value between 0 and 100, and a key "
    "\"reason\" with a string value.)"
)


class JudgeReplyError(InputError):
    """A judge's reply from which no score could be read."""


class LLMJudgeScorer:
    """Caption fidelity judged by a language model that the caller supplies.

    ``judge`` is any callable from a prompt string to the model's reply string (a local model, an API
    client); av_lens neither downloads a model nor opens a connection. The prompt is ``template`` with
    ``{candidate}`` and ``{reference}`` filled in (default: :data:`CLAIR_TEMPLATE`, asking for JSON with a
    0-100 ``"score"``). The reply's score is read from a JSON object's ``"score"`` key, else from a
    ``score: 85`` phrase, else from a reply that is just a number (``"85"``, ``"85/100"``, ``"85%"``), and
    divided by ``scale``. Anything else raises :class:`JudgeReplyError` quoting the reply.
    """

    def __init__(self, judge: Callable[[str], str], template: str = CLAIR_TEMPLATE, scale: float = 100.0):
        if not callable(judge):
            raise InputError(f"judge must be a callable prompt -> reply, got a {type(judge).__name__}",
                             "pass e.g. lambda prompt: my_client.complete(prompt)")
        missing = [k for k in ("{candidate}", "{reference}") if k not in template]
        if missing:
            raise InputError(f"the judge template lacks {', '.join(missing)}",
                             "write a template with {candidate} and {reference} slots (see CLAIR_TEMPLATE)")
        if not scale > 0:
            raise InputError(f"scale must be positive, got {scale}", "use 100 for a 0-100 judge, 1 for 0-1")
        self.judge, self.template, self.scale = judge, template, float(scale)

    def prompt(self, caption: str, reference: str) -> str:
        return self.template.replace("{candidate}", caption).replace("{reference}", reference)

    def parse(self, reply: str) -> float:
        """The score in [0, 1] that a judge's reply gives."""
        value = _parse_score(reply)
        if value is None:
            raise JudgeReplyError(f"could not read a score from the judge's reply {_clip(reply)!r}",
                                  'make the judge answer with JSON such as {"score": 85, "reason": "..."} '
                                  "(or just the number)")
        if not 0 <= value <= self.scale:
            raise JudgeReplyError(f"the judge's score {value:g} lies outside 0..{self.scale:g} (reply "
                                  f"{_clip(reply)!r})", f"ask the judge for a score between 0 and {self.scale:g}, or "
                                  "set scale= to the range it uses")
        return value / self.scale

    def score(self, caption: str, reference: str) -> float:
        reply = self.judge(self.prompt(caption, reference))
        if not isinstance(reply, str):
            raise JudgeReplyError(f"the judge returned a {type(reply).__name__}, not a string",
                                  "make the judge callable return the model's reply text")
        return self.parse(reply)


_NUM = r"[-+]?\d+(?:\.\d+)?"


def _parse_score(reply: str) -> float | None:
    for m in re.finditer(r"\{.*?\}", reply, flags=re.S):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            v = next((obj[k] for k in obj if k.lower() == "score"), None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            if isinstance(v, str) and re.fullmatch(_NUM, v.strip()):
                return float(v)
    m = re.search(rf"score[\"']?\s*(?:[:=]|is)?\s*[\"']?({_NUM})", reply, flags=re.I)
    if m:
        return float(m.group(1))
    m = re.fullmatch(rf"\s*({_NUM})\s*(?:/\s*100|%)?\s*\.?\s*", reply)
    if m:
        return float(m.group(1))
    return None


def _clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def fidelity(captions: Sequence[str], references: Sequence[str], scorer: CaptionScorer) -> Float[Tensor, "n"]:
    """``scorer.score(caption, reference)`` for each pair, as a float tensor [n] of values in [0, 1]."""
    if isinstance(captions, str) or isinstance(references, str):
        raise InputError("captions and references must be lists of strings, got a single string",
                         "wrap one caption as [caption]")
    if len(captions) != len(references):
        raise InputError(f"{len(captions)} captions but {len(references)} references",
                         "pass one reference per caption, in the same order")
    if not isinstance(scorer, CaptionScorer):
        raise InputError(f"{type(scorer).__name__} is not a caption scorer",
                         "pass an object with a score(caption, reference) -> float method (e.g. KeywordScorer)")
    out = []
    for i, (c, r) in enumerate(zip(captions, references)):
        v = float(scorer.score(c, r))
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise InputError(f"{type(scorer).__name__} scored caption {i} as {v}, outside [0, 1]",
                             "make the scorer return a fidelity between 0 and 1")
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)
