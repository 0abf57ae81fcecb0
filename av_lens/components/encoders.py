"""Hook points around the native encoders, which run unchanged (transformers' code and weights).

The audio tower (Whisper-style) and the vision tower (Qwen2.5-VL ViT) are not reimplemented: av_lens calls
them as transformers does, so their outputs are the model's own. :class:`EncoderHooks` adds stable hook
points around one call of a tower:

* ``{name}.hook_in`` — the tower's input (audio: log-mel features [n_mel, frames] of all clips
  concatenated along time; vision: flattened patches [n_patches, C*T*14*14]);
* ``{name}.blocks.{i}.hook_out`` — the output of tower layer i (vision layers run in the tower's
  windowed patch order);
* ``{name}.hook_out`` — the tower's final output, one row per LLM token [n_tokens, d_model].

The vision tower serves images and videos: ``image_encoder.*`` and ``video_encoder.*`` are separate hook
sets around the same weights, so a cache holds both. Per-layer hooks attach torch forward hooks to the
tower's layers only for the duration of the call, and only when one of them is hooked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class _LayerHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_out = HookPoint()


class EncoderHooks(nn.Module):
    def __init__(self, n_layers: int):
        super().__init__()
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList([_LayerHook() for _ in range(n_layers)])
        self.hook_out = HookPoint()

    def run(self, layers: Sequence[nn.Module], call: Callable[[Tensor], Tensor], x: Tensor, prepend: bool = False) -> Tensor:
        """Run ``call(hook_in(x))`` with each of ``layers``' outputs routed through its hook point. ``prepend``
        runs the routing before the tower's own forward hooks (towers whose output is a hidden state that
        transformers records by a forward hook, as Phi-4-multimodal's SigLIP does, must see the edited value)."""
        x = self.hook_in(x)
        handles = []
        try:
            for layer, lh in zip(layers, self.blocks):
                if lh.hook_out.has_hooks():
                    handles.append(layer.register_forward_hook(_route(lh.hook_out), prepend=prepend))
            out = call(x)
        finally:
            for h in handles:
                h.remove()
        return self.hook_out(out)


def _route(hp: HookPoint):
    def fwd_hook(module, args, output):
        if isinstance(output, tuple):
            return (hp(output[0]),) + tuple(output[1:])
        return hp(output)
    return fwd_hook
