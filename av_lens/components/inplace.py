"""When may a component overwrite its own intermediate tensors?

A hook point hands its tensor to whoever hooked it: ``run_with_cache`` keeps a reference, a patching hook may
keep one. Overwriting that tensor afterwards would silently change what they kept, and autograd needs the
saved inputs of every op. So the components use in-place arithmetic (``silu_``, ``mul_``, ``add_``) only
when *nothing* can observe the tensor they overwrite: autograd is off and no forward hook is registered on
the hook points the tensor passed through (neither by TransformerLens nor by plain
``register_forward_hook``, nor a global module hook). That is the plain, un-hooked inference forward, which
then allocates fewer large buffers than transformers does (the SwiGLU MLP's two [batch, pos, d_mlp]
temporaries, a norm's output, the residual sums). The numbers are the same either way: ``a.mul_(b)`` and
``a * b`` compute the same elementwise products.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _module
from transformer_lens.hook_points import HookPoint


def hooked(point: HookPoint) -> bool:
    """Whether a forward hook (on this point, or a global module hook) would see what passes through ``point``."""
    return bool(point._forward_hooks or _module._global_forward_hooks)


def may_overwrite(*points: HookPoint) -> bool:
    """True when tensors that passed through ``points`` can be overwritten in place without anyone seeing it."""
    if torch.is_grad_enabled() or _module._global_forward_hooks:
        return False
    return not any(p._forward_hooks for p in points)
