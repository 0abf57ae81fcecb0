"""Token distribution shift: teacher-forced ranks, probabilities and KL against a brute-force recomputation."""

import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens.analysis.token_shift import append_tokens, pooled_fractions, token_shift, token_shift_batch
from av_lens.errors import InputError
from conftest import cases


@pytest.fixture(scope="module")
def other(tiny_dirs):
    """A second tiny thinker of another shape (3 layers, width 96) with the same tokenizer."""
    return HookedAVTransformer.from_pretrained(tiny_dirs["gqa4_3layers"])


def full_sequence(model, prompt, tokens):
    """prompt + tokens rebuilt from scratch through the processor-dict path (layout computed anew, not extended)."""
    data = {k: v for k, v in prompt.hf_kwargs().items() if k != "use_audio_in_video"}
    data["input_ids"] = torch.cat([prompt.input_ids.cpu(), torch.as_tensor(tokens)[None]], 1)
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    return model.prepare(processor_output=data, use_audio_in_video=prompt.use_audio_in_video)


def brute_force(model, base, prompt, base_prompt, tokens):
    """Ranks, base probabilities and KL(p_model || p_base) from each model's full-sequence logits, in float64."""
    rows = []
    for m, p in ((model, prompt), (base, base_prompt)):
        with torch.no_grad():
            logits = m(full_sequence(m, p, tokens))[0].double()
        P = p.input_ids.shape[1]
        rows.append(logits[P - 1: P - 1 + len(tokens)])
    la, lb = rows
    tok = torch.as_tensor(tokens)
    order = lb.argsort(-1, descending=True)
    ranks = torch.tensor([int((order[j] == tok[j]).nonzero()) + 1 for j in range(len(tokens))])
    pa, pb = la.softmax(-1), lb.softmax(-1)
    kl = (pa * (pa.log() - pb.log())).sum(-1)
    return ranks, pb[torch.arange(len(tokens)), tok], pa[torch.arange(len(tokens)), tok], kl


def test_base_equal_to_model_gives_rank_one_and_zero_kl(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    gen = model.generate(inp, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    res = token_shift(model, model, inp, None, output_tokens=gen.new_tokens[0], max_new_tokens=6,
                      eos_token_ids=())
    assert len(res) == 6 and torch.equal(res.tokens, gen.new_tokens[0].cpu())
    assert res.ranks.tolist() == [1] * 6
    torch.testing.assert_close(res.kl, torch.zeros(6), atol=1e-6, rtol=0)
    assert res.fractions() == {"unshifted": 1.0, "marginal": 0.0, "shifted": 0.0}
    # teacher forcing reproduces the distributions greedy decoding (KV cache, extended layout) saw
    step_p = torch.stack([l[0].softmax(-1)[t] for l, t in zip(gen.logits, gen.new_tokens[0].tolist())])
    torch.testing.assert_close(res.avllm_prob, step_p, atol=1e-5, rtol=1e-4)
    # output_tokens=None generates greedily: the same tokens
    again = token_shift(model, model, inp, max_new_tokens=6, eos_token_ids=())
    assert torch.equal(again.tokens, res.tokens)


def test_other_base_with_other_media_matches_brute_force(model, other, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    base_inp = other.prepare("Describe what you see and hear.", videos=[media["video"]])  # silent video
    tokens = model.generate(inp, max_new_tokens=5, stop_at_eos=False).new_tokens[0].tolist()
    res = token_shift(model, other, inp, base_inp, output_tokens=tokens, eos_token_ids=())
    ranks, pb, pa, kl = brute_force(model, other, inp, base_inp, tokens)
    assert res.ranks.tolist() == ranks.tolist()
    torch.testing.assert_close(res.base_prob.double(), pb, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(res.avllm_prob.double(), pa, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(res.kl.double(), kl, atol=1e-5, rtol=1e-3)
    assert (res.kl > 0).all()
    cats = ["unshifted" if r == 1 else "marginal" if r <= 3 else "shifted" for r in ranks.tolist()]
    assert res.category == cats
    frac = res.fractions()
    assert frac["shifted"] == pytest.approx(cats.count("shifted") / 5) and sum(frac.values()) == pytest.approx(1)
    table = res.table()
    assert "rank" in table and "5 tokens" in table
    # thresholds are parameters: with a wide "marginal" band nothing is shifted
    wide = token_shift(model, other, inp, base_inp, output_tokens=tokens, eos_token_ids=(), marginal_max_rank=10 ** 6)
    assert wide.fractions()["shifted"] == 0.0 and wide.ranks.tolist() == ranks.tolist()


def test_output_stops_at_first_eos(model, other, media):
    inp = model.prepare(**cases(media)["audio"])
    eos = model.cfg.eos_token_ids[0]
    toks = [40, 41, eos, 42, eos]
    res = token_shift(model, other, inp, None, output_tokens=toks)
    assert res.tokens.tolist() == [40, 41, eos]
    ranks, *_ = brute_force(model, other, inp, inp, [40, 41, eos])
    assert res.ranks.tolist() == ranks.tolist()
    assert token_shift(model, other, inp, None, output_tokens=toks, include_eos=False).tokens.tolist() == [40, 41]
    empty = token_shift(model, other, inp, None, output_tokens=[eos], include_eos=False)
    assert len(empty) == 0 and all(v != v for v in empty.fractions().values())  # NaN for no tokens


def test_batch_matches_one_prompt_at_a_time(model, other):
    texts = ["Hello world, what is in this video?", "What sound?"]
    batch = model.prepare(texts)  # left-padded
    rows = [[50, 60, 70, 80], [90, 100]]
    together = token_shift_batch(model, other, batch, None, output_tokens=rows, eos_token_ids=())
    for text, row, res in zip(texts, rows, together):
        alone = token_shift(model, other, model.prepare(text), None, output_tokens=row, eos_token_ids=())
        assert res.tokens.tolist() == row
        assert res.ranks.tolist() == alone.ranks.tolist()
        torch.testing.assert_close(res.kl, alone.kl, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.base_prob, alone.base_prob, atol=1e-6, rtol=1e-4)
    pooled = pooled_fractions(together)
    assert sum(pooled.values()) == pytest.approx(1.0)


def test_append_tokens_positions_continue_after_prompt(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    ext = append_tokens(inp, torch.tensor([[5, 6, 7]]))
    start = int(inp.layout.position_ids.max()) + 1
    assert ext.layout.position_ids[:, 0, -3:].tolist() == [[start, start + 1, start + 2]] * 3
    assert ext.layout.positions("generated").tolist() == [inp.shape[1] + k for k in range(3)]
    rebuilt = full_sequence(model, inp, [5, 6, 7])
    assert torch.equal(ext.layout.position_ids, rebuilt.layout.position_ids)


def test_errors(model, media):
    inp = model.prepare(["a b", "c"])
    with pytest.raises(InputError, match="token_shift_batch"):
        token_shift(model, model, inp, output_tokens=[1, 2])
    one = model.prepare("hello")
    with pytest.raises(InputError, match="outside the shared vocabulary"):
        token_shift(model, model, one, output_tokens=[10 ** 6])
    with pytest.raises(InputError, match="base_inputs has 2"):
        token_shift_batch(model, model, one, inp, output_tokens=[[1]])
    with pytest.raises(InputError, match="rank thresholds"):
        token_shift(model, model, one, output_tokens=[1], unshifted_max_rank=4, marginal_max_rank=3)
