"""Bad inputs give errors that name the problem and the fix (each message has 'Fix:')."""

import dataclasses

import numpy as np
import pytest
import torch

from av_lens import AVLensError, InputError, LayoutError, MediaError
from conftest import cases


def expect(exc, match, fn):
    with pytest.raises(exc, match=match) as info:
        fn()
    assert "Fix:" in str(info.value)
    return info.value


def test_wrong_sample_rate(model, media):
    expect(MediaError, "44100 Hz but the model's feature extractor expects 16000 Hz",
           lambda: model.prepare("x", audio=[(media["wav3"], 44100)]))


def test_empty_audio(model):
    expect(MediaError, "empty", lambda: model.prepare("x", audio=[np.zeros(0, np.float32)]))


def test_too_short_audio(model):
    expect(MediaError, "shorter than one 40 ms audio token", lambda: model.prepare("x", audio=[np.zeros(100, np.float32)]))


def test_stereo_audio(model, media):
    expect(MediaError, "mono", lambda: model.prepare("x", audio=[np.stack([media["wav3"]] * 2)]))


def test_integer_audio(model):
    expect(MediaError, "integer samples", lambda: model.prepare("x", audio=[np.ones(16000, np.int16)]))


def test_nan_audio(model, media):
    bad = media["wav3"].copy()
    bad[5] = np.nan
    expect(MediaError, "NaN", lambda: model.prepare("x", audio=[bad]))


def test_too_long_audio(model):
    expect(MediaError, "feature extractor keeps 30 s", lambda: model.prepare("x", audio=[np.zeros(16000 * 31, np.float32)]))


def test_video_without_frames(model):
    expect(MediaError, "no frames", lambda: model.prepare("x", videos=[np.zeros((0, 56, 56, 3), np.uint8)]))


def test_video_channels_first(model):
    expect(MediaError, "channels first", lambda: model.prepare("x", videos=[np.zeros((4, 3, 56, 56), np.uint8)]))


def test_bad_fps(model, media):
    expect(MediaError, "fps must be positive", lambda: model.prepare("x", videos=[media["video"]], fps=0))


def test_missing_soundtrack(model, media):
    expect(MediaError, "1 video\\(s\\) but 0 soundtrack", lambda: model.prepare("x", videos=[media["video"]],
                                                                              use_audio_in_video=True))


def test_placeholder_feature_count_mismatch(model, media):
    inp = model.prepare(**cases(media)["audio"])
    data = {k: v for k, v in inp.hf_kwargs().items() if k != "use_audio_in_video"}
    ids = data["input_ids"]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[int(inp.layout.positions("audio")[0])] = False  # drop one <|AUDIO|> placeholder
    data["input_ids"], data["attention_mask"] = ids[:, keep], data["attention_mask"][:, keep]
    expect(LayoutError, "74 placeholder tokens in the text but its 300 mel frames gives 75", lambda: model(data))


def test_media_without_placeholder(model, media):
    img = model.prepare(**cases(media)["image"])
    data = {"pixel_values": img.pixel_values, "image_grid_thw": img.image_grid_thw,
            "input_ids": torch.tensor([[20, 21, 22]])}
    expect(LayoutError, "1 image input\\(s\\) given but the text has 0", lambda: model(data))


def test_device_mismatch(model, media):
    inp = model.prepare(**cases(media)["audio"])
    on_meta = dataclasses.replace(inp, input_ids=inp.input_ids.to("meta"))
    expect(InputError, "is on meta but the model is on cpu", lambda: model(on_meta))


def test_dtype_mismatch_of_precomputed_encoder_outputs(model, media):
    enc = model.encode(model.prepare(**cases(media)["audio"]))
    bad = enc.with_encoder_outputs({"audio": enc.encoder_outputs["audio"].double()})
    expect(InputError, "float64 but the model runs in torch.float32", lambda: model(bad))


def test_token_out_of_vocab(model):
    expect(InputError, "vocabulary has", lambda: model(torch.tensor([[1, 5000]])))


def test_float_input_ids(model):
    expect(InputError, "integer token ids", lambda: model({"input_ids": torch.rand(1, 4)}))


def test_bad_max_new_tokens(model, media):
    expect(InputError, "max_new_tokens must be at least 1",
           lambda: model.generate(model.prepare(**cases(media)["text"]), max_new_tokens=0))


def test_unknown_selector(model, media):
    L = model.prepare(**cases(media)["audio"]).layout
    expect(LayoutError, "unknown selector 'sound'", lambda: L.mask("sound"))


def test_not_a_waveform(model):
    expect(MediaError, "not a waveform", lambda: model.prepare("x", audio=["clip.wav"]))


def test_all_errors_are_value_errors():
    assert issubclass(AVLensError, ValueError)
