"""Counterfactual pairs (alignment of factual and swapped-soundtrack inputs) and caption-fidelity scorers."""

import numpy as np
import pytest
import torch

from av_lens.analysis.pairs import (CLAIR_TEMPLATE, CaptionScorer, JudgeReplyError, KeywordScorer, LLMJudgeScorer,
                                    counterfactual_pair, fidelity, match_length, organism_pairs, require_aligned)
from av_lens.errors import InputError
from av_lens.layout import Modality
from av_lens.organism import world

Q = "Describe what you see and hear."


def test_aligned_pair_has_equal_layouts_and_different_audio(model, media):
    # factual soundtrack 5 s, swapped one 3 s: padded with silence to 5 s
    pair = counterfactual_pair(model, media["video"], media["wav5"], media["wav3"], Q, fps=2.0)
    f, c = pair.factual, pair.counterfactual
    assert pair.aligned and "padded" in pair.note
    assert torch.equal(f.input_ids, c.input_ids)
    assert torch.equal(f.layout.modality, c.layout.modality)
    assert torch.equal(f.layout.position_ids, c.layout.position_ids)
    assert f.layout.counts()["audio"] == c.layout.counts()["audio"] > 0
    assert f.use_audio_in_video and c.use_audio_in_video
    assert torch.equal(f.pixel_values_videos, c.pixel_values_videos)  # same frames
    assert not torch.equal(f.input_features, c.input_features)        # other sound
    assert require_aligned(pair) is pair
    # a longer swapped soundtrack is trimmed
    trimmed = counterfactual_pair(model, media["video"], media["wav3"], media["wav5"], Q, fps=2.0)
    assert trimmed.aligned and "trimmed from 80000 to 48000" in trimmed.note
    # the model runs both and the audio positions carry different residuals
    with torch.no_grad():
        lf, lc = model(f), model(c)
    audio = f.layout.mask(Modality.AUDIO)[0]
    assert not torch.allclose(lf[0, audio], lc[0, audio])


def test_misaligned_pair_is_reported_and_refused(model, media):
    pair = counterfactual_pair(model, media["video"], media["wav5"], media["wav3"], Q, fps=2.0, align=False)
    nf, nc = pair.factual.shape[1], pair.counterfactual.shape[1]
    assert nf != nc and not pair.aligned
    assert f"factual {nf} tokens" in pair.note and f"counterfactual {nc} tokens" in pair.note
    with pytest.raises(InputError, match=rf"not position-aligned.*factual {nf} tokens.*counterfactual {nc} tokens"):
        require_aligned(pair)
    # equal lengths need no alignment
    same = counterfactual_pair(model, media["video"], media["wav5"], media["wav5"][::-1].copy(), Q, align=False)
    assert same.aligned and same.note == "soundtracks of equal length"


def test_match_length_keeps_sample_rate_pairs():
    wav = np.ones(10, np.float32)
    out, note = match_length((wav, 16000), 4)
    assert out[1] == 16000 and out[0].tolist() == [1.0] * 4 and "trimmed" in note
    out, note = match_length(wav, 12)
    assert out.tolist() == [1.0] * 10 + [0.0, 0.0] and out.dtype == np.float32 and "2 samples of silence" in note


def test_organism_pairs_on_the_tiny_model(model):
    pairs = organism_pairs(model, 2, seed=7)
    ref = world.clip_pairs(2, 7)
    assert len(pairs) == 2
    for p, (fact, cf) in zip(pairs, ref):
        assert p.aligned
        assert p.meta["look"] == fact.look == cf.look and p.meta["counterfactual_sound"] == cf.sound != fact.sound
        assert p.meta["factual_answer"] == f"{world.OBJECTS[fact.look]} and {world.SOUNDS[fact.sound]}"
        assert p.meta["counterfactual_answer"] == f"{world.OBJECTS[fact.look]} and {world.SOUNDS[cf.sound]}"
        assert torch.equal(p.factual.layout.modality, p.counterfactual.layout.modality)
        assert not torch.equal(p.factual.input_features, p.counterfactual.input_features)
        assert p.factual.layout.counts()["video"] > 0
        text = model.tokenizer.decode(p.factual.input_ids[0])
        assert world.QUESTIONS["describe"] in text
    with pytest.raises(InputError, match="unknown question"):
        organism_pairs(model, 1, 0, question="smell")


def test_keyword_scorer():
    s = KeywordScorer(world.SOUNDS)
    assert isinstance(s, CaptionScorer)
    assert s.score("A dog and a Bark!", "dog and bark") == 1.0
    assert s.score("a dog, ringing", "dog and ring") == 0.0          # whole words only
    assert s.score("I hear a ring and a bark.", "dog and bark") == 1.0  # recall ignores extra keywords
    assert KeywordScorer(world.SOUNDS, mode="jaccard").score("I hear a ring and a bark.", "dog and bark") == 0.5
    two = KeywordScorer(["fire truck", "siren"])
    assert two.score("a fire truck", "a siren from a fire truck") == 0.5
    assert two.score("a truck on fire", "fire truck") == 0.0
    with pytest.raises(InputError, match="none of the scorer's keywords"):
        s.score("dog", "a dog")
    with pytest.raises(InputError, match="one string"):
        KeywordScorer("bark")


def test_fidelity_scores_a_list():
    s = KeywordScorer(world.SOUNDS + world.OBJECTS)
    caps = ["dog and bark", "dog and ring", "car"]
    refs = ["dog and bark", "dog and bark", "car and engine"]
    torch.testing.assert_close(fidelity(caps, refs, s), torch.tensor([1.0, 0.5, 0.5]))
    with pytest.raises(InputError, match="2 captions but 3 references"):
        fidelity(caps[:2], refs, s)
    with pytest.raises(InputError, match="not a caption scorer"):
        fidelity(caps, refs, object())


def test_llm_judge_scorer_with_a_fake_judge():
    prompts = []

    def judge(prompt):
        prompts.append(prompt)
        return 'Sure. {"score": 85, "reason": "same objects, same sound"}'

    s = LLMJudgeScorer(judge)
    assert isinstance(s, CaptionScorer)
    assert s.score("a dog barks", "dog and bark") == pytest.approx(0.85)
    assert "a dog barks" in prompts[0] and "dog and bark" in prompts[0] and "0 to 100" in prompts[0]
    assert prompts[0] == CLAIR_TEMPLATE.format(candidate="a dog barks", reference="dog and bark")
    assert s.parse("Score: 40") == pytest.approx(0.4)
    assert s.parse(" 72/100 ") == pytest.approx(0.72)
    assert s.parse('{"Score": "15"}') == pytest.approx(0.15)
    assert LLMJudgeScorer(judge, template="{candidate} vs {reference}? 0-1", scale=1).parse("0.3") == pytest.approx(0.3)
    torch.testing.assert_close(fidelity(["x", "y"], ["z", "w"], s), torch.tensor([0.85, 0.85]))


def test_llm_judge_errors():
    s = LLMJudgeScorer(lambda p: "I cannot say how similar these are.")
    with pytest.raises(JudgeReplyError, match="could not read a score.*I cannot say") as e:
        s.score("a", "b")
    assert isinstance(e.value, InputError)
    with pytest.raises(JudgeReplyError, match="outside 0..100"):
        LLMJudgeScorer(lambda p: '{"score": 150}').score("a", "b")
    with pytest.raises(JudgeReplyError, match="not a string"):
        LLMJudgeScorer(lambda p: 85).score("a", "b")
    with pytest.raises(InputError, match="lacks \\{reference\\}"):
        LLMJudgeScorer(lambda p: "1", template="rate {candidate}")
    with pytest.raises(InputError, match="callable"):
        LLMJudgeScorer("gpt")
