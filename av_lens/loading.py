"""Loading checkpoints into a HookedAVTransformer, kept apart from the model code.

1. Resolve a hub id or local folder to a folder (:mod:`av_lens.hub`; a hub id, at an optional ``revision``, goes
   through ``huggingface_hub``'s cache; nothing here downloads when ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).
2. Read ``config.json`` with transformers' config classes (no remote code), pick the adapter, convert it
   to an AVConfig, and check it against the model's YAML in ``model_configs/`` when one applies.
3. Build the model with uninitialised parameters directly in the target dtype and device.
4. Stream the safetensors shards one tensor at a time into those parameters (so at most one tensor is
   held twice), mapping names through the adapter; pickled ``.bin`` checkpoints are refused.
5. Fail with a :class:`CheckpointError` on missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from av_lens.adapters import adapter_for
from av_lens.errors import CheckpointError
# resolve_folder and the embedded-checkpoint table live in av_lens.hub (below the adapters); re-exported here
from av_lens.hub import BUILTIN_CHECKPOINTS, HUB_PATTERNS as _HUB_PATTERNS, HUB_TIMEOUT, hub_timeout, resolve_folder  # noqa: F401,E501
from av_lens.registry import find_spec, get_spec

#: a weight-map value "key[a:b]" names rows a..b-1 (first dimension) of the checkpoint tensor "key"
_ROW_SLICE = re.compile(r"(.+)\[(\d+):(\d+)\]")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})",
                                  "the file is truncated or corrupt; download model.safetensors.index.json again") from e
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards {missing}",
                                  "finish the download (all shards listed in model.safetensors.index.json)")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder} has only pickled weights (*.bin / *.pt), which av_lens does not load",
                              "convert them to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{folder} has no *.safetensors weights", "pass a complete checkpoint folder")


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise CheckpointError(f"dtype {dtype} cannot hold the model's weights and activations (not a 16/32/64-bit "
                                  "float type)", "use torch.float32, torch.bfloat16 or torch.float16 (quantised "
                                                 "weights are not supported)")
        return dtype
    if not isinstance(dtype, str):
        raise CheckpointError(f"dtype must be a string or a torch.dtype, got {dtype!r}", "pass e.g. dtype='bf16'")
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CheckpointError(f"unknown dtype {dtype!r}", f"use one of {sorted(table)} or a torch.dtype")
    return table[dtype]


def load_pretrained(cls, name_or_path, *, dtype=torch.float32, device="cpu", model_config=None, local_files_only=None,
                    device_map=None, revision=None):
    from transformers.initialization import no_init_weights

    dtype = _parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and (device.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise CheckpointError(f"device {str(device)!r} was asked for but this machine has "
                              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} usable CUDA device(s)",
                              "pass device='cpu', or a CUDA device that exists (see torch.cuda.device_count())")
    folder = resolve_folder(name_or_path, local_files_only, revision=revision)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json", "pass a transformers checkpoint folder")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})",
                              "the file is truncated or corrupt; download the checkpoint's config.json again") from e
    adapter = adapter_for(raw, str(folder))
    hf_config = adapter.hf_config(folder, raw)
    thinker_cfg = adapter.thinker_config(hf_config)
    tokenizer, processor = _load_tokenizer_and_processor(folder, hf_config if raw.get("auto_map") else None)
    spec = get_spec(model_config) if model_config is not None else find_spec(name_or_path)
    cfg = adapter.to_av_config(thinker_cfg, tokenizer, dtype=dtype, device=device, model_name=str(name_or_path),
                               system_prompt=spec.system_prompt if spec else None,
                               extra={**({"spec": spec.name} if spec else {}),
                                      **({"revision": revision} if revision is not None else {})})
    if spec is not None:
        if spec.adapter != adapter.name:
            raise CheckpointError(f"{folder} is a {adapter.name} checkpoint but {spec.name} needs {spec.adapter}",
                                  "load the checkpoint that belongs to this model config")
        spec.check(cfg, str(folder))
    with torch.device("cpu" if device_map is not None else device), _default_dtype(dtype), no_init_weights():
        model = cls(cfg, adapter, thinker_cfg, tokenizer=tokenizer, processor=processor)
    if device_map is not None:  # spread the (uninitialised) parts over devices; the weights then stream to them
        model.place(device_map)
    files = _weight_files(folder) + [folder / n for n in adapter.pickled_files if (folder / n).exists()]
    _stream_weights(model, adapter, files, folder)
    model.eval()
    return model


def _load_tokenizer_and_processor(folder: Path, hf_config=None):
    """The folder's tokenizer and processor. ``hf_config``: the converted config, passed on for a custom-code
    config.json (phi4mm) so that transformers does not read that file itself (it would ask for remote code)."""
    try:
        return _load_tokenizer_and_processor_unchecked(folder, hf_config)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers / transformers raise many types for a broken file
        present = sorted(p.name for p in folder.iterdir() if "token" in p.name or "processor" in p.name
                         or p.name in ("vocab.json", "merges.txt", "chat_template.jinja"))
        raise CheckpointError(f"cannot load the tokenizer / processor of {folder} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}; files present: {present})",
                              "a tokenizer file is missing, truncated or corrupt; download tokenizer.json, "
                              "tokenizer_config.json and the processor configs again") from e


def _load_tokenizer_and_processor_unchecked(folder: Path, hf_config=None):
    tokenizer = processor = None
    kw = {} if hf_config is None else {"config": hf_config}
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        if (folder / f).exists():
            try:
                json.loads((folder / f).read_text(encoding="utf-8"))
            except ValueError as e:
                raise CheckpointError(f"{folder / f} is not valid JSON ({e})",
                                      f"the file is truncated or corrupt; download {f} again") from e
    if (folder / "tokenizer_config.json").exists() and not any(
            (folder / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")):
        raise CheckpointError(f"{folder} has tokenizer_config.json but no tokenizer vocabulary (tokenizer.json, "
                              "vocab.json + merges.txt or tokenizer.model)",
                              "the download is incomplete; fetch tokenizer.json (or the vocabulary files) again")
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kw)
    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        from transformers import AutoProcessor

        if hf_config is None:
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        else:  # a custom-code folder: only a processor class transformers ships is used (no remote code)
            processor = _native_processor(folder, hf_config)
        tokenizer = getattr(processor, "tokenizer", tokenizer)
    return tokenizer, processor


def _native_processor(folder: Path, hf_config):
    """The processor of a custom-code folder when its processor_config.json names a class transformers ships (e.g.
    ``Phi4MultimodalProcessor``), else None (the model loads; ``prepare`` then asks for a processor)."""
    import transformers

    for name in ("processor_config.json", "preprocessor_config.json"):
        f = folder / name
        if f.exists():
            try:
                cls_name = json.loads(f.read_text()).get("processor_class")
            except ValueError:
                return None
            cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
            return cls.from_pretrained(folder, config=hf_config) if cls is not None else None
    return None


def _stream_weights(model, adapter, files: list[Path], folder: Path) -> None:
    from safetensors import safe_open

    cfg = model.cfg
    expected = adapter.expected_keys(cfg.n_layers, cfg.tie_word_embeddings, cfg)
    by_ckpt: dict[str, str] = {}
    rows_of: dict[str, tuple[str, int]] = {}  # checkpoint key -> (stacked parameter, expert row)
    rows_needed: dict[str, set[int]] = {}
    sliced: dict[str, list[tuple[str, int, int]]] = {}  # checkpoint key -> [(parameter, first row, stop row)]
    targets: dict[str, torch.Tensor] = {}
    for ours, theirs in expected.items():
        targets[ours] = model.get_parameter(ours)
        m = _ROW_SLICE.fullmatch(theirs)
        if m:  # "key[a:b]": rows a..b-1 of a fused checkpoint tensor (q/k/v of a qkv_proj, gate/up of a gate_up_proj)
            sliced.setdefault(m.group(1), []).append((ours, int(m.group(2)), int(m.group(3))))
        elif "{e}" in theirs:  # one checkpoint tensor per expert, stacked into one parameter here
            rows_needed[ours] = set(range(targets[ours].shape[0]))
            for e in rows_needed[ours]:
                rows_of[theirs.format(e=e)] = (ours, e)
        else:
            by_ckpt[theirs] = ours
    for attr, prefix in adapter.towers.items():
        for name, t in getattr(model, attr).state_dict(keep_vars=True).items():
            by_ckpt[prefix + name] = f"{attr}.{name}"
            targets[f"{attr}.{name}"] = t
    loaded, unexpected = set(), []
    for f in files:
        try:
            handle = _PickledWeights(f) if f.suffix in (".bin", ".pt") else safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read {f.name} in {folder}: {e}",
                                  "the file is truncated or corrupt; download it again") from e
        with handle:
            for key in handle.keys():
                k = adapter.strip(key)
                if k is None or k.endswith("rotary_emb.inv_freq"):
                    continue
                if adapter.unused_key is not None and adapter.unused_key(cfg, k):
                    continue
                if k == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if k in sliced:
                    src = _read(handle, key, f)
                    for ours, a, b in sliced[k]:
                        dst = targets[ours]
                        if src.shape[0] < b or tuple(src[a:b].shape) != tuple(dst.shape):
                            raise CheckpointError(f"tensor {key!r} has shape {tuple(src.shape)}, so its rows {a}:{b} "
                                                  f"cannot fill {ours} of shape {tuple(dst.shape)}",
                                                  "config.json and the weights belong to different models")
                        with torch.no_grad():
                            dst.copy_(src[a:b])
                        loaded.add(ours)
                    del src
                    continue
                ours, row = by_ckpt.get(k), None
                if ours is None and k in rows_of:
                    ours, row = rows_of[k]
                if ours is None:
                    unexpected.append(key)
                    continue
                if ours in loaded and f.suffix in (".bin", ".pt"):
                    continue  # a side pickle (VideoLLaMA2-AV's stage-2 audio tower) never overrides the shards
                src = _read(handle, key, f)
                dst = targets[ours] if row is None else targets[ours][row]
                if tuple(src.shape) != tuple(dst.shape):
                    raise CheckpointError(f"tensor {key!r} has shape {tuple(src.shape)} but the config implies "
                                          f"{tuple(dst.shape)}", "config.json and the weights belong to different models")
                with torch.no_grad():
                    dst.copy_(src)
                if row is None:
                    loaded.add(ours)
                else:
                    rows_needed[ours].discard(row)
                    if not rows_needed[ours]:
                        loaded.add(ours)
                del src
    missing = sorted(set(targets) - loaded - _non_weight_entries(model, adapter))
    if missing:
        as_named = {ours: ckpt for ckpt, ours in by_ckpt.items()}  # name them as the checkpoint would
        as_named.update({ours: ckpt for ckpt, (ours, e) in rows_of.items() if e in rows_needed.get(ours, ())})
        as_named.update({ours: f"{ckpt}[{a}:{b}]" for ckpt, parts in sliced.items() for ours, a, b in parts})
        raise CheckpointError(
            f"{folder} lacks {len(missing)} tensors the model needs (e.g. {[as_named.get(m, m) for m in missing[:3]]})",
            "the checkpoint is truncated or of another model; download it again or pick the matching folder",
        )
    if unexpected:
        raise CheckpointError(
            f"{folder} has {len(unexpected)} tensors this {adapter.name} model does not use (e.g. {unexpected[:3]})",
            "check that config.json belongs to these weights",
        )


class _PickledWeights:
    """A torch-pickle state dict behind safetensors' reader interface, loaded with ``weights_only=True`` (tensors
    and containers only: no code in the file runs)."""

    def __init__(self, path: Path):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError("not a flat dict of tensors")
        self.sd = sd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sd = {}

    def keys(self):
        return list(self.sd)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.sd[key]


def _read(handle, key: str, f: Path) -> torch.Tensor:
    try:
        t = handle.get_tensor(key)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read tensor {key!r} from {f.name}: {e}",
                              "the file is truncated or corrupt; download it again") from e
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
        raise CheckpointError(f"tensor {key!r} in {f.name} holds {n_bad} {kind} value(s); every output would be "
                              f"{kind}", "the weights are corrupt (or from a diverged training run); download or "
                                         "re-export the checkpoint")
    return t


def _non_weight_entries(model, adapter) -> set[str]:
    """Tower buffers: computed when the towers are built (position tables), so a checkpoint need not hold them."""
    out = set()
    for attr in adapter.towers:
        for name, _ in getattr(model, attr).named_buffers():
            out.add(f"{attr}.{name}")
    return out
