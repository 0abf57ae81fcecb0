"""Sparse dictionaries: SAEs (ReLU, TopK, JumpReLU) and transcoders, in SAELens's on-disk format.

A sparse autoencoder reads an activation x (say ``blocks.2.hook_resid_post`` at the audio positions), encodes it
into many non-negative features of which few are active, and decodes them back:

    acts = σ((x - b_dec) W_enc + b_enc)          σ: ReLU | keep the top k | JumpReLU (zero below a threshold)
    x̂    = acts W_dec + b_dec

A transcoder has the same parts but predicts another activation (``hook_name_out``, e.g. an MLP's output from
its input). :class:`SparseDictionary` is a TransformerLens ``HookedRootModule`` whose hook points follow SAELens
(``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``, ``hook_sae_error``,
``hook_sae_output``); :func:`av_lens.sae.splice` makes them hook points of the model.

On disk a dictionary is a folder with ``cfg.json`` and ``sae_weights.safetensors`` as SAELens 6.x writes them
(``SAEConfig.to_dict``: ``architecture`` "standard" | "topk" | "jumprelu", ``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` for TopK, and a
``metadata`` dict with ``model_name``, ``hook_name``, ``hook_head_index``, ``prepend_bos``; tensors ``W_enc``
[d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_in], ``b_dec``, ``threshold`` for JumpReLU). Transcoders add
``d_out`` and ``metadata.hook_name_out``. Writes are atomic (a temporary folder renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from av_lens.errors import CheckpointError, InputError

ARCHITECTURES = ("standard", "topk", "jumprelu")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
_ALIASES = {"relu": "standard", "standard": "standard", "topk": "topk", "jumprelu": "jumprelu"}


@dataclass
class DictionaryConfig:
    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int | None = None                  # TopK: active features per position
    d_out: int | None = None              # transcoders: width of the predicted activation (None: an SAE)
    hook_name: str = ""
    hook_name_out: str | None = None      # transcoders: the activation predicted
    model_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    metadata: dict = field(default_factory=dict)   # anything else (training settings, selector, ...)

    def __post_init__(self):
        if self.architecture not in _ALIASES:
            raise InputError(f"unknown dictionary architecture {self.architecture!r}",
                             "use 'relu' (SAELens: 'standard'), 'topk' or 'jumprelu'")
        self.architecture = _ALIASES[self.architecture]
        if self.d_in < 1 or self.d_sae < 1:
            raise InputError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}", "pass sizes >= 1")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= self.d_sae):
            raise InputError(f"a TopK dictionary needs 1 <= k <= d_sae ({self.d_sae}), got k={self.k!r}",
                             "pass e.g. k=8")

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    def to_saelens(self) -> dict:
        meta = {"model_name": self.model_name, "hook_name": self.hook_name, "hook_head_index": None,
                "prepend_bos": False, "sae_lens_version": "6 (written by av_lens)", **self.metadata}
        if self.is_transcoder:
            meta["hook_name_out"] = self.hook_name_out
        out = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "metadata": meta}
        if self.architecture == "topk":
            out["k"] = self.k
        if self.is_transcoder:
            out["d_out"] = self.d_out
        return out

    @classmethod
    def from_saelens(cls, d: dict) -> "DictionaryConfig":
        meta = dict(d.get("metadata") or {})
        hook = meta.pop("hook_name", d.get("hook_name", ""))          # SAELens < 6 kept these at the top level
        model_name = meta.pop("model_name", d.get("model_name", ""))
        hook_out = meta.pop("hook_name_out", d.get("hook_name_out"))
        arch = d.get("architecture", "standard")
        if d.get("normalize_activations", "none") not in ("none", None):
            raise CheckpointError(f"the dictionary normalises its input ({d['normalize_activations']!r}), which "
                                  "av_lens does not implement", "fold the scaling into the weights before saving")
        if d.get("reshape_activations", "none") not in ("none", None):
            raise CheckpointError(f"the dictionary reshapes its input ({d['reshape_activations']!r})",
                                  "use a dictionary trained on an unreshaped activation")
        k = d.get("k") or (d.get("activation_fn_kwargs") or {}).get("k")
        return cls(d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), architecture=arch, k=k, d_out=d.get("d_out"),
                   hook_name=hook or "", hook_name_out=hook_out, model_name=model_name or "",
                   dtype=str(d.get("dtype", "float32")).replace("torch.", ""),
                   apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)), metadata=meta)


class SparseDictionary(HookedRootModule):
    """An SAE or transcoder with SAELens's parameters and hook points."""

    def __init__(self, cfg: DictionaryConfig, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        d_out = cfg.d_out or cfg.d_in
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.d_sae, d_out, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone() if cfg.d_out is None else
                                  torch.randn(cfg.d_in, cfg.d_sae, generator=g) / cfg.d_in ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), 1e-3))
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.use_error_term = False
        self.setup()

    # ---------------------------------------------------------------------------------------- compute
    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input and not self.cfg.is_transcoder:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold)          # JumpReLU

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activate(self.encode_pre(x))

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """The reconstruction (SAE) or prediction (transcoder) of ``x``, through the hook points. With
        ``use_error_term`` the output is ``recons + error`` where error = target - recons, computed without
        the hooks' edits, so splicing leaves the model's computation exact while the features stay visible."""
        x_in = self.hook_sae_input(x)
        pre = self.hook_sae_acts_pre(self.encode_pre(x_in))
        acts = self.hook_sae_acts_post(self.activate(pre))
        recons = self.hook_sae_recons(self.decode(acts))
        if not self.use_error_term:
            return self.hook_sae_output(recons.to(x.dtype))
        tgt = (x if target is None else target).to(recons.dtype)
        with torch.no_grad():
            clean = self.decode(self.encode(x))
        raw_error = tgt - clean
        error = self.hook_sae_error(raw_error)
        # = recons + error, written so that with no edit of the hook points the output is the target bit for bit
        out = tgt + (recons - clean) + (error - raw_error)
        return self.hook_sae_output(out.to(x.dtype))

    # ------------------------------------------------------------------------------------------- disk
    def state(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.cfg.architecture == "jumprelu":
            out["threshold"] = self.threshold
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) atomically into ``folder``."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file, not a folder", "pass a folder path for the dictionary")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            (tmp / CFG_FILE).write_text(json.dumps(self.cfg.to_saelens(), indent=1))
            save_file(self.state(), str(tmp / WEIGHTS_FILE))
            if folder.exists():
                old = folder.with_name(folder.name + ".old")
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old)
            else:
                os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SparseDictionary":
        """Read a dictionary in SAELens's layout (written by SAELens or by :meth:`save`)."""
        folder = Path(folder)
        if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{folder} is not a dictionary folder (it needs {CFG_FILE} and {WEIGHTS_FILE})",
                                  "pass the folder SAELens's save_model or SparseDictionary.save wrote")
        try:
            raw = json.loads((folder / CFG_FILE).read_text())
        except ValueError as e:
            raise CheckpointError(f"{folder / CFG_FILE} is not valid JSON ({e})", "write the config again") from e
        cfg = DictionaryConfig.from_saelens(raw)
        sd = load_file(str(folder / WEIGHTS_FILE))
        d = cls(cfg)
        for name, p in d.state().items():
            if name not in sd:
                raise CheckpointError(f"{folder / WEIGHTS_FILE} lacks {name!r}", "save the dictionary again")
            if tuple(sd[name].shape) != tuple(p.shape):
                raise CheckpointError(f"{name} has shape {tuple(sd[name].shape)}, the config implies {tuple(p.shape)}",
                                      "the config and the weights come from different dictionaries")
        with torch.no_grad():
            for name in d.state():
                getattr(d, name).copy_(sd[name].float())
        return d

    def config_dict(self) -> dict:
        return asdict(self.cfg)
