"""When may a component overwrite its own intermediate tensors?

A hook point hands its tensor to whoever hooked it: ``run_with_cache`` keeps a reference, a patching hook may
keep one. So can a plain PyTorch hook on the module that *produced* the tensor (a forward hook on
``blocks.3.mlp`` or ``blocks.3.attn.o_proj`` receives the very tensor the block then sums into), and a forward
pre-hook on the next module. Overwriting that tensor afterwards would silently change what they kept, and
autograd needs the saved inputs of every op. So the components use in-place arithmetic (``silu_``, ``mul_``,
``add_``) only when *nothing* can observe the buffer they overwrite: autograd is off, and neither the hook
points it passed through nor the modules that produced it carry a forward hook or forward pre-hook (registered
by TransformerLens or by plain ``register_forward_hook``/``register_forward_pre_hook``), and no global module
hook is registered. That is the plain, un-hooked inference forward, which then allocates fewer large buffers
than transformers does (the SwiGLU MLP's two [batch, pos, d_mlp] temporaries, a norm's output, the residual
sums). The numbers are the same either way: ``a.mul_(b)`` and ``a * b`` compute the same elementwise products.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _watched(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def hooked(point: nn.Module) -> bool:
    """Whether calling ``point`` can matter: it carries a forward, pre- or backward hook (TransformerLens's
    ``dir="bwd"`` hooks are backward hooks), or a global module hook exists. Components skip calling a hook
    point that is not hooked only where that saves work (``hook_scale``)."""
    return bool(_watched(point) or point._backward_hooks or point._backward_pre_hooks or _global_hooks()
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def may_overwrite(*watchers: nn.Module | None) -> bool:
    """True when a buffer can be overwritten in place without anyone seeing it: autograd is off, no global module
    hook exists, and none of ``watchers`` (the hook points the buffer passed through and the modules that
    produced it; None entries are skipped) carries a forward hook or pre-hook.

    Components ask both before running the producers and hook points and after: a hook that keeps the tensor
    and removes itself while it runs ("capture once") is seen by the first question, one added meanwhile by
    the second."""
    if torch.is_grad_enabled() or _global_hooks():
        return False
    return not any(m is not None and _watched(m) for m in watchers)
