"""AVInput behaves like a [batch, pos] token batch where TL code treats it as one (issue 14, item 4)."""

import pytest
import torch
from transformer_lens import patching

from av_lens import AVInput, InputError
from conftest import cases, padded_batch

TOL = 1e-4


@pytest.fixture(scope="module")
def batch(model, media):
    return padded_batch(model, media)  # two samples with different media layouts


@pytest.fixture(scope="module")
def batch_logits(model, batch):
    with torch.no_grad():
        return model(batch)


def _real(inp, b):
    return inp.attention_mask[b].bool()


def test_shape_size_len(batch):
    assert batch.shape == batch.input_ids.shape and batch.size() == batch.input_ids.size()
    assert batch.size(0) == 2 and batch.size(-1) == batch.shape[1] and len(batch) == 2


@pytest.mark.parametrize("index", [1, -1, [1], slice(1, 2), torch.tensor([1]), torch.tensor([False, True])])
def test_one_sample_runs_as_in_the_batch(model, batch, batch_logits, index):
    one = batch[index]
    assert isinstance(one, AVInput) and len(one) == 1
    with torch.no_grad():
        out = model(one)
    m = _real(batch, 1)
    assert (out[0, m] - batch_logits[1, m]).abs().max() <= TOL


def test_permuted_batch_and_repeats(model, batch, batch_logits):
    with torch.no_grad():
        swapped = model(batch[[1, 0]])
        twice = model(batch[[0, 0]])
    for new, old in ((0, 1), (1, 0)):
        m = _real(batch, old)
        assert (swapped[new, m] - batch_logits[old, m]).abs().max() <= TOL
    m = _real(batch, 0)
    assert (twice[1, m] - batch_logits[0, m]).abs().max() <= TOL
    assert batch[:2].input_ids.equal(batch.input_ids)
    assert torch.equal(batch[0, 3:], batch.input_ids[0, 3:])  # a tuple indexes the token ids


def test_encoded_inputs_split_by_sample(model, batch, batch_logits):
    enc = model.encode(batch)
    with torch.no_grad():
        out = model(enc[[1, 0]])
    m = _real(batch, 0)
    assert (out[1, m] - batch_logits[0, m]).abs().max() <= TOL


def test_concatenation_of_equal_layouts(model, media):
    kw = cases(media)["video_with_audio"]
    a = model.prepare(**kw)
    b = model.prepare(**{**kw, "video_audio": [media["wav5"][::-1].copy()]})
    both = torch.cat([a, b])
    assert len(both) == 2 and isinstance(both, AVInput)
    with torch.no_grad():
        out = model(both)
        la, lb = model(a), model(b)
    assert (out[0] - la[0]).abs().max() <= TOL and (out[1] - lb[0]).abs().max() <= TOL
    assert (model(AVInput.cat([b, a]))[0] - lb[0]).abs().max() <= TOL
    with pytest.raises(InputError, match="concatenate"):
        torch.cat([a, model.prepare(**cases(media)["audio"])])


def test_per_sample_encoder_cache_entries(model, batch):
    _, cache = model.run_with_cache(batch)
    _, c1 = model.run_with_cache(batch[1])
    rows = cache.media_rows("hook_audio_embed", 1)
    assert rows.shape[0] == batch.layout.count("audio", batch=1)
    assert (rows - c1["hook_audio_embed"]).abs().max() <= TOL
    sliced = cache.apply_slice_to_batch_dim([1])
    assert (sliced["hook_audio_embed"] - c1["hook_audio_embed"]).abs().max() <= TOL
    m = _real(batch, 1)
    assert (sliced["resid_post", 1][0, m] - c1["resid_post", 1][0, m]).abs().max() <= TOL
    assert sliced.layout.batch_size == 1


def test_corrupt_by_permuting_the_batch_with_patching(model, media):
    kw = cases(media)["video_with_audio"]
    a = model.prepare(**kw)
    b = model.prepare(**{**kw, "video_audio": [media["wav5"][::-1].copy()]})
    clean = torch.cat([a, b])
    corrupt = clean[[1, 0]]
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
    metric = lambda logits: logits[:, -1].sum()
    res = patching.generic_activation_patch(
        model, corrupt, cache, metric, patch_setter=lambda act, index, clean_act: clean_act.clone(),
        activation_name="resid_pre", index_axis_names=("layer",))
    assert torch.allclose(res, metric(clean_logits).expand(model.cfg.n_layers), atol=1e-3)
