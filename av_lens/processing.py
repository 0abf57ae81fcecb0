"""From raw media to an AVInput, through the model's native processor.

``prepare`` checks the media first (sample rate, emptiness, shapes, non-finite samples) so that mistakes get
an error naming the problem instead of a shape error deep inside a tower, then builds the prompt (the chat
format with media placeholders, unless the text already holds them), calls the checkpoint's own
``Qwen2_5OmniProcessor`` and computes the modality layout.

Media conventions: audio is mono float at 16 kHz (a 1-D array, or a ``(waveform, sample_rate)`` pair);
images are H x W x 3 arrays (uint8) or PIL images; videos are T x H x W x 3 frame arrays with ``fps``.
A video's soundtrack goes in ``video_audio`` (one waveform per video) and is interleaved with it when
``use_audio_in_video=True``, as the study does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from av_lens.errors import InputError, MediaError
from av_lens.inputs import AVInput

AUDIO_PH = "<|audio_bos|><|AUDIO|><|audio_eos|>"
IMAGE_PH = "<|vision_bos|><|IMAGE|><|vision_eos|>"
VIDEO_PH = "<|vision_bos|><|VIDEO|><|vision_eos|>"


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)) and not (isinstance(x, tuple) and len(x) == 2 and np.isscalar(x[1])):
        return list(x)
    return [x]


def check_audio(wav: Any, expected_sr: int, what: str, max_seconds: float | None = None) -> np.ndarray:
    """A mono float32 waveform at ``expected_sr``, or a :class:`MediaError` that says what is wrong."""
    sr = expected_sr
    if isinstance(wav, tuple) and len(wav) == 2:
        wav, sr = wav
    if isinstance(wav, (str, bytes)) or not hasattr(wav, "__len__"):
        raise MediaError(f"{what} is a {type(wav).__name__}, not a waveform",
                         "decode the file first (av_lens expects a 1-D float array of 16 kHz samples)")
    arr = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if int(sr) != int(expected_sr):
        raise MediaError(f"{what} is sampled at {sr} Hz but the model's feature extractor expects {expected_sr} Hz",
                         f"resample it to {expected_sr} Hz first (e.g. torchaudio.functional.resample)")
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim == 2 and arr.shape[1] < arr.shape[0] and arr.shape[1] <= 8:  # (samples, channels), as soundfile gives
        raise MediaError(f"{what} has shape {arr.shape} (samples x {arr.shape[1]} channels); a mono waveform is 1-D",
                         "mix the channels down to mono over the last axis (wav.mean(axis=1)), not axis 0")
    if arr.ndim != 1:
        raise MediaError(f"{what} has shape {arr.shape}; a mono waveform is 1-D",
                         "mix the channels down to mono (e.g. wav.mean(axis=0))")
    if arr.size == 0:
        raise MediaError(f"{what} is empty (0 samples)", "pass at least 40 ms (640 samples) of audio")
    if not np.issubdtype(arr.dtype, np.floating):
        if np.issubdtype(arr.dtype, np.integer):
            raise MediaError(f"{what} has integer samples ({arr.dtype})",
                             "convert to float in [-1, 1] (e.g. wav.astype(np.float32) / 32768 for int16)")
        raise MediaError(f"{what} has dtype {arr.dtype}", "pass float samples in [-1, 1]")
    if not np.isfinite(arr).all():
        raise MediaError(f"{what} contains NaN or infinite samples", "clean the waveform (np.nan_to_num) first")
    peak = float(np.abs(arr).max())
    if peak > 2.0:
        raise MediaError(f"{what} has float samples up to {peak:g} in magnitude; float audio lies in [-1, 1]"
                         + (" (this looks like int16-scale samples stored as float)" if peak >= 100 else ""),
                         "divide by the full scale first (wav / 32768 for int16-scale samples), or normalise "
                         "with wav / np.abs(wav).max()")
    if arr.size < 640:
        raise MediaError(f"{what} has {arr.size} samples ({arr.size / expected_sr * 1000:.0f} ms), shorter than one "
                         "40 ms audio token", "pass at least 640 samples")
    if max_seconds is not None and arr.size > max_seconds * expected_sr:
        raise MediaError(f"{what} lasts {arr.size / expected_sr:.1f} s but the feature extractor keeps {max_seconds:.0f} s",
                         f"trim or split the audio into pieces of at most {max_seconds:.0f} s")
    return arr.astype(np.float32, copy=False)


def check_pixels(arr: np.ndarray, what: str) -> None:
    """Pixel values the processor reads as intended: uint8 (or integers) in 0..255, or floats in [0, 255].

    Bool, NaN/Inf, negative or > 255 values are refused; float frames that all lie in [0, 1] are warned about
    (the processor divides by 255, so they would be read as an almost black picture)."""
    if arr.dtype == bool:
        raise MediaError(f"{what} has bool pixels (a mask?), not RGB values",
                         "pass uint8 RGB values in 0..255 (e.g. mask.astype(np.uint8) * 255)")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MediaError(f"{what} has dtype {arr.dtype}, not pixel values", "pass uint8 RGB values in 0..255")
    if arr.size == 0 or arr.dtype == np.uint8:
        return
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise MediaError(f"{what} has NaN or infinite pixel values", "clean the frames (np.nan_to_num) first")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise MediaError(f"{what} has pixel values in [{lo:g}, {hi:g}], outside 0..255 ({arr.dtype})",
                         "pass uint8 RGB values in 0..255 (e.g. np.clip(frames, 0, 255).astype(np.uint8))")
    if np.issubdtype(arr.dtype, np.floating) and hi <= 1.0:
        from av_lens.errors import warn

        warn(f"{what} holds float pixels in [{lo:g}, {hi:g}]: the processor reads pixels on a 0..255 scale, so "
             "this is an almost black picture",
             "pass (frames * 255).astype(np.uint8) if the frames are on a 0..1 scale", stacklevel=4)


def _not_an_array(x: Any, what: str, kind: str) -> None:
    if isinstance(x, (str, bytes, os.PathLike)):
        raise MediaError(f"{what} is a {type(x).__name__} ({str(x)[:80]!r}), not {kind}",
                         "decode the file first: av_lens.media.load_video(path) for a video; "
                         "PIL.Image.open(path).convert('RGB') or np.asarray(...) for an image")


def check_video(frames: Any, what: str) -> Any:
    _not_an_array(frames, what, "an array of frames")
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    if isinstance(arr, (list, tuple)):
        if len(arr) == 0:
            raise MediaError(f"{what} has no frames", "pass at least one frame (T x H x W x 3)")
        shapes = sorted({np.shape(f) for f in arr})
        if len(shapes) > 1:
            raise MediaError(f"{what} is a list of frames of different shapes {shapes[:4]}",
                             "resize every frame to one (H, W, 3) size before stacking")
        arr = np.stack([np.asarray(f) for f in arr])
    arr = np.asarray(arr)
    if arr.ndim != 4:
        raise MediaError(f"{what} has shape {arr.shape}; a video is T x H x W x 3 frames",
                         "stack the frames into one array of shape (T, H, W, 3)")
    if arr.shape[0] == 0:
        raise MediaError(f"{what} has no frames", "pass at least one frame (T x H x W x 3)")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        raise MediaError(f"{what} has shape {arr.shape} (channels first)", "transpose to (T, H, W, 3)")
    if arr.shape[-1] != 3:
        raise MediaError(f"{what} has {arr.shape[-1]} channels", "pass RGB frames (T, H, W, 3)")
    if min(arr.shape[1:3]) < 1:
        raise MediaError(f"{what} has empty frames {arr.shape[1:3]}", "pass frames of at least 28 x 28 pixels")
    check_pixels(arr, what)
    return arr


def check_image(img: Any, what: str) -> Any:
    if hasattr(img, "size") and hasattr(img, "mode"):  # PIL
        if min(img.size) < 1:
            raise MediaError(f"{what} is empty", "pass a non-empty image")
        return img
    _not_an_array(img, what, "an image")
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise MediaError(f"{what} has shape {arr.shape}; an image is H x W x 3",
                         "pass an RGB array (H, W, 3) or a PIL image")
    if min(arr.shape[:2]) < 1:
        raise MediaError(f"{what} is empty {arr.shape}", "pass a non-empty image")
    check_pixels(arr, what)
    return arr


def placeholders(model) -> dict[str, str]:
    """Each media kind's placeholder block in this model's vocabulary (kind -> e.g. ``"<|vision_bos|><|IMAGE|>
    <|vision_eos|>"``), spelled from the model's token ids: Qwen2.5-Omni and Qwen2.5-VL share the ids but not
    the strings (``<|IMAGE|>`` vs ``<|image_pad|>``)."""
    t, tok = model.cfg.tokens, model.tokenizer
    if tok is None:
        return {"audio": AUDIO_PH, "image": IMAGE_PH, "video": VIDEO_PH}
    s = lambda i: tok.convert_ids_to_tokens(int(i))
    out = {"image": s(t.vision_bos) + s(t.image) + s(t.vision_eos), "video": s(t.vision_bos) + s(t.video) + s(t.vision_eos)}
    if "audio" in model.cfg.modalities:
        out["audio"] = s(t.audio_bos) + s(t.audio) + s(t.audio_eos)
    return out



def _processor_for(model, text):
    """The model's processor for raw media and a text prompt, or the error that names what is missing."""
    if model.processor is None:
        raise InputError("this checkpoint has no processor config, so raw media cannot be prepared",
                         "save the processor with the checkpoint (processor.save_pretrained) or pass processor_output=")
    if text is None:
        raise InputError("prepare() needs a text prompt", "pass text='Describe what you see and hear.'")
    return model.processor

def chat_prompt(text: str, *, n_images: int = 0, n_videos: int = 0, n_audio: int = 0,
                system_prompt: str | None = None, media_placeholders: dict[str, str] | None = None) -> str:
    """The Qwen chat format: media placeholders (videos, images, audio) then the text, then the
    assistant turn. If ``text`` already holds placeholders it is used as the user turn as is.
    ``media_placeholders`` (from :func:`placeholders`) default to Qwen2.5-Omni's."""
    ph = media_placeholders or {"audio": AUDIO_PH, "image": IMAGE_PH, "video": VIDEO_PH}
    has_ph = any(_inner(p) in text for p in ph.values())
    media = "" if has_ph else ph["video"] * n_videos + ph["image"] * n_images + ph.get("audio", "") * n_audio
    sys_turn = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
    return f"{sys_turn}<|im_start|>user\n{media}{text}<|im_end|>\n<|im_start|>assistant\n"


def _inner(block: str) -> str:
    """The placeholder token of a placeholder block (``<|IMAGE|>`` of ``<|vision_bos|><|IMAGE|><|vision_eos|>``)."""
    parts = block.split("><")
    return "<" + parts[1] + ">" if len(parts) == 3 else block


def _audio_slot_order(text: str, audio_token: str = "<|AUDIO|>", video_token: str = "<|VIDEO|>") -> list[str]:
    """For each audio slot in text order: 'video' (a soundtrack interleaved with a video) or 'audio'."""
    order, i = [], 0
    while True:
        a, v = text.find(audio_token, i), text.find(video_token, i)
        if a < 0 and v < 0:
            return order
        if v >= 0 and (a < 0 or v < a):
            order.append("video")
            i = v + 1
        else:
            order.append("audio")
            i = a + 1


def prepare(model, text: str | Sequence[str] | None = None, *, audio=None, images=None, videos=None,
            video_audio=None, use_audio_in_video: bool | None = None, fps: float = 2.0, chat: bool = True,
            system_prompt: str | None = "default", processor_output: Mapping | None = None,
            processor_kwargs: Mapping | None = None) -> AVInput:
    """Build an :class:`AVInput` for ``model``.

    Args:
        text: the user prompt (one string, or a list for a batch; batch texts must contain their media
            placeholders, e.g. ``"<|vision_bos|><|VIDEO|><|vision_eos|>What do you hear?"``).
        audio: standalone audio clips (16 kHz mono), in the order of their placeholders.
        images / videos: RGB images (H, W, 3) and videos (T, H, W, 3).
        video_audio: one soundtrack per video; with ``use_audio_in_video=True`` (the default when given)
            it is interleaved with its video in 2-second chunks, as Qwen2.5-Omni does.
        fps: frame rate of the given video frames.
        chat: wrap the text in the chat format (system turn, user turn with placeholders, assistant turn).
        system_prompt: "default" uses the model's documented system prompt (if its YAML has one); None for none.
        processor_output: instead of media, the dict a Qwen2.5-Omni processor already returned.
    """
    if model.adapter.prepare is not None:  # a processor family of its own (Phi-4-multimodal)
        return model.adapter.prepare(model, text, audio=audio, images=images, videos=videos, video_audio=video_audio,
                                     use_audio_in_video=use_audio_in_video, fps=fps, chat=chat,
                                     system_prompt=system_prompt, processor_output=processor_output,
                                     processor_kwargs=processor_kwargs)
    cfg = model.cfg
    if use_audio_in_video is None:
        use_audio_in_video = video_audio is not None
    if processor_output is not None:
        return model.to_input(processor_output, use_audio_in_video=use_audio_in_video).to(model.device)
    proc = _processor_for(model, text)
    ph = placeholders(model)
    if "audio" not in cfg.modalities and (audio is not None or video_audio is not None):
        raise InputError(f"{cfg.model_name or 'this model'} ({cfg.original_architecture}) takes no audio",
                         "drop audio= and video_audio=, or load an audio-visual model")
    fe = getattr(proc, "feature_extractor", None)
    sr = int(getattr(fe, "sampling_rate", cfg.audio_sample_rate))
    max_s = float(getattr(fe, "n_samples", 0)) / sr or None
    audio = [check_audio(a, sr, f"audio[{i}]", max_s) for i, a in enumerate(_as_list(audio))]
    video_audio = [check_audio(a, sr, f"video_audio[{i}]", max_s) for i, a in enumerate(_as_list(video_audio))]
    images = [check_image(im, f"images[{i}]") for i, im in enumerate(_as_list(images))]
    videos = [check_video(v, f"videos[{i}]") for i, v in enumerate(_as_list(videos))] if videos is not None else []
    if fps is None or not 0 < fps < float("inf"):  # also refuses NaN
        raise MediaError(f"fps must be positive, got {fps}", "pass the frame rate of the given frames (e.g. fps=2.0)")
    if use_audio_in_video and len(video_audio) != len(videos):
        raise MediaError(f"use_audio_in_video=True with {len(videos)} video(s) but {len(video_audio)} soundtrack(s)",
                         "pass one waveform per video in video_audio=[...], or use_audio_in_video=False")
    if video_audio and not use_audio_in_video:
        audio = video_audio + audio  # soundtracks become standalone audio items placed before other audio
        video_audio = []
    texts = [text] if isinstance(text, str) else list(text)
    if system_prompt == "default":
        system_prompt = cfg.system_prompt
    if chat:
        if len(texts) > 1 and not all(any(_inner(p) in t for p in ph.values()) for t in texts) and (audio or images or videos):
            raise InputError("a batch of prompts with media needs the media placeholders in each prompt",
                             f"write e.g. '{ph['video']}What do you hear?' in each text")
        texts = [chat_prompt(t, n_images=len(images), n_videos=len(videos), n_audio=len(audio),
                             system_prompt=system_prompt, media_placeholders=ph) for t in texts]
    # left padding, which generation needs (the Omni processor pads left by default, Qwen2.5-VL's right)
    kwargs: dict[str, Any] = dict(return_tensors="pt", padding=True, padding_side="left")
    if videos:
        vk = {"fps": float(fps), "do_sample_frames": False}
        if "audio" not in cfg.modalities:
            # the Qwen2.5-VL processor times frames from their metadata (without it: 24 fps), not from fps=
            vk["video_metadata"] = [{"fps": float(fps), "total_num_frames": len(v), "frames_indices": list(range(len(v)))}
                                    for v in videos]
        size = _own_video_size(model)
        if size is not None:
            vk["size"] = size
        kwargs["videos_kwargs"] = vk
    all_audio = audio
    if use_audio_in_video and videos:
        # audio slots in text order: each video's soundtrack where its video is, standalone clips elsewhere
        slots, v_it, a_it, idx = [], iter(range(len(videos))), iter(audio), []
        for kind in (k for t in texts for k in _audio_slot_order(t, _inner(ph["audio"]), _inner(ph["video"]))):
            if kind == "video":
                vi = next(v_it)
                slots.append(video_audio[vi])
                idx.append(vi)
            else:
                slots.append(next(a_it, None))
                idx.append(None)
        if any(s is None for s in slots):
            raise MediaError(f"the prompt has more <|AUDIO|> placeholders than the {len(audio)} audio clip(s) given",
                             "pass one clip per placeholder")
        all_audio = slots
        kwargs["load_audio_from_video"] = True
        kwargs["audio_from_video_indices"] = idx
    kwargs.update(processor_kwargs or {})
    if all_audio:
        kwargs["audio"] = all_audio
    if cfg.rope_rules == "qwen3_omni":  # its processor interleaves audio-in-video by these two settings
        kwargs["position_id_per_seconds"] = cfg.position_id_per_seconds
        kwargs["n_window"] = cfg.audio_n_window
    elif cfg.rope_rules == "qwen2_5_omni" and use_audio_in_video and videos:
        # the processor interleaves by its own class defaults (25 / 2 s) unless told the checkpoint's
        kwargs["position_id_per_seconds"] = cfg.position_id_per_seconds
        kwargs["seconds_per_chunk"] = cfg.seconds_per_chunk
    try:
        data = proc(text=texts, images=images or None, videos=videos or None, **kwargs)
    except (ValueError, IndexError, RuntimeError) as e:
        raise MediaError(f"the processor rejected these inputs: {e}",
                         "check that each placeholder has its media (one per <|AUDIO|>/<|IMAGE|>/<|VIDEO|>) "
                         "and that frames are RGB arrays") from e
    inp = AVInput.from_processor_output(
        data, cfg.tokens, use_audio_in_video=bool(use_audio_in_video and videos),
        spatial_merge_size=cfg.spatial_merge_size, position_id_per_seconds=cfg.position_id_per_seconds,
        seconds_per_chunk=cfg.seconds_per_chunk, rope_rules=cfg.rope_rules, audio_n_window=cfg.audio_n_window,
    )
    return inp.to(model.device)


class MediaRequest(NamedTuple):
    """Checked media of a ``prepare`` request of a family that builds its own prompts (video-SALMONN-2+,
    VideoLLaMA2): 16 kHz mono clips, RGB images, frame arrays, one soundtrack per video when interleaved."""

    audio: list
    images: list
    videos: list
    video_audio: list
    use_audio_in_video: bool


def media_request(audio, images, videos, video_audio, use_audio_in_video, fps, sr: int = 16000) -> MediaRequest:
    """Check every medium (errors name the item and the fix) and the soundtrack rules of ``video_audio``."""
    if fps is None or not 0 < fps < float("inf"):  # also refuses NaN
        raise MediaError(f"fps must be positive, got {fps}", "pass the frame rate of the given frames (e.g. fps=2.0)")
    if use_audio_in_video is None:
        use_audio_in_video = video_audio is not None
    audio = [check_audio(a, sr, f"audio[{i}]") for i, a in enumerate(_as_list(audio))]
    video_audio = [check_audio(a, sr, f"video_audio[{i}]") for i, a in enumerate(_as_list(video_audio))]
    images = [check_image(im, f"images[{i}]") for i, im in enumerate(_as_list(images))]
    videos = [check_video(v, f"videos[{i}]") for i, v in enumerate(_as_list(videos))]
    if video_audio and not use_audio_in_video:
        raise InputError("video_audio= given with use_audio_in_video=False",
                         "pass the soundtracks as audio=[...] (standalone clips), or drop use_audio_in_video=False")
    if use_audio_in_video and len(video_audio) != len(videos):
        raise MediaError(f"use_audio_in_video=True with {len(videos)} video(s) but {len(video_audio)} soundtrack(s)",
                         "pass one waveform per video in video_audio=[...]")
    return MediaRequest(audio, images, videos, video_audio, bool(use_audio_in_video))


class ImageAudioRequest(NamedTuple):
    """A checked ``prepare`` request of a model family that takes images and audio but no video."""

    texts: list[str]
    audio: list
    images: list
    image_ph: str
    audio_ph: str
    has_ph: list[bool]
    sampling_rate: int


def image_audio_request(model, family: str, text, *, audio, images, videos, video_audio, use_audio_in_video,
                        processor_output, check_batch: bool = True) -> "ImageAudioRequest | None":
    """The checks that open ``prepare`` for image+audio families (Phi-4-multimodal, Gemma-3n): video refused,
    media checked, placeholders spelled from the tokenizer. None when ``processor_output`` is given (the caller
    wraps it as is). ``check_batch``: a batch with media must hold its placeholders in every prompt."""
    cfg = model.cfg
    if videos is not None or video_audio is not None or use_audio_in_video:
        raise InputError(f"{cfg.model_name or family} ({cfg.original_architecture}) takes no video",
                         "pass frames as images=[...] and the soundtrack as audio=[...], or load a Qwen Omni model")
    if processor_output is not None:
        return None
    proc = _processor_for(model, text)
    fe = getattr(proc, "feature_extractor", None) or getattr(proc, "audio_processor", None)
    sr = int(getattr(fe, "sampling_rate", cfg.audio_sample_rate))
    audio = [check_audio(a, sr, f"audio[{i}]") for i, a in enumerate(_as_list(audio))]
    images = [check_image(im, f"images[{i}]") for i, im in enumerate(_as_list(images))]
    tok = model.tokenizer
    img_ph, aud_ph = tok.convert_ids_to_tokens(cfg.tokens.image), tok.convert_ids_to_tokens(cfg.tokens.audio)
    texts = [text] if isinstance(text, str) else list(text)
    has_ph = [img_ph in t or aud_ph in t for t in texts]
    if check_batch and len(texts) > 1 and (images or audio) and not all(has_ph):
        raise InputError("a batch of prompts with media needs the media placeholders in each prompt",
                         f"write e.g. '{img_ph}{aud_ph}What do you see and hear?' in each text")
    return ImageAudioRequest(texts, audio, images, img_ph, aud_ph, has_ph, sr)


def _own_video_size(model) -> dict | None:
    """Checkpoints without a registry entry (tiny models, the organism) use their video processor's own size.

    The Qwen2.5-Omni processor otherwise imposes its class default (128..768 x 28 x 28 pixels), which is
    what real checkpoints expect."""
    if model.cfg.extra.get("spec"):  # a registered real checkpoint
        return None
    vp = getattr(model.processor, "video_processor", None)
    lo, hi = getattr(vp, "min_pixels", None), getattr(vp, "max_pixels", None)
    if lo is None or hi is None:
        size = getattr(vp, "size", None) or {}
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    if lo is None or hi is None:
        return None
    return {"shortest_edge": int(lo), "longest_edge": int(hi)}
