"""av_lens.hub: revision= reaches the hub for every model, and the adapters sit below the loader (no adapter
imports av_lens.loading, so loading -> adapters -> ... -> loading cannot close a circle)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import av_lens
from av_lens import HookedAVTransformer
from av_lens.errors import CheckpointError
from av_lens.registry import specs
from av_lens.testing.tiny_audio import TinyAudioSpec, save_tiny_audioflamingo3, save_tiny_qwen2_audio
from av_lens.testing.tiny_phi4 import TinyPhi4Spec, save_tiny_phi4mm

ADAPTERS = Path(av_lens.__file__).parent / "adapters"


class _Offline(Exception):
    pass


@pytest.fixture
def hub(monkeypatch):
    """A fake huggingface_hub.snapshot_download: records each call; returns a registered folder or fails."""
    import huggingface_hub

    calls, folders = [], {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, revision, local_files_only))
        if repo_id in folders:
            return str(folders[repo_id])
        raise _Offline(f"{repo_id} is not on this fake hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, folders


@pytest.mark.parametrize("spec", [s.name for s in specs()])
def test_revision_reaches_the_hub_for_every_registered_model(hub, spec):
    calls, _ = hub
    hub_id = next(s.hub_id for s in specs() if s.name == spec)
    with pytest.raises(CheckpointError, match="at revision 'refs/pr/70'"):
        HookedAVTransformer.from_pretrained(hub_id, revision="refs/pr/70", local_files_only=False)
    assert calls == [(hub_id, "refs/pr/70", False)]


@pytest.mark.parametrize("family", ["qwen2_audio", "audioflamingo3", "phi4mm"])
def test_revision_loads_the_snapshot_it_names(hub, tmp_path, family):
    """A hub id at a revision loads that snapshot's folder (Phi-4-multimodal's main branch is the phi4mm
    format), the model remembers the revision, and meta_model passes it on too."""
    from av_lens.placement import meta_model

    calls, folders = hub
    save = {"qwen2_audio": lambda d: save_tiny_qwen2_audio(d, TinyAudioSpec()),
            "audioflamingo3": lambda d: save_tiny_audioflamingo3(d, TinyAudioSpec()),
            "phi4mm": lambda d: save_tiny_phi4mm(d, TinyPhi4Spec())}[family]
    hub_id = f"tiny-org/{family}"
    folders[hub_id] = save(tmp_path / family)
    model = HookedAVTransformer.from_pretrained(hub_id, revision="abc123", local_files_only=False)
    assert calls[-1] == (hub_id, "abc123", False) and model.cfg.extra["revision"] == "abc123"
    meta = meta_model(hub_id, revision="v1")
    assert calls[-1][:2] == (hub_id, "v1") and meta.cfg.n_layers == model.cfg.n_layers
    HookedAVTransformer.from_pretrained(hub_id, local_files_only=False)
    assert calls[-1][:2] == (hub_id, None)  # no revision: the hub's default branch


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):  # module level and inside functions alike
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else "av_lens." + node.module  # adapters use absolute imports
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", sorted(ADAPTERS.glob("*.py")), ids=lambda p: p.name)
def test_no_adapter_imports_the_loader(path):
    mods = _imported_modules(path)
    assert not {m for m in mods if m == "av_lens.loading" or m.startswith("av_lens.loading.")}, path.name
    assert "av_lens.loading" not in {m.rsplit(".", 1)[0] for m in mods if m.startswith("av_lens.")}


def test_importing_the_adapters_does_not_load_the_loader():
    code = "import sys, av_lens.adapters, av_lens.hub; print('av_lens.loading' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"
