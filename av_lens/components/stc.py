"""VideoLLaMA2's STC connector (spatial-temporal convolution projector) and its audio projector.

The idea
--------
VideoLLaMA2 encodes each video frame separately with an image encoder (VideoLLaMA2.1: SigLIP-so400m-384,
1152 channels, 27x27 = 729 patch tokens per frame), so a 16-frame clip arrives as 16 x 729 tokens. The STC
connector shrinks that token count 8x before the LLM sees it, and mixes information across space and time
on the way:

1. ``s1`` — a RegNet stage (``depth`` bottleneck blocks) runs on every frame on its own, as a 2-D
   feature map [channels, h, w]; it also maps encoder channels to the LLM width;
2. ``sampler`` — one ``Conv3d`` with kernel = stride = ``downsample`` = (2, 2, 2) (frames, h, w) followed
   by SiLU: the spatial-temporal downsampling, each output token sees a 2x2x2 cube of the grid;
3. ``s2`` — a second RegNet stage on every downsampled frame;
4. ``readout`` — an MLP (Linear, GELU, Linear) at the LLM width; tokens leave in (frame, row, column) order.

Each RegNet bottleneck (timm's ``Bottleneck`` with its defaults, as the published code builds it) is
``act(conv3(se(conv2(conv1(x)))) + shortcut(x))`` with

* ``conv1``: 1x1 conv (no bias) -> LayerNorm over channels -> SiLU;
* ``conv2``: 3x3 *depthwise* conv (groups = channels, padding 1, no bias) -> LayerNorm -> SiLU
  (bottle_ratio 1 and group_size 1 are timm's defaults);
* ``se``: squeeze-excitation, ``x * sigmoid(fc2(silu(fc1(mean_hw(x)))))``, 1x1 convs with bias, reduced
  width ``round(block_in_channels * 0.25)``;
* ``conv3``: 1x1 conv (no bias) -> LayerNorm, no activation;
* ``shortcut`` (``downsample``): identity, or 1x1 conv + LayerNorm when the block changes width (only
  ``s1.b1``); then SiLU after the sum (``act3``).

The norm is timm's ``LayerNormAct2d`` (``ConvNormAct`` turns the ``LayerNorm2d`` the published code passes
into it), whose eps is **1e-5**, not ``LayerNorm2d``'s own 1e-6.

Variants (``mm_projector_type``): ``stc_connector_v35`` (VideoLLaMA2.1, incl. -7B-AV) uses ``padding=0`` in
the Conv3d: odd frame counts or odd grids are floored, i.e. the last frame / row / column takes part only
through ``s1`` (for 27x27 the grid becomes 13x13; a 5th frame is dropped). ``stc_connector`` (VideoLLaMA2
v1/v2) uses ``padding=1`` (zero padding on every side). Tokens out, per video:
``prod((n + 2*padding - k) // k + 1 for n, k in zip((frames, h, w), downsample))`` — see
:func:`stc_token_count`; for VideoLLaMA2.1 (16 frames of 27x27): 8 * 13 * 13 = **1352** (v35); the plain
connector would give 9 * 14 * 14 = 1764. Images are repeated to ``num_frames`` frames by the published code
before the connector, so an image also costs 1352 tokens.

``AudioProjector`` is ``build_audio_projector``: ``mm_projector_a_type`` ``"mlp{N}x_gelu"`` ->
``Sequential(Linear(a_in, a_out), [GELU, Linear(a_out, a_out)] * (N-1))`` (keys ``0.*``, ``2.*``),
``"linear"`` -> a bare ``Linear`` (keys ``weight``/``bias``), ``"identity"``. It maps BEATs features
[batch, audio_tokens, 768] to the LLM width; its output tokens follow the video tokens of the same sample.

Parameter names equal the published ones (timm's ``RegStage``: ``s1.b1.conv1.conv.weight``,
``s1.b1.conv1.bn.weight``, ``s1.b1.se.fc1.weight``, ``s1.b1.downsample.conv.weight``, ...;
``sampler.0.*``, ``readout.0.*``, ``readout.2.*``), so a checkpoint's ``model.mm_projector.*`` /
``model.mm_projector_a.*`` tensors load with ``strict=True`` once the prefix is stripped
(:data:`VISION_PREFIX`, :data:`AUDIO_PREFIX`). timm itself is not used here.

Sources (facts read, code written independently)
-----------------------------------------------
* DAMO-NLP-SG/VideoLLaMA2@8cedfbda23e779246112cb963416b95415448a91 (branch ``audio_visual``):
  ``videollama2/model/projector.py`` — ``STCConnector`` (RegStage(depth=4, stride=1, dilation=1,
  act_layer=nn.SiLU, norm_layer=LayerNorm2d), Conv3d(kernel=stride=(2,2,2), padding=1) + SiLU, RegStage,
  ``build_mlp(2, ...)``; the einops reshapes ``b t (h w) d -> (b t) d h w`` with ``h = w = int(sqrt(l))``,
  ``(b t) d h w -> b (t h w) d``), ``STCConnectorV35`` (same, Conv3d ``padding=0``),
  ``build_audio_projector`` (``mm_projector_a_type``, ``mm_hidden_size_a`` -> ``hidden_size_a``);
  ``videollama2/model/videollama2_arch.py`` — ``mm_projector`` / ``mm_projector_a`` attribute names,
  frames [b, t, n, h] from the tower go to the connector unchanged (``"tc_connector" in type``), images
  expanded to ``num_frames``, audio features appended after video features;
  ``videollama2/model/encoder.py`` — SigLIP tower: ``hidden_states[mm_vision_select_layer]``, all tokens
  kept (``patch``); ``scripts/custom/va_joint.sh`` (the AV stage): ``--vision_tower
  google/siglip-so400m-patch14-384 --mm_projector_type stc_connector_v35 --mm_projector_a_type mlp2x_gelu
  --mm_vision_select_layer -2 --num_frames 16``; ``pyproject.toml`` pins ``timm==1.0.3``.
  The ``main`` branch (c0bb03abf6b8a6b9a8dccac006fb4db5d4d9e414) has the same STC classes.
* huggingface/pytorch-image-models@cb0e4391beedcc5ac3ae4bce16561b95c326f32c (tag v1.0.3, the published pin;
  unchanged in 1.0.31): ``timm/models/regnet.py`` (``RegStage``: blocks ``b1..bN``; ``Bottleneck``
  defaults bottle_ratio=1, group_size=1, se_ratio=0.25, downsample='conv1x1', linear_out=False;
  ``create_shortcut``/``downsample_conv``), ``timm/layers/conv_bn_act.py`` (``ConvNormAct``: ``conv``
  bias=False, ``bn`` = norm+act), ``timm/layers/create_norm_act.py`` (LayerNorm2d -> LayerNormAct2d),
  ``timm/layers/norm_act.py`` (``LayerNormAct2d`` eps=1e-5), ``timm/layers/squeeze_excite.py``
  (``SEModule``: fc1, bn=Identity, act, fc2, sigmoid gate), ``timm/layers/padding.py`` (symmetric padding
  ``(k-1)//2``).
* https://huggingface.co/DAMO-NLP-SG/VideoLLaMA2.1-7B-AV (commit acd16250a26a78de5198704ec969b472705634e5,
  "add VideoLLaMA2.1-AV model"): ``_name_or_path`` DAMO-NLP-SG/VideoLLaMA2.1-7B-16F,
  ``Videollama2Qwen2ForCausalLM``; files ``mm_projector_a.bin`` (31.2 MB — bf16 of 15,604,736 parameters =
  mlp2x_gelu 768->3584->3584, a bare Linear would be 5.5 MB), ``audio_tower.bin``, 4 safetensors shards.
  https://huggingface.co/DAMO-NLP-SG/VideoLLaMA2.1-7B-16F-Base/blob/main/mm_projector.bin (the AV model's
  base; bf16): 754 MB = 2 bytes x 376,889,248, the parameter count of ``STCConnector(1152, 3584)`` here.
  The full config.json and model.safetensors.index.json could NOT be read from here (no network; only page
  excerpts are indexed): the projector values (mm_hidden_size 1152, hidden_size 3584, num_frames 16,
  mm_hidden_size_a 768, hidden_size_a 3584) come from va_joint.sh, SigLIP/Qwen2-7B sizes and a derived
  checkpoint's config (QuangTuan/MultiMood-7B-GRPO-VisualAudioText-Comp); checkpoint key names are derived
  from the code above (module attribute paths), not read from the published index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

__all__ = ["STCConnector", "AudioProjector", "RegStage", "Bottleneck", "stc_token_count", "VISION_PREFIX",
           "AUDIO_PREFIX", "STC_PADDING"]

#: where the connectors live in a published VideoLLaMA2 checkpoint (``Videollama2Qwen2ForCausalLM.model``)
VISION_PREFIX = "model.mm_projector."
AUDIO_PREFIX = "model.mm_projector_a."

#: Conv3d padding of the sampler per ``mm_projector_type`` (the two Conv3d-sampler variants)
STC_PADDING = {"stc_connector_v35": 0, "stc_connector": 1}

#: timm's LayerNormAct2d default eps (what RegStage's ConvNormAct builds from LayerNorm2d)
LN_EPS = 1e-5


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints (frames, h, w), got {v!r}")
    return t  # type: ignore[return-value]


def stc_token_count(frames: int, h: int, w: int | None = None, downsample: int | Sequence[int] = (2, 2, 2),
                    padding: int | Sequence[int] = 0) -> int:
    """Tokens the STC connector emits for one video of ``frames`` frames of ``h`` x ``w`` patches.

    The sampler is a Conv3d with kernel = stride = ``downsample``: each of (frames, h, w) becomes
    ``(n + 2*padding - k) // k + 1`` (floor: a remainder is dropped). ``padding`` 0 is
    ``stc_connector_v35`` (VideoLLaMA2.1: ``stc_token_count(16, 27, 27) == 1352``), 1 is ``stc_connector``.
    """
    w = h if w is None else w
    out = 1
    for name, n, k, p in zip(("frames", "h", "w"), (frames, h, w), _triple(downsample), _triple(padding)):
        if n + 2 * p < k:
            raise ValueError(f"STC connector needs {name} + 2*padding >= kernel {k}, got {name}={n}, padding={p}")
        out *= (n + 2 * p - k) // k + 1
    return out


class LayerNormAct2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map at every (h, w), then SiLU (or nothing): timm's
    ``LayerNormAct2d`` as ``ConvNormAct`` builds it from ``LayerNorm2d`` (eps 1e-5; params weight, bias)."""

    def __init__(self, channels: int, apply_act: bool = True, eps: float = LN_EPS):
        super().__init__(channels, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n c h w"]:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """Conv2d (stride 1, symmetric padding (k-1)//2, no bias) -> LayerNormAct2d; names ``conv``, ``bn``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, groups: int = 1, apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=(kernel_size - 1) // 2, groups=groups,
                              bias=False)
        self.bn = LayerNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h w"]:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(fc2(silu(fc1(mean_hw(x)))))``; names ``fc1``, ``fc2`` (1x1, bias)."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n c h w"]:
        s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(s)


class Bottleneck(nn.Module):
    """One RegNet bottleneck block with timm's defaults (bottle_ratio 1, group_size 1 -> depthwise 3x3,
    se_ratio 0.25 of the *block input* width, conv1x1 shortcut when the width changes), SiLU, LayerNorm.
    Stride and dilation are 1, as in the published connector.

    Hook point: ``hook_out`` [n, out_chs, h, w] — the block's output (after the residual sum and SiLU).
    """

    def __init__(self, in_chs: int, out_chs: int, bottle_ratio: float = 1.0, group_size: int = 1,
                 se_ratio: float = 0.25):
        super().__init__()
        mid = int(round(out_chs * bottle_ratio))
        self.conv1 = ConvNormAct(in_chs, mid, 1)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=mid // group_size)
        self.se = SEModule(mid, int(round(in_chs * se_ratio))) if se_ratio else nn.Identity()
        self.conv3 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.act3 = nn.SiLU()
        self.downsample = ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else nn.Identity()
        self.hook_out = HookPoint()  # [n, out_chs, h, w]

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h w"]:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.hook_out(self.act3(y + self.downsample(x)))


class RegStage(nn.Module):
    """``depth`` bottlenecks ``b1..b{depth}``; the first maps ``in_chs`` -> ``out_chs``, the rest keep
    ``out_chs`` (timm's ``RegStage`` with stride 1, dilation 1, ``act_layer=SiLU``, ``norm_layer=LayerNorm2d``)."""

    def __init__(self, depth: int, in_chs: int, out_chs: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"RegStage needs depth >= 1, got {depth}")
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h w"]:
        for block in self.children():
            x = block(x)
        return x


def _gelu_mlp(depth: int, in_size: int, out_size: int) -> list[nn.Module]:
    """The published ``build_mlp`` / ``mlp{N}x_gelu`` layer list: Linear, then (GELU, Linear) * (depth-1)."""
    if depth < 1:
        raise ValueError(f"MLP depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_size, out_size)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(out_size, out_size)]
    return layers


class STCConnector(nn.Module):
    """VideoLLaMA2's spatial-temporal convolution connector: RegStage -> Conv3d + SiLU -> RegStage -> MLP.

    ``padding=0`` is ``stc_connector_v35`` (VideoLLaMA2.1 / -AV), ``padding=1`` the plain ``stc_connector``.
    ``depth``/``mlp_depth``/``downsample`` are the published defaults (4, 2, (2, 2, 2)); they are not in the
    checkpoint config. ``depth=0`` replaces both stages by identities as the published code does (then the
    encoder width must equal ``hidden_size``).

    Hook points (all also reachable per block as ``s1.b{i}.hook_out``, ``s2.b{i}.hook_out``):

    * ``hook_s1_out`` [batch, hidden, frames, h, w] — after the first stage, the sampler's input;
    * ``hook_sampler_out`` [batch, hidden, frames', h', w'] — after the Conv3d + SiLU;
    * ``hook_s2_out`` [batch, n_tokens, hidden] — after the second stage, flattened (frame, row, column);
    * ``hook_out`` [batch, n_tokens, llm_hidden] — the connector's output (what replaces ``<video>``).
    """

    def __init__(self, encoder_hidden_size: int, hidden_size: int, output_hidden_size: int | None = None,
                 downsample: int | Sequence[int] = (2, 2, 2), depth: int = 4, mlp_depth: int = 2,
                 padding: int | Sequence[int] = 0):
        super().__init__()
        output_hidden_size = hidden_size if output_hidden_size is None else output_hidden_size
        if depth == 0 and encoder_hidden_size != hidden_size:
            raise ValueError("depth=0 (no RegNet stages) needs encoder_hidden_size == hidden_size")
        self.encoder_hidden_size, self.hidden_size = encoder_hidden_size, hidden_size
        self.output_hidden_size = output_hidden_size
        self.downsample, self.padding = _triple(downsample), _triple(padding)
        self.depth, self.mlp_depth = depth, mlp_depth
        self.s1 = RegStage(depth, encoder_hidden_size, hidden_size) if depth else nn.Identity()
        self.sampler = nn.Sequential(
            nn.Conv3d(hidden_size, hidden_size, kernel_size=self.downsample, stride=self.downsample,
                      padding=self.padding, bias=True),
            nn.SiLU(),
        )
        self.s2 = RegStage(depth, hidden_size, hidden_size) if depth else nn.Identity()
        self.readout = nn.Sequential(*_gelu_mlp(mlp_depth, hidden_size, output_hidden_size))
        self.hook_s1_out = HookPoint()  # [batch, hidden, frames, h, w]
        self.hook_sampler_out = HookPoint()  # [batch, hidden, frames', h', w']
        self.hook_s2_out = HookPoint()  # [batch, n_tokens, hidden]
        self.hook_out = HookPoint()  # [batch, n_tokens, llm_hidden]

    @classmethod
    def from_config(cls, config, **kwargs) -> STCConnector:
        """Build from a VideoLLaMA2 config (``mm_projector_type``, ``mm_hidden_size``, ``hidden_size``)."""
        kind = getattr(config, "mm_projector_type", None)
        if kind not in STC_PADDING:
            raise ValueError(f"not an STC (Conv3d) connector: mm_projector_type={kind!r}; "
                             f"supported: {sorted(STC_PADDING)}")
        return cls(config.mm_hidden_size, config.hidden_size, padding=STC_PADDING[kind], **kwargs)

    def n_tokens(self, frames: int, h: int, w: int | None = None) -> int:
        """Output tokens for one video of ``frames`` frames of ``h`` x ``w`` patches."""
        return stc_token_count(frames, h, w, self.downsample, self.padding)

    def forward(
        self, x: Float[Tensor, "batch frames tokens channels"] | Float[Tensor, "batch frames h w channels"]
    ) -> Float[Tensor, "batch n_tokens llm_hidden"]:
        """Frame features [batch, frames, h*w, channels] (square grid, row-major as the vision tower emits
        them) or [batch, frames, h, w, channels] -> [batch, n_tokens, llm_hidden]."""
        if x.ndim == 4:
            side = math.isqrt(x.shape[2])
            if side * side != x.shape[2]:
                raise ValueError(f"[batch, frames, tokens, channels] input needs a square token count, got "
                                 f"{x.shape[2]}; pass [batch, frames, h, w, channels] instead")
            x = einops.rearrange(x, "b t (h w) d -> b t h w d", h=side, w=side)
        elif x.ndim != 5:
            raise ValueError(f"expected [batch, frames, tokens, channels] or [batch, frames, h, w, channels], "
                             f"got shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        x = einops.rearrange(x, "b t h w d -> (b t) d h w")
        x = self.s1(x)
        x = self.hook_s1_out(einops.rearrange(x, "(b t) d h w -> b d t h w", b=b, t=t))
        x = self.hook_sampler_out(self.sampler(x))
        t_out = x.shape[2]
        x = self.s2(einops.rearrange(x, "b d t h w -> (b t) d h w"))
        x = self.hook_s2_out(einops.rearrange(x, "(b t) d h w -> b (t h w) d", b=b, t=t_out))
        return self.hook_out(self.readout(x))


class AudioProjector(nn.Module):
    """VideoLLaMA2-AV's audio projector ``mm_projector_a`` (``build_audio_projector``): BEATs features
    [batch, audio_tokens, a_in] -> [batch, audio_tokens, a_out].

    ``projector_type`` ``"mlp{N}x_gelu"`` (VideoLLaMA2.1-7B-AV: ``mlp2x_gelu``, 768 -> 3584 -> 3584) gives
    submodules ``0`` (Linear), ``1`` (GELU), ``2`` (Linear), ...; ``"linear"`` gives the parameters ``weight``,
    ``bias`` directly (a bare ``nn.Linear`` in the published code); ``"identity"`` none.

    Hook points: ``hook_in`` [batch, audio_tokens, a_in], ``hook_out`` [batch, audio_tokens, a_out].
    """

    def __init__(self, in_size: int = 768, out_size: int = 3584, projector_type: str = "mlp2x_gelu"):
        super().__init__()
        self.projector_type = projector_type
        self._layer_names: list[str] = []
        match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
        if match:
            for i, layer in enumerate(_gelu_mlp(int(match.group(1)), in_size, out_size)):
                self.add_module(str(i), layer)
                self._layer_names.append(str(i))
        elif projector_type == "linear":
            lin = nn.Linear(in_size, out_size)
            self.weight, self.bias = lin.weight, lin.bias
        elif projector_type != "identity":
            raise ValueError(f"unknown mm_projector_a_type {projector_type!r} "
                             "(expected 'mlp{N}x_gelu', 'linear' or 'identity')")
        self.hook_in = HookPoint()  # [batch, audio_tokens, a_in]
        self.hook_out = HookPoint()  # [batch, audio_tokens, a_out]

    @classmethod
    def from_config(cls, config) -> AudioProjector:
        """Build from a VideoLLaMA2-AV config (``mm_projector_a_type`` default 'linear' as published,
        ``mm_hidden_size_a``, ``hidden_size_a``)."""
        return cls(config.mm_hidden_size_a, config.hidden_size_a, getattr(config, "mm_projector_a_type", "linear"))

    def forward(self, x: Float[Tensor, "batch audio_tokens a_in"]) -> Float[Tensor, "batch audio_tokens a_out"]:
        x = self.hook_in(x)
        if self.projector_type == "linear":
            x = F.linear(x, self.weight, self.bias)
        for name in self._layer_names:
            x = self._modules[name](x)
        return self.hook_out(x)
