"""av_lens.media: decoding real files (mp4, webm, wav, flac) with PyAV, and clear errors for bad ones.

Every file is written here with PyAV itself (no downloads): a 3 s clip of a red square moving right over a
blue background, with a 440 Hz tone as its soundtrack.
"""

from fractions import Fraction

import numpy as np
import pytest

import av  # noqa: E402 - a core dependency (media decoding)

from av_lens.errors import MediaError  # noqa: E402
from av_lens.media import MediaClip, load_audio, load_clip, load_video  # noqa: E402

SECS, VRATE, W, H = 3.0, 25, 96, 64
SQ_Y, SQ = 24, 16  # the square: rows 24..39, columns x..x+15 with x = 4 + frame index
RED, BLUE = (220, 20, 20), (20, 20, 200)
TONE = 440.0


def _encoder(*names):
    """The first of ``names`` that this FFmpeg build can encode with, or None."""
    for n in names:
        try:
            av.codec.Codec(n, "w")
            return n
        except Exception:  # av.codec.codec.UnknownCodecError, or a decoder-only codec
            continue
    return None


def _square_x(i: int) -> int:
    return 4 + i


def _video_frame(i: int) -> np.ndarray:
    img = np.empty((H, W, 3), np.uint8)
    img[:] = BLUE
    x = _square_x(i)
    img[SQ_Y:SQ_Y + SQ, x:x + SQ] = RED
    return img


def _tone(rate: int, secs: float = SECS, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(secs * rate))) / rate
    return (amp * np.sin(2 * np.pi * TONE * t)).astype(np.float32)


def _encode_audio(container, stream, samples: np.ndarray, rate: int, fmt: str, layout: str) -> None:
    """``samples``: (channels, n) float in [-1, 1]; written in 1024-sample frames."""
    if fmt == "s16":  # packed: one plane of interleaved channels
        planes = (np.clip(samples, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
    else:
        planes = samples.astype(np.float32)
    ch = samples.shape[0]
    step = 1024
    for s in range(0, samples.shape[1], step):
        chunk = planes[:, s * ch:(s + step) * ch] if fmt == "s16" else planes[:, s:s + step]
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout=layout)
        f.sample_rate, f.pts, f.time_base = rate, s, Fraction(1, rate)
        for p in stream.encode(f):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)


def write_av(path, fmt: str, vcodec: str | None, acodec: str | None, arate: int = 44100, vopts=None):
    """A 3 s video (moving red square) and/or a stereo 440 Hz tone, in container ``fmt``."""
    c = av.open(str(path), "w", format=fmt)
    vs = aus = None
    if vcodec:
        vs = c.add_stream(vcodec, rate=VRATE, options=vopts or {})
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
    if acodec:
        aus = c.add_stream(acodec, rate=arate)
        aus.layout = "stereo"
    if vs is not None:
        for i in range(int(SECS * VRATE)):
            f = av.VideoFrame.from_ndarray(_video_frame(i), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, VRATE)
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    if aus is not None:
        fmt_a = aus.codec_context.codec.audio_formats[0].name  # e.g. fltp (aac, opus), s16 (pcm, flac)
        fmt_a = "s16" if fmt_a.startswith("s16") else "fltp"
        tone = _tone(arate)
        _encode_audio(c, aus, np.stack([tone, tone]), arate, fmt_a, "stereo")
    c.close()
    return path


def write_wav(path, samples: np.ndarray, rate: int, codec: str = "pcm_s16le", fmt: str = "wav"):
    c = av.open(str(path), "w", format=fmt)
    s = c.add_stream(codec, rate=rate)
    s.layout = "stereo" if samples.shape[0] == 2 else "mono"
    _encode_audio(c, s, samples, rate, "s16", s.layout.name)
    c.close()
    return path


MP4_V = _encoder("libx264", "h264", "mpeg4")
MP4_A = _encoder("aac", "libfdk_aac", "mp3", "libmp3lame")
WEBM_V = _encoder("libvpx", "libvpx-vp9")
WEBM_A = _encoder("libopus", "libvorbis")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    tone = _tone(44100)
    out = {
        "mp4": write_av(d / "clip.mp4", "mp4", MP4_V, MP4_A),
        "video_only": write_av(d / "silent_film.mp4", "mp4", MP4_V, None),
        "wav": write_wav(d / "tone.wav", np.stack([tone, tone]), 44100),
        "flac": write_wav(d / "tone.flac", np.stack([tone, tone]), 44100, codec="flac", fmt="flac"),
        "silent": write_wav(d / "silence.wav", np.zeros((1, 16000), np.float32), 16000),
    }
    if WEBM_V and WEBM_A:
        out["webm"] = write_av(d / "clip.webm", "webm", WEBM_V, WEBM_A, arate=48000,
                               vopts={"deadline": "realtime", "cpu-used": "8"})
    (d / "notes.mp4").write_text("these are notes, not a video\n" * 20)
    out["text"] = d / "notes.mp4"
    # a video stream that holds no frames (only the audio stream has packets)
    c = av.open(str(d / "no_frames.mkv"), "w", format="matroska")
    vs = c.add_stream("mpeg4", rate=VRATE)
    vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
    aus = c.add_stream("pcm_s16le", rate=16000)
    aus.layout = "mono"
    _encode_audio(c, aus, _tone(16000, 1.0)[None], 16000, "s16", "mono")
    c.close()
    out["no_frames"] = d / "no_frames.mkv"
    return out


def _needs(files, key):
    # PyAV's wheels bundle an FFmpeg with libvpx and libopus: a build without them is a broken install here
    assert key in files, f"this FFmpeg build has no {key} encoder (tried libvpx/libvpx-vp9 + libopus/libvorbis)"
    return files[key]


def _check_frames(frames, fps_used, scale=1.0):
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    assert fps_used == 2.0
    assert abs(frames.shape[0] - fps_used * SECS) <= 1
    assert frames.shape[1:3] == (round(H * scale), round(W * scale))
    for k, img in enumerate(frames):
        i = int(np.ceil(k / fps_used * VRATE - 1e-9))  # the first source frame at or after k / fps
        cy = int((SQ_Y + SQ / 2) * scale)
        cx = int((_square_x(i) + SQ / 2) * scale)
        r, g, b = (int(v) for v in img[cy, cx])
        assert r > 150 and g < 90 and b < 90, (k, (r, g, b))  # the red square where it should be
        r, g, b = (int(v) for v in img[int(4 * scale), cx])  # above it: blue background
        assert b > 150 and r < 90, (k, (r, g, b))
    # the square moves right: its red mass shifts from frame to frame
    red = (frames[..., 0].astype(int) - frames[..., 2].astype(int)) > 100
    xs = [np.nonzero(m.any(0))[0].mean() for m in red]
    assert all(b > a for a, b in zip(xs, xs[1:]))


def _check_tone(wav, secs=SECS, sr=16000):
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - secs * sr) <= 0.02 * secs * sr, wav.size
    spec = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    peak = np.fft.rfftfreq(wav.size, 1 / sr)[spec.argmax()]
    assert abs(peak - TONE) < 2.0, peak
    assert 0.3 < np.abs(wav).max() <= 1.0  # stereo 0.5 tone mixed down to mono keeps its level


# ------------------------------------------------------------------------------------------------ video
@pytest.mark.parametrize("key", ["mp4", "webm"])
def test_load_video_samples_frames_by_time(files, key):
    frames, fps_used = load_video(_needs(files, key), fps=2.0)
    _check_frames(frames, fps_used)


def test_load_video_downscales_and_limits(files):
    frames, fps_used = load_video(files["mp4"], fps=2.0, max_side=48)
    _check_frames(frames, fps_used, scale=0.5)
    frames, _ = load_video(files["mp4"], fps=2.0, max_frames=3)
    assert frames.shape[0] == 3
    frames, _ = load_video(files["mp4"], fps=2.0, max_seconds=1.0)
    assert frames.shape[0] == 2
    # asking for more than the native 25 fps gives every frame once, at the native rate
    frames, fps_used = load_video(files["mp4"], fps=100.0)
    assert fps_used == pytest.approx(VRATE) and abs(frames.shape[0] - SECS * VRATE) <= 1


# ------------------------------------------------------------------------------------------------ audio
@pytest.mark.parametrize("key", ["mp4", "webm", "wav", "flac"])
def test_load_audio_resamples_to_16k_mono(files, key):
    _check_tone(load_audio(_needs(files, key)))


def test_load_audio_max_seconds_and_rate(files):
    wav = load_audio(files["flac"], max_seconds=1.0)
    assert wav.size == 16000
    _check_tone(load_audio(files["wav"], sr=8000), sr=8000)


# ------------------------------------------------------------------------------------------------- clip
def test_load_clip_uses_the_soundtrack_or_a_separate_file(files):
    clip = load_clip(files["mp4"], fps=2.0)
    assert isinstance(clip, MediaClip) and clip.sr == 16000 and clip.fps == 2.0
    _check_frames(clip.frames, clip.fps)
    _check_tone(clip.audio)
    assert "6 frames" in repr(clip)
    clip = load_clip(files["video_only"], audio_path=files["flac"], max_side=48)
    _check_frames(clip.frames, clip.fps, scale=0.5)
    _check_tone(clip.audio)
    assert "tone.flac" in clip.source
    with pytest.raises(Exception):
        clip.fps = 3.0  # frozen


def test_clip_goes_through_prepare(files, model):
    clip = load_clip(files["mp4"], fps=2.0, max_side=56)
    assert clip.frames.shape[1:] == (37, 56, 3)
    inp = model.prepare("Describe.", videos=[clip.frames], video_audio=[clip.audio], fps=clip.fps,
                        use_audio_in_video=True)
    counts = inp.layout.counts()
    assert counts["video"] > 0 and counts["audio"] > 0, counts
    inp2 = model.prepare("Describe.", **clip.prepare_kwargs())
    assert inp2.layout.counts() == counts
    logits = model(inp)
    assert logits.shape[1] == inp.input_ids.shape[1] and bool(logits.isfinite().all())


# ----------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match=r"'.*nope\.mp4' does not exist.*Fix: check the path"):
        load_video(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="does not exist"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(MediaError, match="is a directory"):
        load_clip(tmp_path)


def test_not_a_media_file(files):
    for fn in (load_video, load_audio, load_clip):
        with pytest.raises(MediaError, match=r"cannot decode .*notes\.mp4.*Invalid data.*not a readable media file"):
            fn(files["text"])


def test_audio_file_given_as_video(files):
    with pytest.raises(MediaError, match=r"tone\.wav' has no video stream \(it holds audio only\).*--audio"):
        load_video(files["wav"])
    with pytest.raises(MediaError, match="has no video stream"):
        load_clip(files["flac"])


def test_video_without_soundtrack_needs_an_audio_file(files):
    with pytest.raises(MediaError, match=r"silent_film\.mp4' has no audio stream.*Fix: pass a separate audio "
                                         r"file with --audio / audio_path="):
        load_clip(files["video_only"])
    frames, _ = load_video(files["video_only"])  # the frames alone are fine
    assert frames.shape[0] == 6


def test_silent_audio(files):
    with pytest.raises(MediaError, match=r"soundtrack of '.*silence\.wav' is silent"):
        load_audio(files["silent"])
    with pytest.raises(MediaError, match="is silent"):
        load_clip(files["video_only"], audio_path=files["silent"])
    wav = load_audio(files["silent"], allow_silent=True)
    assert wav.size == 16000 and not wav.any()


def test_zero_frames(files):
    with pytest.raises(MediaError, match=r"no frames could be decoded from the video stream of '.*no_frames\.mkv'"):
        load_video(files["no_frames"])


def test_bad_arguments(files):
    with pytest.raises(MediaError, match="fps must be a positive number"):
        load_video(files["mp4"], fps=0)
    with pytest.raises(MediaError, match="max_frames must be at least 1"):
        load_video(files["mp4"], max_frames=0)
    with pytest.raises(MediaError, match="sr must be a positive integer"):
        load_audio(files["wav"], sr=0)
