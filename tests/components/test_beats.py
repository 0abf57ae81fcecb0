"""BEATs (VideoLLaMA2.1-7B-AV's audio tower) against an independent reference written here from the
published equations (VideoLLaMA2 audio_visual@8cedfbd: videollama2/model/beats/{BEATs,backbone,modules,
weight_norm_fix}.py), fed the same state dict; plus bucket values, the gate, the shared bias, published key
names and strict loading, and the torch-only Kaldi fbank against numpy."""

import math

import numpy as np
import pytest
import torch

from av_lens.components.beats import BEATsConfig, BEATsEncoder, beats_fbank, relative_position_bucket

TINY = dict(input_patch_size=4, embed_dim=24, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
            encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4, num_buckets=8, max_distance=12,
            predictor_class=5)
N_MELS = 16  # tiny mel axis: 4 mel patches


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    m = BEATsEncoder(BEATsConfig.from_dict({**TINY, **over})).eval()
    with torch.no_grad():  # every parameter random and O(1), so each one moves the output
        for name, p in m.named_parameters():
            if name.endswith("weight_g") or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("grep_a"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("relative_attention_bias.weight"):
                p.copy_(2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1] if p.dim() > 1 else 8))
    return m


def fbank_batch(batch=2, frames=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 15.4 + 6.5 * torch.randn(batch, frames, N_MELS, generator=g)


# ---------------------------------------------------------------- independent reference (published equations)

def ref_bucket(rel, num_buckets, max_distance):
    """backbone.py _relative_positions_bucket, one scalar at a time in float64."""
    half = num_buckets // 2
    out = half if rel > 0 else 0
    d, exact = abs(rel), half // 2
    if d < exact:
        return out + d
    return out + min(exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact)), half - 1)


def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_forward(sd, c: dict, fbank, frame_pad=None):
    """extract_features(fbank, padding_mask) from the state dict, without the module's code."""
    p, E, D, H = c["input_patch_size"], c["embed_dim"], c["encoder_embed_dim"], c["encoder_attention_heads"]
    L, K, G = c["encoder_layers"], c["conv_pos"], c["conv_pos_groups"]
    B, T, M = fbank.shape
    x = (fbank - 15.41663) / (2 * 6.55582)
    Tp, Fp = T // p, M // p
    patches = x[:, : Tp * p].reshape(B, Tp, p, Fp, p).permute(0, 1, 3, 2, 4)  # [B, Tp, Fp, p_t, p_f]
    x = torch.einsum("btfij,eij->btfe", patches, sd["patch_embedding.weight"][:, 0]).reshape(B, Tp * Fp, E)
    x = ln(x, sd["layer_norm.weight"], sd["layer_norm.bias"])
    x = x @ sd["post_extract_proj.weight"].T + sd["post_extract_proj.bias"]
    N = x.shape[1]
    tok_pad = None
    if frame_pad is not None:  # token n <- frames [n*k, (n+1)*k), k = T // N (published chunking)
        k = T // N
        tok_pad = torch.stack([frame_pad[:, n * k:(n + 1) * k].all(-1) for n in range(N)], 1)
        x = torch.where(tok_pad[..., None], torch.zeros_like(x), x)
    # conv positional embedding: weight norm over (out, in) per tap, grouped conv written as an explicit sum
    v, g = sd["encoder.pos_conv.0.weight_v"], sd["encoder.pos_conv.0.weight_g"]
    w = g * v / torch.sqrt((v ** 2).sum(dim=(0, 1), keepdim=True) + 1e-6)  # [D, D/G, K]
    xp = torch.nn.functional.pad(x, (0, 0, K // 2, K // 2))  # [B, N + 2*(K//2), D]
    cin = D // G
    conv = torch.zeros(B, N, D)
    for o in range(D):
        grp = o // (D // G)
        for j in range(K):  # output t uses inputs t + j (t < N: the extra last output is dropped)
            conv[:, :, o] += xp[:, j:j + N, grp * cin:(grp + 1) * cin] @ w[o, :, j]
    conv += sd["encoder.pos_conv.0.bias"]
    x = x + gelu(conv)
    x = ln(x, sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"])
    # relative position bias from layer 0's table, shared by all layers
    table = sd["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    buckets = torch.tensor([[ref_bucket(kp - qp, c["num_buckets"], c["max_distance"]) for kp in range(N)]
                            for qp in range(N)])
    bias = table[buckets].permute(2, 0, 1)  # [H, q, k]
    alpha = (2 * L) ** 0.25
    dh = D // H
    for i in range(L):
        pre = f"encoder.layers.{i}."

        def lin(h, name):
            return h @ sd[pre + name + ".weight"].T + sd[pre + name + ".bias"]

        q, k_, v_ = lin(x, "self_attn.q_proj"), lin(x, "self_attn.k_proj"), lin(x, "self_attn.v_proj")
        heads = []
        for h in range(H):
            qh, kh, vh = (t[..., h * dh:(h + 1) * dh] for t in (q, k_, v_))
            gl = qh @ sd[pre + "self_attn.grep_linear.weight"].T + sd[pre + "self_attn.grep_linear.bias"]  # [B, q, 8]
            a = torch.sigmoid(gl[..., :4].sum(-1, keepdim=True))
            b = torch.sigmoid(gl[..., 4:].sum(-1, keepdim=True))
            gate = a * (b * sd[pre + "self_attn.grep_a"][0, h] - 1) + 2  # [B, q, 1]
            s = qh @ kh.transpose(1, 2) / math.sqrt(dh)
            if tok_pad is not None:
                s = s.masked_fill(tok_pad[:, None, :], float("-inf"))
            s = s + gate * bias[h]
            heads.append(torch.softmax(s, -1) @ vh)
        attn = lin(torch.cat(heads, -1), "self_attn.out_proj")
        x = ln(alpha * x + attn, sd[pre + "self_attn_layer_norm.weight"], sd[pre + "self_attn_layer_norm.bias"])
        ffn = lin(gelu(lin(x, "fc1")), "fc2")
        x = ln(alpha * x + ffn, sd[pre + "final_layer_norm.weight"], sd[pre + "final_layer_norm.bias"])
    return x


def max_err(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- buckets

def test_bucket_hand_values_published_and_tiny():
    rel = torch.tensor([0, -5, 5, -79, -80, -200, 100, -799, -800, -5000, 1000])
    # published 320 / 800: half 160, exact < 80; 80 + floor(log10(d/80) * 80); positive side offset 160
    assert relative_position_bucket(rel, 320, 800).tolist() == [0, 5, 165, 79, 80, 111, 247, 159, 159, 159, 319]
    rel = torch.tensor([0, -1, 1, -2, -3, -5, -12, 5, 40])
    # 8 / 12: half 4, exact < 2: 2 + floor(log(d/2)/log(6) * 2), capped at 3
    assert relative_position_bucket(rel, 8, 12).tolist() == [0, 1, 5, 2, 2, 3, 3, 7, 7]


def test_bucket_equals_scalar_reference_over_all_distances():
    for nb, md in ((320, 800), (8, 12), (32, 128)):
        rel = torch.arange(-1500, 1501)
        got = relative_position_bucket(rel, nb, md).tolist()
        assert got == [ref_bucket(r, nb, md) for r in rel.tolist()], (nb, md)


# ---------------------------------------------------------------- forward vs reference

def test_forward_equals_reference():
    m = tiny_model()
    fb = fbank_batch()
    with torch.no_grad():
        out, T, Fq = m.extract_features(fb)
        ref = ref_forward(m.state_dict(), TINY, fb)
    assert (T, Fq) == (9, 4) and out.shape == (2, 36, 32) == ref.shape
    assert max_err(out, ref) <= 1e-5
    assert ref.abs().mean() > 0.1  # not a degenerate (all-zero) comparison


def test_padded_batch_equals_reference_and_unpadded_rows():
    m = tiny_model(seed=3)
    fb = fbank_batch(seed=4)
    pad = torch.zeros(2, 37, dtype=torch.bool)
    pad[1, 20:] = True  # second clip: last 17 frames are padding
    with torch.no_grad():
        out = m(fb, pad)
        ref = ref_forward(m.state_dict(), TINY, fb, frame_pad=pad)
        alone = m(fb[:1])
        unmasked = m(fb)
        as_videollama2 = m(fb, torch.zeros(fb.shape, dtype=torch.bool))  # arch passes zeros(fbank.shape)
    assert max_err(out, ref) <= 1e-5
    assert max_err(out[0], alone[0]) <= 1e-5  # an unpadded row is untouched by its neighbour's padding
    assert max_err(out[1], unmasked[1]) > 1e-2  # the mask does act on the padded row
    assert torch.equal(as_videollama2, unmasked)  # all-False mask == no mask


def test_padding_mask_chunking_is_the_published_one():
    pad = torch.zeros(1, 37, dtype=torch.bool)
    pad[0, 20:] = True
    tok = BEATsEncoder.token_padding_mask(pad, 36)  # 37 % 36 = 1 frame dropped, chunks of 1 frame
    assert tok[0].tolist() == [False] * 20 + [True] * 16
    tok = BEATsEncoder.token_padding_mask(pad, 12)  # 36 frames used, chunks of 3: token n padded iff 3n >= 20
    assert tok[0].tolist() == [n * 3 >= 20 for n in range(12)]


# ---------------------------------------------------------------- the gate and the shared bias

def test_gate_changes_the_output_and_still_matches_reference():
    m = tiny_model(seed=5)
    fb = fbank_batch(batch=1, seed=6)
    with torch.no_grad():
        base = m(fb)
        for layer in m.layers:
            layer.self_attn.grep_linear.weight.zero_()
            layer.self_attn.grep_linear.bias.zero_()
            layer.self_attn.grep_a.zero_()  # gate = 0.5 * (0.5 * 0 - 1) + 2 = 1.5 everywhere
        gated_const = m(fb)
        ref = ref_forward(m.state_dict(), TINY, fb)
        # constant gate 1.5 == ungated model with the table scaled by 1.5
        ng = BEATsEncoder(BEATsConfig.from_dict({**TINY, "gru_rel_pos": False})).eval()
        sd = {k: v for k, v in m.state_dict().items() if "grep_" not in k}
        sd = {k: (1.5 * v if "relative_attention_bias" in k else v) for k, v in sd.items()}
        ng.load_state_dict(sd, strict=True)
        ungated = ng(fb)
    assert max_err(gated_const, base) > 1e-2
    assert max_err(gated_const, ref) <= 1e-5
    assert max_err(gated_const, ungated) <= 1e-5


def test_bias_table_is_layer0s_computed_once_and_reused(monkeypatch):
    m = tiny_model()
    t0 = m.layers[0].self_attn.relative_attention_bias
    assert all(layer.self_attn.relative_attention_bias is t0 for layer in m.layers)
    calls = []
    cls = type(m.layers[0].self_attn)
    orig = cls.compute_bias
    monkeypatch.setattr(cls, "compute_bias", lambda self, q, k: calls.append(self) or orig(self, q, k))
    with torch.no_grad():
        m(fbank_batch())
    assert calls == [m.layers[0].self_attn]


# ---------------------------------------------------------------- published names, strict loading, sizes

# One layer's keys and the tower-level keys, as the published modules name them (backbone.py
# TransformerSentenceEncoderLayer / MultiheadAttention, BEATs.py BEATs, weight_norm_fix.py weight_g/weight_v);
# in audio_tower.bin and the LLM checkpoint each carries the prefix "model.audio_tower." (encoder.py).
LAYER0_KEYS = [
    "encoder.layers.0.self_attn.relative_attention_bias.weight",
    "encoder.layers.0.self_attn.k_proj.weight", "encoder.layers.0.self_attn.k_proj.bias",
    "encoder.layers.0.self_attn.v_proj.weight", "encoder.layers.0.self_attn.v_proj.bias",
    "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.bias",
    "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.self_attn.out_proj.bias",
    "encoder.layers.0.self_attn.grep_linear.weight", "encoder.layers.0.self_attn.grep_linear.bias",
    "encoder.layers.0.self_attn.grep_a",
    "encoder.layers.0.self_attn_layer_norm.weight", "encoder.layers.0.self_attn_layer_norm.bias",
    "encoder.layers.0.fc1.weight", "encoder.layers.0.fc1.bias",
    "encoder.layers.0.fc2.weight", "encoder.layers.0.fc2.bias",
    "encoder.layers.0.final_layer_norm.weight", "encoder.layers.0.final_layer_norm.bias",
]
TOP_KEYS = [
    "patch_embedding.weight", "layer_norm.weight", "layer_norm.bias",
    "post_extract_proj.weight", "post_extract_proj.bias",
    "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias",
    "encoder.layer_norm.weight", "encoder.layer_norm.bias",
    "predictor.weight", "predictor.bias",
]


def published_shapes(c: BEATsConfig):
    D, F_, H, dh = c.encoder_embed_dim, c.encoder_ffn_embed_dim, c.encoder_attention_heads, c.d_head
    layer = {"self_attn.relative_attention_bias.weight": (c.num_buckets, H),
             **{f"self_attn.{n}_proj.weight": (D, D) for n in "kvq"},
             **{f"self_attn.{n}_proj.bias": (D,) for n in "kvq"},
             "self_attn.out_proj.weight": (D, D), "self_attn.out_proj.bias": (D,),
             "self_attn.grep_linear.weight": (8, dh), "self_attn.grep_linear.bias": (8,),
             "self_attn.grep_a": (1, H, 1, 1),
             "self_attn_layer_norm.weight": (D,), "self_attn_layer_norm.bias": (D,),
             "fc1.weight": (F_, D), "fc1.bias": (F_,), "fc2.weight": (D, F_), "fc2.bias": (D,),
             "final_layer_norm.weight": (D,), "final_layer_norm.bias": (D,)}
    p = c.input_patch_size
    top = {"patch_embedding.weight": (c.embed_dim, 1, p, p), "layer_norm.weight": (c.embed_dim,),
           "layer_norm.bias": (c.embed_dim,), "post_extract_proj.weight": (D, c.embed_dim),
           "post_extract_proj.bias": (D,), "encoder.pos_conv.0.weight_g": (1, 1, c.conv_pos),
           "encoder.pos_conv.0.weight_v": (D, D // c.conv_pos_groups, c.conv_pos), "encoder.pos_conv.0.bias": (D,),
           "encoder.layer_norm.weight": (D,), "encoder.layer_norm.bias": (D,),
           "predictor.weight": (c.predictor_class, D), "predictor.bias": (c.predictor_class,)}
    return {**top, **{f"encoder.layers.{i}.{k}": s for i in range(c.encoder_layers) for k, s in layer.items()}}


def test_key_names_are_the_published_ones():
    with torch.device("meta"):
        m = BEATsEncoder()
    keys = list(m.state_dict())
    assert sorted(k for k in keys if k.startswith("encoder.layers.0.")) == sorted(LAYER0_KEYS)
    assert sorted(k for k in keys if not k.startswith("encoder.layers.")) == sorted(TOP_KEYS)
    shapes = published_shapes(m.cfg)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    assert len(m.layers) == 12 and m.layers is m.encoder.layers


def test_strict_load_of_a_published_keyed_state_dict():
    c = BEATsConfig.from_dict(TINY)
    g = torch.Generator().manual_seed(7)
    prefix = "model.audio_tower."  # as in audio_tower.bin (encoder.py strips it before load_state_dict)
    ckpt = {prefix + k: torch.randn(s, generator=g) for k, s in published_shapes(c).items()}
    table = ckpt[prefix + LAYER0_KEYS[0]]
    for i in range(1, c.encoder_layers):  # torch.save of the published model stores the shared table under every layer
        ckpt[prefix + f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    sd = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    m = BEATsEncoder(c)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.encoder.pos_conv[0].weight_v, sd["encoder.pos_conv.0.weight_v"])
    assert torch.equal(m.layers[1].self_attn.relative_attention_bias.weight, table)
    fb = fbank_batch()
    with torch.no_grad():
        want = m(fb)
        # a de-duplicated save (table under layer 0 only) and torch's parametrized weight-norm names also load strictly
        sd2 = {k: v for k, v in sd.items()
               if not (k.endswith("relative_attention_bias.weight") and ".layers.0." not in k)}
        sd2["encoder.pos_conv.0.parametrizations.weight.original0"] = sd2.pop("encoder.pos_conv.0.weight_g")
        sd2["encoder.pos_conv.0.parametrizations.weight.original1"] = sd2.pop("encoder.pos_conv.0.weight_v")
        m2 = BEATsEncoder(c)
        m2.load_state_dict(sd2, strict=True)
        assert torch.equal(m2(fb), want)
    with pytest.raises(RuntimeError):
        BEATsEncoder(c).load_state_dict({k: v for k, v in sd.items() if "grep_a" not in k}, strict=True)


def test_published_config_and_file_size():
    c = BEATsConfig()
    assert (c.input_patch_size, c.embed_dim, c.encoder_layers, c.encoder_embed_dim, c.encoder_ffn_embed_dim,
            c.encoder_attention_heads, c.num_buckets, c.max_distance, c.conv_pos, c.conv_pos_groups) == \
        (16, 512, 12, 768, 3072, 12, 320, 800, 128, 16)
    assert c.deep_norm and not c.layer_norm_first and c.gru_rel_pos and c.relative_position_embedding
    assert c.n_tokens(1 + (30 * 16000 - 400) // 160) == 1496  # VideoLLaMA2 pads/crops to 30 s: 2998 frames
    assert c.n_tokens(1 + (10 * 16000 - 400) // 160) == 496
    with torch.device("meta"):
        n = sum(p.numel() for p in BEATsEncoder().parameters())  # unique (the shared table once)
    # huggingface.co/DAMO-NLP-SG/VideoLLaMA2.1-7B-AV@acd1625 audio_tower.bin (bf16): LFS size 181514532 bytes
    assert n == 90_717_055
    assert 0 < 181_514_532 - 2 * n < 200_000  # only container overhead left over


def test_from_dict_overrides_and_keeps_unknown_keys():
    c = BEATsConfig.from_dict({"encoder_layers": 3, "num_buckets": 64, "some_new_flag": True})
    assert (c.encoder_layers, c.num_buckets, c.max_distance, c.extra) == (3, 64, 800, {"some_new_flag": True})
    assert BEATsConfig.from_dict(None) == BEATsConfig()


# ---------------------------------------------------------------- hooks

def test_layer_forward_hooks_see_and_edit_hidden_states():
    m = tiny_model()
    fb = fbank_batch()
    seen = []
    hs = [layer.register_forward_hook(lambda mod, a, out: seen.append(out[0].clone())) for layer in m.layers]
    with torch.no_grad():
        out = m(fb)
    for h in hs:
        h.remove()
    assert [s.shape for s in seen] == [(2, 36, 32)] * 2 and torch.equal(seen[-1], out)
    h = m.layers[0].register_forward_hook(lambda mod, a, o: (torch.zeros_like(o[0]),) + tuple(o[1:]))
    with torch.no_grad():
        edited = m(fb)
    h.remove()
    assert max_err(edited, out) > 1e-2


# ---------------------------------------------------------------- fbank

def np_kaldi_fbank(wav):
    """Kaldi fbank (torchaudio.compliance.kaldi defaults + VideoLLaMA2's args) in float64 numpy."""
    x = np.asarray(wav, np.float64) * 2 ** 15
    n = 1 + (len(x) - 400) // 160
    fr = np.stack([x[i * 160:i * 160 + 400] for i in range(n)])
    fr = fr - fr.mean(1, keepdims=True)
    fr = fr - 0.97 * np.concatenate([fr[:, :1], fr[:, :-1]], 1)
    fr = fr * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    spec = np.abs(np.fft.rfft(fr, n=512)) ** 2  # [n, 257]

    def mel(f):
        return 1127.0 * np.log(1 + f / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    d = (hi - lo) / 129
    fm = mel(np.arange(257) * 16000 / 512)
    banks = np.zeros((128, 257))
    for b in range(128):
        le, ce, ri = lo + b * d, lo + (b + 1) * d, lo + (b + 2) * d
        for j in range(256):  # the Nyquist bin carries no weight in Kaldi's banks
            banks[b, j] = max(0.0, min((fm[j] - le) / (ce - le), (ri - fm[j]) / (ri - ce)))
    return np.log(np.maximum(spec @ banks.T, np.finfo(np.float32).eps))


def test_fbank_matches_numpy_kaldi():
    rng = np.random.default_rng(0)
    t = np.arange(16000 + 123) / 16000
    wav = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    wav[4000:5600] = 0.0  # a silent stretch (floored log)
    want = np_kaldi_fbank(wav)
    got64 = beats_fbank(torch.from_numpy(wav))
    assert got64.shape == (1 + (len(wav) - 400) // 160, 128) == want.shape
    # mel filters are built in fp32 (as torchaudio does), so float64 agrees to ~fp32 resolution of the banks
    assert np.abs(got64.numpy() - want).max() < 2e-4  # measured 7.5e-5 (fp32 banks differ by up to 1.4e-5)
    got32 = beats_fbank(torch.from_numpy(wav).float()[None])  # [channels, samples]
    loud = want > 0
    assert np.abs(got32.numpy()[loud] - want[loud]).max() < 1e-3
    with pytest.raises(ValueError):
        beats_fbank(torch.from_numpy(wav), sample_rate=44100)


def test_bf16_run_keeps_dtype_and_tracks_fp32():
    """The published tower runs in bf16 (VideoLLaMA2 casts the fbank to bf16); the weight norm is taken in
    fp32 and the FFN GELU in fp32, then cast back, as in weight_norm_fix.py / modules.py."""
    m = tiny_model()
    fb = fbank_batch()
    with torch.no_grad():
        full = m(fb)
        half = m.to(torch.bfloat16)(fb.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    rel = (half.float() - full).norm() / full.norm()
    assert rel < 0.05, rel
