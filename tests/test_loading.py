"""Loading: local folders, full Omni checkpoints (thinker nested, talker skipped), registry checks,
bad checkpoints with clear errors, bf16."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from av_lens import CheckpointError, HookedAVTransformer
from av_lens.registry import get_spec, specs
from conftest import cases


def test_full_omni_checkpoint_loads_thinker_and_skips_talker(tmp_path, tiny_dir, model, media):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig

    thinker_cfg = Qwen2_5OmniThinkerConfig.from_pretrained(tiny_dir)
    full = Qwen2_5OmniConfig(thinker_config=thinker_cfg.to_dict())
    out = tmp_path / "full"
    out.mkdir()
    full.save_pretrained(out)
    for f in tiny_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    weights = {f"thinker.{k}": v for k, v in load_file(tiny_dir / "model.safetensors").items()}
    weights["talker.model.embed_tokens.weight"] = torch.zeros(4, 4)
    weights["token2wav.code_embedding.weight"] = torch.zeros(2, 2)
    save_file(weights, out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    loaded = HookedAVTransformer.from_pretrained(out)
    inp = model.prepare(**cases(media)["audio"])
    with torch.no_grad():
        assert torch.equal(loaded(inp), model(inp))


def test_registry_specs_are_complete():
    names = {s.name for s in specs()}
    assert {"Qwen2.5-Omni-3B", "Qwen2.5-Omni-7B"} <= names
    s3 = get_spec("Qwen/Qwen2.5-Omni-3B")
    assert s3.config["n_layers"] == 36 and s3.tokens["audio"] == 151646
    assert 2 * sum(s3.config["mrope_section"]) == s3.config["d_head"]


def test_every_spec_names_real_fields_and_a_registered_adapter():
    """A misspelt YAML key would silently never be checked: every key must be an AVConfig field or token name."""
    import dataclasses

    from av_lens.adapters import adapters
    from av_lens.config import AVConfig
    from av_lens.layout import TokenIds

    fields = {f.name for f in dataclasses.fields(AVConfig)}
    token_fields = {f.name for f in dataclasses.fields(TokenIds)}
    registered = {a.name for a in adapters()}
    all_specs = specs()
    assert {"Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen3-Omni-30B-A3B"} <= {s.name for s in all_specs}
    for s in all_specs:
        assert s.adapter in registered, s.name
        assert set(s.config) <= fields, (s.name, set(s.config) - fields)
        assert set(s.tokens) <= token_fields, (s.name, set(s.tokens) - token_fields)
        if "mrope_section" in s.config and "d_head" in s.config:
            assert 2 * sum(s.config["mrope_section"]) == s.config["d_head"], s.name


def test_model_config_check_passes_and_fails(tmp_path, tiny_dir):
    good = tmp_path / "tiny.yaml"
    good.write_text("name: tiny\nadapter: qwen2_5_omni\nconfig: {n_layers: 2, d_model: 64, mrope_section: [2, 3, 3]}\n"
                    "tokens: {audio: 3, video: 9}\n")
    HookedAVTransformer.from_pretrained(tiny_dir, model_config=str(good))
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2, Qwen2.5-Omni-3B spec 36"):
        HookedAVTransformer.from_pretrained(tiny_dir, model_config="Qwen2.5-Omni-3B")


def _copy(tiny_dir, dst):
    shutil.copytree(tiny_dir, dst)
    return dst


def test_truncated_safetensors(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HookedAVTransformer.from_pretrained(d)


def test_missing_tensor(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "missing")
    w = load_file(d / "model.safetensors")
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        HookedAVTransformer.from_pretrained(d)


def test_wrong_shape(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "shape")
    w = load_file(d / "model.safetensors")
    w["model.norm.weight"] = torch.ones(3)
    save_file(w, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="has shape \\(3,\\)"):
        HookedAVTransformer.from_pretrained(d)


def test_pickle_only_checkpoint_refused(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "pickle")
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights"):
        HookedAVTransformer.from_pretrained(d)


def test_not_a_thinker(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="not a supported audio-visual model"):
        HookedAVTransformer.from_pretrained(d)


def test_missing_folder_and_offline_hub():
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        HookedAVTransformer.from_pretrained("./does/not/exist")
    with pytest.raises(CheckpointError, match="could not find 'Qwen/Qwen2.5-Omni-3B' locally"):
        HookedAVTransformer.from_pretrained("Qwen/Qwen2.5-Omni-3B", local_files_only=True)


def test_bf16_against_fp32(tiny_dir, model, media):
    """bf16 weights and activations: the documented tolerance is |Δlogits| <= 0.05 on these tiny models
    (logit scale ~0.3) and the same greedy first token; measured ~1e-2."""
    m16 = HookedAVTransformer.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert m16.W_E.dtype == torch.bfloat16 and m16.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    inp = model.prepare(**cases(media)["video_with_audio"])
    with torch.no_grad():
        ref = model(inp)
        low = m16(inp).float()
    assert (ref - low).abs().max().item() <= 0.05
    assert torch.equal(ref[0, -1].argmax(), low[0, -1].argmax())
