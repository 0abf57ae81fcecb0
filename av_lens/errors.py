"""Errors that say what went wrong and how to fix it.

Every error av_lens raises on bad input is an :class:`AVLensError` (a ``ValueError``) whose message has two
parts: the problem, naming the offending value, and ``Fix:`` followed by what to do instead. Subclasses
group them by where they arise, so callers can catch one family (``except MediaError``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AVLensError(ValueError):
    """Base class: ``AVLensError(problem, fix)`` renders as ``"<problem>. Fix: <fix>"``."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem.rstrip('.')}. Fix: {fix}")


class MediaError(AVLensError):
    """Audio, image or video input that cannot be used (sample rate, emptiness, shape, dtype)."""


class LayoutError(AVLensError):
    """Token ids that do not form a valid modality layout (placeholder counts, missing markers)."""


class CheckpointError(AVLensError):
    """A checkpoint that is missing, truncated, of another architecture, or mismatching its model config."""


class HookNameError(AVLensError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class InputError(AVLensError):
    """A model input of the wrong type, dtype or device."""


class AVLensWarning(UserWarning):
    """A legal input that is almost surely a mistake (e.g. float frames in [0, 1]); same ``problem. Fix: fix`` text.

    Turn these into errors with ``warnings.simplefilter("error", AVLensWarning)``."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem.rstrip('.')}. Fix: {fix}")


def warn(problem: str, fix: str, stacklevel: int = 3) -> None:
    """Emit an :class:`AVLensWarning`."""
    import warnings

    warnings.warn(AVLensWarning(problem, fix), stacklevel=stacklevel)


def unknown_hook_error(name: str, known: Iterable[str]) -> HookNameError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return HookNameError(
        f"unknown hook name {name!r}",
        f"{hint}list the valid names with `model.hook_dict.keys()` (TransformerLens names such as "
        f"'blocks.0.hook_resid_post', 'blocks.0.attn.hook_pattern', 'hook_audio_embed')",
    )
