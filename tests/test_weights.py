"""TransformerLens's weight processing (fold_ln, fold_value_biases, center_unembed) on RMSNorm models, against
TL 3's documented formulas computed here from the unprocessed model, and the same outputs."""

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer, InputError
from conftest import cases

TOL = 1e-4


@pytest.fixture(scope="module")
def raw(tiny_dir):
    return HookedAVTransformer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def folded(tiny_dir):
    return HookedAVTransformer.from_pretrained(tiny_dir, fold_ln=True, fold_value_biases=True)


@pytest.fixture(scope="module")
def processed(tiny_dir):
    return HookedAVTransformer.from_pretrained(tiny_dir, fold_ln=True, fold_value_biases=True, center_unembed=True)


@pytest.fixture(scope="module")
def av_input(raw, media):
    return raw.prepare(**cases(media)["video_with_audio"])


def test_default_and_no_processing_are_the_unprocessed_weights(raw, tiny_dir):
    plain = HookedAVTransformer.from_pretrained_no_processing(tiny_dir)
    for a, b in zip(raw.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    assert raw.cfg.normalization_type == "RMS"
    assert not torch.allclose(raw.blocks[0].ln1.w, torch.ones_like(raw.blocks[0].ln1.w))


def test_folded_weights_equal_tl_formulas(raw, folded):
    for l in range(raw.cfg.n_layers):
        w1, w2 = raw.blocks[l].ln1.w, raw.blocks[l].ln2.w
        for name in ("W_Q", "W_K", "W_V"):  # W <- diag(w1) W, per head: [head, d_model, d_head]
            ref = w1[None, :, None] * getattr(raw.blocks[l].attn, name)
            assert torch.allclose(getattr(folded.blocks[l].attn, name), ref, atol=1e-6)
        for name in ("W_gate", "W_in"):  # [d_model, d_mlp]
            assert torch.allclose(getattr(folded.blocks[l].mlp, name), w2[:, None] * getattr(raw.blocks[l].mlp, name),
                                  atol=1e-6)
        assert torch.equal(folded.blocks[l].attn.W_O, raw.blocks[l].attn.W_O)
        # fold_value_biases: b_O = sum_h b_V[h] @ W_O[h], b_V = 0
        ref_bO = torch.einsum("hd,hdm->m", raw.blocks[l].attn.b_V, raw.blocks[l].attn.W_O)
        assert torch.allclose(folded.blocks[l].attn.b_O, ref_bO, atol=1e-6)
        assert torch.all(folded.blocks[l].attn.b_V == 0)
        assert torch.equal(folded.blocks[l].attn.b_Q, raw.blocks[l].attn.b_Q)
        assert torch.all(folded.blocks[l].ln1.w == 1) and torch.all(folded.blocks[l].ln2.w == 1)
    assert torch.allclose(folded.W_U, raw.ln_final.w[:, None] * raw.W_U, atol=1e-6)
    assert torch.equal(folded.W_E, raw.W_E)
    assert folded.cfg.normalization_type == "RMSPre"
    assert torch.allclose(folded.b_O, torch.stack([b.attn.b_O for b in folded.blocks]))
    assert torch.allclose(folded.accumulated_bias(1), folded.blocks[0].attn.b_O)
    assert torch.allclose(folded.accumulated_bias(1, mlp_input=True), folded.b_O.sum(0))


def test_center_unembed_formula(folded, processed):
    ref = folded.W_U - folded.W_U.mean(-1, keepdim=True)  # mean over the vocabulary
    assert torch.allclose(processed.W_U, ref, atol=1e-6)
    assert processed.W_U.mean(-1).abs().max() <= 1e-6


def test_processed_model_gives_the_same_outputs(raw, folded, processed, av_input):
    with torch.no_grad():
        a, b, c = raw(av_input), folded(av_input), processed(av_input)
    assert (a - b).abs().max() <= TOL  # fold_ln and fold_value_biases keep the logits
    assert (a.log_softmax(-1) - c.log_softmax(-1)).abs().max() <= TOL  # center_unembed keeps log-probs
    shift = (a - c)[0]
    assert (shift - shift[:, :1]).abs().max() <= TOL  # a per-position constant
    with torch.no_grad():
        _, ca = raw.run_with_cache(av_input)
        _, cb = folded.run_with_cache(av_input)
    assert (ca["resid_post", 0] - cb["resid_post", 0]).abs().max() <= TOL
    assert (ca["pattern", 1] - cb["pattern", 1]).abs().max() <= 1e-5


def test_fold_ln_makes_logit_attrs_sum_without_the_weight(folded, av_input):
    with torch.no_grad():
        logits, cache = folded.run_with_cache(av_input)
    token = int(logits[0, -1].argmax())
    parts = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(parts, tokens=torch.tensor([token]), pos_slice=-1)
    assert attrs.sum(0).item() == pytest.approx(logits[0, -1, token].item(), abs=1e-3)


def test_tied_embeddings_are_untied_when_folding(tiny_dirs):
    raw = HookedAVTransformer.from_pretrained(tiny_dirs["mqa_tied"])
    f = HookedAVTransformer.from_pretrained(tiny_dirs["mqa_tied"], fold_ln=True)
    assert torch.equal(f.W_E, raw.W_E)
    assert torch.allclose(f.W_U, raw.ln_final.w[:, None] * raw.W_U, atol=1e-6)
    ids = raw.to_tokens("hello world")
    with torch.no_grad():
        assert (raw(ids) - f(ids)).abs().max() <= TOL


def test_center_writing_weights_is_skipped_with_a_warning_as_tl_does(tiny_dir, raw):
    with pytest.warns(UserWarning, match="RMSNorm"):
        m = HookedAVTransformer.from_pretrained(tiny_dir, center_writing_weights=True)
    assert torch.equal(m.W_E, raw.W_E) and torch.equal(m.W_O, raw.W_O)


def test_refactor_factored_attn_matrices_is_refused_for_rotary(tiny_dir):
    with pytest.raises(InputError, match="rotary"):
        HookedAVTransformer.from_pretrained(tiny_dir, refactor_factored_attn_matrices=True)
