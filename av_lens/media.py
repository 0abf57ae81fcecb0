"""Reading real clips from disk: video frames and soundtracks, decoded with PyAV.

The report and users work with real clips: a video file with its own soundtrack (mp4, webm, mkv, mov, ...),
or a video plus a separate audio file (wav, flac, mp3, ogg, ...). The model, by contrast, wants arrays:
RGB frames ``(T, H, W, 3)`` uint8 at a known frame rate, and mono float32 audio at 16 kHz (see
:mod:`av_lens.processing`). This module is the bridge, and it is deliberately small:

* :func:`load_video` decodes the first video stream and samples it at ``fps`` by timestamps: for each
  multiple of ``1/fps`` (counted from the first frame) it keeps the first frame shown at or after that time,
  so a 3 s clip at ``fps=2`` gives 6 frames whatever its native rate. Frames are converted to RGB (and, if
  ``max_side`` is given, downscaled keeping the aspect ratio) by FFmpeg's scaler through PyAV.
* :func:`load_audio` decodes the first audio stream of any container (so a video's soundtrack too),
  mixes it down to mono and resamples it to ``sr`` with FFmpeg's resampler (``av.AudioResampler``).
* :func:`load_clip` does both for one clip and returns a :class:`MediaClip`, whose
  :meth:`MediaClip.prepare_kwargs` are ready for ``model.prepare(text, **clip.prepare_kwargs())``.

Decoding goes through PyAV (FFmpeg bindings), a maintained library that reads every common container and
codec, rather than a hand-rolled parser. Problems surface as :class:`~av_lens.errors.MediaError` naming
the file and what to do: a missing file, a file FFmpeg cannot decode (not a media file, truncated), a
"video" without a video stream, a clip without an audio stream where audio is needed, a silent soundtrack
(which would make every audio-attribution result meaningless), or a video that yields no frames.
Nothing is written to disk.

    from av_lens.media import load_clip
    clip = load_clip("dog_barking.mp4", fps=2.0, max_side=448)             # frames + the video's soundtrack
    clip = load_clip("street.webm", audio_path="street.flac")              # or a separate audio file
    inputs = model.prepare("What do you see and hear?", **clip.prepare_kwargs())
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from av_lens.errors import MediaError

#: a soundtrack whose samples all stay below this (|x|, full scale 1.0; about -80 dBFS) counts as silent
SILENCE_THRESHOLD = 1e-4

_AUDIO_FIX = "pass a separate audio file with --audio / audio_path="

__all__ = ["MediaClip", "SILENCE_THRESHOLD", "load_audio", "load_clip", "load_video"]


@dataclass(frozen=True, eq=False)
class MediaClip:
    """One decoded clip: RGB frames ``(T, H, W, 3)`` uint8 at ``fps``, and mono float32 ``audio`` at ``sr`` Hz."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray
    sr: int
    source: str

    @property
    def video_seconds(self) -> float:
        return self.frames.shape[0] / self.fps

    @property
    def audio_seconds(self) -> float:
        return self.audio.shape[0] / self.sr

    def prepare_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.prepare(text, **kwargs)``: the video with its soundtrack interleaved."""
        return dict(videos=[self.frames], video_audio=[self.audio], fps=self.fps, use_audio_in_video=True)

    def __repr__(self) -> str:
        t, h, w, _ = self.frames.shape
        return (f"MediaClip({self.source!r}, {t} frames {w}x{h} at {self.fps:g} fps, "
                f"{self.audio_seconds:.2f} s audio at {self.sr} Hz)")


# ----------------------------------------------------------------------------------------------- helpers
def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a declared dependency
        raise MediaError("decoding media files needs PyAV, which is not installed",
                         "pip install av  (or reinstall av-lens, which depends on it)") from e
    return av


def _check_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MediaError(f"{what} file {str(p)!r} does not exist", "check the path (relative paths start at "
                         f"the working directory, {os.getcwd()!r})")
    if p.is_dir():
        raise MediaError(f"{what} path {str(p)!r} is a directory, not a file", "pass the path of a media file")
    return p


@contextmanager
def _decoding(p: Path, what: str) -> Iterator[None]:
    """Turn FFmpeg's errors (not a media file, truncated data, unsupported codec) into a MediaError."""
    av = _import_av()
    try:
        yield
    except av.error.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise MediaError(f"cannot decode {what} file {str(p)!r}: {reason} (it is not a readable media file, "
                         "or it is truncated or corrupt)",
                         "pass an audio/video file FFmpeg can read (mp4, webm, mkv, mov, wav, flac, mp3, ogg, ...); "
                         "check it plays, e.g. with `ffprobe`") from e


def _open(p: Path, what: str):
    av = _import_av()
    with _decoding(p, what):
        return av.open(str(p), mode="r")


def _frame_time(frame, index: int, rate: float | None) -> float:
    t = frame.time
    if t is None:  # no timestamps (raw streams): fall back to the nominal rate
        t = index / rate if rate else float(index)
    return float(t)


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


# ------------------------------------------------------------------------------------------------ video
def load_video(path: str | os.PathLike, *, fps: float = 2.0, max_frames: int | None = None,
               max_side: int | None = None, max_seconds: float | None = None) -> tuple[np.ndarray, float]:
    """Decode the first video stream of ``path`` into RGB frames sampled at ``fps``.

    Args:
        fps: frames per second to keep. Sampling is by timestamp: for each ``k / fps`` seconds after the
            first frame, the first frame shown at or after that time. If the file's own frame rate is lower,
            that rate is used instead (no frame is repeated).
        max_frames: stop after this many frames.
        max_side: downscale so that the longer side is at most this many pixels (aspect ratio kept).
        max_seconds: stop after this many seconds of video.

    Returns:
        ``(frames, fps_used)``: frames ``(T, H, W, 3)`` uint8 RGB, and the frame rate they are sampled at.

    Raises:
        MediaError: missing or undecodable file, no video stream, no frames decoded.
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r}", "pass e.g. fps=2.0 (Qwen2.5-Omni's rate)")
    if max_frames is not None and max_frames < 1:
        raise MediaError(f"max_frames must be at least 1, got {max_frames}", "pass max_frames=None for no limit")
    if max_side is not None and max_side < 1:
        raise MediaError(f"max_side must be at least 1 pixel, got {max_side}", "pass e.g. max_side=448, or None")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise MediaError(f"max_seconds must be positive, got {max_seconds!r}", "pass e.g. max_seconds=30, or None")
    p = _check_path(path, "video")
    container = _open(p, "video")
    with container, _decoding(p, "video"):
        if not container.streams.video:
            has_audio = bool(container.streams.audio)
            raise MediaError(
                f"{str(p)!r} has no video stream" + (" (it holds audio only)" if has_audio else ""),
                "pass a video file (mp4, webm, mkv, mov, ...) as the video"
                + ("; give an audio-only file as the audio (--audio / audio_path=, or load_audio)" if has_audio else ""))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or getattr(stream, "guessed_rate", None) or getattr(stream, "base_rate", None)
        rate = float(rate) if rate else None
        fps_used = float(min(fps, rate)) if rate else float(fps)
        frames: list[np.ndarray] = []
        t0: float | None = None
        k = 0  # index of the next sampling time, t0 + k / fps_used
        eps = 1e-6
        for i, frame in enumerate(container.decode(stream)):
            t = _frame_time(frame, i, rate)
            if t0 is None:
                t0 = t
            rel = t - t0
            if max_seconds is not None and rel >= max_seconds - eps:
                break
            if rel + eps < k / fps_used:
                continue
            w, h = _scaled_size(frame.width, frame.height, max_side)
            frames.append(frame.reformat(width=w, height=h, format="rgb24").to_ndarray())
            # the next sampling time strictly after this frame (several may be skipped in a variable-rate file)
            k = max(k + 1, math.floor(rel * fps_used + eps) + 1)
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise MediaError(f"no frames could be decoded from the video stream of {str(p)!r}",
                         "check that the file plays (its video stream may be empty or corrupt); "
                         "re-encode it, e.g. `ffmpeg -i in.mp4 out.mp4`")
    return np.stack(frames).astype(np.uint8, copy=False), fps_used


# ------------------------------------------------------------------------------------------------ audio
def load_audio(path: str | os.PathLike, *, sr: int = 16000, max_seconds: float | None = None,
               allow_silent: bool = False) -> np.ndarray:
    """Decode the first audio stream of ``path`` (wav, flac, mp3, ogg, or a video's soundtrack) to mono at ``sr``.

    Args:
        sr: output sample rate (Qwen2.5-Omni's feature extractor expects 16000).
        max_seconds: keep at most this many seconds.
        allow_silent: return a silent soundtrack instead of raising.

    Returns:
        A 1-D float32 waveform in [-1, 1].

    Raises:
        MediaError: missing or undecodable file, no audio stream, no samples, silent audio.
    """
    if not (isinstance(sr, int) and sr > 0):
        raise MediaError(f"sr must be a positive integer sample rate, got {sr!r}", "pass sr=16000")
    if max_seconds is not None and not max_seconds > 0:
        raise MediaError(f"max_seconds must be positive, got {max_seconds!r}", "pass e.g. max_seconds=30, or None")
    av = _import_av()
    p = _check_path(path, "audio")
    container = _open(p, "audio")
    limit = None if max_seconds is None else int(round(max_seconds * sr))
    chunks: list[np.ndarray] = []
    n = 0
    with container, _decoding(p, "audio"):
        if not container.streams.audio:
            kind = "video file" if container.streams.video else "file"
            raise MediaError(f"{kind} {str(p)!r} has no audio stream (no soundtrack)", _AUDIO_FIX)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)

        def take(frames) -> None:
            nonlocal n
            for f in frames:
                a = f.to_ndarray().reshape(-1)  # packed mono float: (1, samples)
                chunks.append(a)
                n += a.size

        for frame in container.decode(stream):
            take(resampler.resample(frame))
            if limit is not None and n >= limit:
                break
        take(resampler.resample(None))  # flush what the resampler holds
    wav = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if limit is not None:
        wav = wav[:limit]
    if wav.size == 0:
        raise MediaError(f"the audio stream of {str(p)!r} has no samples (zero-length soundtrack)", _AUDIO_FIX)
    if not allow_silent and float(np.max(np.abs(wav))) < SILENCE_THRESHOLD:
        raise MediaError(f"the soundtrack of {str(p)!r} is silent (all {wav.size} samples below "
                         f"{SILENCE_THRESHOLD:g} in magnitude), so audio attributions would be meaningless",
                         f"{_AUDIO_FIX} that has sound, or call load_audio(..., allow_silent=True) on purpose")
    return wav


# ------------------------------------------------------------------------------------------------- clip
def load_clip(video_path: str | os.PathLike, audio_path: str | os.PathLike | None = None, *, fps: float = 2.0,
              max_frames: int | None = None, max_side: int | None = None, sr: int = 16000,
              max_seconds: float | None = None) -> MediaClip:
    """Frames from ``video_path`` and audio from ``audio_path``, or from the video's own soundtrack if not given.

    ``max_seconds`` trims both the frames and the audio, keeping them aligned. See :func:`load_video` and
    :func:`load_audio` for the other arguments and the errors raised.
    """
    frames, fps_used = load_video(video_path, fps=fps, max_frames=max_frames, max_side=max_side,
                                  max_seconds=max_seconds)
    audio = load_audio(video_path if audio_path is None else audio_path, sr=sr, max_seconds=max_seconds)
    source = str(video_path) if audio_path is None else f"{video_path} + {audio_path}"
    return MediaClip(frames=frames, fps=fps_used, audio=audio, sr=sr, source=source)
