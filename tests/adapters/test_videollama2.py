"""VideoLLaMA2-AV on a tiny random checkpoint written in the published layout (shards + two torch pickles).

transformers has no VideoLLaMA2, so the reference is assembled here the way the published code
(DAMO-NLP-SG/VideoLLaMA2 @8cedfbd, branch audio_visual) computes a forward: transformers' ``Qwen2ForCausalLM`` and
``SiglipVisionModel`` and av_lens's STC connector / BEATs / audio projector (each tested on its own against the
published equations in tests/components/), every one loaded *strictly* from the published key names by this file;
the prompt ids built as ``tokenizer_multimodal_token`` builds them (a -201 at the ``<video>`` tag) and the features
spliced there as ``prepare_inputs_labels_for_multimodal`` does (video features, then the soundtrack's).
"""

import json

import numpy as np
import pytest
import torch

from av_lens.inputs import AVInput

from av_lens import CheckpointError, HookedAVTransformer, InputError
from av_lens.adapters.videollama2 import _fbank, _soundtrack_fbank, frame_sample, soundtrack_clips
from av_lens.analysis import attention_flow, knockout_hooks, logit_lens, patch_by_modality, path_patch, token_shift
from av_lens.components.beats import BEATsConfig, BEATsEncoder, beats_fbank
from av_lens.components.stc import AudioProjector, STCConnector
from av_lens.testing.tiny_videollama2 import TinyVideoLLaMA2Spec, audio_config, save_tiny_videollama2, vision_config

TOL = 1e-4
SPEC = TinyVideoLLaMA2Spec()
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_videollama2(tmp_path_factory.mktemp("tiny_vl2") / "m")


@pytest.fixture(scope="module")
def vl2(folder):
    return HookedAVTransformer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref(folder):
    """The published forward's parts, each loaded strictly from the published names."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    sd = load_file(sorted(folder.glob("*.safetensors"))[0])
    for name in ("audio_tower.bin", "mm_projector_a.bin"):
        sd.update(torch.load(folder / name, weights_only=True))
    raw = json.loads((folder / "config.json").read_text())
    lm_cfg = Qwen2Config(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    lm = Qwen2ForCausalLM(lm_cfg).eval()

    def load(module, prefix):
        module.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        return module.eval()

    lm.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.embed_tokens", "model.layers.",
                                                                       "model.norm", "lm_head"))}, strict=True)
    return {
        "lm": lm,
        "vision": load(SiglipVisionModel(SiglipVisionConfig(**vision_config(SPEC))),
                       "model.vision_tower.vision_tower.vision_model."),
        "stc": load(STCConnector(SPEC.d_vision, SPEC.d_model, padding=0), "model.mm_projector."),
        "beats": load(BEATsEncoder(BEATsConfig.from_dict({**audio_config(SPEC), "finetuned_model": False})),
                      "model.audio_tower."),
        "proj": load(AudioProjector(SPEC.d_beats, SPEC.d_model, "mlp2x_gelu"), "model.mm_projector_a."),
        "select_layer": raw["mm_vision_select_layer"],
    }


def published_ids(tok, prompt: str) -> list[int]:
    """``tokenizer_multimodal_token``: text chunks around each tag, the tag's negative index between them."""
    index = {"<video>": -201, "<image>": -200, "<audio>": -202}
    out, rest = [], prompt
    while True:
        hits = [(rest.find(t), t) for t in index if t in rest]
        if not hits:
            return out + tok(rest, add_special_tokens=False)["input_ids"]
        pos, t = min(hits)
        out += tok(rest[:pos], add_special_tokens=False)["input_ids"] + [index[t]]
        rest = rest[pos + len(t):]


def ref_forward(ref, tok, prompt, inp, n_soundtracks=0):
    """One sample through the published splice: each tag's features (``<video>``: video then its soundtrack's, for
    the first ``n_soundtracks`` videos) in place of the negative id, then the Qwen2 decoder on inputs_embeds. Audio
    features are consumed in the order their tags appear (soundtracks and standalone clips alike)."""
    ids = published_ids(tok, prompt)
    nf = SPEC.num_frames
    with torch.no_grad():
        feats = {}
        if inp.pixel_values_videos is not None:
            hs = ref["vision"](inp.pixel_values_videos, output_hidden_states=True).hidden_states[ref["select_layer"]]
            feats["video"] = list(ref["stc"](hs.reshape(-1, nf, *hs.shape[1:])))
        if inp.pixel_values is not None:
            frames = inp.pixel_values[:, None].expand(-1, nf, -1, -1, -1).reshape(-1, *inp.pixel_values.shape[1:])
            hs = ref["vision"](frames, output_hidden_states=True).hidden_states[ref["select_layer"]]
            feats["image"] = list(ref["stc"](hs.reshape(-1, nf, *hs.shape[1:])))
        if inp.input_features is not None:
            feats["audio"] = list(ref["proj"](ref["beats"](inp.input_features)))
        audio = iter(feats.get("audio", []))
        emb = ref["lm"].get_input_embeddings()
        parts, counters = [], {"video": 0, "image": 0, "audio": 0}
        chunk = []
        for t in ids + [None]:
            if t is None or t < 0:
                if chunk:
                    parts.append(emb(torch.tensor(chunk)))
                chunk = []
                if t == -201:
                    k = counters["video"]
                    parts.append(feats["video"][k])
                    if k < n_soundtracks:
                        parts.append(next(audio))
                    counters["video"] += 1
                elif t == -200:
                    parts.append(feats["image"][counters["image"]])
                    counters["image"] += 1
                elif t == -202:
                    parts.append(next(audio))
                    counters["audio"] += 1
            else:
                chunk.append(t)
        x = torch.cat(parts)[None]
        return ref["lm"](inputs_embeds=x, output_hidden_states=True), ids


def cases(media):
    return {
        "text": dict(text="Hello world, what is in this video?"),
        "video_with_audio": dict(text="Describe what you see and hear.", videos=[media["video"]],
                                 video_audio=[media["wav5"]]),
        "video": dict(text="Describe the video.", videos=[media["video"]]),
        "image": dict(text="What do you see?", images=[media["image"]]),
        "audio": dict(text="What do you hear?", audio=[media["wav3"]]),
    }


def prompt_of(kw):
    tags = "".join(f"{t}\n" * len(kw.get(k, [])) for k, t in (("videos", "<video>"), ("images", "<image>"),
                                                                 ("audio", "<audio>")))
    return f"{SYSTEM}<|im_start|>user\n{tags}{kw['text']}<|im_end|>\n<|im_start|>assistant\n"


def check(vl2, out, inp, sample=0):
    real = inp.attention_mask[sample].bool()
    with torch.no_grad():
        logits, cache = vl2.run_with_cache(inp)
    d = (logits[sample, real] - out.logits[0]).abs().max().item()
    assert d <= TOL, f"logits differ by {d}"
    for layer in range(vl2.cfg.n_layers - 1):
        d = (cache[f"blocks.{layer}.hook_resid_post"][sample, real] - out.hidden_states[layer + 1][0]).abs().max().item()
        assert d <= TOL, f"layer {layer} residual differs by {d}"
    d = (cache["hook_embed"][sample, real] - out.hidden_states[0][0]).abs().max().item()
    assert d <= TOL, f"embeddings differ by {d}"


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", ["text", "video_with_audio", "video", "image", "audio"])
def test_forward_parity(vl2, ref, media, case):
    kw = cases(media)[case]
    inp = vl2.prepare(**kw)
    out, ids = ref_forward(ref, vl2.tokenizer, prompt_of(kw), inp, n_soundtracks=len(kw.get("video_audio", [])))
    # our ids are the published ones with each tag expanded to its run of reserved ids
    t = vl2.cfg.tokens
    text_ids = [x for x in inp.input_ids[0].tolist() if x not in (t.video, t.audio, t.image)]
    assert text_ids == [x for x in ids if x >= 0]
    assert inp.shape[1] == out.logits.shape[1]
    check(vl2, out, inp)


def test_padded_batch_parity(vl2, ref, media):
    long = "Describe what you see and hear, in as much detail as you can please."
    inp = vl2.prepare(["<video>\nWhat?", f"<video>\n{long}"], videos=[media["video"], media["video"][::-1].copy()],
                      video_audio=[media["wav5"], media["wav3"]])
    assert not inp.attention_mask[0, 0] and inp.attention_mask[1].all()
    for b, text in enumerate(["What?", long]):
        one = vl2.prepare(f"<video>\n{text}", videos=[[media["video"], media["video"][::-1].copy()][b]],
                          video_audio=[[media["wav5"], media["wav3"]][b]])
        out, _ = ref_forward(ref, vl2.tokenizer, f"{SYSTEM}<|im_start|>user\n<video>\n{text}<|im_end|>\n"
                                                 "<|im_start|>assistant\n", one, n_soundtracks=1)
        check(vl2, out, inp, sample=b)


def test_greedy_generation_matches_teacher_forcing(vl2, media):
    inp = vl2.prepare(**cases(media)["video_with_audio"])
    gen = vl2.generate(inp, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    with torch.no_grad():
        tf = vl2(inp.extend(gen.new_tokens))[0, inp.shape[1] - 1:-1]
    assert torch.equal(tf.argmax(-1), gen.new_tokens[0])
    assert (torch.stack(gen.logits, 1)[0] - tf).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------------- inputs
def test_layout_counts_and_times_by_hand(vl2, media):
    """4 frames of 4 x 4 patches through STC v35: 2 steps x 2 x 2 = 8 video tokens; 30 s of fbank (2,998 frames):
    187 x 8 = 1,496 BEATs tokens, 8 per 0.16 s step; 1-D positions over everything."""
    inp = vl2.prepare(**cases(media)["video_with_audio"])
    L = inp.layout
    mod = L.modality[0]
    assert L.count("video") == 8 and L.count("audio") == 1496
    v, a = L.mask("video")[0].nonzero().flatten(), L.mask("audio")[0].nonzero().flatten()
    assert int(a[0]) == int(v[-1]) + 1  # the soundtrack follows its video at the one <video> tag
    assert L.position_ids[0, 0].tolist() == list(range(inp.shape[1]))
    idx = frame_sample(8, 4)
    assert idx.tolist() == [1, 3, 4, 6]  # the published middle-of-segment rule, hand-computed for 8 frames -> 4
    spg = 2 * np.mean(np.diff(idx)) / 2.0  # fps 2: one connector step = 2 sampled frames
    assert L.time[0, v].tolist() == pytest.approx([0.0] * 4 + [spg] * 4)
    assert L.time[0, a[:17]].tolist() == pytest.approx([0.0] * 8 + [0.16] * 8 + [0.32])
    assert inp.input_features.shape == (1, 2998, 128)
    assert int((mod == 0).sum()) + 8 + 1496 + int((mod == 4).sum()) == inp.shape[1]


def test_fbank_is_the_published_preprocessing(vl2, media):
    """5 s padded with zeros to 30 s, Kaldi fbank (tested against numpy in tests/components), rounded to bf16."""
    inp = vl2.prepare(**cases(media)["audio"])
    wav = np.pad(media["wav3"], (0, 30 * 16000 - len(media["wav3"])))
    want = beats_fbank(torch.as_tensor(wav)).to(torch.bfloat16).float()
    assert torch.equal(inp.input_features[0], want)
    long = np.tile(media["wav5"], 7)  # 35 s
    with pytest.warns(UserWarning, match="first 30 s"):
        inp = vl2.prepare("What do you hear?", audio=[long])
    assert torch.equal(inp.input_features[0], beats_fbank(torch.as_tensor(long[:480000])).to(torch.bfloat16).float())


def test_short_videos_are_padded_with_black_frames_and_warned(vl2, media):
    with pytest.warns(UserWarning, match="black frames"):
        inp = vl2.prepare("Describe.", videos=[media["video"][:2]])
    px = inp.pixel_values_videos
    assert px.shape[0] == 4
    black = vl2.prepare("Describe.", images=[np.zeros_like(media["image"])]).pixel_values[0]
    assert torch.equal(px[2], black) and torch.equal(px[3], black)


def test_refusals(vl2, media):
    with pytest.raises(InputError, match="soundtrack"):
        vl2.prepare("Describe.", videos=[media["video"]], video_audio=[media["wav5"]], use_audio_in_video=False)
    with pytest.raises(InputError, match="placeholder"):
        vl2.prepare("<video><video>\nDescribe.", videos=[media["video"]])
    with pytest.raises(InputError, match="num_frames"):
        inp = vl2.prepare(**cases(media)["video"])
        vl2.to_input({"input_ids": inp.input_ids, "pixel_values_videos": inp.pixel_values_videos[:3]})


def test_missing_pickle_is_named(tmp_path, folder):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "mm_projector_a.bin").unlink()
    with pytest.raises(CheckpointError, match="mm_projector_a"):
        HookedAVTransformer.from_pretrained(bad)


def test_published_sizes_at_full_scale():
    """The towers at the published sizes (meta device): SigLIP-so400m-384 + STC v35 give 1,352 tokens for 16 frames
    and the connector holds 376,889,248 parameters (= the published mm_projector.bin's 753,778,496 bytes in bf16,
    tests/components/test_stc.py); BEATs gives 1,496 tokens for 30 s."""
    with torch.device("meta"):
        stc = STCConnector(1152, 3584, padding=0)
        beats = BEATsEncoder(BEATsConfig())
        proj = AudioProjector(768, 3584, "mlp2x_gelu")
    assert stc.n_tokens(16, 27, 27) == 1352
    assert sum(p.numel() for p in stc.parameters()) == 376_889_248
    assert beats.cfg.n_tokens(2998) == 1496
    assert [n for n, _ in proj.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


# --------------------------------------------------------------------------------------------- analyses
def test_every_analysis_tool_runs(vl2, media):
    inp = vl2.prepare(**cases(media)["video_with_audio"])
    n = vl2.cfg.n_layers
    flow = attention_flow(vl2, inp, "last_prompt", keys={"audio": "audio", "video": "video", "text": "text|special"})
    torch.testing.assert_close(flow.mass.sum(-1), torch.ones_like(flow.mass.sum(-1)), atol=1e-5, rtol=0)
    with torch.no_grad():
        _, cache = vl2.run_with_cache(inp)
    pattern = cache["blocks.1.attn.hook_pattern"][0, :, -1]
    torch.testing.assert_close(flow.mass[0, 1, :, 1], pattern[:, inp.layout.mask("video")[0]].sum(-1), atol=1e-5,
                               rtol=0)
    lens = logit_lens(vl2, inp, "video", k=3)
    assert lens.top_ids.shape[1:] == (8, 3)
    with torch.no_grad():
        clean = vl2(inp)
        knocked = vl2.run_with_hooks(inp, fwd_hooks=knockout_hooks(vl2, "last_prompt", "audio", range(n)))
    assert not torch.allclose(clean[:, -1], knocked[:, -1])
    last = int(clean[0, -1].argmax())
    other = vl2.prepare(**{**cases(media)["video_with_audio"], "video_audio": [media["wav3"]]})
    metric = lambda logits: logits[0, -1, last]
    res = patch_by_modality(vl2, inp, other, metric, sets=("audio", "video", "text"), progress=False)
    assert res.clean != res.corrupted
    assert abs(float(res["resid_pre"][0, 0]) - res.clean) < 1e-4  # the inputs differ only in the soundtrack
    assert abs(float(res["resid_pre"][0, 1]) - res.corrupted) < 1e-4
    pp = path_patch(vl2, inp, other, metric, senders="audio", receivers="last_prompt", layers=[0, 1])
    assert pp.shape == (2,) and torch.isfinite(pp).all()
    assert "mm_projector.hook_sampler_out" in cache and "audio_encoder.blocks.1.hook_out" in cache


def test_token_shift_against_the_vision_only_base(vl2, folder, tmp_path, media):
    """The AV model against its vision-only base (same LM, tower and connector here): no audio modality, audio
    refused; on a video-only input the shift's ranks equal a brute-force recomputation from the base's logits and,
    with identical language models, every answer token keeps rank 1 exactly where the AV model put it first."""
    base = HookedAVTransformer.from_pretrained(save_tiny_videollama2(tmp_path / "base", audio=False))
    assert base.adapter.name == "videollama2_base" and base.cfg.modalities == ("image", "video")
    assert not hasattr(base, "audio_tower")
    with pytest.raises(InputError, match="no audio tower"):
        base.prepare("Describe.", videos=[media["video"]], video_audio=[media["wav5"]])
    kw = cases(media)["video"]
    inp, base_inp = vl2.prepare(**kw), base.prepare(**kw)
    assert torch.equal(inp.input_ids, base_inp.input_ids)
    tokens = vl2.generate(inp, max_new_tokens=5, stop_at_eos=False).new_tokens[0]
    res = token_shift(vl2, base, inp, base_inp, output_tokens=tokens, eos_token_ids=())
    with torch.no_grad():
        lb = base(base_inp.extend(tokens[None]))[0, base_inp.shape[1] - 1: base_inp.shape[1] - 1 + len(tokens)]
    ranks = [int((lb[j] > lb[j, tokens[j]]).sum()) + 1 for j in range(len(tokens))]
    assert res.ranks.tolist() == ranks == [1] * len(tokens)


def test_a_soundtrack_is_read_as_eight_two_second_clips(vl2, media):
    """process_audio_from_video: 8 clips of 2 s at i * (duration - 2) / 7 (pytorchvideo's ConstantClipsPerVideoSampler),
    joined and zero-padded to 30 s; a video under 2 s gives its whole soundtrack 8 times. Hand-computed for 10 s:
    clip 1 starts at 8/7 s = sample 18,285.71 -> 18285."""
    ten = soundtrack_clips(160000)
    assert len(ten) == 8 and ten[0] == (0, 32000) and ten[1] == (18285, 50285) and ten[-1] == (128000, 160000)
    assert soundtrack_clips(16000) == [(0, 32000)] * 8
    assert soundtrack_clips(2 * 16000) == [(0, 32000)] * 8  # exactly 2 s: the start step is 0, so 8 copies too
    inp = vl2.prepare(**cases(media)["video_with_audio"])
    wav = media["wav5"]
    joined = np.concatenate([wav[a:b] for a, b in soundtrack_clips(len(wav))])
    assert len(joined) == 8 * 32000 - sum(32000 - (min(b, len(wav)) - a) for a, b in soundtrack_clips(len(wav)))
    want = beats_fbank(torch.as_tensor(np.pad(joined, (0, 480000 - len(joined))))).to(torch.bfloat16).float()
    assert torch.equal(inp.input_features[0], want)
    assert not torch.equal(want, _fbank(wav, "x"))  # not the standalone-clip reading


def test_audio_features_follow_their_tags_in_order(vl2, ref, media):
    """A standalone <audio> before a <video> with a soundtrack: the first audio run holds the clip's features, the
    second the soundtrack's (the layout and the splice read features in token order); parity with the reference."""
    v, a_track, a_clip = media["video"], media["wav5"], media["wav3"]
    inp = vl2.prepare("<audio>\n<video>\nCompare.", videos=[v], video_audio=[a_track], audio=[a_clip])
    assert torch.equal(inp.input_features[0], _fbank(a_clip, "x"))
    assert torch.equal(inp.input_features[1], _soundtrack_fbank(a_track))
    out, _ = ref_forward(ref, vl2.tokenizer, f"{SYSTEM}<|im_start|>user\n<audio>\n<video>\nCompare.<|im_end|>\n"
                                             "<|im_start|>assistant\n", inp, n_soundtracks=1)
    check(vl2, out, inp)
    batch = vl2.prepare(["<audio>\nWhat?", "<video>\nWhat?"], videos=[v], video_audio=[a_track], audio=[a_clip])
    assert torch.equal(batch.input_features[0], _fbank(a_clip, "x"))
    assert [it.sample for it in sorted(batch.layout.items, key=lambda it: (it.modality, it.global_index))
            if it.modality == 1] == [0, 1]


def test_frames_are_squashed_unless_padding_is_asked_for(vl2, media):
    """The released model_init binds aspect_ratio=None (frames squashed to the square input); training padded to a
    square with the image-mean colour (processor_kwargs={'aspect_ratio': 'pad'})."""
    from transformers import SiglipImageProcessor

    from av_lens.adapters.videollama2 import _square

    wide = np.random.default_rng(2).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    ip = SiglipImageProcessor(size={"height": 56, "width": 56})
    squashed = vl2.prepare("Describe.", videos=[wide]).pixel_values_videos
    assert torch.equal(squashed, ip(images=list(wide), return_tensors="pt")["pixel_values"])
    padded = vl2.prepare("Describe.", videos=[wide], processor_kwargs={"aspect_ratio": "pad"}).pixel_values_videos
    assert torch.equal(padded, ip(images=[_square(f, ip.image_mean) for f in wide], return_tensors="pt")["pixel_values"])
    assert not torch.equal(squashed, padded)
    with pytest.raises(InputError, match="aspect_ratio"):
        vl2.prepare("Describe.", videos=[wide], processor_kwargs={"aspect_ratio": "crop"})


def test_shard_weights_win_over_the_side_pickles(tmp_path, folder):
    """The released shards hold the fine-tuned audio tower; the side pickles are the stage-2 inputs of that tuning.
    Where both hold a tensor the shards' is loaded; the pickles only fill what the shards lack."""
    import shutil

    from safetensors.torch import load_file, save_file

    both = tmp_path / "both"
    shutil.copytree(folder, both)
    f = sorted(both.glob("*.safetensors"))[0]
    sd = load_file(f)
    pickled = torch.load(both / "audio_tower.bin", weights_only=True)
    tuned = {k: v + 1.0 for k, v in pickled.items() if k.endswith("fc1.weight")}
    save_file({**sd, **tuned}, f, metadata={"format": "pt"})
    m = HookedAVTransformer.from_pretrained(both)
    for k, v in tuned.items():
        assert torch.equal(m.audio_tower.state_dict()[k[len("model.audio_tower."):]], v)
    other = next(k for k in pickled if k.endswith("fc2.weight"))
    assert torch.equal(m.audio_tower.state_dict()[other[len("model.audio_tower."):]], pickled[other])


def test_a_batch_splits_joins_and_caches_its_encoders_by_sample(vl2, media):
    """inputs[i], AVInput.cat and model.encode (precomputed tower outputs) on a two-sample AV batch: each sample's
    logits as in the batch (the padded sample to float noise)."""
    b = vl2.prepare(["<video>\nWhat?", "<video>\nDescribe it."], videos=[media["video"], media["video"][::-1].copy()],
                    video_audio=[media["wav5"], media["wav3"]])
    with torch.no_grad():
        full = vl2(b)
        assert ((vl2(b[1])[0] - full[1]).abs().max().item()) <= TOL
        assert torch.equal(vl2(AVInput.cat([b[0], b[1]])), full)
        enc = vl2.encode(b)
        assert set(enc.encoder_outputs) == {"audio", "video"}
        assert torch.equal(vl2(enc), full)  # the same tower outputs, precomputed
        assert (vl2(enc[1]) - vl2(b[1])).abs().max().item() <= TOL  # towers run on one sample vs two
