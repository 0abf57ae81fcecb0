"""The organism's tokenizer, processor and architecture: built offline from transformers' own classes.

The tokenizer is word-level over the world's closed vocabulary plus the Qwen2.5-Omni special tokens (same
names, same roles); it lower-cases and splits punctuation, so "What do you hear?" reads as six words. The
processor is the native ``Qwen2_5OmniProcessor`` with small-media settings (112x112 frames; clip length and
audio rate per :class:`Design`). The model is ``Qwen2_5OmniThinkerForConditionalGeneration`` — the exact
thinker architecture, small.
"""

from __future__ import annotations

from dataclasses import dataclass

from av_lens.errors import InputError
from av_lens.organism.world import GEOMETRIES, OBJECTS, QUESTIONS, SIDE, SOUNDS
from av_lens.testing.tiny import NAMED_TOKENS, SPECIAL_TOKENS

CHAT_WORDS = ["\n", "system", "user", "assistant", "you", "are", "a", "helpful", "i", "it", "is", "the", "clip",
              "yes", "no", "sound", "picture", "nothing"]
QUESTION_WORDS = sorted({w for q in QUESTIONS.values() for w in q.split()} | {"and"})
WORDS = list(dict.fromkeys(CHAT_WORDS + QUESTION_WORDS + list(OBJECTS) + list(SOUNDS)))

@dataclass(frozen=True)
class Design:
    """One organism design: the thinker's shape, the audio front end and the clip geometry it is trained on.

    ``v2`` is the shipped organism, with the real model's proportions: 8 LM layers, 6 s clips spanning three
    2-second TMRoPE chunks, and 2 audio tokens per second (an 8 mel-frame/s front end and the encoder's 4x
    reduction) against 16 video tokens per second: 12 audio vs 96 video tokens per clip, 8:1 (Qwen2.5-Omni:
    ~12:1). ``v1`` is the retired first organism (4 layers, 1 s clips, 25 audio vs 32 video tokens), kept so
    its recorded figures in docs/organism.md can be reproduced."""

    name: str
    arch: dict
    max_audio_seconds: int
    hop_length: int               # mel hop in samples (16 kHz)
    n_fft: int
    position_id_per_seconds: int  # TMRoPE time positions per second (= audio tokens per second)
    seconds_per_chunk: int = 2    # TMRoPE chunk length for audio-in-video interleaving

    @property
    def geometry(self):
        return GEOMETRIES[self.name]


DESIGNS = {
    "v1": Design("v1", dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=384, audio_d=64, audio_layers=2,
                            vision_d=64, vision_depth=2), 4, 160, 400, 25),
    "v2": Design("v2", dict(d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, d_mlp=192, audio_d=64, audio_layers=2,
                            vision_d=64, vision_depth=2), 6, 2000, 2048, 2),
}
#: the design of the shipped checkpoints
DEFAULT_DESIGN = "v2"
ARCH = DESIGNS[DEFAULT_DESIGN].arch
MAX_AUDIO_SECONDS = DESIGNS[DEFAULT_DESIGN].max_audio_seconds
POSITION_ID_PER_SECONDS = DESIGNS[DEFAULT_DESIGN].position_id_per_seconds
SECONDS_PER_CHUNK = DESIGNS[DEFAULT_DESIGN].seconds_per_chunk


def design(name: str = DEFAULT_DESIGN) -> Design:
    if name not in DESIGNS:
        raise InputError(f"unknown organism design {name!r}", f"use one of {sorted(DESIGNS)}")
    return DESIGNS[name]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + WORDS + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s\w]|\w+"), behavior="removed", invert=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", extra_special_tokens=dict(NAMED_TOKENS))
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tok


def build_processor(tok, design_name: str = DEFAULT_DESIGN):
    from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    d = design(design_name)
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=d.hop_length,
                                 chunk_length=d.max_audio_seconds, n_fft=d.n_fft)
    kw = dict(min_pixels=28 * 28, max_pixels=SIDE * SIDE, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                                feature_extractor=fe, tokenizer=tok)


def thinker_config(tok, arch: dict | None = None, design_name: str = DEFAULT_DESIGN):
    from transformers import Qwen2_5OmniThinkerConfig

    d = design(design_name)
    a = dict(d.arch, **(arch or {}))
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    head_dim = a["d_model"] // a["n_heads"]
    q = head_dim // 2
    mrope = [q - 2 * (q // 3), q // 3, q // 3]
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=a["d_model"], intermediate_size=a["d_mlp"],
                         num_hidden_layers=a["n_layers"], num_attention_heads=a["n_heads"],
                         num_key_value_heads=a["n_kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope}),
        audio_config=dict(num_mel_bins=128, d_model=a["audio_d"], encoder_layers=a["audio_layers"],
                          encoder_attention_heads=4, encoder_ffn_dim=2 * a["audio_d"], output_dim=a["d_model"],
                          n_window=100, max_source_positions=1500),
        vision_config=dict(depth=a["vision_depth"], hidden_size=a["vision_d"], intermediate_size=2 * a["vision_d"],
                           num_heads=4, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[a["vision_depth"] - 1],
                           out_hidden_size=a["d_model"]),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=ids["<|im_start|>"], position_id_per_seconds=d.position_id_per_seconds,
        seconds_per_chunk=d.seconds_per_chunk,
        tie_word_embeddings=False,
    )
    cfg.text_config.pad_token_id = ids["<|endoftext|>"]
    cfg.text_config.eos_token_id = ids["<|im_end|>"]
    return cfg


def design_of(checkpoint) -> Design:
    """The design an organism checkpoint was trained with, read from its ``organism.json`` ("v1", the retired
    first organism, when the record names no design: checkpoints from before designs were recorded). A folder
    without ``organism.json`` is refused (InputError): it is not an organism checkpoint.

    ``checkpoint``: a folder, or a name of the embedded checkpoints (``"av-lens/organism"``)."""
    import json
    from pathlib import Path

    from av_lens.organism import CHECKPOINTS, checkpoint_root

    folder = checkpoint_root() / CHECKPOINTS[checkpoint] if checkpoint in CHECKPOINTS else Path(checkpoint)
    meta = folder / "organism.json"
    if not meta.is_file():
        raise InputError(f"{folder} has no organism.json, so it is not an organism checkpoint (or its record is lost)",
                         "pass a folder written by av_lens.organism.train, or one of "
                         f"{sorted(CHECKPOINTS)}")
    return design(json.loads(meta.read_text()).get("curriculum", {}).get("design", "v1"))
