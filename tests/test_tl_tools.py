"""TransformerLens 4's own analysis tools accept av_lens models and AVInputs where their contract allows
(issue 14, item 7): the logit lens and direct logit attribution of ``transformer_lens.tools.analysis``, and
attribution patching with an AVInput where it takes token ids."""

import numpy as np
import pytest
import torch
from transformer_lens.tools.analysis import attribution_patch, direct_logit_attribution, logit_lens

from av_lens import HookedAVTransformer
from av_lens.layout import Modality


@pytest.fixture(scope="module")
def folded(tiny_dir):
    return HookedAVTransformer.from_pretrained(tiny_dir, fold_ln=True).eval()


@pytest.fixture(scope="module")
def pair(folded, media):
    rng = np.random.default_rng(1)
    kw = dict(text="What sound do you hear?", audio=[media["wav3"]])
    other = (0.1 * rng.standard_normal(len(media["wav3"]))).astype(np.float32)
    return folded.prepare(**kw), folded.prepare(**{**kw, "audio": [other]})


def test_tl_logit_lens_on_a_cache_and_on_an_av_input(folded, pair):
    clean, _ = pair
    with torch.no_grad():
        logits, cache = folded.run_with_cache(clean)
    r = logit_lens(cache)
    assert r.values.shape[0] == folded.cfg.n_layers + 1
    assert torch.allclose(r.values[-1].reshape(-1), logits[0, -1], atol=1e-4)  # the final entry is the model's logits
    r2 = logit_lens(folded, clean)
    assert torch.allclose(r2.values, r.values, atol=1e-5)


def test_tl_direct_logit_attribution_sums_to_the_logit(folded, pair):
    clean, _ = pair
    with torch.no_grad():
        logits, cache = folded.run_with_cache(clean)
    tok = int(logits[0, -1].argmax())
    dla = direct_logit_attribution(folded, clean, answer_tokens=torch.tensor([tok]), cache=cache)
    assert dla.attribution.sum().item() == pytest.approx(logits[0, -1, tok].item(), abs=1e-3)


def test_tl_attribution_patching_takes_av_inputs(folded, pair):
    clean, corrupt = pair
    metric = lambda logits: logits[0, -1, 5] - logits[0, -1, 6]
    res = attribution_patch(folded, clean, corrupt, metric)
    embed = {n.position: s for n, s in res.node_scores.items() if n.kind == "embed"}
    mod = clean.layout.modality[0]
    text = [p for p in range(clean.shape[1]) if int(mod[p]) == int(Modality.TEXT)]
    audio = [p for p in range(clean.shape[1]) if int(mod[p]) == int(Modality.AUDIO)]
    assert all(embed[p] == 0 for p in text)  # the two inputs differ only in their audio
    assert any(abs(embed[p]) > 0 for p in audio)
