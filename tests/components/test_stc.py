"""VideoLLaMA2's STC connector (stc_connector_v35 / stc_connector) and audio projector (av_lens.components.stc).

The reference forward below is written from the published equations with plain functional ops (F.conv2d,
F.layer_norm, squeeze-excitation, F.conv3d, GELU) reading tensors by their published key names; it never
calls av_lens' modules. Sources: DAMO-NLP-SG/VideoLLaMA2@8cedfbd (audio_visual) videollama2/model/projector.py
and timm v1.0.3 (cb0e439) timm/models/regnet.py, timm/layers/{conv_bn_act,norm_act,squeeze_excite}.py.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from av_lens.components.stc import (AUDIO_PREFIX, VISION_PREFIX, AudioProjector, RegStage, STCConnector,
                                    stc_token_count)

ENC, HID = 16, 24  # tiny encoder width / LLM width
LN_EPS = 1e-5  # timm LayerNormAct2d (what ConvNormAct builds from LayerNorm2d)
TOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# the independent functional reference
# ---------------------------------------------------------------------------------------------------------
def ref_norm(x, sd, key, act):
    """LayerNorm over channels of NCHW, then SiLU if act."""
    x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[key + ".weight"], sd[key + ".bias"], LN_EPS)
    x = x.permute(0, 3, 1, 2)
    return F.silu(x) if act else x


def ref_block(x, sd, p):
    c = sd[p + "conv1.conv.weight"].shape[0]
    y = ref_norm(F.conv2d(x, sd[p + "conv1.conv.weight"]), sd, p + "conv1.bn", True)
    y = ref_norm(F.conv2d(y, sd[p + "conv2.conv.weight"], padding=1, groups=c), sd, p + "conv2.bn", True)
    s = y.mean(dim=(2, 3), keepdim=True)
    s = F.silu(F.conv2d(s, sd[p + "se.fc1.weight"], sd[p + "se.fc1.bias"]))
    y = y * torch.sigmoid(F.conv2d(s, sd[p + "se.fc2.weight"], sd[p + "se.fc2.bias"]))
    y = ref_norm(F.conv2d(y, sd[p + "conv3.conv.weight"]), sd, p + "conv3.bn", False)
    if p + "downsample.conv.weight" in sd:
        shortcut = ref_norm(F.conv2d(x, sd[p + "downsample.conv.weight"]), sd, p + "downsample.bn", False)
    else:
        shortcut = x
    return F.silu(y + shortcut)


def ref_stage(x, sd, p):
    i = 1
    while f"{p}b{i}.conv1.conv.weight" in sd:
        x = ref_block(x, sd, f"{p}b{i}.")
        i += 1
    return x


def ref_stc(x, sd, padding):
    """x [b, t, h*w, d] -> [b, (t' h' w'), out]: s1 per frame, Conv3d(k=s=2)+SiLU, s2 per frame, MLP."""
    b, t, n, d = x.shape
    h = math.isqrt(n)
    x = x.reshape(b * t, h, h, d).permute(0, 3, 1, 2)  # (b t) d h w
    x = ref_stage(x, sd, "s1.")
    c = x.shape[1]
    x = x.reshape(b, t, c, h, h).permute(0, 2, 1, 3, 4)  # b d t h w
    x = F.silu(F.conv3d(x, sd["sampler.0.weight"], sd["sampler.0.bias"], stride=2, padding=padding))
    t2, h2, w2 = x.shape[2:]
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t2, c, h2, w2)
    x = ref_stage(x, sd, "s2.")
    x = x.reshape(b, t2, c, h2, w2).permute(0, 1, 3, 4, 2).reshape(b, t2 * h2 * w2, c)  # b (t h w) d
    x = F.gelu(F.linear(x, sd["readout.0.weight"], sd["readout.0.bias"]))
    return F.linear(x, sd["readout.2.weight"], sd["readout.2.bias"])


def random_state(module, seed=0):
    """Every tensor random (norm gains near 1), so no parameter can hide behind its default init."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        sd[k] = 1 + 0.2 * r if k.endswith("bn.weight") else 0.3 * r
    return sd


def make(padding=0, depth=4, seed=0):
    m = STCConnector(ENC, HID, depth=depth, padding=padding).eval()
    sd = random_state(m, seed)
    m.load_state_dict(sd, strict=True)
    return m, sd


# ---------------------------------------------------------------------------------------------------------
# forward vs. reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [0, 1], ids=["v35", "plain"])
@pytest.mark.parametrize("frames,side", [(4, 4), (5, 4), (4, 5), (2, 3)])
def test_forward_matches_functional_reference(padding, frames, side):
    m, sd = make(padding)
    x = torch.randn(2, frames, side * side, ENC, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = m(x), ref_stc(x, sd, padding)
    assert out.shape == ref.shape == (2, stc_token_count(frames, side, side, padding=padding), HID)
    err = (out - ref).abs().max().item()
    assert err <= TOL, err


def test_v35_odd_frame_count_drops_the_last_frame():
    """padding=0, stride 2: a 5th frame never reaches the sampler's output (s1 is per-frame)."""
    m, _ = make(0)
    x = torch.randn(1, 5, 16, ENC)
    with torch.no_grad():
        assert torch.allclose(m(x), m(x[:, :4]), atol=1e-6, rtol=0)
        changed = x.clone()
        changed[:, 4] += 1.0
        assert torch.equal(m(changed), m(x))


def test_plain_connector_zero_pads_every_side():
    m, _ = make(1)
    with torch.no_grad():
        assert m(torch.randn(1, 5, 16, ENC)).shape == (1, 3 * 3 * 3, HID)


def test_five_dim_input_equals_flattened_input():
    m, _ = make(0)
    x = torch.randn(2, 4, 4, 4, ENC)
    with torch.no_grad():
        assert torch.equal(m(x), m(x.flatten(2, 3)))
        assert m(torch.randn(1, 4, 6, 4, ENC)).shape == (1, 2 * 3 * 2, HID)  # non-square grids via 5-D


def test_rejects_non_square_token_counts_and_bad_ranks():
    m, _ = make(0, depth=1)
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 4, 15, ENC))
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(4, 16, ENC))


# ---------------------------------------------------------------------------------------------------------
# token counts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("frames,h,w", [(2, 2, 2), (3, 3, 3), (4, 4, 4), (5, 5, 3), (6, 7, 4), (8, 5, 6)])
def test_token_count_equals_output_length(padding, frames, h, w):
    m = STCConnector(ENC, HID, depth=1, padding=padding).eval()
    with torch.no_grad():
        n = m(torch.randn(1, frames, h, w, ENC)).shape[1]
    assert n == stc_token_count(frames, h, w, padding=padding) == m.n_tokens(frames, h, w)


def test_published_16_frame_token_count():
    # VideoLLaMA2.1(-AV): num_frames 16, SigLIP-so400m-patch14-384 -> 27x27 = 729 patches per frame
    assert 27 * 27 == 729 and stc_token_count(16, 27, 27) == 8 * 13 * 13 == 1352
    assert STCConnector.from_config(SimpleNamespace(mm_projector_type="stc_connector_v35", mm_hidden_size=ENC,
                                                    hidden_size=HID)).n_tokens(16, 27) == 1352
    assert stc_token_count(16, 27, 27, padding=1) == 9 * 14 * 14 == 1764  # the plain stc_connector
    assert stc_token_count(8, 27, 27) == 676
    with pytest.raises(ValueError, match="frames"):
        stc_token_count(1, 27, 27)  # v35 needs >= 2 frames (published: images are repeated to num_frames)


# ---------------------------------------------------------------------------------------------------------
# published parameter names
# ---------------------------------------------------------------------------------------------------------
# Key names of a VideoLLaMA2.1-7B-AV / -16F checkpoint's vision connector (Videollama2Qwen2ForCausalLM.model
# .mm_projector = STCConnectorV35: timm RegStage s1/s2 of 4 Bottlenecks, sampler Conv3d, readout MLP).
# Derived from DAMO-NLP-SG/VideoLLaMA2@8cedfbd videollama2/model/projector.py + timm v1.0.3 module paths; the
# published model.safetensors.index.json could not be read offline. Shapes are for mm_hidden_size 1152 ->
# hidden_size 3584; their total, 376,889,248 parameters, is the 754 MB bf16 mm_projector.bin of
# huggingface.co/DAMO-NLP-SG/VideoLLaMA2.1-7B-16F-Base.
PUBLISHED_S1_B1 = {
    "model.mm_projector.s1.b1.conv1.conv.weight": (3584, 1152, 1, 1),
    "model.mm_projector.s1.b1.conv1.bn.weight": (3584,),
    "model.mm_projector.s1.b1.conv1.bn.bias": (3584,),
    "model.mm_projector.s1.b1.conv2.conv.weight": (3584, 1, 3, 3),
    "model.mm_projector.s1.b1.conv2.bn.weight": (3584,),
    "model.mm_projector.s1.b1.conv2.bn.bias": (3584,),
    "model.mm_projector.s1.b1.se.fc1.weight": (288, 3584, 1, 1),
    "model.mm_projector.s1.b1.se.fc1.bias": (288,),
    "model.mm_projector.s1.b1.se.fc2.weight": (3584, 288, 1, 1),
    "model.mm_projector.s1.b1.se.fc2.bias": (3584,),
    "model.mm_projector.s1.b1.conv3.conv.weight": (3584, 3584, 1, 1),
    "model.mm_projector.s1.b1.conv3.bn.weight": (3584,),
    "model.mm_projector.s1.b1.conv3.bn.bias": (3584,),
    "model.mm_projector.s1.b1.downsample.conv.weight": (3584, 1152, 1, 1),
    "model.mm_projector.s1.b1.downsample.bn.weight": (3584,),
    "model.mm_projector.s1.b1.downsample.bn.bias": (3584,),
}
PUBLISHED_BLOCK = {  # every later block (s1.b2-b4, s2.b1-b4): width 3584 in and out, SE width 896
    "conv1.conv.weight": (3584, 3584, 1, 1), "conv1.bn.weight": (3584,), "conv1.bn.bias": (3584,),
    "conv2.conv.weight": (3584, 1, 3, 3), "conv2.bn.weight": (3584,), "conv2.bn.bias": (3584,),
    "se.fc1.weight": (896, 3584, 1, 1), "se.fc1.bias": (896,),
    "se.fc2.weight": (3584, 896, 1, 1), "se.fc2.bias": (3584,),
    "conv3.conv.weight": (3584, 3584, 1, 1), "conv3.bn.weight": (3584,), "conv3.bn.bias": (3584,),
}
PUBLISHED_REST = {
    "model.mm_projector.sampler.0.weight": (3584, 3584, 2, 2, 2),
    "model.mm_projector.sampler.0.bias": (3584,),
    "model.mm_projector.readout.0.weight": (3584, 3584),
    "model.mm_projector.readout.0.bias": (3584,),
    "model.mm_projector.readout.2.weight": (3584, 3584),
    "model.mm_projector.readout.2.bias": (3584,),
}
# mm_projector_a (mm_projector_a_type mlp2x_gelu, mm_hidden_size_a 768 -> hidden_size_a 3584): 15,604,736
# parameters = the 31.2 MB bf16 mm_projector_a.bin of huggingface.co/DAMO-NLP-SG/VideoLLaMA2.1-7B-AV
PUBLISHED_AUDIO = {
    "model.mm_projector_a.0.weight": (3584, 768),
    "model.mm_projector_a.0.bias": (3584,),
    "model.mm_projector_a.2.weight": (3584, 3584),
    "model.mm_projector_a.2.bias": (3584,),
}


def published_vision_keys():
    keys = dict(PUBLISHED_S1_B1)
    for stage, first in (("s1", 2), ("s2", 1)):
        for i in range(first, 5):
            keys.update({f"model.mm_projector.{stage}.b{i}.{k}": v for k, v in PUBLISHED_BLOCK.items()})
    keys.update(PUBLISHED_REST)
    return keys


def test_parameter_names_and_shapes_equal_the_published_checkpoint():
    with torch.device("meta"):
        stc = STCConnector.from_config(SimpleNamespace(mm_projector_type="stc_connector_v35", mm_hidden_size=1152,
                                                       hidden_size=3584))
        audio = AudioProjector.from_config(SimpleNamespace(mm_projector_a_type="mlp2x_gelu", mm_hidden_size_a=768,
                                                           hidden_size_a=3584))
    ours = {VISION_PREFIX + k: tuple(p.shape) for k, p in stc.named_parameters()}
    assert ours == published_vision_keys() and len(ours) == 113
    assert {k: tuple(v.shape) for k, v in stc.state_dict().items()} == {k[len(VISION_PREFIX):]: v
                                                                        for k, v in ours.items()}  # no buffers
    assert sum(p.numel() for p in stc.parameters()) == 376_889_248
    ours_a = {AUDIO_PREFIX + k: tuple(p.shape) for k, p in audio.named_parameters()}
    assert ours_a == PUBLISHED_AUDIO and sum(p.numel() for p in audio.parameters()) == 15_604_736


def test_strict_load_of_a_state_dict_keyed_as_published():
    m = STCConnector(ENC, HID)
    g = torch.Generator().manual_seed(3)
    checkpoint = {VISION_PREFIX + k: torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    checkpoint["model.layers.0.mlp.up_proj.weight"] = torch.zeros(1)  # other checkpoint tensors are ignored
    mine = {k[len(VISION_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(VISION_PREFIX)}
    assert "s1.b1.downsample.conv.weight" in mine and "s2.b1.downsample.conv.weight" not in mine
    m.load_state_dict(mine, strict=True)
    assert torch.equal(m.s1.b1.conv2.conv.weight, checkpoint["model.mm_projector.s1.b1.conv2.conv.weight"])
    with pytest.raises(RuntimeError):
        m.load_state_dict({**mine, "s1.b1.downsample.bn.running_mean": torch.zeros(HID)}, strict=True)


# ---------------------------------------------------------------------------------------------------------
# audio projector
# ---------------------------------------------------------------------------------------------------------
def test_audio_projector_mlp2x_gelu_matches_reference():
    a = AudioProjector(ENC, HID, "mlp2x_gelu")
    assert [k for k, _ in a.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    sd = random_state(a, 4)
    a.load_state_dict(sd, strict=True)
    x = torch.randn(2, 7, ENC)
    with torch.no_grad():
        ref = F.linear(F.gelu(F.linear(x, sd["0.weight"], sd["0.bias"])), sd["2.weight"], sd["2.bias"])
        assert (a(x) - ref).abs().max().item() <= TOL


def test_audio_projector_other_published_types():
    lin = AudioProjector(ENC, HID, "linear")
    assert [k for k, _ in lin.named_parameters()] == ["weight", "bias"]  # a bare nn.Linear when published
    x = torch.randn(1, 3, ENC)
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=TOL, rtol=0)
    assert AudioProjector.from_config(SimpleNamespace(mm_hidden_size_a=ENC, hidden_size_a=HID)).projector_type \
        == "linear"  # the published default of mm_projector_a_type
    assert len(list(AudioProjector(ENC, HID, "mlp3x_gelu").parameters())) == 6
    assert torch.equal(AudioProjector(ENC, ENC, "identity")(x), x)
    with pytest.raises(ValueError):
        AudioProjector(ENC, HID, "qformer")


# ---------------------------------------------------------------------------------------------------------
# config, hooks, and (when installed) timm itself
# ---------------------------------------------------------------------------------------------------------
def test_from_config_picks_the_sampler_padding():
    cfg = dict(mm_hidden_size=ENC, hidden_size=HID)
    assert STCConnector.from_config(SimpleNamespace(mm_projector_type="stc_connector_v35", **cfg)).padding == (0,) * 3
    assert STCConnector.from_config(SimpleNamespace(mm_projector_type="stc_connector", **cfg)).padding == (1,) * 3
    with pytest.raises(ValueError, match="not an STC"):
        STCConnector.from_config(SimpleNamespace(mm_projector_type="mlp2x_gelu", **cfg))


def test_hook_points_see_the_documented_shapes_and_can_edit():
    m, _ = make(0, depth=2)
    x = torch.randn(2, 4, 16, ENC)
    seen = {}
    names = ["hook_s1_out", "hook_sampler_out", "hook_s2_out", "hook_out", "s1.b2.hook_out"]
    for name in names:
        m.get_submodule(name).add_hook(lambda t, hook, name=name: seen.__setitem__(name, tuple(t.shape)))
    with torch.no_grad():
        clean = m(x)
    assert seen == {"hook_s1_out": (2, HID, 4, 4, 4), "hook_sampler_out": (2, HID, 2, 2, 2),
                    "hook_s2_out": (2, 8, HID), "hook_out": (2, 8, HID), "s1.b2.hook_out": (8, HID, 4, 4)}
    for name in names:
        m.get_submodule(name).remove_hooks()
    m.hook_sampler_out.add_hook(lambda t, hook: torch.zeros_like(t))
    with torch.no_grad():
        ablated = m(x)
    m.hook_sampler_out.remove_hooks()
    assert not torch.allclose(clean, ablated)
    assert torch.allclose(ablated[0], ablated[1])  # nothing of the input survives a zeroed sampler


@pytest.mark.parametrize("in_chs,out_chs", [(ENC, HID), (HID, HID), (10, 12)])
def test_regstage_equals_timm_regstage(in_chs, out_chs):
    """timm (a dependency for Gemma-3n, not of this module) built as the published code builds it."""
    timm_regnet = pytest.importorskip("timm.models.regnet")
    timm_layers = pytest.importorskip("timm.layers")
    ref = timm_regnet.RegStage(depth=2, in_chs=in_chs, out_chs=out_chs, stride=1, dilation=1, act_layer=nn.SiLU,
                               norm_layer=timm_layers.LayerNorm2d).eval()
    ours = RegStage(2, in_chs, out_chs).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    sd = random_state(ref, 5)  # (10 -> 12: SE width round(2.5) == 2, Python's rounding, as in timm)
    ref.load_state_dict(sd, strict=True)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(3, in_chs, 5, 4)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL
