"""av_lens: TransformerLens-style interpretability for audio-visual LLMs.

    from av_lens import HookedAVTransformer, S
    model = HookedAVTransformer.from_pretrained("av-lens/organism")   # or "Qwen/Qwen2.5-Omni-3B", a local folder
    inputs = model.prepare("what do you hear ?", videos=[frames], fps=4.0, video_audio=[wav], use_audio_in_video=True)
    logits, cache = model.run_with_cache(inputs)
    audio_resid = cache["blocks.2.hook_resid_post"][0, inputs.layout.positions("audio")]

``import av_lens`` is cheap: the names below are imported on first use (torch, transformers and
transformer_lens load with the first of ``HookedAVTransformer``, ``AVInput``, ``S``, ...), so ``av-lens --help``
and ``from av_lens.organism import world`` do not pay for them.
"""

import importlib as _importlib
import os as _os

_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access, PEP 562)
_LAZY = {
    "AVConfig": "av_lens.config",
    "AVInput": "av_lens.inputs",
    "AVActivationCache": "av_lens.model", "HookedAVTransformer": "av_lens.model", "RunState": "av_lens.model",
    **{n: "av_lens.errors" for n in ("AVLensError", "AVLensWarning", "CheckpointError", "HookNameError", "InputError",
                                     "LayoutError", "MediaError")},
    **{n: "av_lens.layout" for n in ("MediaItem", "MediaSpec", "Modality", "ModalityLayout", "S", "Sel", "TokenIds",
                                     "build_layout")},
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'av_lens' has no attribute {name!r}")
    if module == "av_lens.model":
        _importlib.import_module("av_lens.adapters")  # registers the architecture adapters
        _importlib.import_module("av_lens.model")
        _importlib.import_module("av_lens.placement")  # gives HookedAVTransformer.place its placer
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
