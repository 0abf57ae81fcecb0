"""The modality layout against hand-counted expectations, and against transformers' get_rope_index."""

import math

import pytest
import torch

from av_lens import LayoutError, MediaSpec, Modality, S, TokenIds, build_layout
from conftest import cases, padded_batch

# tiny tokenizer ids: see av_lens.testing.tiny.SPECIAL_TOKENS
TOK = TokenIds(audio=3, image=8, video=9, audio_bos=4, audio_eos=5, vision_bos=6, vision_eos=7,
               markers={1: "im_start", 2: "im_end", 0: "endoftext"})
T = 50  # some text token


def test_audio_tokens_formula():
    # conv stride 2 then pool 2: 12 mel frames -> 3 tokens; 3 s (300 frames) -> 75; 5 s -> 125 (25 per second)
    assert [MediaSpec.audio_tokens(n) for n in (12, 300, 500)] == [3, 75, 125]


def test_text_audio_text_by_hand():
    ids = torch.tensor([[1, T, 4, 3, 3, 3, 5, T, 2]])
    L = build_layout(ids, None, TOK, MediaSpec(audio_lengths=(12,)))
    assert L.modality[0].tolist() == [4, 0, 4, 1, 1, 1, 4, 0, 4]
    assert L.position_ids[0, 0].tolist() == list(range(9))  # audio is 1-D: consecutive positions
    assert L.time[0, 3:6].tolist() == pytest.approx([0.0, 0.04, 0.08])
    assert math.isnan(L.time[0, 1])
    assert L.item[0, 2:7].tolist() == [0] * 5  # markers belong to their item
    assert L.positions("audio").tolist() == [3, 4, 5]
    assert L.spans("text|special") == [(0, 3), (6, 9)]
    assert L.rope_deltas.tolist() == [[0]]


def test_image_by_hand():
    # one image of grid (1, 4, 6) -> merged 2 x 3 = 6 tokens at t=start, h in 0..1, w in 0..2
    ids = torch.tensor([[T, 6] + [8] * 6 + [7, T]])
    L = build_layout(ids, None, TOK, MediaSpec(image_grid_thw=((1, 4, 6),)))
    pos = L.position_ids[:, 0]
    assert pos[:, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert pos[:, 8].tolist() == [5, 5, 5]  # eos after the block's max (2 + 2)
    assert pos[:, 9].tolist() == [6, 6, 6]
    assert L.rope_deltas.tolist() == [[7 - 10]]  # max + 1 - length: the image compresses positions


def test_video_by_hand():
    # 3 temporal grids of 2x2 merged tokens at 0.5 s per grid -> t offsets floor(k * 0.5 * 25) = 0, 12, 25
    ids = torch.tensor([[6] + [9] * 12 + [7]])
    L = build_layout(ids, None, TOK, MediaSpec(video_grid_thw=((3, 4, 4),), video_second_per_grid=(0.5,)))
    assert L.position_ids[0, 0, 1:13].tolist() == [1] * 4 + [13] * 4 + [26] * 4
    assert L.time[0, 1:13].tolist() == [0.0] * 4 + [0.5] * 4 + [1.0] * 4
    assert L.position_ids[:, 0, 13].tolist() == [27, 27, 27]  # eos: block max (1 + 25) + 1


def test_audio_in_video_interleaving_by_hand():
    # 4 s video (4 grids x 4 tokens, 1 s per grid) with 5 s of audio (125 tokens): 2-second chunks
    # V(grids 0,1) A(0..49) V(grids 2,3) A(50..99) A(100..124)
    body = [9] * 8 + [3] * 50 + [9] * 8 + [3] * 75
    ids = torch.tensor([[T, 6, 4] + body + [5, 7, T]])
    L = build_layout(ids, None, TOK, MediaSpec(audio_lengths=(500,), video_grid_thw=((4, 4, 4),),
                                               video_second_per_grid=(1.0,), use_audio_in_video=True))
    p = L.position_ids[:, 0]
    assert p[:, 1].tolist() == p[:, 2].tolist() == [1, 1, 1]  # both bos share a position
    assert L.spans("video") == [(3, 11), (61, 69)]
    assert L.spans("audio") == [(11, 61), (69, 144)]
    assert p[0, 3:11].tolist() == [2] * 4 + [27] * 4  # video grid k at start + 25 k
    assert p[0, 11].item() == 2 and p[0, 60].item() == 51  # audio j at start + j
    assert p[0, 61:69].tolist() == [52] * 4 + [77] * 4
    assert p[:, 144].tolist() == p[:, 145].tolist() == [127, 127, 127]  # both eos after the last chunk
    assert p[:, 146].tolist() == [128, 128, 128]
    assert L.time[0, 11:61].tolist() == pytest.approx([j * 0.04 for j in range(50)])
    assert L.time[0, 61:69].tolist() == [2.0] * 4 + [3.0] * 4
    assert [it.modality for it in L.items] == [Modality.VIDEO, Modality.AUDIO]
    assert L.items[0].with_audio and L.items[0].duration_s == 4.0


def test_selectors_and_generated():
    ids = torch.tensor([[1, T, 4, 3, 3, 3, 5, 6, 9, 9, 9, 9, 7, T]])
    L = build_layout(ids, None, TOK, MediaSpec(audio_lengths=(12,), video_grid_thw=((1, 4, 4),),
                                               video_second_per_grid=(1.0,)))
    assert L.mask("all but video").sum() == 10
    assert L.mask("audio|video").sum() == 7
    assert torch.equal(L.mask("~video"), L.mask(S.all - S.video))
    assert L.positions(S.media).tolist() == [3, 4, 5, 8, 9, 10, 11]
    assert L.positions("vision_bos").tolist() == [7]
    assert L.positions(S.audio.between(0.03, 1.0)).tolist() == [4, 5]
    G = L.extend(3)
    assert G.positions("generated").tolist() == [14, 15, 16]
    assert G.position_ids[0, 0, 14:].tolist() == [L.position_ids.max().item() + 1 + k for k in range(3)]
    assert G.count("text") == 5 and G.count("text-generated") == 2
    assert G.counts()["generated"] == 3
    with pytest.raises(LayoutError, match="unknown selector"):
        L.mask("sound")


@pytest.mark.parametrize("bad, msg", [
    ([[4, 3, 3, 5]], "2 placeholder tokens in the text but its 12 mel frames gives 3"),
    ([[3, 3, 3]], "not preceded by its start marker"),
    ([[4, 3, 3, 3, T]], "expected <|audio_eos|>"),
])
def test_layout_errors(bad, msg):
    with pytest.raises(LayoutError, match=msg.replace("|", r"\|")):
        build_layout(torch.tensor(bad), None, TOK, MediaSpec(audio_lengths=(12,)))


def test_more_media_than_placeholders():
    with pytest.raises(LayoutError, match="2 audio input"):
        build_layout(torch.tensor([[4, 3, 3, 3, 5]]), None, TOK, MediaSpec(audio_lengths=(12, 12)))


def test_processor_layouts_match_get_rope_index(model, reference, media):
    """For every study layout and a padded batch, positions and rope deltas equal transformers'."""
    inputs = [model.prepare(**kw) for kw in cases(media).values()] + [padded_batch(model, media)]
    for inp in inputs:
        fam = inp.feature_attention_mask
        pos, deltas = reference.model.get_rope_index(
            inp.input_ids, inp.image_grid_thw, inp.video_grid_thw, inp.attention_mask, inp.use_audio_in_video,
            fam.sum(-1) if fam is not None else None, inp.video_second_per_grid)
        assert torch.equal(pos, inp.layout.position_ids)
        assert torch.equal(deltas.reshape(-1, 1), inp.layout.rope_deltas)


def test_processor_counts_by_hand(model, media):
    # tiny processor: 56x56 frames -> 2x2 merged tokens per grid; 8 frames at 2 fps -> 4 grids of 1 s
    L = model.prepare(**cases(media)["image_video_audio"]).layout
    c = L.counts()
    assert (c["video"], c["audio"], c["image"]) == (16, 125 + 75, 4)
    audio_items = [it for it in L.items if it.modality == Modality.AUDIO]
    assert [it.n_tokens for it in audio_items] == [125, 75]
    assert L.spans(S.video)[0][1] - L.spans(S.video)[0][0] == 8  # first 2-second chunk: 2 grids
    text = L.summary()
    assert "video 0" in text and "audio 1" in text and "2.00-3.00s" in text


def test_padded_batch_layout(model, media):
    inp = padded_batch(model, media)
    L = inp.layout
    n_pad = int((inp.attention_mask[0] == 0).sum())
    assert L.modality[0, :n_pad].eq(int(Modality.PAD)).all()
    assert L.count("audio", batch=0) == 75 and L.count("audio", batch=1) == 125
    assert L.count("video", batch=0) == 0 and L.count("video", batch=1) == 16
    assert L.select_batch(1).count("image") == 4
