"""Training dictionaries on activations streamed from model runs, at the positions a selector picks.

    sae = train_dictionary(model, batches, "blocks.2.hook_resid_post", at="audio", d_sae=256,
                           architecture="topk", k=8, tokens=200_000, seed=0)

Each input batch runs once (``run_with_hooks`` capturing only ``hook_name``, and ``hook_name_out`` for a
transcoder); the rows at the selected, non-padding positions go into a shuffle buffer from which Adam steps
draw minibatches; batches are cycled until ``tokens`` rows have been trained on. The loss is the MSE of the
reconstruction (normalised by the input's variance), plus for ReLU an L1 penalty on the features weighted by the
decoder norms, and for JumpReLU a straight-through L0 penalty. Features that have not fired for
``dead_after`` rows are re-initialised on the worst-reconstructed rows (Bricken et al.'s resampling, simplified).
Everything is seeded: the same seed, inputs and settings give the same dictionary (one torch thread).
``checkpoint=`` folders save the dictionary and the training state every ``checkpoint_every`` steps (atomic),
and ``resume=True`` continues from the last one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import SelectorLike
from av_lens.sae.dictionary import DictionaryConfig, SparseDictionary


def collect_rows(model, inputs, hook_name: str, at: SelectorLike, hook_name_out: str | None = None):
    """(rows [n, d_in], target rows [n, d_out] or None, modality per row [n]) at ``at``'s positions."""
    from av_lens.analysis._common import selector_mask

    inputs = model.to_input(inputs)
    names = [hook_name] + ([hook_name_out] if hook_name_out else [])
    for n in names:
        if n not in model.hook_dict:
            from av_lens.errors import HookNameError
            raise HookNameError(f"{n!r} is not a hook point of this model", "pick a name from model.hook_dict")
    m = selector_mask(inputs.layout, at, "training")
    got: dict[str, Tensor] = {}

    def keep(act, hook):
        got[hook.name] = act.detach()[m.to(act.device)].float().cpu()

    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=[(n, keep) for n in names], return_type=None)
    return got[hook_name], got.get(hook_name_out), inputs.layout.modality[m]


def _loss(sae: SparseDictionary, x: Tensor, y: Tensor, l1: float, var: Tensor) -> tuple[Tensor, dict]:
    pre = sae.encode_pre(x)
    acts = sae.activate(pre)
    if sae.cfg.architecture == "jumprelu":       # the threshold learns through a sigmoid surrogate of L0
        l0 = torch.sigmoid((pre - sae.threshold) * 50).sum(-1).mean()
    recon = sae.decode(acts)
    mse = ((recon - y) ** 2).sum(-1).mean() / var
    loss = mse
    if sae.cfg.architecture == "standard":
        loss = loss + l1 * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    elif sae.cfg.architecture == "jumprelu":
        loss = loss + l1 * l0
    return loss, {"mse": float(mse.detach()), "l0": float((acts.detach() > 0).float().sum(-1).mean())}


def train_dictionary(model, batches: Sequence, hook_name: str, *, at: SelectorLike = "all", d_sae: int = 512,
                     architecture: str = "topk", k: int | None = 16, l1: float = 1e-3, tokens: int = 100_000,
                     minibatch: int = 256, lr: float = 2e-3, seed: int = 0, hook_name_out: str | None = None,
                     dead_after: int = 20_000, checkpoint: str | os.PathLike | None = None,
                     checkpoint_every: int = 200, resume: bool = False, progress: bool = True) -> SparseDictionary:
    """Train an SAE (or, with ``hook_name_out``, a transcoder) on ``hook_name`` at ``at``'s positions."""
    from tqdm.auto import tqdm

    if not batches:
        raise InputError("no input batches to train on", "pass a list of AVInput batches (e.g. organism clips)")
    if tokens < minibatch or minibatch < 1:
        raise InputError(f"tokens ({tokens}) must be at least one minibatch ({minibatch})",
                         "raise tokens= or lower minibatch=")
    if architecture not in ("relu", "standard", "topk", "jumprelu"):
        raise InputError(f"unknown dictionary architecture {architecture!r}",
                         "use 'relu' (SAELens: 'standard'), 'topk' or 'jumprelu'")
    g = torch.Generator().manual_seed(seed)
    rows, targets, mods = [], [], []
    for b in batches:                      # one pass over the model; rows are reused every epoch
        x, y, m = collect_rows(model, b, hook_name, at, hook_name_out)
        rows.append(x)
        targets.append(y if y is not None else x)
        mods.append(m)
    X, Y = torch.cat(rows), torch.cat(targets)
    d_out = Y.shape[1] if hook_name_out else None
    cfg = DictionaryConfig(d_in=X.shape[1], d_sae=d_sae, architecture=architecture,
                           k=k if architecture == "topk" else None, d_out=d_out, hook_name=hook_name,
                           hook_name_out=hook_name_out, model_name=str(getattr(model.cfg, "model_name", "")),
                           metadata={"trained_by": "av_lens", "selector": str(at), "tokens": tokens, "seed": seed,
                                     "l1": l1, "lr": lr, "minibatch": minibatch})
    sae = SparseDictionary(cfg, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(Y.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    var = ((Y - Y.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12)
    steps = tokens // minibatch
    step0 = 0
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None and resume and (ck / "trainer_state.pt").is_file():
        state = torch.load(ck / "trainer_state.pt", weights_only=False)
        sae = SparseDictionary.load(ck / "dictionary")
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        step0 = state["step"]
    since_fired = torch.zeros(d_sae)
    bar = tqdm(range(step0, steps), desc=f"training {architecture} dictionary on {hook_name} @ {at}",
               disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(X), (minibatch,), generator=g)
        x, y = X[idx], Y[idx]
        loss, info = _loss(sae, x, y, l1, var)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.data /= sae.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-8) if d_out is None else 1.0
            fired = (sae.encode(x) > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + minibatch)
            dead = since_fired > dead_after
            if dead.any():
                err = ((sae.decode(sae.encode(X[:4096])) - Y[:4096]) ** 2).sum(-1)
                worst = err.argsort(descending=True)[: int(dead.sum())]
                v = (Y[:4096][worst] - sae.b_dec)
                v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                sae.W_dec.data[dead] = v if d_out is None else v * 0.1
                if d_out is None:
                    sae.W_enc.data[:, dead] = v.T * 0.1
                sae.b_enc.data[dead] = 0
                since_fired[dead] = 0
        if progress and step % 50 == 0:
            bar.set_postfix(mse=f"{info['mse']:.4f}", l0=f"{info['l0']:.1f}")
        if ck is not None and (step + 1) % checkpoint_every == 0:
            _save_state(ck, sae, opt, g, step + 1)
    sae.cfg.metadata["explained_variance_train"] = round(explained_variance(sae, X, Y), 4)
    if ck is not None:
        _save_state(ck, sae, opt, g, steps)
    return sae


def _save_state(folder: Path, sae, opt, g, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sae.save(folder / "dictionary")
    tmp = folder / "trainer_state.pt.tmp"
    torch.save({"opt": opt.state_dict(), "rng": g.get_state(), "step": step}, tmp)
    os.replace(tmp, folder / "trainer_state.pt")
    (folder / "progress.json").write_text(json.dumps({"step": step}))


@torch.no_grad()
def explained_variance(sae: SparseDictionary, X: Tensor, Y: Tensor | None = None) -> float:
    Y = X if Y is None else Y
    R = sae.decode(sae.encode(X))
    return float(1 - ((R - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum().clamp_min(1e-12))
