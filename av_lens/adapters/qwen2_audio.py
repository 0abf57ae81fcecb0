"""Qwen2-Audio (Qwen/Qwen2-Audio-7B, -7B-Instruct): a Whisper-large-v3-style audio encoder (two convolutions, 32
layers of width 1280, average pooling 2) and a linear projector feeding a Qwen2-7B decoder. The model of "Are
Audio-Language Models Listening?" and of the AR&D audio-attention studies.

What differs from the Omni thinker, and where av_lens handles it:

* **1-D positions** (``rope_rules="1d"``): a plain Qwen2 decoder, so text and audio tokens advance one position
  axis by one; pads sit at 0, as in transformers' generate (``attention_mask.cumsum(-1) - 1``). The rotary module
  is transformers' ``Qwen2RotaryEmbedding`` fed the first row of av_lens's [3, batch, pos] positions.
* **Media** are ``<|audio_bos|>`` + a run of ``<|AUDIO|>`` + ``<|audio_eos|>``: the processor pads every clip to
  one 30 s window (3000 mel frames; longer clips are cut) and expands the placeholder to
  ``((frames - 1) // 2 + 1 - 2) // 2 + 1`` tokens of the clip's real frames. The markers are tagged ``special``;
  audio token k of a clip has time stamp k * 40 ms (10 ms hop x conv stride 2 x pooling 2).
* **Encoder.** transformers' ``Qwen2AudioEncoder`` and ``Qwen2AudioMultiModalProjector`` run unchanged, with the
  padding mask the reference builds from ``feature_attention_mask``; the first n valid tokens of each clip enter
  the stream. Hook points: ``audio_encoder.hook_in`` (log-mel [n_audio, 128, 3000]),
  ``audio_encoder.blocks.{i}.hook_out`` ([n_audio, 1500, 1280], before pooling) and ``audio_encoder.hook_out``
  ([n_audio_tokens, d_model], projected).
* **Checkpoint keys.** Published checkpoints (and transformers' ``save_pretrained``) use
  ``language_model.model.*`` / ``language_model.lm_head`` / ``audio_tower.*`` / ``multi_modal_projector.*``; a
  raw transformers-5 ``state_dict()`` uses ``model.language_model.*`` / ``model.audio_tower.*`` / ``lm_head``.
  Both load.

:mod:`av_lens.adapters.audioflamingo3` reuses this file's pieces (same decoder, same encoder shape).
"""

from __future__ import annotations

import torch
from torch import nn

from av_lens.adapters.base import Adapter, Rotary1D, register
from av_lens.adapters.qwen2_5_omni import QWEN2_5_OMNI, _marker_ids, _text_model_kwargs
from av_lens.config import AVConfig
from av_lens.errors import InputError
from av_lens.layout import MediaSpec, TokenIds, build_layout

#: the default system turn of Qwen2-Audio's chat template
DEFAULT_SYSTEM = "You are a helpful assistant."


def audio_llm_config(hf, tokenizer, audio_token_id: int, architecture: str, marker_tokens: dict[str, str],
                     **overrides) -> AVConfig:
    """AVConfig of a Qwen2-decoder audio LLM (Qwen2-Audio, Audio Flamingo 3): 1-D positions, audio only."""
    text = hf.text_config
    markers = _marker_ids(tokenizer)
    if tokenizer is not None:
        for tok, name in marker_tokens.items():
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                markers[tid] = name
    # transformers never ties these models' lm_head to the embeddings (no tied-weights keys), whatever the
    # config's tie_word_embeddings says, so the checkpoint always holds its own lm_head; follow that
    kw = _text_model_kwargs(text, markers, tie=False)
    head_dim = kw["d_head"]
    kw.update(
        tokens=TokenIds(audio=int(audio_token_id), image=-1, video=-1, audio_bos=-1, audio_eos=-1, vision_bos=-1,
                        vision_eos=-1, markers=markers),
        mrope_section=(head_dim // 2, 0, 0),  # 1-D positions: every frequency on the one axis
        modalities=("audio",), rope_rules="1d", original_architecture=architecture,
    )
    kw.update(overrides)
    return AVConfig(**kw)


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    return audio_llm_config(hf, tokenizer, hf.audio_token_index, "Qwen2AudioForConditionalGeneration",
                            {"<|audio_bos|>": "audio_bos", "<|audio_eos|>": "audio_eos"}, **overrides)


def _build_towers(hf):
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder, Qwen2AudioMultiModalProjector

    return {"audio_tower": Qwen2AudioEncoder._from_config(hf.audio_config, attn_implementation="sdpa"),
            "multi_modal_projector": Qwen2AudioMultiModalProjector(hf)}


def build_rotary(hf):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    return Rotary1D(Qwen2RotaryEmbedding(config=hf.text_config))


def encoder_layers(tower, kind: str) -> list[nn.Module]:
    return list(tower.layers)


def token_lengths(frames: torch.Tensor) -> torch.Tensor:
    """Audio tokens of clips (or windows) with ``frames`` real mel frames: conv stride 2, then pooling 2."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _encode_audio(model, inp) -> torch.Tensor:
    from transformers.masking_utils import create_bidirectional_mask

    tower, proj = model.audio_tower, model.multi_modal_projector
    feats = inp.input_features
    frames = inp.feature_attention_mask.to(feats.device).sum(-1)
    after_conv, n_tok = tower._get_feat_extract_output_lengths(frames)
    n_pos = (feats.shape[-1] - 2) // 2 + 1  # the encoder's positions, as the reference counts them
    valid_pos = (torch.arange(n_pos, device=feats.device)[None] < after_conv[:, None]).long()

    def call(x):  # as Qwen2AudioModel.forward: padding mask over conv positions, encoder, projector, valid tokens
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(x.shape[0], n_pos, 1,
                                                                                          dtype=x.dtype, device=x.device),
                                         attention_mask=valid_pos)
        h = proj(tower(x.to(tower.conv1.weight.dtype), attention_mask=mask).last_hidden_state)
        keep = torch.arange(h.shape[1], device=h.device)[None] < n_tok.to(h.device)[:, None]
        return h[keep]

    return model.audio_encoder.run(encoder_layers(tower, "audio"), call, feats)


# --------------------------------------------------------------------------------------------- inputs
def audio_token_seconds(model) -> float:
    """Seconds per audio token: the feature hop x conv stride 2 x pooling 2 (0.04 s for 16 kHz, hop 160)."""
    fe = getattr(model.processor, "feature_extractor", None) if model.processor is not None else None
    if fe is None:
        return 0.0
    return float(fe.hop_length) / float(fe.sampling_rate) * 4


def input_from_processor(model, data) -> "AVInput":
    """An AVInput from a ``Qwen2AudioProcessor`` output (``return_tensors="pt"``)."""
    from av_lens.inputs import AVInput, checked_ids_and_mask

    ids, mask = checked_ids_and_mask(data)
    for unsupported in ("pixel_values", "pixel_values_videos"):
        if data.get(unsupported) is not None:
            raise InputError(f"{model.cfg.original_architecture} takes audio only, but the input has {unsupported}",
                             "drop the images / video, or load an audio-visual model (e.g. Qwen2.5-Omni)")
    feats, fam = data.get("input_features"), data.get("feature_attention_mask")
    if feats is not None and fam is None:
        raise InputError("input_features without feature_attention_mask",
                         "pass the processor's feature_attention_mask (it gives each clip's length)")
    counts = () if feats is None else tuple(int(n) for n in token_lengths(torch.as_tensor(fam).sum(-1)))
    media = MediaSpec(audio_token_counts=counts, audio_token_seconds=audio_token_seconds(model), rope_rules="1d")
    layout = build_layout(ids, mask, model.cfg.tokens, media)
    return AVInput(input_ids=ids, attention_mask=mask.long(), layout=layout,
                   input_features=None if feats is None else torch.as_tensor(feats),
                   feature_attention_mask=None if fam is None else torch.as_tensor(fam))


def audio_request(model, family: str, text, audio, images, videos, video_audio, use_audio_in_video):
    """(texts, checked clips, placeholder, sampling rate) for an audio-only family; refuses images and video."""
    from av_lens.processing import _as_list, _processor_for, check_audio

    if images is not None or videos is not None or video_audio is not None or use_audio_in_video:
        raise InputError(f"{model.cfg.model_name or family} ({model.cfg.original_architecture}) takes audio only",
                         "drop images= / videos= / video_audio=, or load an audio-visual model (e.g. Qwen2.5-Omni)")
    proc = _processor_for(model, text)
    sr = int(getattr(proc.feature_extractor, "sampling_rate", model.cfg.audio_sample_rate))
    clips = [check_audio(a, sr, f"audio[{i}]") for i, a in enumerate(_as_list(audio))]
    texts = [text] if isinstance(text, str) else list(text)
    return texts, clips, proc, sr


def prepare(model, text=None, *, audio=None, images=None, videos=None, video_audio=None, use_audio_in_video=None,
            fps=2.0, chat=True, system_prompt="default", processor_output=None, processor_kwargs=None):
    """:func:`av_lens.processing.prepare` for Qwen2-Audio. ``chat=True``: Qwen2-Audio's chat template
    (``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`` + ``Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\\n``
    per clip unless the text holds the blocks + text + ``<|im_end|>\\n<|im_start|>assistant\\n``); ``chat=False``:
    the text as is (a clip block is put first when the text has none, as the base model's prompts read). Then
    the native processor (left padding) and the 1-D layout; clips go to the prompts in order."""
    if processor_output is not None:
        return model.to_input(processor_output)
    texts, clips, proc, sr = audio_request(model, "Qwen2-Audio", text, audio, images, videos, video_audio,
                                           use_audio_in_video)
    block = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    has = ["<|AUDIO|>" in t for t in texts]
    if len(texts) > 1 and clips and not all(has):
        raise InputError("a batch of prompts with audio needs the audio placeholders in each prompt",
                         f"write e.g. '{block}What do you hear?' in each text")
    if chat:
        sp = (model.cfg.system_prompt or DEFAULT_SYSTEM) if system_prompt == "default" else system_prompt
        sys_turn = f"<|im_start|>system\n{sp}<|im_end|>\n" if sp else ""
        blocks = "".join(f"Audio {k + 1}: {block}\n" for k in range(len(clips)))
        texts = [f"{sys_turn}<|im_start|>user\n{'' if h else blocks}{t}<|im_end|>\n<|im_start|>assistant\n"
                 for t, h in zip(texts, has)]
    else:
        texts = [t if h else block * len(clips) + t for t, h in zip(texts, has)]
    n_ph = sum(t.count("<|AUDIO|>") for t in texts)
    if n_ph != len(clips):
        raise InputError(f"the prompts hold {n_ph} audio placeholders but {len(clips)} clips were given",
                         f"write one {block} per clip")
    kwargs = dict(return_tensors="pt", padding=True, padding_side="left")
    if clips:
        kwargs.update(audio=clips, sampling_rate=sr)
    kwargs.update(processor_kwargs or {})
    data = proc(text=texts, **kwargs)
    return input_from_processor(model, data).to(model.device)


def reference_kwargs(inp) -> dict:
    """Keyword arguments for transformers' ``Qwen2AudioForConditionalGeneration`` (with the layout's 1-D positions,
    which are what its generate uses; its plain forward would count left pads as positions)."""
    kw = {"input_ids": inp.input_ids, "attention_mask": inp.attention_mask,
          "position_ids": inp.layout.position_ids[0].to(inp.input_ids.device)}
    if inp.input_features is not None:
        kw.update(input_features=inp.input_features, feature_attention_mask=inp.feature_attention_mask)
    return kw


#: published layout (and save_pretrained's) -> the names below; a raw transformers-5 state_dict's too
RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
           ("model.language_model.", "model."), ("model.audio_tower.", "audio_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."))

QWEN2_AUDIO = register(Adapter(
    name="qwen2_audio",
    model_types=("qwen2_audio",),
    global_map=QWEN2_5_OMNI.global_map,
    layer_map=QWEN2_5_OMNI.layer_map,
    towers={"audio_tower": "audio_tower.", "multi_modal_projector": "multi_modal_projector."},
    rename_prefixes=RENAMES,
    thinker_config=lambda hf: hf,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=build_rotary,
    encoder_layers=encoder_layers,
    encode={"audio": _encode_audio},
    reference_kwargs=reference_kwargs,
    prepare=prepare,
    input_from_processor=input_from_processor,
))
