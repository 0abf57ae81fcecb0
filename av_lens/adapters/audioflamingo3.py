"""Audio Flamingo 3 (nvidia/audio-flamingo-3-hf, 8B): a fine-tuned Whisper-large-v3 encoder (AF-Whisper) and a
2-layer GELU projector feeding a Qwen2.5-7B decoder. The model of the temporal-binding and emotion-neuron studies.

It shares Qwen2-Audio's decoder handling (1-D positions, Qwen2 rotary, see :mod:`av_lens.adapters.qwen2_audio`).
What is its own:

* **Windows.** The processor cuts each clip into 30 s windows (at most ``max_audio_len`` = 600 s), one row of
  ``input_features`` [n_windows, 128, 3000] per window with its ``input_features_mask``; the encoder masks each
  window's padding itself. A clip's ``<sound>`` placeholder expands to the token count of the clip's summed frames;
  the model fills it with the valid tokens of the clip's windows in order. av_lens's ``prepare`` records the windows
  per clip (``extra["audio_windows"]``); for a bare processor output it groups windows into clips by the runs of
  ``<sound>`` tokens. Audio token k of a clip has time stamp k * 40 ms (windows are contiguous).
* **One clip per prompt**, as the processor requires.
* **Markers.** No start/end markers: a clip is a bare run of ``<sound>`` tokens (the 1-D rules' runs).
* **Hook points**: ``audio_encoder.hook_in`` (log-mel windows), ``audio_encoder.blocks.{i}.hook_out``
  ([n_windows, 1500, 1280]) and ``audio_encoder.hook_out`` ([n_audio_tokens, d_model], projected).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from av_lens.adapters.base import register
from av_lens.adapters.qwen2_audio import (QWEN2_AUDIO, audio_llm_config, audio_request, audio_token_seconds,
                                          encoder_layers, token_lengths)
from av_lens.config import AVConfig
from av_lens.errors import InputError, LayoutError
from av_lens.layout import MediaSpec, build_layout


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    return audio_llm_config(hf, tokenizer, hf.audio_token_id, "AudioFlamingo3ForConditionalGeneration", {},
                            **overrides)


def _build_towers(hf):
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (AudioFlamingo3Encoder,
                                                                            AudioFlamingo3MultiModalProjector)

    return {"audio_tower": AudioFlamingo3Encoder._from_config(hf.audio_config, attn_implementation="sdpa"),
            "multi_modal_projector": AudioFlamingo3MultiModalProjector(hf)}


def _encode_audio(model, inp) -> torch.Tensor:
    tower, proj = model.audio_tower, model.multi_modal_projector
    fmask = inp.feature_attention_mask.to(inp.input_features.device)
    _, n_tok = tower._get_feat_extract_output_lengths(fmask.sum(-1))

    def call(x):  # as AudioFlamingo3Model.get_audio_features: encoder (masks its padding), projector, valid tokens
        h = proj(tower(x.to(tower.conv1.weight.dtype), input_features_mask=fmask).last_hidden_state)
        keep = torch.arange(h.shape[1], device=h.device)[None] < n_tok.to(h.device)[:, None]
        return h[keep]

    return model.audio_encoder.run(encoder_layers(tower, "audio"), call, inp.input_features)


def _windows_by_runs(ids, mask, audio_id: int, frames: torch.Tensor) -> list[int]:
    """Windows per clip, matched in order to the runs of ``<sound>`` tokens (a run holds one clip's tokens)."""
    runs = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()].tolist()
        i = 0
        while i < len(row):
            if row[i] == audio_id:
                j = i
                while j < len(row) and row[j] == audio_id:
                    j += 1
                runs.append(j - i)
                i = j
            else:
                i += 1
    out, w = [], 0
    for n in runs:
        k = 1
        while w + k <= len(frames) and int(token_lengths(frames[w:w + k].sum())) < n:
            k += 1
        if w + k > len(frames) or int(token_lengths(frames[w:w + k].sum())) != n:
            raise LayoutError(f"a run of {n} audio tokens does not match the remaining audio windows' frames "
                              f"{frames[w:].tolist()}", "build inputs with model.prepare(audio=[...]), or pass the "
                              "processor output whose input_features belong to this text")
        out.append(k)
        w += k
    return out


def input_from_processor(model, data, windows: list[int] | None = None) -> "AVInput":
    """An AVInput from an ``AudioFlamingo3Processor`` output (``return_tensors="pt"``); ``windows``: windows per clip
    (None: matched to the runs of ``<sound>`` tokens)."""
    from av_lens.inputs import AVInput, checked_ids_and_mask

    ids, mask = checked_ids_and_mask(data)
    feats, fmask = data.get("input_features"), data.get("input_features_mask")
    if feats is not None and fmask is None:
        raise InputError("input_features without input_features_mask",
                         "pass the processor's input_features_mask (it gives each window's length)")
    counts, extra = (), {}
    if feats is not None:
        frames = torch.as_tensor(fmask).sum(-1)
        if windows is None:
            windows = (data["audio_windows"].tolist() if data.get("audio_windows") is not None
                       else _windows_by_runs(ids, mask, model.cfg.tokens.audio, frames))
        if sum(windows) != len(frames):
            raise InputError(f"{sum(windows)} audio windows expected by the clips but input_features has {len(frames)}",
                             "pass the processor output unchanged")
        starts = [sum(windows[:k]) for k in range(len(windows))]
        counts = tuple(int(token_lengths(frames[s:s + n].sum())) for s, n in zip(starts, windows))
        extra["audio_windows"] = torch.tensor(windows)
    media = MediaSpec(audio_token_counts=counts, audio_token_seconds=audio_token_seconds(model), rope_rules="1d")
    layout = build_layout(ids, mask, model.cfg.tokens, media)
    return AVInput(input_ids=ids, attention_mask=mask.long(), layout=layout,
                   input_features=None if feats is None else torch.as_tensor(feats),
                   feature_attention_mask=None if fmask is None else torch.as_tensor(fmask), extra=extra)


def prepare(model, text=None, *, audio=None, images=None, videos=None, video_audio=None, use_audio_in_video=None,
            fps=2.0, chat=True, system_prompt="default", processor_output=None, processor_kwargs=None):
    """:func:`av_lens.processing.prepare` for Audio Flamingo 3. ``chat=True``: ``<|im_start|>user\\n`` + one
    ``<sound>`` per clip (unless the text holds them) + text + ``<|im_end|>\\n<|im_start|>assistant\\n`` (a system
    turn first when ``system_prompt`` or the model config has one); ``chat=False``: the text as is (``<sound>`` put
    first when missing). Then the native processor (left padding, 30 s windows) and the 1-D layout."""
    if processor_output is not None:
        return model.to_input(processor_output)
    texts, clips, proc, sr = audio_request(model, "Audio Flamingo 3", text, audio, images, videos, video_audio,
                                           use_audio_in_video)
    ph = proc.audio_token
    has = [ph in t for t in texts]
    if len(texts) > 1 and clips and not all(has):
        raise InputError("a batch of prompts with audio needs the audio placeholder in each prompt",
                         f"write e.g. '{ph}What do you hear?' in each text")
    if chat:
        sp = model.cfg.system_prompt if system_prompt == "default" else system_prompt
        sys_turn = f"<|im_start|>system\n{sp}<|im_end|>\n" if sp else ""
        texts = [f"{sys_turn}<|im_start|>user\n{'' if h else ph * len(clips)}{t}<|im_end|>\n<|im_start|>assistant\n"
                 for t, h in zip(texts, has)]
    else:
        texts = [t if h else ph * len(clips) + t for t, h in zip(texts, has)]
    n_ph = [t.count(ph) for t in texts]
    if clips and (len(clips) != len(texts) or any(n != 1 for n in n_ph)) or not clips and any(n_ph):
        raise InputError(f"Audio Flamingo 3's processor takes one clip per prompt, but {len(texts)} prompt(s) hold "
                         f"{n_ph} {ph} placeholders for {len(clips)} clip(s)",
                         f"pass one clip per prompt, each prompt with one {ph} (or none, to have it put first)")
    # the processor pads text (left) by default; a shared padding= would also reach the feature extractor, whose
    # windows must stay padded to the full 30 s (max_length, its default)
    kwargs = dict(return_tensors="pt", text_kwargs={"padding": True, "padding_side": "left"})
    windows = None
    if clips:
        kwargs.update(audio=clips, sampling_rate=sr)
        size = int(sr * proc.feature_extractor.chunk_length)
        cap = int(proc.max_audio_len // proc.feature_extractor.chunk_length)
        windows = [min(cap, max(1, -(-len(c) // size))) for c in clips]  # as the processor cuts them
    kwargs.update(processor_kwargs or {})
    data = proc(text=texts, **kwargs)
    return input_from_processor(model, data, windows).to(model.device)


def reference_kwargs(inp) -> dict:
    """Keyword arguments for transformers' ``AudioFlamingo3ForConditionalGeneration`` (with the layout's 1-D
    positions, which are what its generate uses)."""
    kw = {"input_ids": inp.input_ids, "attention_mask": inp.attention_mask,
          "position_ids": inp.layout.position_ids[0].to(inp.input_ids.device)}
    if inp.input_features is not None:
        kw.update(input_features=inp.input_features, input_features_mask=inp.feature_attention_mask)
    return kw


#: Qwen2-Audio's weight map, towers, key renames, rotary and encoder layers; its own config, towers, encoder call,
#: windows-per-clip inputs and prompts
AUDIOFLAMINGO3 = register(replace(
    QWEN2_AUDIO,
    name="audioflamingo3",
    model_types=("audioflamingo3",),
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    encode={"audio": _encode_audio},
    reference_kwargs=reference_kwargs,
    prepare=prepare,
    input_from_processor=input_from_processor,
))
