"""The model registry: one YAML per supported checkpoint in ``model_configs/``.

Each YAML records what av_lens's code relies on for that model — sizes, token ids, TMRoPE sections,
media timing, the default system prompt — so that loading a checkpoint can check the checkpoint's own
config against it and fail loudly on a mismatch (a wrong file, a renamed token, a changed rope layout)
instead of computing silently wrong positions. Loading is separate from modelling: this module only
reads and compares specs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from av_lens.errors import CheckpointError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None
    adapter: str
    aliases: tuple[str, ...] = ()
    system_prompt: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    notes: str = ""
    source: str = ""

    def matches(self, name: str) -> bool:
        n = str(name).strip().rstrip("/").lower()
        return n in {self.name.lower(), (self.hub_id or "").lower(), *(a.lower() for a in self.aliases)}

    def check(self, cfg, where: str) -> None:
        """Compare an AVConfig built from a checkpoint against this spec; raise on any difference."""
        diffs = []
        for key, want in self.config.items():
            have = getattr(cfg, key, None)
            if isinstance(have, tuple):
                have = list(have)
            if isinstance(want, float) or isinstance(have, float):
                same = have is not None and abs(float(have) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
            else:
                same = have == want
            if not same:
                diffs.append(f"{key}: checkpoint {have!r}, {self.name} spec {want!r}")
        for key, want in self.tokens.items():
            have = getattr(cfg.tokens, key, None)
            if have != want:
                diffs.append(f"token {key}: checkpoint {have!r}, {self.name} spec {want!r}")
        if diffs:
            raise CheckpointError(
                f"{where} does not match the {self.name} model config ({self.source}): " + "; ".join(diffs),
                f"load the right checkpoint, or pass model_config=None to skip the {self.name} check",
            )


def _load_yaml(path: Path | Any, source: str) -> ModelSpec:
    data = yaml.safe_load(path.read_text())
    try:
        return ModelSpec(
            name=data["name"], hub_id=data.get("hub_id"), adapter=data["adapter"],
            aliases=tuple(data.get("aliases", ())), system_prompt=data.get("system_prompt"),
            config=dict(data.get("config", {})), tokens=dict(data.get("tokens", {})), notes=data.get("notes", ""),
            source=source,
        )
    except KeyError as e:
        raise CheckpointError(f"model config {source} lacks the field {e}", "add it (see model_configs/*.yaml)") from e


def specs() -> list[ModelSpec]:
    """All registered model specs (model_configs/*.yaml shipped with the package)."""
    root = resources.files("av_lens.model_configs")
    return [_load_yaml(p, f"model_configs/{p.name}") for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")]


def find_spec(name: str | os.PathLike | None) -> ModelSpec | None:
    """The spec for a registered name / hub id, a path to a YAML file, or None when nothing matches."""
    if name is None:
        return None
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return _load_yaml(p, str(p))
    for s in specs():
        if s.matches(str(name)):
            return s
    return None


def get_spec(name: str | os.PathLike) -> ModelSpec:
    spec = find_spec(name)
    if spec is None:
        known = ", ".join(s.name for s in specs())
        raise CheckpointError(f"no model config named {str(name)!r}", f"use one of: {known}, or a path to a YAML file")
    return spec
