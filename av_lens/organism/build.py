"""The organism's tokenizer, processor and architecture: built offline from transformers' own classes.

The tokenizer is word-level over the world's closed vocabulary plus the Qwen2.5-Omni special tokens (same
names, same roles); it lower-cases and splits punctuation, so "What do you hear?" reads as six words. The
processor is the native ``Qwen2_5OmniProcessor`` with small-media settings (112x112 frames, clips of up to
4 s). The model is ``Qwen2_5OmniThinkerForConditionalGeneration`` — the exact thinker architecture, small.
"""

from __future__ import annotations

from av_lens.organism.world import OBJECTS, QUESTIONS, SIDE, SOUNDS
from av_lens.testing.tiny import NAMED_TOKENS, SPECIAL_TOKENS

CHAT_WORDS = ["\n", "system", "user", "assistant", "you", "are", "a", "helpful", "i", "it", "is", "the", "clip",
              "yes", "no", "sound", "picture", "nothing"]
QUESTION_WORDS = sorted({w for q in QUESTIONS.values() for w in q.split()} | {"and"})
WORDS = list(dict.fromkeys(CHAT_WORDS + QUESTION_WORDS + list(OBJECTS) + list(SOUNDS)))

#: the organism's architecture (all inside the issue's ranges: 4-6 LM layers, width 128-256, 2-4 encoder layers)
ARCH = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=384, audio_d=64, audio_layers=2,
            vision_d=64, vision_depth=2)
MAX_AUDIO_SECONDS = 4
#: TMRoPE time positions per second (= audio tokens per second); the processor must be told the same rate
POSITION_ID_PER_SECONDS = 25


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


def build_processor(tok):
    from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                 chunk_length=MAX_AUDIO_SECONDS, n_fft=400)
    kw = dict(min_pixels=28 * 28, max_pixels=SIDE * SIDE, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                                feature_extractor=fe, tokenizer=tok)


def thinker_config(tok, arch: dict | None = None):
    from transformers import Qwen2_5OmniThinkerConfig

    a = dict(ARCH, **(arch or {}))
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
        user_token_id=ids["<|im_start|>"], position_id_per_seconds=POSITION_ID_PER_SECONDS, seconds_per_chunk=2,
        tie_word_embeddings=False,
    )
    cfg.text_config.pad_token_id = ids["<|endoftext|>"]
    cfg.text_config.eos_token_id = ids["<|im_end|>"]
    return cfg
