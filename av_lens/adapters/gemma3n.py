"""Gemma-3n (google/gemma-3n-E2B-it, -E4B-it; ``model_type: gemma3n``): a Gemma decoder with AltUp streams,
Laurel blocks, per-layer token inputs, KV sharing, sliding-window local layers and soft-capped logits, fed by a
USM conformer (audio) and a MobileNetV5 (image) through transformers' ``Gemma3nMultimodalEmbedder``.

The decoder is av_lens's own (``av_lens/components/gemma3n_block.py``, chosen through ``Adapter.backbone``; the
hook mapping onto the AltUp streams is described there and in docs/models.md). Positions are 1-D
(``rope_rules="1d"``): every token advances by one, pads sit at 0. The processor expands each image to
``<start_of_image>`` + a fixed number of ``<image_soft_token>`` + ``<end_of_image>`` (each surrounded by blank lines),
and each clip likewise with the audio tokens; the start/end markers are tagged as special positions, the soft
tokens as image / audio. Audio soft tokens beyond what the encoder produces for a clip are filled, as in
transformers, with the embedding of the last audio id; they are still tagged audio (their time stamps run on).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from av_lens.adapters.base import Adapter, register
from av_lens.config import AVConfig
from av_lens.errors import InputError
from av_lens.layout import MediaSpec, TokenIds, build_layout

_MARKERS = {"<start_of_turn>": "start_of_turn", "<end_of_turn>": "end_of_turn", "<bos>": "bos", "<eos>": "eos"}
_LM = "model.language_model."


def _marker_ids(hf, tokenizer) -> dict[int, str]:
    markers = {int(hf.boi_token_id): "vision_bos", int(hf.eoi_token_id): "vision_eos",
               int(hf.boa_token_id): "audio_bos", int(hf.eoa_token_id): "audio_eos"}
    if tokenizer is not None:
        for tok, name in _MARKERS.items():
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                markers[tid] = name
    return markers


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    tc = hf.text_config
    markers = _marker_ids(hf, tokenizer)
    # boi/eoi/boa/eoa are plain markers here: the 1-D rules take the runs of soft tokens, not the Qwen start blocks
    tokens = TokenIds(audio=int(hf.audio_token_id), image=int(hf.image_token_id), video=-1, audio_bos=-1,
                      audio_eos=-1, vision_bos=-1, vision_eos=-1, markers=markers)
    eos = tc.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for tid, name in markers.items():
        if name == "end_of_turn" and tid not in eos:
            eos.append(tid)
    d_mlp = tc.intermediate_size
    extra = {"sliding_window": int(tc.sliding_window), "altup_num_inputs": int(tc.altup_num_inputs),
             "kv_sharing_modes": list(tc.kv_sharing_modes), "layer_types": list(tc.layer_types),
             "final_logit_softcapping": tc.final_logit_softcapping}
    extra.update(overrides.pop("extra", {}) or {})
    kw = dict(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=tc.num_attention_heads,
        n_key_value_heads=tc.num_key_value_heads, d_head=tc.head_dim,
        d_mlp=int(d_mlp[0] if isinstance(d_mlp, (list, tuple)) else d_mlp), d_vocab=tc.vocab_size,
        n_ctx=tc.max_position_embeddings, eps=tc.rms_norm_eps, act_fn="gelu",
        rotary_base=float(tc.rope_parameters["full_attention"]["rope_theta"]),
        mrope_section=(tc.head_dim // 2, 0, 0),  # 1-D positions
        tie_word_embeddings=True, pad_token_id=tc.pad_token_id, eos_token_ids=tuple(eos), tokens=tokens,
        modalities=("audio", "image"), rope_rules="1d", attn_bias=bool(tc.attention_bias), qk_norm=True,
        original_architecture="Gemma3nForConditionalGeneration", extra=extra,
    )
    kw.update(overrides)
    if kw["attn_bias"]:
        from av_lens.errors import CheckpointError

        raise CheckpointError("this Gemma-3n config has attention biases, which av_lens does not load",
                              "use a checkpoint with attention_bias false (as published)")
    return AVConfig(**kw)


def _backbone(cfg: AVConfig, hf) -> dict:
    from av_lens.components.gemma3n_block import Gemma3nBlock, Gemma3nEmbed, Gemma3nStreams

    tc = hf.text_config
    return {"embed": Gemma3nEmbed(cfg, hf), "block": lambda layer: Gemma3nBlock(cfg, layer, tc),
            "stream": Gemma3nStreams(cfg, tc)}


def _build_towers(hf):
    from transformers import AutoModel

    return {"audio_tower": AutoModel.from_config(hf.audio_config), "visual": AutoModel.from_config(hf.vision_config)}


class _Rotary(nn.Module):
    """transformers' ``Gemma3nRotaryEmbedding`` (one table per layer type: theta 1e6 for full, 1e4 for sliding
    layers) fed the first row of av_lens's [3, batch, pos] positions. ``forward`` gives the full-attention tables."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inner.full_attention_inv_freq

    def tables(self, x, position_ids, layer_type: str):
        if self.inv_freq.device != x.device:
            self.inner.to(x.device)
        return self.inner(x, position_ids[0] if position_ids.ndim == 3 else position_ids, layer_type)

    def forward(self, x, position_ids):
        return self.tables(x, position_ids, "full_attention")


def _build_rotary(hf):
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRotaryEmbedding

    return _Rotary(Gemma3nRotaryEmbedding(hf.text_config))


def _encoder_layers(tower, kind: str) -> list[nn.Module]:
    if kind == "audio":
        return list(tower.conformer)
    return list(tower.timm_model.blocks)  # the MobileNetV5 stages


def _encode_image(model, inp) -> torch.Tensor:
    hf = model.hf_config

    def call(x):  # as Gemma3nModel.get_image_features
        h = model.visual(pixel_values=x, do_pooling=False, return_dict=True).last_hidden_state
        h = h.reshape(h.shape[0], hf.vision_config.hidden_size, hf.vision_soft_tokens_per_image).permute(0, 2, 1)
        h = h * hf.vision_config.hidden_size ** 0.5
        return model.embed.embed_vision(inputs_embeds=h).reshape(-1, model.cfg.d_model)

    return model.image_encoder.run(_encoder_layers(model.visual, "image"), call, inp.pixel_values)


def _encode_audio(model, inp) -> torch.Tensor:
    hf = model.hf_config
    if "input_features_mask" not in inp.extra:
        raise InputError("the input has audio features but no input_features_mask",
                         "build it with model.prepare(audio=[...]) or pass the processor's input_features_mask")
    valid = inp.extra["input_features_mask"].to(inp.input_features.device).bool()

    def call(x):  # as Gemma3nModel.forward: encoder, embed_audio, pad to audio_soft_tokens_per_image
        out = model.audio_tower(x, ~valid, return_dict=True)
        emb = model.embed.embed_audio(inputs_embeds=out.last_hidden_state)
        pad_id = torch.tensor([[model.cfg.d_vocab - 1]], device=emb.device)
        pad = model.embed.embed_audio(input_ids=pad_id)
        emb = torch.where(out.audio_mel_mask.unsqueeze(-1), pad, emb)
        n, t, d = emb.shape
        emb = torch.cat([emb, pad.expand(n, hf.audio_soft_tokens_per_image - t, d)], dim=1)
        return emb.reshape(-1, d)

    return model.audio_encoder.run(list(model.audio_tower.conformer), call, inp.input_features)


# --------------------------------------------------------------------------------------------- inputs
def _audio_token_seconds(model) -> float:
    ac = model.hf_config.audio_config
    fe = getattr(model.processor, "feature_extractor", None) if model.processor is not None else None
    if fe is None:
        return 0.0
    stride = math.prod(int(s[0]) for s in ac.sscp_conv_stride_size)
    return float(fe.hop_length) / float(fe.sampling_rate) * stride * int(ac.conf_reduction_factor)


def input_from_processor(model, data) -> "AVInput":
    """An AVInput from a ``Gemma3nProcessor`` output (``return_tensors="pt"``)."""
    from av_lens.inputs import AVInput, checked_ids_and_mask

    ids, mask = checked_ids_and_mask(data)
    if data.get("pixel_values_videos") is not None:
        raise InputError("Gemma-3n takes no video", "pass frames as images=[...], or load a Qwen Omni model")
    pixels, feats = data.get("pixel_values"), data.get("input_features")
    extra = {}
    if feats is not None:
        if data.get("input_features_mask") is None:
            raise InputError("input_features without input_features_mask", "pass the processor's input_features_mask too")
        extra["input_features_mask"] = torch.as_tensor(data["input_features_mask"])
    hf = model.hf_config
    media = MediaSpec(
        image_token_counts=() if pixels is None else (int(hf.vision_soft_tokens_per_image),) * int(pixels.shape[0]),
        audio_token_counts=() if feats is None else (int(hf.audio_soft_tokens_per_image),) * int(feats.shape[0]),
        audio_token_seconds=_audio_token_seconds(model), rope_rules="1d",
    )
    layout = build_layout(ids, mask, model.cfg.tokens, media)
    return AVInput(input_ids=ids, attention_mask=mask.long(), layout=layout,
                   input_features=None if feats is None else torch.as_tensor(feats),
                   pixel_values=None if pixels is None else torch.as_tensor(pixels), extra=extra)


def prepare(model, text=None, *, audio=None, images=None, videos=None, video_audio=None, use_audio_in_video=None,
            fps=2.0, chat=True, system_prompt="default", processor_output=None, processor_kwargs=None):
    """:func:`av_lens.processing.prepare` for Gemma-3n: ``<start_of_turn>user\\n`` + one ``<image_soft_token>`` per
    image and one ``<audio_soft_token>`` per clip (unless the text holds them) + text +
    ``<end_of_turn>\\n<start_of_turn>model\\n``, then the native processor (left padding) and the 1-D layout.
    In a batch, images go to the prompts in order, as many to each as its text has image placeholders."""
    from av_lens.processing import image_audio_request

    req = image_audio_request(model, "Gemma-3n", text, audio=audio, images=images, videos=videos,
                              video_audio=video_audio, use_audio_in_video=use_audio_in_video,
                              processor_output=processor_output)
    if req is None:
        return model.to_input(processor_output)
    proc = model.processor
    texts, audio, images, img_ph, aud_ph, has_ph = req.texts, req.audio, req.images, req.image_ph, req.audio_ph, req.has_ph
    texts = [t if ph else img_ph * len(images) + aud_ph * len(audio) + t for t, ph in zip(texts, has_ph)]
    if chat:
        texts = [f"<start_of_turn>user\n{t}<end_of_turn>\n<start_of_turn>model\n" for t in texts]
    counts = [t.count(img_ph) for t in texts]
    if sum(counts) != len(images):
        raise InputError(f"the prompts hold {sum(counts)} image placeholders but {len(images)} images were given",
                         f"write one {img_ph} per image")
    if sum(t.count(aud_ph) for t in texts) != len(audio):
        raise InputError(f"the prompts hold {sum(t.count(aud_ph) for t in texts)} audio placeholders but "
                         f"{len(audio)} clips were given", f"write one {aud_ph} per clip")
    kwargs = dict(return_tensors="pt", padding=True, padding_side="left")
    kwargs.update(processor_kwargs or {})
    if audio:
        kwargs["audio"] = audio
    if images:
        it = iter(images)
        kwargs["images"] = [[next(it) for _ in range(c)] for c in counts]
    data = proc(text=texts, **kwargs)
    return input_from_processor(model, data).to(model.device)


def reference_kwargs(inp) -> dict:
    """Keyword arguments for transformers' ``Gemma3nForConditionalGeneration`` (with the layout's 1-D positions,
    which are what its generate uses; its plain forward would count left pads as positions)."""
    kw = {"input_ids": inp.input_ids, "attention_mask": inp.attention_mask,
          "position_ids": inp.layout.position_ids[0].to(inp.input_ids.device)}
    if inp.pixel_values is not None:
        kw["pixel_values"] = inp.pixel_values
    if inp.input_features is not None:
        kw.update(input_features=inp.input_features, input_features_mask=inp.extra["input_features_mask"])
    return kw


def _layer_extra(cfg, layer: int) -> dict[str, str]:
    """k/v projections and k_norm, in the layers that compute their own keys and values (not the KV-shared ones)."""
    if cfg.extra["kv_sharing_modes"][layer] == "reuse":
        return {}
    p = _LM + "layers.{l}.self_attn."
    return {"blocks.{l}.attn.k_proj.weight": p + "k_proj.weight", "blocks.{l}.attn.v_proj.weight": p + "v_proj.weight",
            "blocks.{l}.attn.k_norm.w": p + "k_norm.weight"}


_GLOBAL = {"embed.W_E": _LM + "embed_tokens.weight", "ln_final.w": _LM + "norm.weight",
           "unembed.weight": "lm_head.weight",
           "stream.W_E_per_layer": _LM + "embed_tokens_per_layer.weight",
           "stream.per_layer_model_projection.weight": _LM + "per_layer_model_projection.weight",
           "stream.per_layer_projection_norm.w": _LM + "per_layer_projection_norm.weight"}
for _i in range(8):  # altup_num_inputs - 1 projections each; the unused entries are dropped in expected_keys
    _GLOBAL[f"stream.altup_projections.{_i}.weight"] = _LM + f"altup_projections.{_i}.weight"
    _GLOBAL[f"stream.altup_unembed_projections.{_i}.weight"] = _LM + f"altup_unembed_projections.{_i}.weight"
for _kind in ("vision", "audio"):
    for _w in ("embedding.weight", "hard_embedding_norm.weight", "soft_embedding_norm.weight",
               "embedding_projection.weight"):
        _GLOBAL[f"embed.embed_{_kind}.{_w}"] = f"model.embed_{_kind}.{_w}"

_LAYER = {f"blocks.{{l}}.{ours}": _LM + "layers.{l}." + theirs for ours, theirs in {
    "altup.correct_output_scale": "altup.correct_output_scale",
    "altup.correction_coefs.weight": "altup.correction_coefs.weight",
    "altup.prediction_coefs.weight": "altup.prediction_coefs.weight",
    "altup.modality_router.weight": "altup.modality_router.weight",
    "altup.router_norm.weight": "altup.router_norm.weight",
    "laurel.linear_left.weight": "laurel.linear_left.weight",
    "laurel.linear_right.weight": "laurel.linear_right.weight",
    "laurel.post_laurel_norm.weight": "laurel.post_laurel_norm.weight",
    "ln1.w": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_norm.w": "self_attn.q_norm.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn_post_norm.w": "post_attention_layernorm.weight",
    "ln2.w": "pre_feedforward_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp_post_norm.w": "post_feedforward_layernorm.weight",
    "per_layer_input_gate.weight": "per_layer_input_gate.weight",
    "per_layer_projection.weight": "per_layer_projection.weight",
    "per_layer_norm.w": "post_per_layer_input_norm.weight",
}.items()}


class _GemmaAdapter(Adapter):
    def expected_keys(self, n_layers: int, tied: bool, cfg=None) -> dict[str, str]:
        keys = super().expected_keys(n_layers, tied, cfg)
        n = cfg.extra["altup_num_inputs"] if cfg is not None else 4
        return {k: v for k, v in keys.items()
                if not (k.startswith("stream.altup_") and int(k.split(".")[2]) >= n - 1)}


def _unused_key(cfg, key: str) -> bool:
    """Published checkpoints keep k/v weights for the KV-shared layers, which never use them."""
    modes = cfg.extra.get("kv_sharing_modes") if cfg is not None else None
    if not modes or not key.startswith(_LM + "layers."):
        return False
    parts = key[len(_LM + "layers."):].split(".")
    return (parts[0].isdigit() and int(parts[0]) < len(modes) and modes[int(parts[0])] == "reuse"
            and parts[1] == "self_attn" and parts[2] in ("k_proj", "v_proj", "k_norm", "v_norm"))


GEMMA3N = register(_GemmaAdapter(
    name="gemma3n",
    model_types=("gemma3n",),
    global_map=_GLOBAL,
    layer_map=_LAYER,
    layer_extra=_layer_extra,
    towers={"audio_tower": "model.audio_tower.", "visual": "model.vision_tower."},
    thinker_config=lambda hf: hf,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=_build_rotary,
    encoder_layers=_encoder_layers,
    encode={"audio": _encode_audio, "image": _encode_image},
    reference_kwargs=reference_kwargs,
    prepare=prepare,
    input_from_processor=input_from_processor,
    backbone=_backbone,
    unused_key=_unused_key,
))
