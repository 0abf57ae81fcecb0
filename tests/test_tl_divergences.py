"""The three places where TransformerLens habits gave silently different numbers (issue 14), each checked
against an independent computation. Every test here fails on the code before the fix."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from av_lens import HookedAVTransformer
from conftest import cases

TOL = 1e-4


@pytest.fixture(scope="module")
def organism():
    return HookedAVTransformer.from_pretrained("av-lens/organism")


# ---------------------------------------------------------------------------------------- (a) padded token batches
def test_left_padded_to_tokens_batch_does_not_attend_to_pads(organism):
    m = organism
    a, b = "what do you hear in this clip now", "what do you hear"
    toks = m.to_tokens([a, b])
    assert m.tokenizer.padding_side == "left" and toks.shape[0] == 2
    n_b = m.to_tokens(b).shape[1]
    assert n_b < toks.shape[1]  # b is left-padded
    with torch.no_grad():
        batched = m(toks)
        alone = m(m.to_tokens(b))
    assert (batched[1, -n_b:] - alone[0]).abs().max() <= TOL
    # a copy of the tensor (not the one to_tokens returned) gets TL's inferred mask: leading pads
    with torch.no_grad():
        again = m(toks.clone())
    assert (again[1, -n_b:] - alone[0]).abs().max() <= TOL


def test_left_padding_on_request_and_explicit_attention_mask(model):
    a, b = "hello world foo bar", "hi"
    toks = model.to_tokens([a, b], padding_side="left")
    n_b = model.to_tokens(b).shape[1]
    with torch.no_grad():
        alone = model(model.to_tokens(b))
        fresh = toks.clone()  # inferred with the tokenizer's side (right) would be wrong: pass the mask as TL does
        mask = (torch.arange(toks.shape[1])[None] >= toks.shape[1] - torch.tensor([[toks.shape[1]], [n_b]])).long()
        explicit = model(fresh, attention_mask=mask)
        by_side = model(fresh, padding_side="left")
    assert (model(toks)[1, -n_b:] - alone[0]).abs().max() <= TOL
    assert (explicit[1, -n_b:] - alone[0]).abs().max() <= TOL
    assert (by_side[1, -n_b:] - alone[0]).abs().max() <= TOL


def test_right_padded_batch_matches_single_runs_and_masks_pad_targets(model):
    a, b = "hello world foo bar", "hi"
    toks = model.to_tokens([a, b])
    assert model.tokenizer.padding_side == "right"
    n_b = model.to_tokens(b).shape[1]
    with torch.no_grad():
        logits = model(toks)
        alone = model(model.to_tokens(b))
        loss = model(toks, return_type="loss", loss_per_token=True)
    assert (logits[1, :n_b] - alone[0]).abs().max() <= TOL
    assert torch.all(loss[1, n_b - 1:] == 0)  # pad targets carry no loss


# ---------------------------------------------------------------------------------------- (b) loss on text targets
def test_loss_covers_text_targets_only(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    with torch.no_grad():
        logits, loss = model(inp, return_type="both")
        per_tok = model(inp, return_type="loss", loss_per_token=True)
    ids = inp.input_ids[0]
    placeholder = {model.cfg.tokens.audio, model.cfg.tokens.video, model.cfg.tokens.image}
    lp = F.log_softmax(logits[0, :-1].double(), -1)
    keep = [i for i in range(len(ids) - 1) if int(ids[i + 1]) not in placeholder]
    n_media = len(ids) - 1 - len(keep)
    assert n_media > 10  # the case has many media targets
    ref = -torch.stack([lp[i, ids[i + 1]] for i in keep]).mean()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-4)
    every = -lp.gather(-1, ids[1:, None])[:, 0].mean()
    assert abs(every.item() - loss.item()) > 1e-3  # the old all-targets mean is a different number
    assert per_tok.shape == (1, len(ids) - 1)
    assert int((per_tok[0] != 0).sum()) == len(keep)


def test_text_only_loss_equals_transformer_lens_formula(model):
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

    toks = model.to_tokens(["hello world foo bar", "hi there"])
    mask = (toks != model.tokenizer.pad_token_id).long()
    with torch.no_grad():
        logits, loss = model(toks, return_type="both")
        per_tok = model(toks, return_type="loss", loss_per_token=True)
    assert loss.item() == pytest.approx(lm_cross_entropy_loss(logits, toks, mask).item(), abs=1e-5)
    assert torch.allclose(per_tok, lm_cross_entropy_loss(logits, toks, mask, per_token=True), atol=1e-5)


# ---------------------------------------------------------------------------------------- (c) unembedding directions
def test_tokens_to_residual_directions_are_W_U_columns(model):
    assert not torch.allclose(model.ln_final.w, torch.ones_like(model.ln_final.w))  # the norm weight matters here
    t = 5
    assert torch.equal(model.tokens_to_residual_directions(t), model.W_U[:, t])
    ts = torch.tensor([3, 5, 7])
    assert torch.equal(model.tokens_to_residual_directions(ts), model.W_U[:, ts].T)
    assert model.tokens_to_residual_directions(torch.tensor([5])).shape == (model.cfg.d_model,)
    resid = torch.randn(model.cfg.d_model)
    assert (resid @ model.tokens_to_residual_directions(t) - (resid @ model.W_U)[t]).abs() <= 1e-5
