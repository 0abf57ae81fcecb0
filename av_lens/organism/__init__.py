"""The model organism: a small Qwen2.5-Omni thinker trained here on a synthetic audio-visual world.

``HookedAVTransformer.from_pretrained("av-lens/organism")`` loads it offline (``"av-lens/organism-base"``:
the vision-language stage it was built from). See docs/organism.md for the model card.
"""

from pathlib import Path

#: the embedded checkpoints, by the names the loader accepts
CHECKPOINTS = {"av-lens/organism": "organism", "av-lens/organism-base": "organism-base"}


def checkpoint_root() -> Path:
    """The folder inside the installed package that holds ``organism/`` and ``organism-base/``."""
    return Path(__file__).resolve().parent / "checkpoints"
