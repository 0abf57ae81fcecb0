"""av_lens: TransformerLens-style interpretability for audio-visual LLMs.

    from av_lens import HookedAVTransformer, S
    model = HookedAVTransformer.from_pretrained("Qwen/Qwen2.5-Omni-3B")   # or a local folder
    inputs = model.prepare("What do you hear?", videos=[frames], video_audio=[wav], use_audio_in_video=True)
    logits, cache = model.run_with_cache(inputs)
    audio_resid = cache["blocks.20.hook_resid_post"][0, inputs.layout.positions("audio")]
"""

import os as _os

_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from av_lens import adapters  # noqa: E402,F401  (registers the architecture adapters)
from av_lens.config import AVConfig  # noqa: E402
from av_lens.errors import (AVLensError, CheckpointError, HookNameError, InputError, LayoutError,  # noqa: E402
                            MediaError)
from av_lens.errors import AVLensWarning  # noqa: E402
from av_lens.inputs import AVInput  # noqa: E402
from av_lens.layout import MediaItem, MediaSpec, Modality, ModalityLayout, S, Sel, TokenIds, build_layout  # noqa: E402
from av_lens.model import AVActivationCache, HookedAVTransformer, RunState  # noqa: E402
from av_lens import placement as _placement  # noqa: E402,F401  (gives HookedAVTransformer.place its placer)

__version__ = "0.1.0"
__all__ = [
    "AVConfig", "AVInput", "AVActivationCache", "AVLensError", "CheckpointError", "HookNameError",
    "HookedAVTransformer", "InputError", "LayoutError", "MediaError", "MediaItem", "MediaSpec", "Modality",
    "ModalityLayout", "RunState", "S", "Sel", "TokenIds", "build_layout",
]
__all__ += ["AVLensWarning"]
