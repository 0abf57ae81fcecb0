"""A tiny random-weight VideoLLaMA2-AV checkpoint, written in the published layout, offline.

The published release (DAMO-NLP-SG/VideoLLaMA2.1-7B-AV) is a Qwen2 causal LM whose safetensors shards also hold
the SigLIP tower (``model.vision_tower.vision_tower.vision_model.*``) and the STC connector (``model.mm_projector.*``), with the
BEATs tower and its projector in two torch pickles (``audio_tower.bin``: ``model.audio_tower.*``,
``mm_projector_a.bin``: ``model.mm_projector_a.*``), and a config.json of ``model_type: videollama2_qwen2``.
This builder writes the same layout at tiny sizes, plus ``vision_config`` / ``audio_config`` dicts (the published
config names its towers' checkpoints instead). Nothing here means anything: it only has the real architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from av_lens.testing.tiny import _perturb, train_bpe_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyVideoLLaMA2Spec:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    vision_layers: int = 3  # hidden_states[-2] is then layer 1's output, not the last layer's
    d_vision: int = 32
    image_size: int = 56  # 4 x 4 patches of 14
    num_frames: int = 4
    d_beats_embed: int = 16
    d_beats: int = 32
    beats_layers: int = 2
    seed: int = 0


def vision_config(spec: TinyVideoLLaMA2Spec) -> dict:
    return dict(hidden_size=spec.d_vision, intermediate_size=2 * spec.d_vision, num_hidden_layers=spec.vision_layers,
                num_attention_heads=2, image_size=spec.image_size, patch_size=14, vision_use_head=False)


def audio_config(spec: TinyVideoLLaMA2Spec) -> dict:
    return dict(embed_dim=spec.d_beats_embed, encoder_embed_dim=spec.d_beats, encoder_layers=spec.beats_layers,
                encoder_attention_heads=4, encoder_ffn_embed_dim=2 * spec.d_beats, conv_pos=16, conv_pos_groups=16,
                num_buckets=32, max_distance=64)


def build_parts(spec: TinyVideoLLaMA2Spec = TinyVideoLLaMA2Spec()):
    """(Qwen2ForCausalLM, tokenizer, {prefix: module}) with random weights; the prefixes are the published ones."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from av_lens.components.beats import BEATsConfig, BEATsEncoder
    from av_lens.components.stc import AudioProjector, STCConnector

    tok = train_bpe_tokenizer(SPECIAL, 400, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL}
    cfg = Qwen2Config(vocab_size=len(tok) + 8, hidden_size=spec.d_model, intermediate_size=spec.d_mlp,
                      num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                      num_key_value_heads=spec.n_kv_heads, max_position_embeddings=8192, rope_theta=1e6,
                      tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(spec.seed)
    lm = Qwen2ForCausalLM(cfg).eval()
    _perturb(lm, spec.seed)
    vis = SiglipVisionModel(SiglipVisionConfig(**vision_config(spec))).eval()
    stc = STCConnector(spec.d_vision, spec.d_model, padding=0).eval()
    beats = BEATsEncoder(BEATsConfig.from_dict({**audio_config(spec), "finetuned_model": False})).eval()
    proj = AudioProjector(spec.d_beats, spec.d_model, "mlp2x_gelu").eval()
    for i, m in enumerate((vis, stc, beats, proj)):
        _perturb(m, spec.seed + 10 + i)
    parts = {"model.vision_tower.vision_tower.vision_model.": vis, "model.mm_projector.": stc, "model.audio_tower.": beats,
             "model.mm_projector_a.": proj}
    return lm, tok, parts


def save_tiny_videollama2(folder: str | os.PathLike, spec: TinyVideoLLaMA2Spec = TinyVideoLLaMA2Spec(),
                          audio: bool = True) -> Path:
    """Write a tiny VideoLLaMA2-AV folder in the published layout (shards + two pickles + config.json);
    ``audio=False``: the vision-only release (no audio tower, projector, pickles or mm_audio fields), with the same
    language model, vision tower and connector weights (the AV model's base, for token shift)."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    lm, tok, parts = build_parts(spec)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one weight file, found {files}")
    tensors = load_file(files[0])
    for prefix in ("model.vision_tower.vision_tower.vision_model.", "model.mm_projector."):
        tensors.update({prefix + k: v.contiguous() for k, v in parts[prefix].state_dict().items()})
    save_file(tensors, files[0], metadata={"format": "pt"})
    for prefix, name in (("model.audio_tower.", "audio_tower.bin"), ("model.mm_projector_a.", "mm_projector_a.bin")):
        if audio:
            torch.save({prefix + k: v for k, v in parts[prefix].state_dict().items()}, folder / name)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type="videollama2_qwen2", architectures=["Videollama2Qwen2ForCausalLM"],
               mm_vision_tower="google/siglip-so400m-patch14-384", mm_hidden_size=spec.d_vision,
               mm_projector_type="stc_connector_v35", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               num_frames=spec.num_frames, mm_audio_tower="BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
               mm_projector_a_type="mlp2x_gelu", mm_hidden_size_a=spec.d_beats, hidden_size_a=spec.d_model,
               vision_config=vision_config(spec), audio_config=audio_config(spec))
    if not audio:
        for k in ("mm_audio_tower", "mm_projector_a_type", "mm_hidden_size_a", "hidden_size_a", "audio_config"):
            del cfg[k]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder
