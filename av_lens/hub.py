"""Finding a checkpoint folder: a local folder, a checkpoint embedded in the package, or a hub id.

This module sits below both the loader (:mod:`av_lens.loading`) and the adapters (which need a checkpoint's
folder for files beside the weights, such as Phi-4-multimodal's LoRA adapters), so neither imports the other.
It imports nothing of av_lens but the errors and, lazily, the embedded organism's file list.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from av_lens.errors import CheckpointError

#: names of checkpoints shipped inside the package -> function returning their folder
BUILTIN_CHECKPOINTS: dict[str, Callable[[], Path]] = {}

#: the files a hub snapshot fetches (configs, safetensors weights, tokenizer and processor files; no pickles)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


def _embedded(folder: Path, name: str) -> Path:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"the embedded checkpoint {name!r} is missing from this installation ({folder})",
                              "reinstall av-lens, or retrain it: python -m av_lens.organism.train --out DIR "
                              "and load DIR/organism")
    return folder


def _register_organism() -> None:
    from av_lens.organism import CHECKPOINTS, checkpoint_root

    for name, sub in CHECKPOINTS.items():
        BUILTIN_CHECKPOINTS[name] = lambda sub=sub, name=name: _embedded(checkpoint_root() / sub, name)


_register_organism()


#: seconds a hub request may take before from_pretrained gives up (env AV_LENS_HUB_TIMEOUT overrides it)
HUB_TIMEOUT = 30.0


def hub_timeout() -> float:
    """The hub timeout in seconds: ``AV_LENS_HUB_TIMEOUT`` if set, else :data:`HUB_TIMEOUT`."""
    raw = os.environ.get("AV_LENS_HUB_TIMEOUT")
    if raw is None or raw == "":
        return HUB_TIMEOUT
    try:
        t = float(raw)
    except ValueError:
        t = float("nan")
    if not 0 < t < float("inf"):
        raise CheckpointError(f"AV_LENS_HUB_TIMEOUT={raw!r} is not a positive number of seconds",
                              "set it to e.g. AV_LENS_HUB_TIMEOUT=30, or unset it (default 30 s)")
    return t


def hub_call(fn, name: str):
    """Run a hub call with a hard wall-clock limit: an endpoint that accepts the connection and never answers
    makes it fail after :func:`hub_timeout` seconds instead of hanging (the per-request timeouts of
    huggingface_hub are set to the same value, and the call runs in a daemon thread as a last resort)."""
    import threading

    limit = hub_timeout()
    try:
        from huggingface_hub import constants

        constants.HF_HUB_ETAG_TIMEOUT = min(getattr(constants, "HF_HUB_ETAG_TIMEOUT", limit), limit)
        constants.HF_HUB_DOWNLOAD_TIMEOUT = min(getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", limit), limit)
    except Exception:  # noqa: BLE001 - an older huggingface_hub without these settings
        pass
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    th = threading.Thread(target=target, daemon=True, name=f"av_lens hub call {name}")
    th.start()
    th.join(limit)
    if th.is_alive():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise CheckpointError(f"the model hub ({endpoint}) did not answer within {limit:g} s while looking up {name!r}",
                              "check the network (or HF_ENDPOINT), raise AV_LENS_HUB_TIMEOUT, or download the model "
                              f"first (huggingface-cli download {name}) and pass the local folder")
    if "error" in box:
        raise box["error"]
    return box["value"]


def offline_by_default() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to something other than 0/false."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_folder(name_or_path: str | os.PathLike, local_files_only: bool | None = None,
                   revision: str | None = None) -> Path:
    """The folder of a checkpoint: ``name_or_path`` itself when it is a folder, an embedded checkpoint's folder,
    or the hub snapshot of ``name_or_path`` at ``revision`` (a branch, tag or commit; None: the default branch),
    fetched through ``huggingface_hub``'s cache (nothing is downloaded when ``local_files_only`` or
    ``HF_HUB_OFFLINE=1``). Every hub call has a hard time limit (:func:`hub_timeout`)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CheckpointError(f"the model name is {name_or_path!r} ({type(name_or_path).__name__}), not a folder or "
                              "hub id", "pass a checkpoint folder, a hub id such as 'Qwen/Qwen2.5-Omni-3B', or "
                                        "'av-lens/organism'")
    if not str(name_or_path).strip():
        raise CheckpointError("the model name is empty (an empty path would load the working directory)",
                              "pass a checkpoint folder, a hub id such as 'Qwen/Qwen2.5-Omni-3B', or 'av-lens/organism'")
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{str(p)!r} is a file, not a checkpoint folder",
                              "pass the folder that holds config.json and the *.safetensors files")
    if str(name_or_path) in BUILTIN_CHECKPOINTS:  # checkpoints embedded in the package resolve offline
        return BUILTIN_CHECKPOINTS[str(name_or_path)]()
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"no checkpoint folder at {name!r}",
                              "pass an existing local folder or a hub id such as 'Qwen/Qwen2.5-Omni-3B'")
    if local_files_only is None:
        local_files_only = offline_by_default()
    at = "" if revision is None else f" at revision {revision!r}"
    try:
        from huggingface_hub import snapshot_download

        return Path(hub_call(lambda: snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                                       local_files_only=local_files_only), name))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - every hub failure means the same thing to the caller
        rev = "" if revision is None else f" --revision {revision}"
        raise CheckpointError(
            f"could not find {name!r}{at} locally or on the model hub ({type(e).__name__}: {str(e).splitlines()[0]})",
            f"download it first (huggingface-cli download {name}{rev}) and pass the local folder",
        ) from e
