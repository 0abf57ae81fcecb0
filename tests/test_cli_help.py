"""The command line reads well: plain-text help with examples and defaults, --version, no torch for --help, and
a user's clip is decoded, checked and trimmed to the model's window before any model loads."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from av_lens import cli


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_is_plain_text_with_examples_and_version():
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "``" not in r.stdout and "examples:" in r.stdout and "av-lens demo" in r.stdout
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "--version"], capture_output=True, text=True, timeout=60)
    import av_lens

    assert r.returncode == 0 and r.stdout.strip() == f"av-lens {av_lens.__version__}"


def test_help_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom av_lens import cli\n"
            "for argv in (['--help'], ['report', '--help'], ['demo', '--help'], ['sweep', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: cli.main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'av') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_import_av_lens_is_lazy():
    code = ("import sys, av_lens\nheavy = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules]\n"
            "from av_lens import HookedAVTransformer, S, AVInput, MediaError\n"
            "print(heavy, 'torch' in sys.modules, sorted(av_lens.__all__) == sorted(set(dir(av_lens)) & set(av_lens.__all__)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "True", "True"], r.stdout
    import av_lens

    with pytest.raises(AttributeError, match="no_such_name"):
        av_lens.no_such_name  # noqa: B018


@pytest.mark.parametrize("cmd", ["demo", "report", "sweep"])
def test_every_option_has_help_and_states_its_default(cmd):
    sub = _subparsers(cli.build_parser())[cmd]
    assert sub.description and "``" not in sub.description
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help, f"{cmd} {a.option_strings} has no help"
        if a.default not in (None, False) and not a.required:
            assert "default" in a.help, f"{cmd} {a.option_strings}: help does not state the default {a.default!r}"


@pytest.mark.parametrize("cmd", ["demo", "report"])
def test_model_commands_take_device_and_dtype(cmd):
    args = cli.build_parser().parse_args([cmd, "--device", "cuda:1", "--dtype", "bf16"])
    assert (args.device, args.dtype) == ("cuda:1", "bf16")


def test_report_help_states_the_clip_limit():
    sub = _subparsers(cli.build_parser())["report"]
    text = sub.format_help()
    assert "6 s" in text and "--start" in text and "--duration" in text and "built-in pair" in text
    assert cli.clip_limit_seconds(None) == pytest.approx(6.0)
    assert cli.clip_limit_seconds("/no/such/folder") is None


# ---------------------------------------------------------------------------------------------- own media
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    pytest.importorskip("av")
    from tests import test_media as tm

    d = tmp_path_factory.mktemp("media")
    if tm.MP4_V is None or tm.MP4_A is None:
        pytest.fail("this FFmpeg build cannot encode mp4 video and audio")
    long = _write_mp4(tm, d / "long.mp4", 9.0)
    short = tm.write_wav(d / "short.wav", np.stack([tm._tone(16000, 2.0)] * 2), 16000)
    return SimpleNamespace(long=long, short=short)


def _write_mp4(tm, path, secs: float, rate: int = 44100):
    """A ``secs``-second mp4: the moving square at 25 fps and a stereo 440 Hz tone (AAC where available)."""
    import av
    from fractions import Fraction

    c = av.open(str(path), "w", format="mp4")
    vs = c.add_stream(tm.MP4_V, rate=tm.VRATE)
    vs.width, vs.height, vs.pix_fmt = tm.W, tm.H, "yuv420p"
    aus = c.add_stream(tm.MP4_A, rate=rate)
    aus.layout = "stereo"
    for i in range(int(secs * tm.VRATE)):
        f = av.VideoFrame.from_ndarray(tm._video_frame(i % 60), format="rgb24")
        f.pts, f.time_base = i, Fraction(1, tm.VRATE)
        for p in vs.encode(f):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    fmt = aus.codec_context.codec.audio_formats[0].name
    tone = tm._tone(rate, secs)
    tm._encode_audio(c, aus, np.stack([tone, tone]), rate, "s16" if fmt.startswith("s16") else "fltp", "stereo")
    c.close()
    return path


def _args(**kw):
    base = dict(model=None, video=None, audio=None, counterfactual_audio=None, start=0.0, duration=None, fps=2.0,
                max_side=448)
    return SimpleNamespace(**{**base, **kw})


def test_a_long_clip_is_trimmed_to_the_models_window_with_a_note(media):
    notes = []
    clip, cf = cli.load_user_clip(_args(video=media.long), log=notes.append)
    assert cf is None
    assert len(clip.audio) == 6 * 16000 and len(clip.frames) == 12
    assert len(notes) == 1 and "trimmed to 0-6.00 s" in notes[0] and "--start/--duration" in notes[0]


def test_start_and_duration_choose_the_window(media):
    notes = []
    clip, _ = cli.load_user_clip(_args(video=media.long, start=1.5, duration=2.0), log=notes.append)
    assert len(clip.audio) == 2 * 16000 and len(clip.frames) == 4
    full, _ = cli.load_user_clip(_args(video=media.long, duration=4.0), log=lambda m: None)
    assert np.allclose(clip.audio[:1000], full.audio[24000:25000], atol=1e-3)  # the window starts 1.5 s in
    assert "1.5-3.50 s" in notes[0]


def test_counterfactual_audio_is_padded_with_a_note(media):
    notes = []
    clip, cf = cli.load_user_clip(_args(video=media.long, counterfactual_audio=media.short), log=notes.append)
    assert len(cf.audio) == len(clip.audio) == 6 * 16000
    assert np.all(cf.audio[2 * 16000 + 10:] == 0)
    assert any("padded with silence" in n and "2.00 s" in n for n in notes), notes


@pytest.mark.parametrize("kw, msg", [(dict(duration=9.5), "longer than the 6 s"), (dict(start=10.0), "past the end"),
                                     (dict(duration=0.0), "not a positive")])
def test_bad_windows_are_refused_before_any_model_loads(media, kw, msg):
    from av_lens.errors import InputError

    with pytest.raises(InputError, match=msg):
        cli.load_user_clip(_args(video=media.long, **kw), log=lambda m: None)


def test_cli_refuses_a_bad_window_fast_with_rc_2(media, tmp_path):
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "report", "--video", str(media.long), "--duration", "9",
                        "--out", str(tmp_path / "r.html")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "longer than the 6 s" in r.stderr and "Fix:" in r.stderr
    assert not (tmp_path / "r.html").exists()
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "report", "--start", "-1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--start" in r.stderr
