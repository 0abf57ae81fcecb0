"""VideoLLaMA2.1-7B-AV (DAMO-NLP-SG/VideoLLaMA2.1-7B-AV): the third model of the study av_lens serves (arXiv
2604.02605). Not in transformers; written from the published code (DAMO-NLP-SG/VideoLLaMA2 @8cedfbd, branch
``audio_visual``: ``videollama2/model/videollama2_arch.py``, ``encoder.py``, ``projector.py``, ``beats/``,
``mm_utils.py``, ``__init__.py``).

* **Language model**: a Qwen2 decoder (``Videollama2Qwen2ForCausalLM``; 7B: 28 layers of width 3584, GQA 28:4) with
  plain 1-D positions (``rope_rules="1d"``).
* **Vision**: SigLIP-so400m-patch14-384 (transformers' ``SiglipVisionModel``), features of
  ``hidden_states[mm_vision_select_layer]`` (-2: the second-to-last layer's output, no post-norm), 27 x 27 = 729
  patches per frame, ``num_frames`` (16) frames per video, then the STC connector v35
  (:mod:`av_lens.components.stc`): 8 x 13 x 13 = 1,352 tokens per video. An image is repeated to ``num_frames``
  frames first, so it costs the same.
* **Audio**: BEATs (:mod:`av_lens.components.beats`) on a Kaldi fbank of 30 s rounded to bf16 as the published
  preprocessing does, then ``mm_projector_a`` (Linear-GELU-Linear): 187 x 8 = 1,496 tokens per clip. A standalone
  clip (``process_audio_file``) is zero-padded to 30 s (longer: cropped at a random start in the published code, at
  the start here, with a warning); a video's soundtrack (``process_audio_from_video``) is read as 8 clips of 2 s
  spread evenly over it (pytorchvideo's ``ConstantClipsPerVideoSampler``), joined (16 s) and zero-padded to 30 s.
* **Prompt** (``mm_infer``): the Qwen2 chat format (its default system turn), the user turn ``<video>\\n`` + text.
  One ``<video>`` placeholder takes the video's tokens *then its soundtrack's* (``torch.cat([video, audio])``);
  ``<audio>`` a standalone clip, ``<image>`` an image. The published code splices features at a negative token id;
  av_lens expands each placeholder to a run of reserved ids at the top of the vocabulary (``d_vocab - 1`` video,
  ``- 2`` audio, ``- 3`` image; ids the tokenizer never produces, refused otherwise), so every position has a token
  id, a modality tag and a time stamp (video: the first frame of the token's 2-frame step; audio: 0.16 s per
  16-frame time patch).
* **Frames** (``process_video``, ``frame_sample``): ``num_frames`` frames sampled uniformly (the middle of each of
  ``num_frames`` equal segments), as the published code samples a video file (a frame *array* it would take whole,
  up to 32 frames); fewer frames are padded with black frames as published (with a warning); each frame resized to
  384 x 384 by a SigLIP image processor — squashed, as the released ``model_init`` binds ``aspect_ratio=None``, or
  padded to a square with the image-mean colour first with ``processor_kwargs={"aspect_ratio": "pad"}`` (training's
  ``--image_aspect_ratio pad``).

Checkpoint keys: the shards' ``model.embed_tokens`` / ``model.layers.*`` / ``model.norm`` / ``lm_head`` (Qwen2),
``model.vision_tower.vision_tower.vision_model.*`` (SigLIP, as transformers 4 named its modules; transformers 5's
``SiglipVisionModel`` drops the ``vision_model`` level), ``model.mm_projector.*`` (STC); ``audio_tower.bin``
(``model.audio_tower.*``) and ``mm_projector_a.bin`` (``model.mm_projector_a.*``) are torch pickles, read with
``weights_only=True``. The published config.json names the vision tower and BEATs checkpoint rather than giving
their sizes; av_lens uses SigLIP-so400m-384's and BEATs' published sizes unless config.json has ``vision_config`` /
``audio_config`` dicts (as the tiny test checkpoints do).

Hook points: ``video_encoder`` / ``image_encoder`` (``hook_in`` pixels [n_frames, 3, 384, 384], ``blocks.{i}
.hook_out`` SigLIP layers, ``hook_out`` [n_tokens, d_model] after the connector), ``audio_encoder`` (``hook_in``
fbank [n_clips, 2998, 128], ``blocks.{i}.hook_out`` BEATs layers, ``hook_out`` [n_tokens, d_model] after
``mm_projector_a``); the connector's own ``mm_projector.hook_s1_out`` etc.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from av_lens.adapters.base import Adapter, Rotary1D, register
from av_lens.adapters.qwen2_5_omni import QWEN2_5_OMNI, _marker_ids, _text_model_kwargs
from av_lens.config import AVConfig
from av_lens.errors import CheckpointError, InputError, MediaError

#: google/siglip-so400m-patch14-384's vision config (the tower VideoLLaMA2.1 names in mm_vision_tower)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                         layer_norm_eps=1e-6, vision_use_head=False)
DEFAULT_SYSTEM = "You are a helpful assistant."
AUDIO_SECONDS = 30.0
#: the published placeholder spellings
PLACEHOLDERS = {"video": "<video>", "image": "<image>", "audio": "<audio>"}


def config_from_dict(raw: dict):
    """The published config.json (``model_type: videollama2_qwen2``, Qwen2 fields at the top, ``mm_*`` fields
    beside them) as a transformers ``Qwen2Config`` carrying the ``mm_*`` fields as attributes."""
    from transformers import Qwen2Config

    kw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    return Qwen2Config(**kw)


def _reserved_ids(vocab: int) -> dict[str, int]:
    return {"video": vocab - 1, "audio": vocab - 2, "image": vocab - 3}


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    kind = getattr(hf, "mm_projector_type", None)
    if kind not in ("stc_connector_v35", "stc_connector"):
        raise CheckpointError(f"this VideoLLaMA2 checkpoint uses mm_projector_type={kind!r}; av_lens implements the "
                              "STC connectors of VideoLLaMA2 / 2.1", "load a VideoLLaMA2(.1) AV checkpoint "
                              "(mm_projector_type stc_connector_v35, e.g. DAMO-NLP-SG/VideoLLaMA2.1-7B-AV)")
    markers = _marker_ids(tokenizer)
    ids = _reserved_ids(int(hf.vocab_size))
    if tokenizer is not None and len(tokenizer) > ids["image"]:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens, so the top ids {sorted(ids.values())} of the "
                              f"{hf.vocab_size}-entry vocabulary that av_lens reserves for media positions are real "
                              "tokens", "use the checkpoint's own tokenizer (Qwen2's 151,646 tokens in a 152,064 vocabulary)")
    from av_lens.layout import TokenIds

    kw = _text_model_kwargs(hf, markers, tie=bool(getattr(hf, "tie_word_embeddings", False)))
    kw.update(tokens=TokenIds(audio=ids["audio"], image=ids["image"], video=ids["video"], audio_bos=-1,
                              audio_eos=-1, vision_bos=-1, vision_eos=-1, markers=markers),
              mrope_section=(kw["d_head"] // 2, 0, 0), rope_rules="1d",
              modalities=("audio", "image", "video") if _has_audio(hf) else ("image", "video"),
              original_architecture="Videollama2Qwen2ForCausalLM")
    extra = dict(overrides.pop("extra", None) or {})
    kw.update(overrides)
    cfg = AVConfig(**kw)
    cfg.extra = {**cfg.extra, **extra, "num_frames": int(getattr(hf, "num_frames", 16)),
                 "select_layer": int(getattr(hf, "mm_vision_select_layer", -2))}
    return cfg


def _has_audio(hf) -> bool:
    return getattr(hf, "mm_audio_tower", None) is not None


def _vision_config(hf):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**{**SIGLIP_SO400M_384, **(getattr(hf, "vision_config", None) or {})})


def _build_towers(hf):
    from transformers import SiglipVisionModel

    from av_lens.components.beats import BEATsConfig, BEATsEncoder
    from av_lens.components.stc import STC_PADDING, AudioProjector, STCConnector

    vcfg = _vision_config(hf)
    vision = {"visual": SiglipVisionModel._from_config(vcfg, attn_implementation="sdpa"),
              "mm_projector": STCConnector(int(getattr(hf, "mm_hidden_size", vcfg.hidden_size)), int(hf.hidden_size),
                                           padding=STC_PADDING[hf.mm_projector_type])}
    if not _has_audio(hf):
        return vision
    # the AudioSet classifier the published weights carry is never used: not built, its keys skipped at load
    bcfg = replace(BEATsConfig.from_dict(getattr(hf, "audio_config", None)), finetuned_model=False)
    return {
        **vision,
        "audio_tower": BEATsEncoder(bcfg),
        "mm_projector_a": AudioProjector(int(getattr(hf, "mm_hidden_size_a", bcfg.encoder_embed_dim)),
                                         int(getattr(hf, "hidden_size_a", hf.hidden_size)),
                                         getattr(hf, "mm_projector_a_type", "mlp2x_gelu")),
    }


def build_rotary(hf):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    return Rotary1D(Qwen2RotaryEmbedding(config=hf))


def encoder_layers(tower, kind: str) -> list[nn.Module]:
    return list(tower.layers) if kind == "audio" else list(tower.encoder.layers)


def _frame_features(model, frames: Tensor) -> Tensor:
    """SigLIP ``hidden_states[select_layer]`` of frames [n, 3, S, S] -> [n, patches, d_vision]."""
    out = model.visual(frames.to(model.visual.dtype), output_hidden_states=True)
    return out.hidden_states[model.cfg.extra.get("select_layer", -2)]


def _encode_vision(kind: str):
    def encode(model, inp) -> Tensor:
        pixels = inp.pixel_values_videos if kind == "video" else inp.pixel_values
        n_frames = model.cfg.extra.get("num_frames", 16)
        hooks = model.video_encoder if kind == "video" else model.image_encoder

        def call(x):
            if kind == "image":  # the published encode_images_or_videos repeats an image to num_frames frames
                x = x[:, None].expand(-1, n_frames, -1, -1, -1).reshape(-1, *x.shape[1:])
            feats = _frame_features(model, x)
            feats = feats.reshape(-1, n_frames, *feats.shape[1:])  # [n_items, frames, patches, d]
            return model.mm_projector(feats).reshape(-1, model.cfg.d_model)

        return hooks.run(encoder_layers(model.visual, "vision"), call, pixels)
    return encode


def _encode_audio(model, inp) -> Tensor:
    def call(fbank):
        feats = model.audio_tower(fbank.to(next(model.audio_tower.parameters()).dtype))
        return model.mm_projector_a(feats).reshape(-1, model.cfg.d_model)

    return model.audio_encoder.run(encoder_layers(model.audio_tower, "audio"), call, inp.input_features)


# --------------------------------------------------------------------------------------------- inputs
def video_tokens(model) -> tuple[int, int]:
    """(tokens per video, tokens per temporal step) after the connector."""
    vcfg = model.visual.config
    side = vcfg.image_size // vcfg.patch_size
    n = model.mm_projector.n_tokens(model.cfg.extra.get("num_frames", 16), side, side)
    ds, pad = model.mm_projector.downsample, model.mm_projector.padding
    per_step = ((side + 2 * pad[1] - ds[1]) // ds[1] + 1) * ((side + 2 * pad[2] - ds[2]) // ds[2] + 1)
    return n, per_step


def audio_tokens(model, n_frames: int) -> int:
    return model.audio_tower.cfg.n_tokens(n_frames)


def input_from_processor(model, data) -> "AVInput":
    """An AVInput from ``input_ids`` (with each placeholder already expanded to its run of reserved ids),
    ``attention_mask``, optional ``pixel_values_videos`` [n_videos * num_frames, 3, S, S], ``pixel_values``
    [n_images, 3, S, S], ``input_features`` (fbank [n_clips, frames, 128]) and ``video_second_per_grid``
    (seconds per 2-frame step of each video)."""
    from av_lens.inputs import AVInput, checked_ids_and_mask
    from av_lens.layout import MediaSpec, build_layout

    ids, mask = checked_ids_and_mask(data)
    t = lambda k: None if data.get(k) is None else torch.as_tensor(data[k])
    pv, pi, feats, spg = t("pixel_values_videos"), t("pixel_values"), t("input_features"), t("video_second_per_grid")
    if feats is not None and "audio" not in model.cfg.modalities:
        raise InputError("the input has audio (input_features) but this VideoLLaMA2 checkpoint has no audio tower",
                         "drop the audio, or load the audio-visual release (VideoLLaMA2.1-7B-AV)")
    n_frames = model.cfg.extra.get("num_frames", 16)
    n_vid, per_step = video_tokens(model)
    if pv is not None and pv.shape[0] % n_frames:
        raise InputError(f"pixel_values_videos has {pv.shape[0]} frames, not a multiple of num_frames={n_frames}",
                         "prepare videos with model.prepare(videos=[...]) (it samples num_frames frames per video)")
    n_videos = 0 if pv is None else pv.shape[0] // n_frames
    if spg is None:
        spg = torch.zeros(n_videos)
    media = MediaSpec(
        rope_rules="1d", image_token_counts=(n_vid,) * (0 if pi is None else pi.shape[0]),
        video_token_counts=(n_vid,) * n_videos, video_step_tokens=(per_step,) * n_videos,
        video_second_per_grid=tuple(float(x) for x in spg.reshape(-1)),
        audio_token_counts=() if feats is None else (audio_tokens(model, feats.shape[1]),) * feats.shape[0],
        # BEATs tokens run time-major over 16 x 16 fbank patches: 8 mel patches share one 16-frame (0.16 s) step
        audio_token_seconds=0.0 if feats is None else model.audio_tower.cfg.input_patch_size * 0.01,
        audio_step_tokens=1 if feats is None else 128 // model.audio_tower.cfg.input_patch_size)
    layout = build_layout(ids, mask, model.cfg.tokens, media)
    # rows of pixels per item as "grids" (frames, 1, 1) / (1, 1, 1) and an all-ones feature mask, so that AVInput's
    # per-sample selection and concatenation split them as they split the Qwen families' (the towers ignore them)
    grid = lambda n, t: None if n == 0 else torch.tensor([[t, 1, 1]] * n)
    return AVInput(input_ids=ids, attention_mask=mask.long(), layout=layout, input_features=feats,
                   feature_attention_mask=None if feats is None else torch.ones(feats.shape[:2], dtype=torch.long),
                   pixel_values=pi, image_grid_thw=grid(0 if pi is None else pi.shape[0], 1),
                   pixel_values_videos=pv, video_grid_thw=grid(n_videos, n_frames),
                   video_second_per_grid=None if pv is None else spg.float())


def frame_sample(n: int, num_frames: int) -> np.ndarray:
    """The published uniform sampling: the middle of each of ``num_frames`` equal segments of [0, n - 1]."""
    seg = float(n - 1) / num_frames
    return np.round(np.array([(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)]) + 1e-6).astype(int)


def _image_processor(model):
    from transformers import SiglipImageProcessor

    proc = model.processor
    ip = getattr(proc, "image_processor", proc)
    if isinstance(ip, SiglipImageProcessor):
        return ip
    size = model.visual.config.image_size
    return SiglipImageProcessor(size={"height": size, "width": size})


def _square(frame: np.ndarray, mean) -> np.ndarray:
    """The published ``expand2square``: pad to a square with the image-mean colour, content centred."""
    h, w = frame.shape[:2]
    if h == w:
        return frame
    s = max(h, w)
    out = np.empty((s, s, 3), dtype=frame.dtype)
    out[...] = np.array([int(m * 255) for m in mean], dtype=frame.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = frame
    return out


def _pixels(model, frames: list[np.ndarray], aspect_ratio: str | None) -> Tensor:
    """Frames through the SigLIP processor; ``aspect_ratio="pad"`` pads each to a square first (training's
    ``--image_aspect_ratio pad``), None squashes them to the square input as the released ``model_init`` does."""
    ip = _image_processor(model)
    if aspect_ratio not in (None, "pad"):
        raise InputError(f"aspect_ratio={aspect_ratio!r}", "pass processor_kwargs={'aspect_ratio': None} (the released "
                         "inference: frames squashed to a square) or {'aspect_ratio': 'pad'} (training's padding)")
    frames = [_square(f, ip.image_mean) for f in frames] if aspect_ratio == "pad" else frames
    return ip(images=frames, return_tensors="pt")["pixel_values"]


def _fbank(wav: np.ndarray, what: str) -> Tensor:
    """A standalone clip as ``process_audio_file``: 30 s (zero-padded; longer clips cropped — at a random start in
    the published code, at the start here, with a warning), Kaldi fbank, rounded to bf16."""
    from av_lens.components.beats import beats_fbank

    n = int(AUDIO_SECONDS * 16000)
    if len(wav) > n:
        warnings.warn(f"{what} is {len(wav) / 16000:.1f} s; VideoLLaMA2 reads 30 s (its own code crops at a random "
                      "start), av_lens keeps the first 30 s", stacklevel=3)
        wav = wav[:n]
    wav = np.pad(wav, (0, n - len(wav)))
    return beats_fbank(torch.as_tensor(wav, dtype=torch.float32)).to(torch.bfloat16).float()


def soundtrack_clips(n_samples: int, sr: int = 16000, clip_s: int = 2, n_clips: int = 8) -> list[tuple[int, int]]:
    """Sample ranges of a video's soundtrack as ``process_audio_from_video`` reads it: pytorchvideo's
    ``ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=8)`` — clip i starts at i * (duration - 2) / 7
    (exact fractions), 2 s long, 8 clips; a video of 2 s or less gives its whole soundtrack 8 times."""
    from fractions import Fraction

    max_start = Fraction(max(n_samples / sr - clip_s, 0))  # float duration, as the published call passes it
    step = Fraction(max_start, max(n_clips - 1, 1))
    out, i = [], 0
    while True:
        start = step * i
        out.append((int(start * sr), int((start + clip_s) * sr)))
        i += 1
        if i >= n_clips or step * i > max_start:
            return out


def _soundtrack_fbank(wav: np.ndarray) -> Tensor:
    """A video's soundtrack as ``process_audio_from_video``: its 8 sampled 2 s clips joined (16 s at most), padded
    to 30 s, Kaldi fbank, rounded to bf16."""
    from av_lens.components.beats import beats_fbank

    joined = np.concatenate([wav[a:b] for a, b in soundtrack_clips(len(wav))])
    joined = np.pad(joined, (0, int(AUDIO_SECONDS * 16000) - len(joined)))
    return beats_fbank(torch.as_tensor(joined, dtype=torch.float32)).to(torch.bfloat16).float()


def prepare(model, text=None, *, audio=None, images=None, videos=None, video_audio=None, use_audio_in_video=None,
            fps=2.0, chat=True, system_prompt="default", processor_output=None, processor_kwargs=None):
    """:func:`av_lens.processing.prepare` for VideoLLaMA2-AV. Media go where the text says ``<video>``, ``<image>``
    or ``<audio>`` (or first, each followed by a newline, when it says none, as ``mm_infer`` builds its prompt);
    with ``video_audio`` each video's tokens are followed by its soundtrack's. ``chat=True``: the Qwen2 chat
    format with its default system turn; the assistant turn opened."""
    from av_lens.processing import media_request

    if processor_output is not None:
        return model.to_input(processor_output)
    if text is None:
        raise InputError("prepare() needs a text prompt", "pass text='Describe what you see and hear.'")
    if model.tokenizer is None:
        raise InputError("this checkpoint has no tokenizer, so prompts cannot be built",
                         "save the tokenizer with the checkpoint")
    audio, images, videos, video_audio, use_audio_in_video = media_request(
        audio, images, videos, video_audio, use_audio_in_video, fps)
    if "audio" not in model.cfg.modalities and (audio or video_audio):
        raise InputError(f"{model.cfg.model_name or 'this VideoLLaMA2 checkpoint'} has no audio tower (a vision-only "
                         "release, e.g. the AV model's base VideoLLaMA2.1-7B-16F)",
                         "drop audio= and video_audio=, or load the audio-visual release (VideoLLaMA2.1-7B-AV)")
    opts = dict(processor_kwargs or {})
    aspect = opts.pop("aspect_ratio", None)
    if opts:
        raise InputError(f"unknown processor_kwargs {sorted(opts)} for VideoLLaMA2",
                         "VideoLLaMA2's prepare takes processor_kwargs={'aspect_ratio': None | 'pad'}")
    nf = model.cfg.extra.get("num_frames", 16)
    out: dict = {}
    if videos:
        frames, spg = [], []
        for k, v in enumerate(videos):
            v = np.asarray(v)
            if len(v) >= nf:
                idx = frame_sample(len(v), nf)
            else:
                warnings.warn(f"videos[{k}] has {len(v)} frames; VideoLLaMA2 takes {nf}, so {nf - len(v)} black frames "
                              "are appended as its own code does", stacklevel=2)
                idx = np.arange(len(v))
            picked = [v[i] for i in idx] + [np.zeros_like(v[0])] * (nf - len(idx))
            frames += picked
            step = float(np.mean(np.diff(idx))) if len(idx) > 1 else 1.0
            spg.append(2 * step / float(fps))  # one connector step = 2 sampled frames
        out["pixel_values_videos"] = _pixels(model, frames, aspect)
        out["video_second_per_grid"] = torch.tensor(spg)
    if images:
        out["pixel_values"] = _pixels(model, images, aspect)
    tracks = [_soundtrack_fbank(a) for a in video_audio]
    clips = [_fbank(a, f"audio[{i}]") for i, a in enumerate(audio)]
    t = model.cfg.tokens
    n_vid, _ = video_tokens(model)
    n_aud = audio_tokens(model, (tracks + clips)[0].shape[0]) if tracks or clips else 0
    blocks = {"video": [[t.video] * n_vid + ([t.audio] * n_aud if use_audio_in_video else []) for _ in videos],
              "image": [[t.image] * n_vid for _ in images], "audio": [[t.audio] * n_aud for _ in audio]}
    tok = model.tokenizer
    texts = [text] if isinstance(text, str) else list(text)
    sp = DEFAULT_SYSTEM if system_prompt == "default" else system_prompt
    used, rows = {k: 0 for k in blocks}, []
    fbanks = []  # in the order their tokens appear (sample by sample): the layout and the splice read them so
    for txt in texts:
        if not any(ph in txt for ph in PLACEHOLDERS.values()):
            if len(texts) > 1 and any(blocks.values()):
                raise InputError("a batch of prompts with media needs the media placeholders in each prompt",
                                 "write e.g. '<video>\\nWhat do you hear?' in each text")
            txt = "".join((PLACEHOLDERS[k] + "\n") * len(blocks[k]) for k in ("video", "image", "audio")) + txt
        if chat:
            sys_turn = f"<|im_start|>system\n{sp}<|im_end|>\n" if sp else ""
            txt = f"{sys_turn}<|im_start|>user\n{txt}<|im_end|>\n<|im_start|>assistant\n"
        row, rest = [], txt
        while True:
            hits = [(rest.find(ph), k) for k, ph in PLACEHOLDERS.items() if ph in rest]
            if not hits:
                break
            pos, k = min(hits)
            row += tok(rest[:pos], add_special_tokens=False)["input_ids"]
            if used[k] >= len(blocks[k]):
                raise InputError(f"the prompts hold more {PLACEHOLDERS[k]} placeholders than the {len(blocks[k])} {k} "
                                 "input(s)", f"pass one {k} per {PLACEHOLDERS[k]}")
            row += blocks[k][used[k]]
            if k == "video" and use_audio_in_video:
                fbanks.append(tracks[used[k]])
            elif k == "audio":
                fbanks.append(clips[used[k]])
            used[k] += 1
            rest = rest[pos + len(PLACEHOLDERS[k]):]
        rows.append(row + tok(rest, add_special_tokens=False)["input_ids"])
    for k, n in used.items():
        if n != len(blocks[k]):
            raise InputError(f"{len(blocks[k])} {k} input(s) given but the prompts hold {n} {PLACEHOLDERS[k]}",
                             f"write one {PLACEHOLDERS[k]} per {k}, or none at all in a single prompt (media then go "
                             "first)")
    if fbanks:
        out["input_features"] = torch.stack(fbanks)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_from_processor(model, out).to(model.device)


def _rename(key: str) -> str | None:
    for old, new in (("model.vision_tower.vision_tower.vision_model.", "visual."),
                     ("model.vision_tower.vision_tower.", "visual."), ("model.mm_projector_a.", "mm_projector_a."),
                     ("model.mm_projector.", "mm_projector."), ("model.audio_tower.", "audio_tower.")):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("visual.head.") or key.startswith("audio_tower.predictor."):
        return None  # SigLIP's pooling head and BEATs' AudioSet classifier: in the published files, never used
    return key


VIDEOLLAMA2 = register(Adapter(
    name="videollama2",
    model_types=("videollama2_qwen2",),
    global_map=QWEN2_5_OMNI.global_map,
    layer_map=QWEN2_5_OMNI.layer_map,
    towers={"visual": "visual.", "mm_projector": "mm_projector.", "audio_tower": "audio_tower.",
            "mm_projector_a": "mm_projector_a."},
    thinker_config=lambda hf: hf,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=build_rotary,
    encoder_layers=encoder_layers,
    encode={"image": _encode_vision("image"), "video": _encode_vision("video"), "audio": _encode_audio},
    prepare=prepare,
    input_from_processor=input_from_processor,
    config_from_dict=config_from_dict,
    key_map=_rename,
    pickled_files=("audio_tower.bin", "mm_projector_a.bin"),
))

#: the vision-only releases (VideoLLaMA2.1-7B-16F, the AV model's base, for token shift): no mm_audio_tower in
#: config.json, so no audio tower, no projector and no pickles
VIDEOLLAMA2_BASE = register(replace(
    VIDEOLLAMA2, name="videollama2_base", model_types=(),
    accepts=lambda raw: raw.get("model_type") == "videollama2_qwen2" and not raw.get("mm_audio_tower"),
    towers={"visual": "visual.", "mm_projector": "mm_projector."}, pickled_files=(),
))
