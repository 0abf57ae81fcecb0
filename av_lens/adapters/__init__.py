"""Architecture adapters (one file per transformers architecture); importing this package registers them."""

from av_lens.adapters.base import Adapter, adapter_for, adapters, register
from av_lens.adapters.qwen2_5_omni import QWEN2_5_OMNI

__all__ = ["Adapter", "adapter_for", "adapters", "register", "QWEN2_5_OMNI"]
