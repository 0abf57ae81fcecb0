"""video-SALMONN-2+ on a tiny random checkpoint written in the published layout.

transformers has no video-SALMONN-2+, so the reference is assembled in this file from what the published code
(bytedance/video-SALMONN-2 @61faec0, ``video_SALMONN2_plus/qwenvl/``) computes:

* the language model and vision tower: transformers' ``Qwen2_5_VLForConditionalGeneration`` loaded from the same
  folder, fed ``inputs_embeds`` and explicit ``position_ids``;
* the audio branch: transformers' ``WhisperEncoder`` loaded strictly from the published ``audio.*`` names, windows
  cut by reshaping, and the Q-Former written here in plain torch from the equations of the published
  ``modeling_bert.py`` (post-LayerNorm BERT layers: self-attention, cross-attention to the window, query FFN),
  reading the published key names directly;
* positions: a transcription of the published ``get_rope_index`` (its three branches) written here.

Then layouts against hand counts, the refusals, the published checkpoint's module shapes and names at full size
(from the published configuration class's defaults), and every analysis tool.
"""

import math

import numpy as np
import pytest
import torch

from av_lens.inputs import AVInput
import torch.nn.functional as F

from av_lens import HookedAVTransformer, InputError, LayoutError
from av_lens.adapters.video_salmonn2 import SalmonnAudioTower, key_map, sample_frames, split_into_groups
from av_lens.analysis import (attention_flow, knockout_hooks, logit_lens, patch_by_modality, path_patch,
                              token_shift)
from av_lens.layout import Modality
from av_lens.testing.tiny import build_tiny_hf_vl
from av_lens.testing.tiny_salmonn import AUDIO_PAD, TinySalmonnSpec, save_tiny_video_salmonn2

TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_video_salmonn2(tmp_path_factory.mktemp("tiny_salmonn") / "m")


@pytest.fixture(scope="module")
def sal(folder):
    return HookedAVTransformer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref(folder):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def published(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()
            if k.startswith("audio.")}


# --------------------------------------------------------------------------------------------- reference
def _grid(t, gh, gw, s):
    """A video grid's (time, height, width) offsets as the published code computes them (time in float32)."""
    tt = (torch.arange(t).view(-1, 1).expand(-1, gh * gw) * torch.tensor(s, dtype=torch.float32) * 2).long().flatten()
    hh = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten()
    ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten()
    return torch.stack([tt, hh, ww])


def ref_rope_index(ids, mask, *, vision_start, image, video, audio, image_grid=None, video_grid=None,
                   second_per_grid=None, audio_lengths=None, merge=2):
    """The published ``get_rope_index`` (video_SALMONN2_plus/qwenvl/model/modeling_qwen2_5_vl.py), transcribed."""
    pos = torch.ones(3, *ids.shape, dtype=torch.long)
    vi = ii = ai = 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()]
        toks = row.tolist()
        starts = torch.nonzero(row == vision_start).flatten()
        after = row[starts + 1]
        pieces, st = [], 0
        top = lambda: int(pieces[-1].max()) + 1 if pieces else 0
        if audio_lengths is not None and video_grid is not None:  # audio-visual branch
            for _ in range(int((after == video).sum())):
                ed = toks.index(video, st)
                t, h, w = (int(x) for x in video_grid[vi])
                s = float(second_per_grid[vi]) if second_per_grid is not None else 1.0
                gh, gw = h // merge, w // merge
                s0 = top()
                pieces.append(torch.arange(ed - st).expand(3, -1) + s0)
                vpos = _grid(t, gh, gw, s) + ed - st + s0
                n_a = int(audio_lengths[vi])
                k = torch.arange(n_a)
                apos = torch.stack([k, torch.zeros_like(k), k]) + ed - st + s0
                both = torch.zeros(3, vpos.shape[1] + n_a, dtype=torch.long)
                seg = row[ed:ed + vpos.shape[1] + n_a]
                both[:, seg == audio] = apos
                both[:, seg == video] = vpos
                pieces.append(both)
                st = ed + vpos.shape[1] + n_a
                vi += 1
            if st < len(toks):
                s0 = int(pieces[-1][0].max()) + 1 if pieces else 0
                pieces.append(torch.arange(len(toks) - st).expand(3, -1) + s0)
        elif image_grid is not None or video_grid is not None:  # vision branch
            n_img, n_vid = int((after == image).sum()), int((after == video).sum())
            for _ in range(n_img + n_vid):
                ed_i = toks.index(image, st) if image in toks[st:] and n_img else len(toks) + 1
                ed_v = toks.index(video, st) if video in toks[st:] and n_vid else len(toks) + 1
                if ed_i < ed_v:
                    (t, h, w), s, ed = (int(x) for x in image_grid[ii]), 0.0, ed_i
                    ii, n_img = ii + 1, n_img - 1
                else:
                    (t, h, w), ed = (int(x) for x in video_grid[vi]), ed_v
                    s = float(second_per_grid[vi]) if second_per_grid is not None else 1.0
                    vi, n_vid = vi + 1, n_vid - 1
                gh, gw = h // merge, w // merge
                s0 = top()
                pieces.append(torch.arange(ed - st).expand(3, -1) + s0)
                pieces.append(_grid(t, gh, gw, s) + ed - st + s0)
                st = ed + t * gh * gw
            if st < len(toks):
                pieces.append(torch.arange(len(toks) - st).expand(3, -1) + top())
        elif audio_lengths is not None:  # audio branch
            for _ in range(int((after == audio).sum())):
                ed = toks.index(audio, st)
                n = int(audio_lengths[ai])
                s0 = top()
                pieces.append(torch.arange(ed - st).expand(3, -1) + s0)
                k = torch.arange(n)
                pieces.append(torch.stack([k, k, torch.zeros_like(k)]) + ed - st + s0)
                st = ed + n
                ai += 1
            if st < len(toks):
                s0 = int(pieces[-1][0].max()) + 1 if pieces else 0
                pieces.append(torch.arange(len(toks) - st).expand(3, -1) + s0)
        else:
            pieces.append(torch.arange(len(toks)).expand(3, -1))
        pos[:, b, mask[b].bool()] = torch.cat(pieces, 1)
    return pos


def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _mha(x, kv, sd, name, heads):
    lin = lambda t, p: F.linear(t, sd[f"{name}.{p}.weight"], sd[f"{name}.{p}.bias"])
    q, k, v = lin(x, "query"), lin(kv, "key"), lin(kv, "value")
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    return a.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


def ref_audio(published, chunks, spec: TinySalmonnSpec):
    """Whisper (transformers, strict load of the published names) -> 0.5 s windows -> the published Q-Former
    equations -> audio_proj, for log-mel chunks [n, n_mel, 3000]."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    wcfg = WhisperConfig(num_mel_bins=spec.n_mel, encoder_layers=spec.whisper_layers,
                         encoder_attention_heads=spec.whisper_heads, encoder_ffn_dim=2 * spec.d_whisper,
                         d_model=spec.d_whisper, max_source_positions=1500)
    enc = WhisperEncoder(wcfg).eval()
    enc.load_state_dict({k[len("audio."):]: v for k, v in published.items()
                         if not k.startswith(("audio.qformer.", "audio.q_tokens", "audio.audio_proj."))}, strict=True)
    with torch.no_grad():
        h = enc(chunks).last_hidden_state  # [n, 1500, C]
    kernel = round(1500 * spec.second_per_window / 30)
    win = h.reshape(h.shape[0] * (1500 // kernel), kernel, h.shape[-1])
    sd = {k[len("audio.qformer.bert."):]: v for k, v in published.items() if k.startswith("audio.qformer.bert.")}
    eps = 1e-12
    x = _ln(published["audio.q_tokens"].expand(win.shape[0], -1, -1), sd, "embeddings.LayerNorm", eps)
    for i in range(spec.qformer_layers):
        p = f"encoder.layer.{i}"
        a = _mha(x, x, sd, f"{p}.attention.self", spec.qformer_heads)
        x = _ln(F.linear(a, sd[f"{p}.attention.output.dense.weight"], sd[f"{p}.attention.output.dense.bias"]) + x,
                sd, f"{p}.attention.output.LayerNorm", eps)
        c = _mha(x, win, sd, f"{p}.crossattention.self", spec.qformer_heads)
        x = _ln(F.linear(c, sd[f"{p}.crossattention.output.dense.weight"],
                         sd[f"{p}.crossattention.output.dense.bias"]) + x, sd, f"{p}.crossattention.output.LayerNorm",
                eps)
        f = F.gelu(F.linear(x, sd[f"{p}.intermediate_query.dense.weight"], sd[f"{p}.intermediate_query.dense.bias"]))
        x = _ln(F.linear(f, sd[f"{p}.output_query.dense.weight"], sd[f"{p}.output_query.dense.bias"]) + x,
                sd, f"{p}.output_query.LayerNorm", eps)
    out = F.linear(x, published["audio.audio_proj.weight"], published["audio.audio_proj.bias"])
    return out.reshape(-1, out.shape[-1])


def published_chunks(inp, n_frames=3000):
    """The published model's ``audio_feature`` [n_chunks, n_mel, 3000] from an AVInput, computed here."""
    out = []
    for f, m in zip(inp.input_features, inp.feature_attention_mask):
        for w in range(f.shape[-1] // n_frames):
            if m[w * n_frames]:
                out.append(f[:, w * n_frames:(w + 1) * n_frames])
    return torch.stack(out)


def reference_forward(sal, ref, published, inp, spec=TinySalmonnSpec(), inference=False):
    """``inference=True``: the positions of the published inference.py, whose generate() passes the model neither
    audio_lengths nor second_per_grid_ts."""
    t = sal.cfg.tokens
    ids, mask = inp.input_ids, inp.attention_mask
    with torch.no_grad():
        emb = ref.get_input_embeddings()(ids)
        for pix, grid, tok in ((inp.pixel_values, inp.image_grid_thw, t.image),
                               (inp.pixel_values_videos, inp.video_grid_thw, t.video)):
            if pix is not None:
                feats = ref.model.visual(pix, grid_thw=grid).pooler_output
                emb = emb.masked_scatter((ids == tok)[..., None], feats)
        lengths = None
        if inp.input_features is not None:
            feats = ref_audio(published, published_chunks(inp), spec)
            emb = emb.masked_scatter((ids == t.audio)[..., None], feats)
            lengths = [it.n_tokens for it in sorted(inp.layout.items, key=lambda it: it.global_index)
                       if it.modality == Modality.AUDIO]
        pos = ref_rope_index(ids, mask, vision_start=t.vision_bos, image=t.image, video=t.video, audio=t.audio,
                             image_grid=inp.image_grid_thw, video_grid=inp.video_grid_thw,
                             second_per_grid=None if inference else inp.video_second_per_grid,
                             audio_lengths=None if inference else lengths)
        out = ref(inputs_embeds=emb, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    return out, pos


def cases(media):
    return {
        "text": dict(text="Hello world, what is in this video?"),
        "audio": dict(text="What do you hear?", audio=[media["wav5"]]),
        "image": dict(text="What do you see?", images=[media["image"]]),
        "video": dict(text="Describe the video.", videos=[media["video"]]),
        "video_with_audio": dict(text="Describe what you see and hear.", videos=[media["video"]],
                                 video_audio=[media["wav5"]]),
        "video_3fps_with_audio": dict(text="Describe.", videos=[media["video"][:6]], video_audio=[media["wav3"]],
                                      fps=3.0),
        "long_audio": dict(text="What do you hear?", audio=[np.tile(media["wav5"], 7)]),  # 35 s: two 30 s chunks
    }


def padded_av_batch(sal, media):
    return sal.prepare(["<video>\nDescribe what you see and hear, in detail please.", "<video>\nWhat?"],
                       videos=[media["video"][:4], media["video"]], video_audio=[media["wav3"], media["wav5"]])


# --------------------------------------------------------------------------------------------- parity
def check_parity(sal, ref, published, inp):
    out, pos = reference_forward(sal, ref, published, inp)
    real = inp.attention_mask.bool()
    assert torch.equal(inp.layout.position_ids[:, real], pos[:, real]), "positions differ from get_rope_index"
    with torch.no_grad():
        logits, cache = sal.run_with_cache(inp)
    d = (logits - out.logits)[real].abs().max().item()
    assert d <= TOL, f"logits differ by {d}"
    for layer in range(sal.cfg.n_layers - 1):
        d = (cache[f"blocks.{layer}.hook_resid_post"] - out.hidden_states[layer + 1])[real].abs().max().item()
        assert d <= TOL, f"layer {layer} residual differs by {d}"
    d = (cache["hook_embed"] - out.hidden_states[0])[real].abs().max().item()
    assert d <= TOL, f"embeddings differ by {d}"
    return cache


@pytest.mark.parametrize("case", ["text", "audio", "image", "video", "video_with_audio", "video_3fps_with_audio",
                                  "long_audio"])
def test_forward_parity(sal, ref, published, media, case):
    check_parity(sal, ref, published, sal.prepare(**cases(media)[case]))


def test_padded_audio_visual_batch_parity(sal, ref, published, media):
    inp = padded_av_batch(sal, media)
    assert not inp.attention_mask[1, 0] and inp.attention_mask[0].all()
    check_parity(sal, ref, published, inp)
    with torch.no_grad():
        alone = sal(sal.prepare("<video>\nWhat?", videos=[media["video"]], video_audio=[media["wav5"]]))
        batched = sal(inp)
    assert (batched[1, inp.attention_mask[1].bool()] - alone[0]).abs().max().item() <= TOL


def test_audio_tower_equals_the_published_equations(sal, published, media):
    """The tower alone (transformers' Whisper + Blip2QFormerModel under renamed keys) vs the Q-Former written from
    the published equations; and the reference is sensitive to the Q-Former (a zeroed query FFN changes it)."""
    inp = sal.prepare(**cases(media)["long_audio"])
    chunks = published_chunks(inp)
    assert chunks.shape[0] == 2
    with torch.no_grad():
        ours = sal.audio_tower(chunks)
    theirs = ref_audio(published, chunks, TinySalmonnSpec())
    assert ours.shape == (120, sal.cfg.d_model)
    assert (ours - theirs).abs().max().item() <= 1e-5
    broken = dict(published)
    broken["audio.qformer.bert.encoder.layer.1.output_query.dense.weight"] = torch.zeros_like(
        published["audio.qformer.bert.encoder.layer.1.output_query.dense.weight"])
    assert (ref_audio(broken, chunks, TinySalmonnSpec()) - theirs).abs().max().item() > 1e-3


def test_greedy_generation_matches_teacher_forcing(sal, media):
    inp = sal.prepare(**cases(media)["video_with_audio"])
    gen = sal.generate(inp, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    with torch.no_grad():
        tf = sal(inp.extend(gen.new_tokens))
    step = tf[0, inp.shape[1] - 1:-1]
    assert torch.equal(step.argmax(-1), gen.new_tokens[0])
    assert (torch.stack(gen.logits, 1)[0] - step).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------------- layout
def test_layout_of_a_video_with_audio_by_hand(sal, media):
    """8 frames at 2 fps: 4 grid steps of 1 s with 2x2 merged tokens; 5 s of audio padded to one 30 s chunk, 60
    tokens. The published grouping puts floor((k+1) * 2) - floor(k * 2) = 2 audio tokens after each of steps 0..2
    and the remaining 54 after step 3."""
    inp = sal.prepare(**cases(media)["video_with_audio"])
    L = inp.layout
    ids = inp.input_ids[0].tolist()
    t = sal.cfg.tokens
    s = ids.index(t.vision_bos)
    body = ids[s + 1:ids.index(t.vision_eos)]
    runs, k = [], 0
    while k < len(body):
        j = k
        while j < len(body) and body[j] == body[k]:
            j += 1
        runs.append(("V" if body[k] == t.video else "A", j - k))
        k = j
    assert runs == [("V", 4), ("A", 2), ("V", 4), ("A", 2), ("V", 4), ("A", 2), ("V", 4), ("A", 54)]
    assert split_into_groups(60, 4, 1.0) == [2, 2, 2, 54]
    p = int(L.position_ids[0, 0, s]) + 1  # the position after <|vision_start|>
    mod = L.modality[0]
    vid, aud = (mod == int(Modality.VIDEO)).nonzero().flatten(), (mod == int(Modality.AUDIO)).nonzero().flatten()
    assert len(vid) == 16 and len(aud) == 60
    pos = L.position_ids[:, 0]
    assert pos[0, vid].tolist() == [p + 2 * (k // 4) for k in range(16)]  # t = step * 1 s * 2
    assert pos[1, vid].tolist() == [p + (k % 4) // 2 for k in range(16)]
    assert pos[2, vid].tolist() == [p + k % 2 for k in range(16)]
    assert pos[:, aud].tolist() == [[p + k for k in range(60)], [p] * 60, [p + k for k in range(60)]]
    assert L.time[0, aud].tolist() == [0.5 * k for k in range(60)]
    assert L.time[0, vid].tolist() == [float(k // 4) for k in range(16)]
    end = ids.index(t.vision_eos)
    assert int(pos[0, end]) == p + 59 + 1  # the last block: its largest time position + 1
    assert L.count("audio") == 60 and L.count("video") == 16


@pytest.fixture(scope="module")
def coarse(tmp_path_factory):
    """30 s audio windows: 1 audio token per 30 s chunk, so a video's width can outrun its audio's positions."""
    spec = TinySalmonnSpec(second_per_window=30.0)
    return HookedAVTransformer.from_pretrained(save_tiny_video_salmonn2(tmp_path_factory.mktemp("coarse") / "m", spec))


def test_text_between_two_audio_visual_blocks_resumes_after_the_largest_position(coarse, media):
    """Before a later block the text resumes at the block's largest position on any axis + 1; after the last one at
    its largest time position + 1. With 1 audio token and 2x2 merged video tokens of one grid step the two differ
    (w max p + 1, time max p); both equal the transcribed get_rope_index."""
    wide = media["video"][:2]
    one_s = media["wav3"][:16000]
    inp = coarse.prepare("<video><video>\nCompare.", videos=[wide, wide], video_audio=[one_s, one_s])
    ids, pos = inp.input_ids[0].tolist(), inp.layout.position_ids[:, 0]
    t = coarse.cfg.tokens
    ends = [i for i, x in enumerate(ids) if x == t.vision_eos]
    starts = [i for i, x in enumerate(ids) if x == t.vision_bos]
    assert inp.layout.count("audio") == 2 and inp.layout.count("video") == 8
    assert coarse.cfg.extra["audio_token_seconds"] == 30.0  # one token per 30 s window: its time stamp step
    for s, e, last in ((starts[0], ends[0], False), (starts[1], ends[1], True)):
        p = int(pos[0, s]) + 1
        block = pos[:, s + 1:e]
        assert int(block.max()) == p + 1 and int(block[0].max()) == p
        assert int(pos[0, e]) == (p + 1 if last else p + 2)
    lengths = [1, 1]
    ref = ref_rope_index(inp.input_ids, inp.attention_mask, vision_start=t.vision_bos, image=t.image, video=t.video,
                         audio=t.audio, video_grid=inp.video_grid_thw, second_per_grid=inp.video_second_per_grid,
                         audio_lengths=lengths)
    assert torch.equal(ref, inp.layout.position_ids)


def test_refusals(sal, media):
    with pytest.raises(LayoutError, match="mixes videos with audio and standalone audio"):
        sal.prepare("<video><audio>\nCompare.", videos=[media["video"]], video_audio=[media["wav5"]],
                    audio=[media["wav3"]])
    with pytest.raises(LayoutError, match="mixes videos with audio and images"):
        sal.prepare("Describe.", videos=[media["video"]], video_audio=[media["wav5"]], images=[media["image"]])
    with pytest.raises(LayoutError, match="standalone audio with images or videos"):
        sal.prepare("Describe.", images=[media["image"]], audio=[media["wav3"]])
    with pytest.raises(InputError, match="soundtrack"):
        sal.prepare("Describe.", videos=[media["video"]], video_audio=[media["wav5"]], use_audio_in_video=False)
    with pytest.raises(InputError, match="placeholder"):
        sal.prepare("<video><video>\nDescribe.", videos=[media["video"]])
    good = sal.prepare(**cases(media)["video_with_audio"])
    ids = good.input_ids.clone()
    a = (ids[0] == sal.cfg.tokens.audio).nonzero().flatten()
    ids[0, a[-1]] = sal.tokenizer.convert_tokens_to_ids("<|im_end|>")  # one audio token short
    with pytest.raises(LayoutError, match="should hold 16 video and 60 audio"):
        sal.to_input({"input_ids": ids, "attention_mask": good.attention_mask,
                      "pixel_values_videos": good.pixel_values_videos, "video_grid_thw": good.video_grid_thw,
                      "second_per_grid_ts": good.video_second_per_grid, "input_features": good.input_features,
                      "feature_attention_mask": good.feature_attention_mask})


def test_published_dataset_format_loads(sal, media):
    """The published dataset's ``audio_feature`` [n_chunks, n_mel, 3000] + ``audio_lengths`` give the same input."""
    inp = sal.prepare(**cases(media)["video_with_audio"])
    data = {"input_ids": inp.input_ids, "attention_mask": inp.attention_mask,
            "pixel_values_videos": inp.pixel_values_videos, "video_grid_thw": inp.video_grid_thw,
            "second_per_grid_ts": [float(x) for x in inp.video_second_per_grid],
            "audio_feature": published_chunks(inp), "audio_lengths": [60]}
    other = sal.to_input(data)
    assert torch.equal(other.layout.position_ids, inp.layout.position_ids)
    with torch.no_grad():
        assert torch.equal(sal(other), sal(inp))
    with pytest.raises(InputError, match="audio_lengths"):
        sal.to_input({**data, "audio_lengths": [59]})


# --------------------------------------------------------------------------------------------- checkpoint
def test_published_module_shapes_and_names_at_full_size():
    """The audio branch built on the meta device from the published configuration class's defaults
    (configuration_qwen2_5_vl.py: WhisperConfig 128 mels / 32 layers / 20 heads / d 1280 / ffn 5120 / 1500
    positions, 0.5 s windows; BertConfig hidden 3072 / 2 layers / 12 heads / intermediate 12288 / encoder_width
    1280 / query_length 1 / cross_attention_freq 1; out_hidden_size = the LM width, 3584 for 7B) has the published
    module paths (modeling_whisper.py, modeling_bert.py) once renamed, and 60 tokens per 30 s window."""
    cfg = {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
           "d_model": 1280, "max_source_positions": 1500, "second_per_window": 0.5, "second_stride": 0.5,
           "qformer_config": {"hidden_size": 3072, "num_hidden_layers": 2, "num_attention_heads": 12,
                              "intermediate_size": 12288, "encoder_width": 1280, "query_length": 1,
                              "cross_attention_freq": 1}}
    with torch.device("meta"):
        tower = SalmonnAudioTower(cfg, 3584)
    names = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    published = {  # published key (under audio.) -> shape
        "audio.conv1.weight": (1280, 128, 3), "audio.conv2.weight": (1280, 1280, 3),
        "audio.embed_positions.weight": (1500, 1280), "audio.layers.31.fc1.weight": (5120, 1280),
        "audio.layers.0.self_attn.k_proj.weight": (1280, 1280), "audio.layer_norm.weight": (1280,),
        "audio.qformer.bert.embeddings.LayerNorm.weight": (3072,),
        "audio.qformer.bert.encoder.layer.0.attention.self.query.weight": (3072, 3072),
        "audio.qformer.bert.encoder.layer.1.crossattention.self.key.weight": (3072, 1280),
        "audio.qformer.bert.encoder.layer.1.crossattention.self.value.bias": (3072,),
        "audio.qformer.bert.encoder.layer.0.crossattention.output.LayerNorm.bias": (3072,),
        "audio.qformer.bert.encoder.layer.1.intermediate_query.dense.weight": (12288, 3072),
        "audio.qformer.bert.encoder.layer.1.output_query.dense.weight": (3072, 12288),
        "audio.q_tokens": (1, 1, 3072), "audio.audio_proj.weight": (3584, 3072),
    }
    for key, shape in published.items():
        ours = key_map(key)
        assert ours.startswith("audio.") and names[ours[len("audio."):]] == shape, key
    assert key_map("audio.qformer.bert.embeddings.position_ids") is None
    assert key_map("audio.qformer.cls.predictions.bias") is None
    assert tower.tokens_per_chunk == 60 and tower.kernel == 25 and tower.n_frames == 3000
    # as many tensors as the published module holds: 32 Whisper layers x 15 (q/k/v/out, 2 norms, fc1/fc2; k has no
    # bias) + 7 (conv1, conv2, embed_positions, layer_norm), the Q-Former's 2 layers x 26 + its embedding LayerNorm,
    # q_tokens, audio_proj
    assert len(names) == 32 * 15 + 7 + 2 * 26 + 2 + 1 + 2


def test_missing_audio_tensor_is_named(tmp_path, folder):
    import shutil

    from safetensors.torch import load_file, save_file

    from av_lens import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    f = sorted(bad.glob("*.safetensors"))[0]
    sd = load_file(f)
    del sd["audio.qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="crossattention"):
        HookedAVTransformer.from_pretrained(bad)


# --------------------------------------------------------------------------------------------- analyses
def test_every_analysis_tool_runs(sal, media):
    inp = sal.prepare(**cases(media)["video_with_audio"])
    n, H = sal.cfg.n_layers, sal.cfg.n_heads
    flow = attention_flow(sal, inp, "last_prompt", keys={"audio": "audio", "video": "video", "text": "text|special"})
    torch.testing.assert_close(flow.mass.sum(-1), torch.ones_like(flow.mass.sum(-1)), atol=1e-5, rtol=0)
    with torch.no_grad():
        _, cache = sal.run_with_cache(inp)
    pattern = cache["blocks.1.attn.hook_pattern"][0, :, -1]  # [head, key]
    audio = inp.layout.mask("audio")[0]
    torch.testing.assert_close(flow.mass[0, 1, :, 0], pattern[:, audio].sum(-1), atol=1e-5, rtol=0)
    lens = logit_lens(sal, inp, "audio", k=3)
    assert lens.top_ids.shape[1:] == (60, 3)
    with torch.no_grad():
        clean = sal(inp)
        knocked = sal.run_with_hooks(inp, fwd_hooks=knockout_hooks(sal, "last_prompt", "audio", range(n)))
    assert not torch.allclose(clean[:, -1], knocked[:, -1])
    last = int(clean[0, -1].argmax())
    other = sal.prepare(**{**cases(media)["video_with_audio"], "video_audio": [media["wav5"][::-1].copy()]})
    metric = lambda logits: logits[0, -1, last]
    res = patch_by_modality(sal, inp, other, metric, sets=("audio", "video", "text"), progress=False)
    # the inputs differ only in the soundtrack: patching layer 0's residual at the audio positions restores the
    # clean metric, at the video positions it changes nothing
    assert res.clean != res.corrupted
    assert abs(float(res["resid_pre"][0, 0]) - res.clean) < 1e-4
    assert abs(float(res["resid_pre"][0, 1]) - res.corrupted) < 1e-4
    pp = path_patch(sal, inp, other, metric, senders="audio", receivers="last_prompt", layers=[0, 1])
    assert pp.shape == (2,) and torch.isfinite(pp).all()


def test_token_shift_against_the_base_vlm(sal, media):
    """Against its base VLM (a tiny Qwen2.5-VL with the same vocabulary): with the language model copied
    unchanged the shift is nil on a video-only input; with one layer's MLP changed it is not, and the ranks equal a
    brute-force recomputation from the base's full-sequence logits."""
    from av_lens.testing.tiny import TinySpec

    model, _, _ = build_tiny_hf_vl(TinySpec(), extra_special_tokens=(AUDIO_PAD,))
    base = HookedAVTransformer.from_hf_model(model, tokenizer=sal.tokenizer, processor=sal.processor) \
        if hasattr(HookedAVTransformer, "from_hf_model") else None
    if base is None:
        import tempfile

        d = tempfile.mkdtemp()
        model.save_pretrained(d)
        sal.processor.save_pretrained(d)
        base = HookedAVTransformer.from_pretrained(d)
    assert base.cfg.rope_rules == "qwen2_5_vl"
    kw = cases(media)["video"]
    inp, base_inp = sal.prepare(**kw), base.prepare(**kw)
    tokens = sal.generate(inp, max_new_tokens=5, stop_at_eos=False).new_tokens[0]
    res = token_shift(sal, base, inp, base_inp, output_tokens=tokens, eos_token_ids=())
    with torch.no_grad():
        lb = base(base_inp.extend(tokens[None]))[0, base_inp.shape[1] - 1: base_inp.shape[1] - 1 + len(tokens)]
    ranks = [int((lb[j] > lb[j, tokens[j]]).sum()) + 1 for j in range(len(tokens))]
    assert res.ranks.tolist() == ranks


def test_videos_are_sampled_as_the_published_inference_samples_them(sal, media):
    """A frame every 0.1 s, 16..768 frames at linspace positions (duplicates dropped), 61,250 x 0.95 x 768 / k pixels
    per frame (61,250 from 768 frames), min 3,136; hand-computed cases."""
    rng = np.random.default_rng(4)
    v40 = rng.integers(0, 255, (40, 56, 56, 3), dtype=np.uint8)  # 2 s at 20 fps -> 20 frames at 10 fps
    frames, rate, size = sample_frames(v40, 20.0)
    assert len(frames) == 20 and rate == 10.0 and size == {"shortest_edge": 3136, "longest_edge": 2234400}
    assert np.array_equal(frames, v40[np.linspace(0, 39, 20).astype(int)])
    long = np.zeros((900, 2, 2, 3), dtype=np.uint8)  # 90 s at 10 fps -> clamped to 768 frames
    frames, rate, size = sample_frames(long, 10.0)
    assert len(frames) == 768 and rate == 768 / 90 and size["longest_edge"] == 61250
    assert len(sample_frames(v40[:4], 2.0)[0]) == 4  # 2 s wants 20 frames; only 4 exist, duplicates dropped
    inp = sal.prepare("Describe.", videos=[v40], fps=20.0)
    assert inp.video_grid_thw[0, 0] == 10 and float(inp.video_second_per_grid[0]) == pytest.approx(0.2)
    raw = sal.prepare("Describe.", videos=[v40], fps=20.0, processor_kwargs={"published_sampling": False})
    assert raw.video_grid_thw[0, 0] == 20 and float(raw.video_second_per_grid[0]) == pytest.approx(0.1)
    with pytest.raises(InputError, match="published_sampling"):
        sal.prepare("Describe.", videos=[v40], processor_kwargs={"sampling": False})


@pytest.mark.parametrize("case", ["video_with_audio", "video_3fps_with_audio", "video", "audio", "image"])
def test_the_published_inference_scripts_positions_on_request(folder, ref, published, media, case):
    """rope_rules 'video_salmonn2_inference': the positions inference.py's generate() runs with (the vision-only
    branch over the interleaved block at 1 s per grid step; standalone audio as text), equal to the transcribed
    get_rope_index called without audio_lengths and second_per_grid_ts; logits equal the reference's with them."""
    sal = HookedAVTransformer.from_pretrained(folder)
    sal.cfg.rope_rules = "video_salmonn2_inference"
    inp = sal.prepare(**cases(media)[case])
    out, pos = reference_forward(sal, ref, published, inp, inference=True)
    assert torch.equal(inp.layout.position_ids, pos)
    with torch.no_grad():
        assert (sal(inp) - out.logits).abs().max().item() <= TOL
    trained = HookedAVTransformer.from_pretrained(folder).prepare(**cases(media)[case])
    if case in ("video_with_audio", "video_3fps_with_audio", "audio"):
        assert not torch.equal(trained.layout.position_ids, inp.layout.position_ids)  # the two rules differ here
    assert torch.equal(trained.layout.modality, inp.layout.modality)
    assert torch.equal(trained.layout.time.nan_to_num(-1.0), inp.layout.time.nan_to_num(-1.0))
    if case == "video_with_audio":
        with pytest.raises(LayoutError, match="second video with audio"):
            sal.prepare("<video><video>\nCompare.", videos=[media["video"]] * 2, video_audio=[media["wav5"]] * 2)
        sal.cfg.rope_rules = "1d"
        with pytest.raises(InputError, match="video_salmonn2_inference"):
            sal.prepare(**cases(media)[case])


def test_a_batch_splits_joins_and_caches_its_encoders_by_sample(sal, media):
    """inputs[i], AVInput.cat and model.encode (precomputed tower outputs) on a two-sample AV batch: each sample's
    logits as in the batch (the padded sample to float noise)."""
    b = sal.prepare(["<video>\nWhat?", "<video>\nDescribe it."], videos=[media["video"], media["video"][::-1].copy()],
                    video_audio=[media["wav5"], media["wav3"]])
    with torch.no_grad():
        full = sal(b)
        assert ((sal(b[1])[0] - full[1]).abs().max().item()) <= TOL
        assert torch.equal(sal(AVInput.cat([b[0], b[1]])), full)
        enc = sal.encode(b)
        assert set(enc.encoder_outputs) == {"audio", "video"}
        assert torch.equal(sal(enc), full)  # the same tower outputs, precomputed
        assert (sal(enc[1]) - sal(b[1])).abs().max().item() <= TOL  # towers run on one sample vs two
