"""Splicing: run a dictionary inside the model, so its features are hook points of the model.

    with splice(model, sae, at="audio"):                  # or keep = splice(...); ...; keep.remove()
        logits, cache = model.run_with_cache(inputs)
        cache["blocks.2.hook_resid_post.hook_sae_acts_post"]   # [batch, pos, d_sae] features

While spliced, the model's activation at ``sae.cfg.hook_name`` is replaced by the dictionary's output at the
positions ``at`` selects (default all; padding never). With ``use_error_term=True`` (default) the output is
reconstruction + error, so the model computes exactly what it did — and an edit of ``hook_sae_acts_post``
(ablate a feature, patch it from another run) changes the model only through the features. With
``use_error_term=False`` the reconstruction replaces the activation, and :func:`reconstruction_report` measures
what is lost (MSE, explained variance, cross-entropy recovered) per modality.

The dictionary's hook points are attached under the hook point they read —
``{hook_name}.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post``, ``.hook_sae_recons``,
``.hook_sae_error``, ``.hook_sae_output`` — as SAELens's ``HookedSAETransformer`` names them, so
``run_with_cache``, ``run_with_hooks``, patching and attribution patching reach them by name.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from av_lens.errors import HookNameError, InputError
from av_lens.layout import SelectorLike

POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
          "hook_sae_output")


class Splice:
    """A dictionary spliced into a model at its hook point; :meth:`remove` undoes it (also on exceptions when
    used as a context manager)."""

    def __init__(self, model, sae, at: SelectorLike | None = None, use_error_term: bool = True):
        name = sae.cfg.hook_name
        if name not in model.hook_dict:
            raise HookNameError(f"the dictionary reads {name!r}, which this model does not have",
                                "train or load a dictionary for one of model.hook_dict's names")
        point = model.hook_dict[name]
        if any(hasattr(point, p) for p in POINTS):
            raise InputError(f"a dictionary is already spliced at {name!r}", "remove it first (splice.remove())")
        width = model.cfg.d_model if name.endswith(("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")) \
            else None
        if width is not None and sae.cfg.d_in != width:
            raise InputError(f"the dictionary has d_in {sae.cfg.d_in} but {name!r} is {width} wide",
                             "splice a dictionary trained on this model")
        self.model, self.sae, self.at, self.point = model, sae, at, point
        sae.use_error_term = use_error_term
        for p in POINTS:
            point.add_module(p, getattr(sae, p))
        self.handle = point.register_forward_hook(self._hook)
        model.setup()

    def _hook(self, module, args, out: Tensor) -> Tensor:
        st = self.model.run_state
        spliced = self.sae(out)
        if self.at is None and st is None:
            return spliced
        from av_lens.analysis._common import current_rows, selector_mask

        layout, qs, n = current_rows(self.model)
        sel = "all" if self.at is None else self.at
        m = selector_mask(layout, sel, "splice", require=False)[:, qs:qs + n].to(out.device)
        return torch.where(m[..., None], spliced, out)

    def remove(self) -> None:
        self.handle.remove()
        for p in POINTS:
            if p in self.point._modules:
                del self.point._modules[p]
        self.model.setup()

    def __enter__(self) -> "Splice":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def splice(model, sae, at: SelectorLike | None = None, *, use_error_term: bool = True) -> Splice:
    """Splice ``sae`` into ``model`` at ``sae.cfg.hook_name`` (see the module docstring)."""
    return Splice(model, sae, at, use_error_term)


@torch.no_grad()
def reconstruction_report(model, sae, inputs, *, groups=("audio", "video", "image", "text")) -> dict:
    """Per position group: MSE, explained variance of the dictionary's reconstruction at ``hook_name``, and —
    splicing the reconstruction without the error term at that group's positions — the cross-entropy loss
    recovered, (CE_zero-ablated - CE_spliced) / (CE_zero-ablated - CE_clean), on the model's own next tokens."""
    from av_lens.analysis._common import selector_mask

    inputs = model.to_input(inputs)
    name = sae.cfg.hook_name
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n == name)
    x = cache[name]
    recon = sae.decode(sae.encode(x))
    logits = model(inputs)
    targets = logits.argmax(-1)[:, :-1]

    def ce(lg):
        return float(torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1).float(), targets.flatten()))

    clean = ce(logits)
    out = {}
    for g in groups:
        m = selector_mask(inputs.layout, g, g, require=False)
        if not m.any():
            continue
        xm, rm = x[m], recon[m]
        mse = float(((xm - rm) ** 2).mean())
        ev = float(1 - ((xm - rm) ** 2).sum() / ((xm - xm.mean(0)) ** 2).sum().clamp_min(1e-12))
        with splice(model, sae, at=g, use_error_term=False):
            spliced = ce(model(inputs))
        zero = ce(model.run_with_hooks(inputs, fwd_hooks=[(name, lambda a, hook, m=m: a.masked_fill(
            m[..., None].to(a.device), 0.0))]))
        rec = (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-9 else float("nan")
        out[g] = {"positions": int(m.sum()), "mse": mse, "explained_variance": ev, "ce_clean": clean,
                  "ce_spliced": spliced, "ce_zero_ablated": zero, "ce_recovered": rec}
    return out
