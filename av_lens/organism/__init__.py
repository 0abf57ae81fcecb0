"""The model organism: a small Qwen2.5-Omni thinker trained here on a synthetic audio-visual world.

``HookedAVTransformer.from_pretrained("av-lens/organism")`` loads it offline; ``"av-lens/organism-base"`` is
the vision-language stage it was built from, and ``"av-lens/organism-control"`` the no-VLM control (the same
audio-visual training from random weights, with no vision-language stage first). See docs/organism.md for the
model card.
"""

from pathlib import Path

#: the embedded checkpoints, by the names the loader accepts
CHECKPOINTS = {"av-lens/organism": "organism", "av-lens/organism-base": "organism-base",
               "av-lens/organism-control": "organism-control"}


def checkpoint_root() -> Path:
    """The folder inside the installed package that holds ``organism/``, ``organism-base/`` and
    ``organism-control/``."""
    return Path(__file__).resolve().parent / "checkpoints"
