"""Property test: random mixes of text, audio, images and videos (with and without audio-in-video), built by
the native processor, give layouts whose positions equal transformers' get_rope_index and whose per-item
token counts equal the processor's expansion."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from av_lens import Modality
from av_lens.processing import AUDIO_PH, IMAGE_PH, VIDEO_PH

item = st.one_of(
    st.tuples(st.just("audio"), st.floats(0.1, 6.0)),
    st.tuples(st.just("image"), st.sampled_from([28, 56, 84]), st.sampled_from([28, 56])),
    st.tuples(st.just("video"), st.integers(1, 5), st.sampled_from([28, 56]), st.floats(0.1, 6.0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(item, min_size=1, max_size=4), audio_in_video=st.booleans(), seed=st.integers(0, 1000),
       fps=st.sampled_from([1.0, 2.0, 4.0]))
def test_random_layouts_match_reference(model, reference, items, audio_in_video, seed, fps):
    rng = np.random.default_rng(seed)
    text, audio, images, videos, soundtracks = "", [], [], [], []
    for it in items:
        text += "some words "
        if it[0] == "audio":
            text += AUDIO_PH
            audio.append(0.1 * rng.standard_normal(int(it[1] * 16000)).astype(np.float32))
        elif it[0] == "image":
            text += IMAGE_PH
            images.append(rng.integers(0, 255, (it[1], it[2], 3), dtype=np.uint8))
        else:
            text += VIDEO_PH
            videos.append(rng.integers(0, 255, (2 * it[1], it[2], it[2], 3), dtype=np.uint8))
            soundtracks.append(0.1 * rng.standard_normal(int(it[3] * 16000)).astype(np.float32))
    use_av = audio_in_video and bool(videos)
    inp = model.prepare(text + " end", audio=audio, images=images, videos=videos or None, fps=fps,
                        video_audio=soundtracks if use_av else None, use_audio_in_video=use_av, chat=True)
    fam = inp.feature_attention_mask
    pos, deltas = reference.model.get_rope_index(
        inp.input_ids, inp.image_grid_thw, inp.video_grid_thw, inp.attention_mask, use_av,
        fam.sum(-1) if fam is not None else None, inp.video_second_per_grid)
    L = inp.layout
    assert torch.equal(pos, L.position_ids)
    assert torch.equal(deltas.reshape(-1, 1), L.rope_deltas)
    for kind, token in (("audio", model.cfg.tokens.audio), ("image", model.cfg.tokens.image),
                        ("video", model.cfg.tokens.video)):
        assert L.count(kind) == int((inp.input_ids == token).sum())  # every placeholder is tagged
    for it in L.items:  # each item's tokens equal what the processor expanded for it
        assert int(((L.modality == int(it.modality)) & (L.item == it.index)).sum()) == it.n_tokens
