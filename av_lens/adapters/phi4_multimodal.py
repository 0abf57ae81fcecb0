"""Phi-4-multimodal (microsoft/Phi-4-multimodal-instruct, 5.6B): a Phi-3-style decoder (Phi-4-mini) fed by a
SigLIP image encoder with dynamic HD crops and a conformer speech encoder, both inside one transformers module
(``model.embed_tokens_extend``), plus two modality LoRA adapters shipped beside the base weights.

What differs from the Qwen models, and where av_lens handles it:

* **Fused projections.** Checkpoints store ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``; the weight map
  names row ranges of them (``"...qkv_proj.weight[0:3072]"``, see ``av_lens/loading.py``), so they load into
  av_lens's separate q/k/v and gate/up parameters (and hook points) at load time. No biases.
* **Partial rotary** (``cfg.rotary_dim`` = 0.75 * d_head): only the first ``rotary_dim`` dims of each head
  rotate. cos/sin come from transformers' own rotary module (longrope scaling in the real config: short
  factors up to ``original_max_position_embeddings``, long factors beyond, picked from the largest position).
* **1-D positions** (``rope_rules="1d"``): text, image and audio tokens all advance by one; pads sit at 0, as
  in transformers' generate (``attention_mask.cumsum(-1) - 1``). Media are runs of ``<|image|>`` / ``<|audio|>``
  without start/end markers; the layout splits a run into items by each item's token count (images: from
  ``image_sizes`` and ``image_attention_mask`` as the image embedding reads them; audio: ``audio_embed_sizes``).
  Audio tokens get time stamps k * 80 ms (10 ms feature hop x compression 8, read from the processor).
* **Encoders.** transformers' ``Phi4MultimodalImageEmbedding`` (SigLIP, 2x2 pooling, HD crops, separators,
  projection) and ``Phi4MultimodalAudioEmbedding`` (conformer + projection) run unchanged; av_lens reads their
  output at the placeholder positions. The audio projection is the "vision" one whenever the input has image
  pixels, the "speech" one otherwise, as in transformers. Hook points: ``image_encoder.hook_in`` (the crops
  [n_images, n_crops, 3, 448, 448]), ``image_encoder.blocks.{i}.hook_out`` for the SigLIP layers that feed the
  features (``feature_layer`` -2: all but the last), ``audio_encoder.hook_in`` (log-mel [n_audio, frames, 80]),
  ``audio_encoder.blocks.{i}.hook_out`` (conformer layers), and ``*.hook_out`` [n_tokens, d_model].
* **Two checkpoint formats.** The transformers format (``phi4_multimodal``, e.g. a converted branch reached with
  ``from_pretrained(..., revision=...)``) and the custom-code format published on the main branch (``phi4mm``):
  its config.json is converted to a ``Phi4MultimodalConfig`` by :func:`config_from_phi4mm` and its tensor names by
  :func:`phi4mm_key` (no remote code runs). The phi4mm file also holds both LoRA adapters' A/B matrices beside each
  targeted weight (``...qkv_proj.base_layer.weight``, ``...qkv_proj.lora_A.speech.weight``): the base weights load,
  the LoRA matrices are deliberately skipped (fold an adapter with :func:`merge_lora` from a PEFT folder).
* **Modality LoRA adapters** (``vision-lora/``, ``speech-lora/`` in PEFT format): :func:`merge_lora` folds
  ``alpha/r * B @ A`` of one adapter into the weights (read from the adapter's safetensors and
  ``adapter_config.json``; no peft needed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from av_lens.adapters.base import Adapter, Rotary1D, register
from av_lens.config import AVConfig
from av_lens.errors import CheckpointError, InputError
from av_lens.layout import MediaSpec, TokenIds, build_layout

_MARKER_TOKENS = {"<|system|>": "system", "<|user|>": "user", "<|assistant|>": "assistant", "<|end|>": "end",
                  "<|endoftext|>": "endoftext"}


def _marker_ids(tokenizer) -> dict[int, str]:
    markers = {}
    if tokenizer is not None:
        for tok, name in _MARKER_TOKENS.items():
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                markers[tid] = name
    return markers


def _to_av_config(hf, tokenizer=None, **overrides) -> AVConfig:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings:
        raise CheckpointError(f"this checkpoint limits attention to a sliding window of {window} tokens, which av_lens "
                              "does not implement",
                              "use a checkpoint whose sliding_window is null or at least max_position_embeddings")
    markers = _marker_ids(tokenizer)
    tokens = TokenIds(audio=int(hf.audio_config.audio_token_id), image=int(hf.vision_config.image_token_id), video=-1,
                      audio_bos=-1, audio_eos=-1, vision_bos=-1, vision_eos=-1, markers=markers)
    eos = hf.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for tid, name in markers.items():
        if name == "end" and tid not in eos:
            eos.append(tid)
    kw = dict(
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_key_value_heads=hf.num_key_value_heads, d_head=head_dim, d_mlp=hf.intermediate_size, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, eps=hf.rms_norm_eps, act_fn=hf.hidden_act,
        rotary_base=float(rope.get("rope_theta", 10000.0)), rotary_dim=rotary_dim,
        mrope_section=(head_dim // 2, 0, 0),  # 1-D positions: every frequency on the one axis (not M-RoPE)
        tie_word_embeddings=bool(hf.tie_word_embeddings), pad_token_id=hf.pad_token_id, eos_token_ids=tuple(eos),
        tokens=tokens, modalities=("audio", "image"), rope_rules="1d", attn_bias=False,
        original_architecture="Phi4MultimodalForCausalLM",
    )
    kw.update(overrides)
    return AVConfig(**kw)


def _build_towers(hf):
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (Phi4MultimodalAudioEmbedding,
                                                                              Phi4MultimodalImageEmbedding)

    visual = Phi4MultimodalImageEmbedding(hf)
    # transformers' SigLIP attention has is_causal=True, so under sdpa without a padding mask (full 448 crops) it
    # attends causally; eager attention is bidirectional, as SigLIP is. Run the tower eager.
    visual.img_processor.set_attn_implementation("eager")
    return {"audio_tower": Phi4MultimodalAudioEmbedding(hf), "visual": visual}


def _build_rotary(hf):
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalRotaryEmbedding

    return Rotary1D(Phi4MultimodalRotaryEmbedding(config=hf))


def _used_vision_layers(image_embed) -> list[nn.Module]:
    layers = list(image_embed.img_processor.encoder.layers)
    fl = image_embed.layer_idx  # index into hidden_states (embeddings, layer 0, ...): -2 = output of the next-to-last
    n_used = len(layers) + 1 + fl if fl < 0 else fl
    return layers[:n_used]


def _encoder_layers(tower, kind: str) -> list[nn.Module]:
    if kind == "audio":
        return list(tower.encoder.encoders)
    return _used_vision_layers(tower)


def _scatter_target(model, inp, dtype):
    ids = inp.input_ids
    return ids, torch.zeros(*ids.shape, model.cfg.d_model, dtype=dtype, device=ids.device)


def _encode_image(model, inp) -> torch.Tensor:
    emb, ex = model.visual, inp.extra
    if "image_sizes" not in ex:
        raise InputError("the input has image pixels but no image_sizes", "build it with model.prepare(images=[...])")
    ids, zeros = _scatter_target(model, inp, emb.img_projection_up.weight.dtype)

    def call(x):  # transformers' own image embedding, read back at the image placeholders
        out = emb(ids, zeros, image_pixel_values=x, image_sizes=ex["image_sizes"],
                  image_attention_mask=ex.get("image_attention_mask"))
        return out[ids == model.cfg.tokens.image]

    return model.image_encoder.run(_used_vision_layers(emb), call, inp.pixel_values, prepend=True)


def _encode_audio(model, inp) -> torch.Tensor:
    emb, ex = model.audio_tower, inp.extra
    if "audio_embed_sizes" not in ex:
        raise InputError("the input has audio features but no audio_embed_sizes",
                         "build it with model.prepare(audio=[...])")
    ids, zeros = _scatter_target(model, inp, emb.up_proj_for_speech.weight.dtype)
    mode = "vision" if inp.pixel_values is not None else "speech"  # as transformers picks the projection

    def call(x):
        out = emb(ids, zeros, audio_input_features=x, audio_embed_sizes=ex["audio_embed_sizes"],
                  audio_attention_mask=ex.get("audio_attention_mask"), audio_projection_mode=mode)
        return out[ids == model.cfg.tokens.audio]

    return model.audio_encoder.run(list(emb.encoder.encoders), call, inp.input_features)


# --------------------------------------------------------------------------------------------- inputs
def image_token_counts(hf, image_sizes, image_attention_mask) -> tuple[int, ...]:
    """Tokens per image, as ``Phi4MultimodalImageEmbedding`` lays them out: the HD crops' pooled grid (useful
    rows x (useful columns + 1 separator)), one global separator, the global view's grid (b x (b + 1))."""
    vc = hf.vision_config
    n_patches = vc.image_size // vc.patch_size
    base = (n_patches + n_patches % 2) // 2
    out = []
    for idx in range(image_sizes.shape[0]):
        h, w = (int(v) for v in image_sizes[idx])
        hr, wr = h // vc.crop_size, w // vc.crop_size
        if image_attention_mask is not None:
            m = image_attention_mask[idx, 1:hr * wr + 1, 0::2, 0::2]
            m = m.reshape(hr, wr, base, base).transpose(1, 2).reshape(hr * base, wr * base)
            uh, uw = int(m[:, 0].sum()), int(m[0, :].sum())
        else:
            uh, uw = hr * base, wr * base
        out.append(uh * (uw + 1) + 1 + base * (base + 1))
    return tuple(out)


def _audio_token_seconds(model) -> float:
    fe = getattr(model.processor, "audio_processor", None) if model.processor is not None else None
    if fe is None:
        return 0.0
    return (float(fe.hop_length) / float(fe.sampling_rate) * int(fe.audio_compression_rate)
            * int(getattr(fe, "audio_downsample_rate", 1)))


def input_from_processor(model, data) -> "AVInput":
    """An AVInput from a ``Phi4MultimodalProcessor`` output (``return_tensors="pt"``)."""
    from av_lens.inputs import AVInput, checked_ids_and_mask

    ids, mask = checked_ids_and_mask(data)
    for unsupported in ("pixel_values_videos", "video_grid_thw"):
        if data.get(unsupported) is not None:
            raise InputError("Phi-4-multimodal takes no video", "drop the video, or load an audio-visual Qwen model")
    extra = {k: torch.as_tensor(data[k]) for k in ("image_sizes", "image_attention_mask", "audio_embed_sizes",
                                                    "audio_attention_mask") if data.get(k) is not None}
    pixels, feats = data.get("image_pixel_values"), data.get("audio_input_features")
    if pixels is not None and "image_sizes" not in extra:
        raise InputError("image_pixel_values without image_sizes", "pass the processor's image_sizes too")
    if feats is not None and "audio_embed_sizes" not in extra:
        raise InputError("audio_input_features without audio_embed_sizes", "pass the processor's audio_embed_sizes too")
    media = MediaSpec(
        image_token_counts=() if pixels is None else image_token_counts(model.hf_config, extra["image_sizes"],
                                                                         extra.get("image_attention_mask")),
        audio_token_counts=() if feats is None else tuple(int(n) for n in extra["audio_embed_sizes"]),
        audio_token_seconds=_audio_token_seconds(model), rope_rules="1d",
    )
    layout = build_layout(ids, mask, model.cfg.tokens, media)
    return AVInput(input_ids=ids, attention_mask=mask.long(), layout=layout,
                   input_features=None if feats is None else torch.as_tensor(feats),
                   pixel_values=None if pixels is None else torch.as_tensor(pixels), extra=extra)


def prepare(model, text=None, *, audio=None, images=None, videos=None, video_audio=None, use_audio_in_video=None,
            fps=2.0, chat=True, system_prompt="default", processor_output=None, processor_kwargs=None):
    """:func:`av_lens.processing.prepare` for Phi-4-multimodal: ``<|system|>...<|end|><|user|>`` + one
    ``<|image|>`` per image and one ``<|audio|>`` per clip (unless the text holds them) + text +
    ``<|end|><|assistant|>``, then the native processor (left padding) and the 1-D layout."""
    from av_lens.processing import image_audio_request

    cfg = model.cfg
    req = image_audio_request(model, "Phi-4-multimodal", text, audio=audio, images=images, videos=videos,
                              video_audio=video_audio, use_audio_in_video=use_audio_in_video,
                              processor_output=processor_output, check_batch=chat)
    if req is None:
        return model.to_input(processor_output)
    proc = model.processor
    texts, audio, images, img_ph, aud_ph, has_ph = req.texts, req.audio, req.images, req.image_ph, req.audio_ph, req.has_ph
    sr = req.sampling_rate
    if system_prompt == "default":
        system_prompt = cfg.system_prompt
    if chat:
        sys_turn = f"<|system|>{system_prompt}<|end|>" if system_prompt else ""
        texts = [f"{sys_turn}<|user|>{'' if ph else img_ph * len(images) + aud_ph * len(audio)}{t}<|end|><|assistant|>"
                 for t, ph in zip(texts, has_ph)]
    kwargs = dict(return_tensors="pt", padding=True, padding_side="left")
    kwargs.update(processor_kwargs or {})
    if audio:
        kwargs["audio"] = audio
        kwargs["sampling_rate"] = sr
    try:
        data = proc(text=texts, images=images or None, **kwargs)
    except (ValueError, IndexError, RuntimeError) as e:
        from av_lens.errors import MediaError

        raise MediaError(f"the processor rejected these inputs: {e}",
                         f"check that each {img_ph} / {aud_ph} placeholder has its image / clip") from e
    return input_from_processor(model, data).to(model.device)


def reference_kwargs(inp) -> dict:
    """Keyword arguments for transformers' ``Phi4MultimodalForCausalLM`` (with the layout's 1-D positions, which
    are what its generate uses; its plain forward would count left pads as positions)."""
    kw = {"input_ids": inp.input_ids, "attention_mask": inp.attention_mask,
          "position_ids": inp.layout.position_ids[0].to(inp.input_ids.device)}
    if inp.pixel_values is not None:
        kw.update(image_pixel_values=inp.pixel_values, image_sizes=inp.extra["image_sizes"],
                  image_attention_mask=inp.extra.get("image_attention_mask"))
    if inp.input_features is not None:
        kw.update(audio_input_features=inp.input_features, audio_embed_sizes=inp.extra["audio_embed_sizes"],
                  audio_attention_mask=inp.extra.get("audio_attention_mask"))
    return kw


def _layer_extra(cfg, layer: int) -> dict[str, str]:
    """q/k/v and gate/up as row ranges of the fused checkpoint tensors."""
    q, kv, i = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head, cfg.d_mlp
    a, m = "model.layers.{l}.self_attn.qkv_proj.weight", "model.layers.{l}.mlp.gate_up_proj.weight"
    return {
        "blocks.{l}.attn.q_proj.weight": f"{a}[0:{q}]",
        "blocks.{l}.attn.k_proj.weight": f"{a}[{q}:{q + kv}]",
        "blocks.{l}.attn.v_proj.weight": f"{a}[{q + kv}:{q + 2 * kv}]",
        "blocks.{l}.mlp.gate_proj.weight": f"{m}[0:{i}]",
        "blocks.{l}.mlp.up_proj.weight": f"{m}[{i}:{2 * i}]",
    }


# --------------------------------------------------------------------------------------------- LoRA
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.qkv_proj|self_attn\.o_proj|"
                       r"mlp\.gate_up_proj|mlp\.down_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight")


def lora_folder(model, adapter: str) -> Path:
    """The folder of a modality adapter: ``adapter`` itself if it is a folder, else ``{adapter}-lora`` (``vision``,
    ``speech``) beside the model's checkpoint."""
    from av_lens.hub import resolve_folder

    p = Path(adapter).expanduser()
    if p.is_dir():
        return p
    base = resolve_folder(model.cfg.model_name, local_files_only=True, revision=model.cfg.extra.get("revision"))
    for name in (adapter, f"{adapter}-lora"):
        if (base / name).is_dir():
            return base / name
    found = sorted(d.name for d in base.iterdir() if d.is_dir() and (d / "adapter_config.json").exists())
    raise CheckpointError(f"{base} has no LoRA adapter folder {adapter!r} (nor {adapter}-lora)",
                          f"pass one of {found or ['(none found)']}, or the adapter folder's path")


def read_lora(folder: Path, cfg: AVConfig) -> tuple[float, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """(scale, {(layer, module): (A [r, in], B [out, r])}) of a PEFT LoRA adapter, read without peft."""
    from safetensors.torch import load_file

    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise CheckpointError(f"{folder} is not a PEFT LoRA adapter (needs adapter_config.json and "
                              "adapter_model.safetensors)", "pass the vision-lora or speech-lora folder")
    ac = json.loads(cfg_path.read_text())
    if ac.get("peft_type", "LORA") != "LORA" or ac.get("use_dora") or ac.get("fan_in_fan_out") \
            or ac.get("bias", "none") != "none" or ac.get("rank_pattern") or ac.get("alpha_pattern"):
        raise CheckpointError(f"{cfg_path} asks for LoRA features av_lens does not fold (DoRA, biases, fan_in_fan_out, "
                              "per-module ranks)", "use a plain LoRA adapter (as Phi-4-multimodal ships)")
    r, alpha = int(ac["r"]), float(ac["lora_alpha"])
    scale = alpha / r ** 0.5 if ac.get("use_rslora") else alpha / r
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(w_path)).items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"{w_path} holds {key!r}, which is not a LoRA matrix of a decoder layer's qkv_proj, "
                                  "o_proj, gate_up_proj or down_proj", "use the adapter that belongs to this model")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    out = {}
    for (layer, mod), ab in parts.items():
        if set(ab) != {"A", "B"} or layer >= cfg.n_layers:
            raise CheckpointError(f"{w_path}: layer {layer} {mod} has {sorted(ab)} of lora_A/lora_B "
                                  f"(the model has {cfg.n_layers} layers)", "use the adapter that belongs to this model")
        out[(layer, mod)] = (ab["A"].float(), ab["B"].float())
    return scale, out


def _targets(block, mod: str, cfg) -> list[tuple[nn.Parameter, int, int]]:
    """(parameter, first row, stop row) of the fused module's output rows, in av_lens's split parameters."""
    q, kv, i = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head, cfg.d_mlp
    a, m = block.attn, block.mlp
    return {
        "self_attn.qkv_proj": [(a.q_proj.weight, 0, q), (a.k_proj.weight, q, q + kv), (a.v_proj.weight, q + kv, q + 2 * kv)],
        "self_attn.o_proj": [(a.o_proj.weight, 0, cfg.d_model)],
        "mlp.gate_up_proj": [(m.gate_proj.weight, 0, i), (m.up_proj.weight, i, 2 * i)],
        "mlp.down_proj": [(m.down_proj.weight, 0, cfg.d_model)],
    }[mod]


def merge_lora(model, adapter: str) -> "object":
    """Fold one modality adapter (``"vision"``, ``"speech"``, or an adapter folder) into the model's weights:
    ``W += lora_alpha / r * B @ A`` on each targeted qkv_proj / o_proj / gate_up_proj / down_proj (computed in fp32,
    split into av_lens's q/k/v and gate/up parameters). Returns the model; refuses a second merge."""
    if model.cfg.original_architecture != "Phi4MultimodalForCausalLM":
        raise InputError(f"merge_lora is for Phi-4-multimodal, not {model.cfg.original_architecture}",
                         "load a Phi-4-multimodal checkpoint")
    if model.cfg.extra.get("lora"):
        raise InputError(f"the {model.cfg.extra['lora']} adapter is already merged into this model",
                         "load the model again to merge another adapter")
    folder = lora_folder(model, adapter)
    scale, mats = read_lora(folder, model.cfg)
    with torch.no_grad():
        for (layer, mod), (A, B) in mats.items():
            targets = _targets(model.blocks[layer], mod, model.cfg)
            n_out, n_in = targets[-1][2], targets[0][0].shape[1]
            if tuple(A.shape[1:]) != (n_in,) or B.shape[0] != n_out or B.shape[1] != A.shape[0]:
                raise CheckpointError(f"{folder}: layer {layer} {mod} LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} "
                                      f"do not fit [{n_out}, {n_in}]", "use the adapter that belongs to this model")
            delta = scale * (B.to(A.device) @ A)
            for p, a, b in targets:
                p.add_(delta[a:b].to(p.device, p.dtype))
    model.cfg.extra["lora"] = folder.name
    return model


# --------------------------------------------------------------------------------------------- phi4mm format
#: published phi4mm tensor names -> transformers' (first match wins); see transformers'
#: convert_phi4_multimodal_weights_to_hf.py for the same correspondence
_E = r"model\.embed_tokens_extend\."
_PHI4MM_KEYS = [(re.compile(a), b) for a, b in (
    (_E + r"audio_embed\.encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.0\.linear\.",
     r"model.embed_tokens_extend.audio_embed.encoder.encoders.\1.feed_forward_\2.gate_up_proj."),
    (_E + r"audio_embed\.encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.2\.",
     r"model.embed_tokens_extend.audio_embed.encoder.encoders.\1.feed_forward_\2.down_proj."),
    (_E + r"audio_embed\.encoder\.encoders\.(\d+)\.self_attn\.linear_(q|k|v)\.",
     r"model.embed_tokens_extend.audio_embed.encoder.encoders.\1.self_attn.\2_proj."),
    (_E + r"audio_embed\.encoder\.encoders\.(\d+)\.self_attn\.linear_out\.",
     r"model.embed_tokens_extend.audio_embed.encoder.encoders.\1.self_attn.o_proj."),
    (_E + r"image_embed\.img_projection\.0\.", "model.embed_tokens_extend.image_embed.img_projection_up."),
    (_E + r"image_embed\.img_projection\.2\.", "model.embed_tokens_extend.image_embed.img_projection_down."),
    (_E + r"image_embed\.glb_GN$", "model.embed_tokens_extend.image_embed.global_img_feature_extensor"),
    (_E + r"image_embed\.sub_GN$", "model.embed_tokens_extend.image_embed.sub_img_feature_extensor"),
    (_E + r"audio_embed\.audio_projection\.speech\.0\.", "model.embed_tokens_extend.audio_embed.up_proj_for_speech."),
    (_E + r"audio_embed\.audio_projection\.speech\.2\.", "model.embed_tokens_extend.audio_embed.down_proj_for_speech."),
    (_E + r"audio_embed\.audio_projection\.vision\.0\.",
     "model.embed_tokens_extend.audio_embed.up_proj_for_vision_speech."),
    (_E + r"audio_embed\.audio_projection\.vision\.2\.",
     "model.embed_tokens_extend.audio_embed.down_proj_for_vision_speech."),
)]
#: a LoRA matrix of the phi4mm file (``...<module>.lora_A.<adapter>.weight``): skipped on load
PHI4MM_LORA = re.compile(r"model\.layers\.\d+\..+\.lora_[AB]\.[A-Za-z0-9_-]+\.weight")


def phi4mm_key(key: str) -> str | None:
    """A published phi4mm tensor name as transformers names it; None for the LoRA matrices (deliberately skipped).
    Names already in the transformers format pass unchanged (none of the patterns matches them)."""
    if PHI4MM_LORA.fullmatch(key):
        return None
    for pat, new in _PHI4MM_KEYS:
        out, n = pat.subn(new, key, count=1)
        if n and pat.match(key):
            return out
    return key.replace(".base_layer.", ".")  # the LoRA-wrapped base weights


def _fields(cls) -> set[str]:
    import inspect

    names = set()
    for klass in inspect.getmro(cls):
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def config_from_phi4mm(raw: dict):
    """A ``Phi4MultimodalConfig`` from the published custom-code config.json (``model_type: phi4mm``): the
    Phi-3-style text fields as they are (``rope_scaling`` + ``rope_theta`` + ``partial_rotary_factor`` become
    ``rope_parameters``), the speech encoder from ``audio_processor.config`` (attention_dim, attention_heads,
    linear_units, nemo_conv_settings.conv_channels, relative_attention_bias_args.t5_bias_max_distance renamed),
    ``embd_layer.audio_embd_layer.downsample_rate``, and the vision fields of ``embd_layer.image_embd_layer``
    (``crop_size``; the SigLIP sizes are transformers' defaults unless given there). Unknown entries are dropped."""
    from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalVisionConfig

    raw = json.loads(json.dumps(raw))  # a deep copy
    try:
        embd = raw.pop("embd_layer")
        audio = dict(raw.pop("audio_processor")["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"this phi4mm config.json lacks {e} (embd_layer, audio_processor.config)",
                              "use the complete config.json of microsoft/Phi-4-multimodal-instruct") from e
    renames = {"attention_dim": "hidden_size", "attention_heads": "num_attention_heads",
               "linear_units": "intermediate_size",
               "depthwise_seperable_out_channel": "depthwise_separable_out_channel"}  # the published spelling
    for old, new in renames.items():
        if old in audio:
            audio[new] = audio.pop(old)
    if isinstance(audio.get("nemo_conv_settings"), dict):
        audio["nemo_conv_channels"] = audio.pop("nemo_conv_settings")["conv_channels"]
    if isinstance(audio.get("relative_attention_bias_args"), dict):
        audio["bias_max_distance"] = audio.pop("relative_attention_bias_args")["t5_bias_max_distance"]
    audio_embd, image_embd = embd.get("audio_embd_layer", {}), embd.get("image_embd_layer", {})
    if "downsample_rate" in audio_embd:
        audio["downsample_rate"] = audio_embd["downsample_rate"]
    af, vf = _fields(Phi4MultimodalAudioConfig), _fields(Phi4MultimodalVisionConfig)
    audio_cfg = Phi4MultimodalAudioConfig(**{k: v for k, v in audio.items() if k in af})
    vision_cfg = Phi4MultimodalVisionConfig(**{k: v for k, v in image_embd.items() if k in vf})
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    if not rope:
        rope = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                "rope_theta": float(raw.get("rope_theta", 10000.0)),
                "partial_rotary_factor": float(raw.get("partial_rotary_factor", 1.0))}
        for k in ("short_factor", "long_factor"):
            if k in scaling:
                rope[k] = scaling[k]
        if "original_max_position_embeddings" in raw:
            rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    tf = _fields(Phi4MultimodalConfig) - {"audio_config", "vision_config", "rope_parameters"}
    text = {k: v for k, v in raw.items() if k in tf}
    return Phi4MultimodalConfig(**text, rope_parameters=rope, audio_config=audio_cfg, vision_config=vision_cfg)


def _config_from_dict(raw: dict):
    return config_from_phi4mm(raw) if raw.get("model_type") == "phi4mm" else None  # None: AutoConfig reads it


PHI4_MULTIMODAL = register(Adapter(
    name="phi4_multimodal",
    model_types=("phi4_multimodal", "phi4mm"),
    global_map={"embed.W_E": "model.embed_tokens.weight", "ln_final.w": "model.norm.weight",
                "unembed.weight": "lm_head.weight"},
    layer_map={
        "blocks.{l}.ln1.w": "model.layers.{l}.input_layernorm.weight",
        "blocks.{l}.ln2.w": "model.layers.{l}.post_attention_layernorm.weight",
        "blocks.{l}.attn.o_proj.weight": "model.layers.{l}.self_attn.o_proj.weight",
        "blocks.{l}.mlp.down_proj.weight": "model.layers.{l}.mlp.down_proj.weight",
    },
    layer_extra=_layer_extra,
    towers={"audio_tower": "model.embed_tokens_extend.audio_embed.", "visual": "model.embed_tokens_extend.image_embed."},
    thinker_config=lambda hf: hf,
    to_av_config=_to_av_config,
    build_towers=_build_towers,
    build_rotary=_build_rotary,
    encoder_layers=_encoder_layers,
    encode={"audio": _encode_audio, "image": _encode_image},
    reference_kwargs=reference_kwargs,
    prepare=prepare,
    input_from_processor=input_from_processor,
    config_from_dict=_config_from_dict,
    key_map=phi4mm_key,
))
