"""Architecture adapters (one file per transformers architecture); importing this package registers them."""

from av_lens.adapters.audioflamingo3 import AUDIOFLAMINGO3
from av_lens.adapters.base import Adapter, adapter_for, adapters, register
from av_lens.adapters.gemma3n import GEMMA3N
from av_lens.adapters.phi4_multimodal import PHI4_MULTIMODAL
from av_lens.adapters.qwen2_5_omni import QWEN2_5_OMNI
from av_lens.adapters.qwen2_5_vl import QWEN2_5_VL
from av_lens.adapters.qwen2_audio import QWEN2_AUDIO
from av_lens.adapters.qwen3_omni_moe import QWEN3_OMNI_MOE
from av_lens.adapters.video_salmonn2 import VIDEO_SALMONN2
from av_lens.adapters.videollama2 import VIDEOLLAMA2

__all__ = ["Adapter", "adapter_for", "adapters", "register", "QWEN2_5_OMNI", "QWEN2_5_VL", "QWEN3_OMNI_MOE", "PHI4_MULTIMODAL", "GEMMA3N", "QWEN2_AUDIO", "AUDIOFLAMINGO3", "VIDEO_SALMONN2", "VIDEOLLAMA2"]
