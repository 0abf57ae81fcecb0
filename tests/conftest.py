"""Shared fixtures: tiny random Qwen2.5-Omni thinkers saved to disk, the transformers reference, media."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens.testing.tiny import TinySpec, save_tiny_qwen2_5_omni

torch.set_num_threads(2)

#: shapes the parity suite runs on: GQA ratios, head_dim, mrope sections, tied/untied embeddings
SPECS = {
    "gqa2_untied": TinySpec(),
    "mqa_tied": TinySpec(n_kv_heads=1, tie=True, seed=1),
    "mha_hd32": TinySpec(d_model=64, n_heads=2, n_kv_heads=2, head_dim=32, mrope_section=(4, 6, 6), seed=2),
    "gqa4_3layers": TinySpec(n_layers=3, d_model=96, n_heads=8, n_kv_heads=2, head_dim=12, mrope_section=(2, 2, 2),
                             seed=3),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_qwen2_5_omni(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs):
    return tiny_dirs["gqa2_untied"]


@pytest.fixture(scope="session")
def model(tiny_dir):
    return HookedAVTransformer.from_pretrained(tiny_dir)


def load_reference(folder):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def reference(tiny_dir):
    return load_reference(tiny_dir)


@pytest.fixture(scope="session")
def media():
    rng = np.random.default_rng(0)
    return {
        "wav3": (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32),
        "wav5": (0.1 * rng.standard_normal(16000 * 5)).astype(np.float32),
        "video": rng.integers(0, 255, (8, 56, 56, 3), dtype=np.uint8),  # 4 s at 2 fps, 2x2 tokens per grid
        "image": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8),
    }


#: the study's input layouts, as prepare() arguments
def cases(media):
    return {
        "text": dict(text="Hello world, what is in this video?"),
        "audio": dict(text="What sound do you hear?", audio=[media["wav3"]]),
        "image": dict(text="What do you see?", images=[media["image"]]),
        "video": dict(text="Describe the video.", videos=[media["video"]]),
        "video_with_audio": dict(text="Describe what you see and hear.", videos=[media["video"]],
                                 video_audio=[media["wav5"]], use_audio_in_video=True),
        "image_video_audio": dict(text="Describe.", videos=[media["video"]], video_audio=[media["wav5"]],
                                  images=[media["image"]], audio=[media["wav3"]], use_audio_in_video=True),
    }


PAD_A = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>What sound?<|im_end|>\n<|im_start|>assistant\n"
PAD_V = ("<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
         "<|vision_bos|><|VIDEO|><|vision_eos|>Describe it please.<|im_end|>\n<|im_start|>assistant\n")


def padded_batch(model, media):
    """A left-padded batch of two different layouts (audio only; image + audio + video)."""
    return model.prepare([PAD_A, PAD_V], audio=[media["wav3"], media["wav5"]], images=[media["image"]],
                         videos=[media["video"]], chat=False, use_audio_in_video=False)
