"""video-SALMONN-2+ (tsinghua-ee/video-SALMONN2_plus_{3B,7B}_full): Qwen2.5-VL with a Whisper audio branch. The
model of "From Senses to Decisions" (arXiv 2606.10147) beside Qwen2.5-Omni.

The published code (bytedance/video-SALMONN-2 @61faec0, ``video_SALMONN2_plus/qwenvl/model/``) is Qwen2.5-VL's
``Qwen2_5_VLForConditionalGeneration`` plus one module, ``audio``:

* **Audio branch** (``modeling_whisper.py``, ``WhisperEncoder``): Whisper-large-v3's encoder (two convolutions,
  32 layers of width 1280, final LayerNorm; 30 s windows of 3000 log-mel frames -> 1500 positions), then the
  positions cut into non-overlapping windows of ``second_per_window`` = 0.5 s (25 positions, ``F.unfold``), one
  BLIP-2-style Q-Former call per window (``modeling_bert.py``: a BERT with ``query_length`` = 1 learned query
  ``q_tokens``, self-attention, cross-attention to the window in every layer, the query FFN; 2 layers of width
  3072 in the published config class) and ``audio_proj`` (Linear 3072 -> d_model). So 60 tokens per 30 s window,
  2 audio tokens per second. av_lens runs transformers' ``WhisperEncoder`` and ``Blip2QFormerModel`` (the same
  computation: LayerNorm of the query embeddings, the same layer structure) with the published keys renamed.
* **Prompt** (``qwenvl/data/dataset.py``, ``generate_id_target``): a clip is padded to at least 1 s and cut into
  30 s pieces, each padded by the feature extractor; the clip takes ``ceil(len / 30 s) * 60`` ``<|audio_pad|>``
  tokens (padding included). A video with its audio is one ``<|vision_start|>`` block holding, per temporal grid
  step, that step's video tokens then a run of audio tokens (``split_into_groups``: step k gets the audio tokens
  between ``floor(k * s * 2)`` and ``floor((k + 1) * s * 2)``, s = seconds per grid step; the last step the rest);
  a standalone clip is ``<|vision_start|>`` + audio tokens + ``<|vision_end|>``. The chat format is the fixed
  template of ``preprocess_qwen_2_visual`` (system "You are a helpful assistant.", media where ``<video>`` stood,
  then the text).
* **Positions** (``get_rope_index`` in ``modeling_qwen2_5_vl.py``; the same code as the training data's
  ``rope2d.get_rope_index_25``): rope rules ``"video_salmonn2"`` in :mod:`av_lens.layout`. Video tokens take
  Qwen2.5-VL's (floor(step * s * 2), h, w); audio token k inside a video block takes (k, 0, k), inside a standalone
  block (k, k, 0), both from the position after ``<|vision_start|>``; the text after the *last* audio-carrying
  block resumes at the block's largest time position + 1, after earlier ones at its largest position + 1.

The published inference script runs other positions: ``inference.py`` builds ``position_ids`` with these rules but
calls ``generate``, whose ``prepare_inputs_for_generation`` discards them, and passes neither ``audio_lengths`` nor
``second_per_grid_ts`` (lists, dropped by its tensor filter), so its prefill runs the vision-only branch over the
interleaved block. av_lens follows the rules the model was trained with; ``model.cfg.rope_rules =
"video_salmonn2_inference"`` switches to the script's (docs/models.md).

Hook points: ``audio_encoder.hook_in`` (log-mel windows [n_windows, n_mel, 3000]), ``audio_encoder.blocks.{i}
.hook_out`` (Whisper layer i, [n_windows, 1500, d_whisper]) and ``audio_encoder.hook_out`` ([n_audio_tokens,
d_model], one row per 0.5 s window after the Q-Former and ``audio_proj``); vision as Qwen2.5-VL.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from av_lens.adapters.base import Adapter, register
from av_lens.adapters.qwen2_5_vl import QWEN2_5_VL, _to_av_config as _vl_av_config
from av_lens.config import AVConfig
from av_lens.errors import CheckpointError, InputError, MediaError

#: the published default of ``audio_token_id`` (``<|audio_pad|>``, added after Qwen2.5-VL's 151,665 tokens)
AUDIO_TOKEN = "<|audio_pad|>"
SYSTEM_PROMPT = "You are a helpful assistant."
#: Whisper's positions per 30 s window, as the published window arithmetic hard-codes it (1500 * s / 30)
_POSITIONS_PER_30S = 1500


# --------------------------------------------------------------------------------------------- audio tower
class SalmonnAudioTower(nn.Module):
    """Whisper encoder -> 0.5 s windows -> one Q-Former call per window -> ``audio_proj``.

    Parameter names follow the published ``audio.*`` keys after :func:`key_map`: ``encoder.*`` (transformers'
    ``WhisperEncoder``: conv1, conv2, embed_positions, layers, layer_norm), ``qformer.*`` (transformers'
    ``Blip2QFormerModel``), ``q_tokens`` [1, query_length, d_qformer], ``audio_proj``."""

    def __init__(self, audio_cfg: dict, d_model: int):
        super().__init__()
        from transformers import Blip2QFormerConfig, WhisperConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        a = dict(audio_cfg)
        q = dict(a.pop("qformer_config", None) or {})
        self.second_per_window = float(a.pop("second_per_window", 0.5))
        self.second_stride = float(a.pop("second_stride", 0.5))
        keep = ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
                "activation_function", "max_source_positions", "scale_embedding", "layer_norm_eps")
        wcfg = WhisperConfig(**{k: a[k] for k in keep if k in a}, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, encoder_layerdrop=0.0)
        self.encoder = WhisperEncoder._from_config(wcfg, attn_implementation="sdpa")
        self.query_length = int(q.get("query_length", 1))
        self.d_qformer = int(q.get("hidden_size", 3072))
        qcfg = Blip2QFormerConfig(
            hidden_size=self.d_qformer, num_hidden_layers=int(q.get("num_hidden_layers", 2)),
            num_attention_heads=int(q.get("num_attention_heads", 12)),
            intermediate_size=int(q.get("intermediate_size", 12288)), hidden_act=q.get("hidden_act", "gelu"),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            layer_norm_eps=float(q.get("layer_norm_eps", 1e-12)),
            cross_attention_frequency=int(q.get("cross_attention_freq", 1)),
            encoder_hidden_size=int(q.get("encoder_width", wcfg.d_model)), use_qformer_text_input=False)
        if q.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"the Q-Former config has position_embedding_type="
                                  f"{q['position_embedding_type']!r}, which the published model does not use",
                                  "use the published video-SALMONN-2+ config (absolute: no position term on queries)")
        self.qformer = Blip2QFormerModel(qcfg)
        self.q_tokens = nn.Parameter(torch.zeros(1, self.query_length, self.d_qformer))
        self.audio_proj = nn.Linear(self.d_qformer, d_model)
        self.n_frames = 2 * wcfg.max_source_positions  # mel frames per window (conv2 has stride 2)
        self.kernel = round(_POSITIONS_PER_30S * self.second_per_window / 30.0)
        self.stride = round(_POSITIONS_PER_30S * self.second_stride / 30.0)
        if self.kernel < 1 or self.stride < 1 or self.kernel > wcfg.max_source_positions:
            raise CheckpointError(f"second_per_window={self.second_per_window} / second_stride={self.second_stride} "
                                  f"give a window of {self.kernel} and a stride of {self.stride} encoder positions",
                                  "use windows between 0.02 s and the encoder's span")
        self.windows_per_chunk = (wcfg.max_source_positions - self.kernel) // self.stride + 1

    @property
    def tokens_per_chunk(self) -> int:
        """LLM tokens per window of ``n_frames`` mel frames (60 for the published 30 s / 0.5 s / 1 query)."""
        return self.windows_per_chunk * self.query_length

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def forward(self, feats: Float[Tensor, "n_chunks n_mel frames"]) -> Float[Tensor, "n_tokens d_model"]:
        h = self.encoder(feats.to(self.encoder.conv1.weight.dtype)).last_hidden_state  # [n, 1500, C]
        w = h.unfold(1, self.kernel, self.stride).permute(0, 1, 3, 2)  # [n, windows, kernel, C]
        w = w.reshape(-1, self.kernel, h.shape[-1])
        q = self.q_tokens.expand(w.shape[0], -1, -1)
        out = self.qformer(query_embeds=q, encoder_hidden_states=w,
                           encoder_attention_mask=torch.ones(w.shape[:2], dtype=torch.long, device=w.device))
        return self.audio_proj(out.last_hidden_state).reshape(-1, self.audio_proj.out_features)


def key_map(key: str) -> str | None:
    """Published ``audio.*`` names (LAVIS-style BERT Q-Former, Whisper at the top of ``audio``) -> ours."""
    if not key.startswith("audio."):
        return key
    rest = key[len("audio."):]
    if rest.startswith("qformer."):
        rest = rest[len("qformer."):]
        if rest.startswith("cls.") or rest == "bert.embeddings.position_ids":
            return None  # the unused LM head and BERT's position-id buffer
        if rest.startswith("bert.embeddings.LayerNorm."):
            return "audio.qformer.layernorm." + rest[len("bert.embeddings.LayerNorm."):]
        if rest.startswith("bert.embeddings.") or rest.startswith("bert.pooler."):
            return None  # word / position embeddings: unused with query embeddings only
        rest = rest[len("bert."):] if rest.startswith("bert.") else rest
        rest = rest.replace(".attention.self.", ".attention.attention.").replace(".crossattention.self.",
                                                                                   ".crossattention.attention.")
        return "audio.qformer." + rest
    if rest.startswith(("q_tokens", "audio_proj.")):
        return key
    return "audio.encoder." + rest


# --------------------------------------------------------------------------------------------- config
def accepts(raw: dict) -> bool:
    """A Qwen2.5-VL config.json with an ``audio_config``: the published video-SALMONN-2+ format."""
    return raw.get("model_type") == "qwen2_5_vl" and isinstance(raw.get("audio_config"), dict)


def _audio_cfg(hf) -> dict:
    a = getattr(hf, "audio_config", None)
    if a is None:
        raise CheckpointError("the video-SALMONN-2+ config has no audio_config",
                              "use the checkpoint's own config.json (Qwen2.5-VL's config plus audio_config)")
    return a if isinstance(a, dict) else a.to_dict()


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    audio_id = getattr(hf, "audio_token_id", None)
    if audio_id is None and tokenizer is not None:
        audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if audio_id is None:
        audio_id = 151665
    cfg = _vl_av_config(hf, tokenizer)
    a = _audio_cfg(hf)
    kernel_s = float(a.get("second_stride", 0.5)) / int((a.get("qformer_config") or {}).get("query_length", 1))
    cfg.tokens = replace(cfg.tokens, audio=int(audio_id))
    cfg.modalities = ("audio", "image", "video")
    cfg.rope_rules = "video_salmonn2"
    cfg.position_id_per_seconds = 2  # the published get_rope_index hard-codes 2 time positions per second
    cfg.original_architecture = "video_SALMONN2_plus"
    extra = dict(overrides.pop("extra", None) or {})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.extra = {**cfg.extra, **extra, "audio_token_seconds": kernel_s}
    return cfg


def _build_towers(hf):
    towers = dict(QWEN2_5_VL.build_towers(hf))
    towers["audio_tower"] = SalmonnAudioTower(_audio_cfg(hf), int(hf.text_config.hidden_size))
    return towers


def encoder_layers(tower, kind: str) -> list[nn.Module]:
    return list(tower.layers) if kind == "audio" else list(tower.blocks)


def _encode_audio(model, inp) -> Tensor:
    tower = model.audio_tower
    feats = chunks_of(inp.input_features, inp.feature_attention_mask, tower.n_frames)
    return model.audio_encoder.run(encoder_layers(tower, "audio"), tower, feats)


def chunks_of(feats: Tensor, mask: Tensor | None, n_frames: int) -> Tensor:
    """[n_clips, n_mel, W * n_frames] (each clip's 30 s chunks side by side, ``mask`` marking the real ones) ->
    [n_chunks, n_mel, n_frames] in clip order, as the published model receives them."""
    if feats.shape[-1] % n_frames:
        raise InputError(f"audio features have {feats.shape[-1]} frames, not a multiple of the encoder's "
                         f"{n_frames}-frame window", "build the inputs with model.prepare(audio=...)")
    n, m, t = feats.shape
    per = feats.reshape(n, m, t // n_frames, n_frames).permute(0, 2, 1, 3)  # [n, W, mel, frames]
    if mask is None:
        return per.reshape(-1, m, n_frames)
    real = mask.reshape(n, t // n_frames, n_frames)[..., 0].bool().to(feats.device)
    return per[real]


# --------------------------------------------------------------------------------------------- inputs
def audio_token_counts(model, mask: Tensor) -> tuple[int, ...]:
    """Audio tokens per clip: its real 30 s chunks x tokens per chunk."""
    tower = model.audio_tower
    chunks = mask.reshape(mask.shape[0], -1, tower.n_frames)[..., 0].sum(-1)
    return tuple(int(c) * tower.tokens_per_chunk for c in chunks)


def input_from_processor(model, data) -> "AVInput":
    """An AVInput from a dict of ``input_ids``, ``attention_mask``, optional ``pixel_values(_videos)``,
    ``image/video_grid_thw``, ``second_per_grid_ts`` and audio as ``input_features`` [n_clips, n_mel,
    W * 3000] with ``feature_attention_mask`` (what :func:`prepare` builds), or the published dataset's
    ``audio_feature`` [n_chunks, n_mel, 3000] with ``audio_lengths`` (tokens per clip)."""
    from av_lens.inputs import AVInput, checked_ids_and_mask
    from av_lens.layout import MediaSpec, build_layout

    ids, mask = checked_ids_and_mask(data)
    feats, fam = data.get("input_features"), data.get("feature_attention_mask")
    tower = model.audio_tower
    if feats is None and data.get("audio_feature") is not None:
        chunks = torch.as_tensor(data["audio_feature"])
        lengths = data.get("audio_lengths")
        if lengths is None:
            raise InputError("audio_feature without audio_lengths", "pass the dataset's audio_lengths (tokens per clip)")
        per_clip = [int(n) // tower.tokens_per_chunk for n in lengths]
        if any(int(n) % tower.tokens_per_chunk for n in lengths) or sum(per_clip) != chunks.shape[0]:
            raise InputError(f"audio_lengths {list(lengths)} do not match {chunks.shape[0]} audio chunks of "
                             f"{tower.tokens_per_chunk} tokens", "pass the dataset's audio_feature and audio_lengths "
                             "unchanged")
        feats, fam = _stack_clips(list(torch.split(chunks, per_clip)), tower.n_frames)
    elif feats is not None and fam is None:
        fam = torch.ones(feats.shape[0], feats.shape[-1], dtype=torch.long)
    counts = () if feats is None else audio_token_counts(model, torch.as_tensor(fam))
    vgrid, igrid = data.get("video_grid_thw"), data.get("image_grid_thw")
    spg = data.get("second_per_grid_ts", data.get("video_second_per_grid"))
    if vgrid is not None and spg is None:
        raise InputError("video_grid_thw without second_per_grid_ts",
                         "pass the seconds per temporal grid step of each video (temporal_patch_size / fps)")
    spg_t = None if spg is None else torch.as_tensor(spg, dtype=torch.float32).reshape(-1)
    media = MediaSpec(
        image_grid_thw=() if igrid is None else tuple(tuple(int(x) for x in g) for g in torch.as_tensor(igrid)),
        video_grid_thw=() if vgrid is None else tuple(tuple(int(x) for x in g) for g in torch.as_tensor(vgrid)),
        video_second_per_grid=() if spg_t is None else tuple(float(x) for x in spg_t),
        spatial_merge_size=model.cfg.spatial_merge_size, position_id_per_seconds=2, rope_rules=_rules(model),
        audio_token_counts=counts, audio_token_seconds=float(model.cfg.extra.get("audio_token_seconds", 0.5)))
    layout = build_layout(ids, mask, model.cfg.tokens, media)
    t = lambda k: None if data.get(k) is None else torch.as_tensor(data[k])
    return AVInput(input_ids=ids, attention_mask=mask.long(), layout=layout,
                   input_features=None if feats is None else torch.as_tensor(feats).float(),
                   feature_attention_mask=None if fam is None else torch.as_tensor(fam).long(),
                   pixel_values=t("pixel_values"), image_grid_thw=t("image_grid_thw"),
                   pixel_values_videos=t("pixel_values_videos"), video_grid_thw=t("video_grid_thw"),
                   video_second_per_grid=spg_t)


#: position rules: the trained ones (default) or the published inference script's (``model.cfg.rope_rules =
#: "video_salmonn2_inference"``)
RULES = ("video_salmonn2", "video_salmonn2_inference")


def _rules(model) -> str:
    rules = model.cfg.rope_rules
    if rules not in RULES:
        raise InputError(f"model.cfg.rope_rules is {rules!r}, which video-SALMONN-2+ does not have",
                         f"set it to one of {list(RULES)} ('video_salmonn2': the trained rules, the default)")
    return rules


def _stack_clips(clips: list[Tensor], n_frames: int) -> tuple[Tensor, Tensor]:
    """Per-clip chunk stacks [W_i, n_mel, n_frames] -> ([n_clips, n_mel, max W * n_frames], mask)."""
    w = max(c.shape[0] for c in clips)
    n_mel = clips[0].shape[1]
    feats = torch.zeros(len(clips), n_mel, w * n_frames)
    mask = torch.zeros(len(clips), w * n_frames, dtype=torch.long)
    for i, c in enumerate(clips):
        feats[i, :, :c.shape[0] * n_frames] = c.permute(1, 0, 2).reshape(n_mel, -1)
        mask[i, :c.shape[0] * n_frames] = 1
    return feats, mask


def feature_extractor(model):
    """The published audio front end: ``WhisperFeatureExtractor(feature_size=n_mel, sampling_rate=16000,
    hop_length=160, chunk_length=30)`` (``inference.py``'s ``prepare_dataset``), sized by the tower."""
    tower = model.audio_tower
    return _whisper_fe(int(tower.encoder.config.num_mel_bins), tower.n_frames * 160 // 16000)


@functools.lru_cache(maxsize=8)
def _whisper_fe(n_mel: int, chunk_s: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mel, sampling_rate=16000, hop_length=160, chunk_length=chunk_s,
                                   n_fft=400)


def audio_chunks(model, wav: np.ndarray) -> Tensor:
    """One clip -> its log-mel chunks [W, n_mel, n_frames]: padded to at least 1 s, cut into 30 s pieces (the
    last one padded by the feature extractor), as the published ``process_audio``."""
    fe = feature_extractor(model)
    sr = fe.sampling_rate
    if len(wav) < sr:
        wav = np.pad(wav, (0, sr - len(wav)))
    size = fe.n_samples
    pieces = [wav[k:k + size] for k in range(0, len(wav), size)]
    return torch.stack([torch.as_tensor(fe(p, sampling_rate=sr, return_tensors="pt")["input_features"][0])
                        for p in pieces])


#: the published inference settings (inference.py prepare_dataset; qwenvl/data/dataset.py video_torchcodec and
#: process_video_frames): frames every 0.1 s, 16..768 of them, 61,250 pixels per frame scaled up for short videos
BASE_INTERVAL, MIN_FRAMES, MAX_FRAMES, FRAME_PIXELS, MIN_FRAME_PIXELS = 0.1, 16, 768, 61250, 4 * 28 * 28


def sample_frames(frames: np.ndarray, fps: float) -> tuple[np.ndarray, float, dict]:
    """The published frame sampling and per-frame pixel budget for a video of ``len(frames)`` frames at ``fps``:
    round(duration / 0.1) frames clamped to 16..768, at ``np.linspace(0, n - 1, k).astype(int)`` (duplicates
    dropped), their rate k / duration, and max_pixels = 61,250 x 0.95 x 768 / k (61,250 at 768 frames), min_pixels
    3,136. Returns (frames, rate, the video processor's ``size``)."""
    duration = len(frames) / fps
    k = min(max(round(duration / BASE_INTERVAL), MIN_FRAMES), MAX_FRAMES)
    idx = np.unique(np.linspace(0, len(frames) - 1, k, dtype=int))
    pixels = FRAME_PIXELS * (0.95 * MAX_FRAMES / len(idx) if len(idx) < MAX_FRAMES else 1.0)
    return np.asarray(frames)[idx], len(idx) / duration, {"shortest_edge": MIN_FRAME_PIXELS,
                                                           "longest_edge": int(pixels)}


def split_into_groups(n_audio: int, grid_t: int, seconds_per_grid: float) -> list[int]:
    """Audio tokens after each temporal grid step of a video (the published ``split_into_groups`` with
    seconds per grid): step k gets floor((k+1) s 2) - floor(k s 2) tokens, the last step all that remain."""
    idx = (torch.arange(grid_t) * torch.tensor(seconds_per_grid, dtype=torch.float32) * 2).long().tolist()
    groups = [b - a for a, b in zip(idx, idx[1:])]
    groups.append(n_audio - sum(groups))
    if groups[-1] < 0:
        raise MediaError(f"the video's {grid_t} grid steps of {seconds_per_grid:.3g} s span more audio tokens than "
                         f"its soundtrack's {n_audio}", "pass the soundtrack of the whole video (video_audio=[...])")
    return groups


def prepare(model, text=None, *, audio=None, images=None, videos=None, video_audio=None, use_audio_in_video=None,
            fps=2.0, chat=True, system_prompt="default", processor_output=None, processor_kwargs=None):
    """:func:`av_lens.processing.prepare` for video-SALMONN-2+. Media blocks go where the text says ``<video>``,
    ``<image>`` or ``<audio>`` (or first, then a newline, when it says none, as the published prompts read); with
    ``video_audio`` (the default when given) each video carries its soundtrack interleaved per grid step. Frames
    go through the checkpoint's Qwen2.5-VL video processor (seconds per grid step = temporal_patch_size / fps),
    audio through the published Whisper feature extractor. ``chat=True``: the published template with its system
    turn and the assistant turn opened. Videos are resampled as the published inference samples a file
    (:func:`sample_frames`: a frame every 0.1 s, 16..768 frames, a pixel budget by frame count); pass frames at
    10 fps or more for that to hold, or ``processor_kwargs={"published_sampling": False}`` to use the frames and
    the checkpoint's processor sizes as given."""
    from av_lens.processing import _processor_for, media_request

    if processor_output is not None:
        return model.to_input(processor_output)
    proc = _processor_for(model, text)
    audio, images, videos, video_audio, use_audio_in_video = media_request(
        audio, images, videos, video_audio, use_audio_in_video, fps)
    texts = [text] if isinstance(text, str) else list(text)
    tok = model.tokenizer
    s = lambda tid: tok.convert_ids_to_tokens(int(tid))
    t = model.cfg.tokens
    bos, eos, vpad, ipad, apad = s(t.vision_bos), s(t.vision_eos), s(t.video), s(t.image), s(t.audio)
    out: dict = {}
    opts = dict(processor_kwargs or {})
    published = bool(opts.pop("published_sampling", True))
    if opts:
        raise InputError(f"unknown processor_kwargs {sorted(opts)} for video-SALMONN-2+",
                         "video-SALMONN-2+'s prepare takes processor_kwargs={'published_sampling': True | False}")
    if videos:
        vp = proc.video_processor
        pix, grids, spg = [], [], []
        for v in videos:
            v, rate, size = sample_frames(v, float(fps)) if published else (v, float(fps), None)
            md = [{"fps": rate, "total_num_frames": len(v), "frames_indices": list(range(len(v)))}]
            kw = {"size": size} if size is not None else {}
            vdata = vp(videos=[v], video_metadata=md, do_sample_frames=False, return_tensors="pt", **kw)
            pix.append(vdata["pixel_values_videos"])
            grids.append(vdata["video_grid_thw"])
            spg.append(vp.temporal_patch_size / rate)
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(pix), torch.cat(grids)
        out["second_per_grid_ts"] = torch.tensor(spg)
    if images:
        idata = proc.image_processor(images=images, return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = idata["pixel_values"], idata["image_grid_thw"]
    tower = model.audio_tower
    clips = [audio_chunks(model, a) for a in video_audio] + [audio_chunks(model, a) for a in audio]
    if clips:
        out["input_features"], out["feature_attention_mask"] = _stack_clips(clips, tower.n_frames)
    n_tok = [c.shape[0] * tower.tokens_per_chunk for c in clips]
    m2 = model.cfg.spatial_merge_size ** 2
    blocks = {"video": [], "image": [], "audio": []}
    for k, v in enumerate(videos):
        g = [int(x) for x in out["video_grid_thw"][k]]
        per_t = g[1] * g[2] // m2
        if use_audio_in_video:
            groups = split_into_groups(n_tok[k], g[0], float(out["second_per_grid_ts"][k]))
            blocks["video"].append(bos + "".join(vpad * per_t + apad * n for n in groups) + eos)
        else:
            blocks["video"].append(bos + vpad * (g[0] * per_t) + eos)
    for k in range(len(images)):
        blocks["image"].append(bos + ipad * (int(out["image_grid_thw"][k].prod()) // m2) + eos)
    for k in range(len(audio)):
        blocks["audio"].append(bos + apad * n_tok[len(video_audio) + k] + eos)
    used = {k: 0 for k in blocks}
    filled = []
    for txt in texts:
        has = any(f"<{k}>" in txt for k in blocks)
        if not has:
            if len(texts) > 1 and any(blocks.values()):
                raise InputError("a batch of prompts with media needs the media placeholders in each prompt",
                                 "write e.g. '<video>\\nWhat do you hear?' in each text")
            txt = "".join(f"<{k}>" * len(blocks[k]) for k in ("video", "image", "audio")) + \
                ("\n" if any(blocks.values()) else "") + txt
        for k in ("video", "image", "audio"):
            parts = txt.split(f"<{k}>")
            if used[k] + len(parts) - 1 > len(blocks[k]):
                raise InputError(f"the prompts hold more <{k}> placeholders than the {len(blocks[k])} {k} input(s)",
                                 f"pass one {k} per <{k}>")
            txt = parts[0] + "".join(blocks[k][used[k] + j] + p for j, p in enumerate(parts[1:]))
            used[k] += len(parts) - 1
        filled.append(txt)
    for k, n in used.items():
        if n != len(blocks[k]):
            raise InputError(f"{len(blocks[k])} {k} input(s) given but the prompts hold {n} <{k}> placeholder(s)",
                             f"write one <{k}> per {k}, or none at all in a single prompt (media then go first)")
    if chat:
        sp = SYSTEM_PROMPT if system_prompt == "default" else system_prompt
        sys_turn = f"<|im_start|>system\n{sp}<|im_end|>\n" if sp else ""
        filled = [f"{sys_turn}<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n" for x in filled]
    enc = tok(filled, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    return input_from_processor(model, out).to(model.device)


VIDEO_SALMONN2 = register(Adapter(
    name="video_salmonn2",
    model_types=(),  # chosen by accepts(): a qwen2_5_vl config.json with an audio_config
    global_map=QWEN2_5_VL.global_map,
    layer_map=QWEN2_5_VL.layer_map,
    towers={"visual": "visual.", "audio_tower": "audio."},
    rename_prefixes=QWEN2_5_VL.rename_prefixes + (("model.audio.", "audio."),),
    thinker_config=lambda hf: hf,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=QWEN2_5_VL.build_rotary,
    encoder_layers=encoder_layers,
    encode={"image": QWEN2_5_VL.encode["image"], "video": QWEN2_5_VL.encode["video"], "audio": _encode_audio},
    prepare=prepare,
    input_from_processor=input_from_processor,
    key_map=key_map,
    accepts=accepts,
))
