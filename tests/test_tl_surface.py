"""The HookedTransformer surface TL code touches most, with TL's semantics (text-only parity against the
tokenizer / TL formulas computed here) and its audio-visual extensions."""

import numpy as np
import pytest
import torch

from av_lens import HookedAVTransformer, InputError, utils
from conftest import cases

TOL = 1e-4


@pytest.fixture(scope="module")
def av(model, media):
    return model.prepare(**cases(media)["video_with_audio"])


# ------------------------------------------------------------------------------------------------ tokens
def test_to_tokens_keywords_have_tl_meaning(model):
    tok = model.tokenizer
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    assert model.to_tokens("hello world").tolist() == [ids]
    bos = tok.eos_token_id  # no BOS in this tokenizer: TL substitutes the EOS token
    assert tok.bos_token_id is None
    assert model.to_tokens("hello world", prepend_bos=True).tolist() == [[bos, *ids]]
    short = tok("hi", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id
    n = len(ids)
    left = model.to_tokens(["hello world", "hi"], padding_side="left")
    right = model.to_tokens(["hello world", "hi"], padding_side="right")
    assert left.tolist() == [ids, [pad] * (n - len(short)) + short]
    assert right.tolist() == [ids, short + [pad] * (n - len(short))]
    model.cfg.n_ctx, old = 2, model.cfg.n_ctx
    try:
        assert model.to_tokens("hello world", truncate=True).shape == (1, 2)
        assert model.to_tokens("hello world", truncate=False).shape == (1, n)
    finally:
        model.cfg.n_ctx = old
    assert model.to_tokens("hi", move_to_device=False).device.type == "cpu"


def test_to_string_and_single_token(model):
    toks = model.to_tokens(["hello world", "hi"])
    assert model.to_string(toks) == model.tokenizer.batch_decode(toks, clean_up_tokenization_spaces=False)
    assert model.to_string(toks[0]) == model.tokenizer.decode(toks[0], clean_up_tokenization_spaces=False)
    t = int(toks[0, 0])
    assert model.to_string(torch.tensor(t)) == model.tokenizer.decode([t])
    s = model.to_string(torch.tensor(t))
    assert model.to_single_token(s) == t
    with pytest.raises(InputError, match="not one"):
        model.to_single_token("hello world foo")


def test_to_str_tokens_text_as_tl(model):
    toks = model.to_tokens("hello world")
    ref = [model.tokenizer.decode([i]) for i in toks[0].tolist()]
    assert model.to_str_tokens("hello world") == ref
    assert model.to_str_tokens(toks) == ref  # [1, pos] is squeezed
    assert model.to_str_tokens(toks[0]) == ref
    assert model.to_str_tokens(["hello world", "hi"]) == [ref, model.to_str_tokens("hi")]
    assert model.to_str_tokens("hello world", prepend_bos=True)[0] == model.tokenizer.eos_token


def test_to_str_tokens_labels_media_positions(model, av):
    strs = model.to_str_tokens(av)
    L = av.layout
    assert len(strs) == av.shape[1]
    a = int(L.positions("audio")[3])
    assert strs[a] == f"<audio 0 · {float(L.time[0, a]):.2f} s>"
    v = int(L.positions("video")[-1])
    assert strs[v] == f"<video 0 · {float(L.time[0, v]):.2f} s>"
    t = int(L.positions("text")[0])
    assert strs[t] == model.tokenizer.decode([int(av.input_ids[0, t])])
    assert sum(s.startswith("<audio") for s in strs) == L.count("audio")


def test_get_token_position(model, av):
    toks = model.to_tokens("hello world hello")
    first = int(toks[0, 0])
    assert model.get_token_position(first, toks) == 0
    last = (toks[0] == first).nonzero()[-1].item()
    assert model.get_token_position(first, toks, mode="last") == last
    assert model.get_token_position(model.to_string(torch.tensor(first)), "hello world hello") == 0
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.get_token_position(im_end, av) == int((av.input_ids[0] == im_end).nonzero()[0])
    with pytest.raises(InputError, match="does not occur"):
        model.get_token_position(399, toks)


def test_forward_accepts_prepend_bos_and_padding_side_for_strings(model):
    with torch.no_grad():
        a = model("hello world", prepend_bos=True)
        b = model(model.to_tokens("hello world", prepend_bos=True))
        c = model(["hello world", "hi"], padding_side="left")
        d = model(model.to_tokens("hi"))
    assert torch.allclose(a, b, atol=TOL)
    assert (c[1, -d.shape[1]:] - d[0]).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ switches
def test_split_qkv_input_hooks_and_same_logits(model, av):
    with torch.no_grad():
        base = model(av)
        model.set_use_split_qkv_input(True)
        try:
            logits, cache = model.run_with_cache(av)
            nh, nkv = model.cfg.n_heads, model.cfg.n_key_value_heads
            assert cache["blocks.0.hook_q_input"].shape == (1, av.shape[1], nh, model.cfg.d_model)
            assert cache["blocks.0.hook_k_input"].shape == (1, av.shape[1], nkv, model.cfg.d_model)
            assert (logits - base).abs().max() <= TOL

            def zero_head0(x, hook):
                x = x.clone()
                x[:, :, 0] = 0
                return x

            qs = {}
            model.run_with_hooks(av, fwd_hooks=[("blocks.0.hook_q_input", zero_head0),
                                                ("blocks.0.attn.hook_q", lambda x, hook: qs.setdefault("q", x))])
            q_ref = cache["blocks.0.attn.hook_q"]
            assert torch.allclose(qs["q"][:, :, 1:], q_ref[:, :, 1:], atol=1e-5)  # other heads untouched
            assert torch.allclose(qs["q"][:, :, 0], model.blocks[0].attn.b_Q[0].expand_as(qs["q"][:, :, 0]), atol=1e-5)
        finally:
            model.set_use_split_qkv_input(False)


def test_attn_in_and_mlp_in_hooks_and_same_logits(model, av):
    with torch.no_grad():
        base = model(av)
        model.set_use_attn_in(True)
        model.set_use_hook_mlp_in(True)
        try:
            logits, cache = model.run_with_cache(av)
        finally:
            model.set_use_attn_in(False)
            model.set_use_hook_mlp_in(False)
    assert (logits - base).abs().max() <= TOL
    assert cache["blocks.1.hook_attn_in"].shape == (1, av.shape[1], model.cfg.n_heads, model.cfg.d_model)
    assert torch.allclose(cache["blocks.1.hook_attn_in"][:, :, 2], cache["blocks.1.hook_resid_pre"])
    assert torch.allclose(cache["blocks.1.hook_mlp_in"], cache["blocks.1.hook_resid_mid"])
    _, plain = model.run_with_cache(av)
    assert "blocks.1.hook_mlp_in" not in plain.cache_dict  # off again


def test_set_use_attn_result(model, av):
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(av, names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out")))
    finally:
        model.set_use_attn_result(False)
    assert (cache["result", 0].sum(2) - cache["attn_out", 0]).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ utils
def test_get_act_name_matches_hook_names(model, av):
    assert utils.get_act_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    assert utils.get_act_name("resid_post", 0) == "blocks.0.hook_resid_post"
    assert utils.get_act_name("scale", 0, "ln1") == "blocks.0.ln1.hook_scale"
    for n in ("pattern", "q", "z", "resid_pre", "mlp_out", "post", "pre", "normalized"):
        name = utils.get_act_name(n, 0, "ln1" if n == "normalized" else None)
        assert name in model.hook_dict, name
    _, cache = model.run_with_cache(av)
    assert torch.equal(cache[utils.get_act_name("pattern", 1)], cache["pattern", 1])


def test_utils_tensor_helpers():
    x = torch.randn(1, 3, 2, dtype=torch.bfloat16)
    assert utils.to_numpy(x).dtype == np.float32 and utils.to_numpy(x).shape == (1, 3, 2)
    assert utils.remove_batch_dim(x).shape == (3, 2)
    assert utils.remove_batch_dim(torch.zeros(2, 3)).shape == (2, 3)


def test_lm_cross_entropy_loss_on_av_and_tokens(model, av):
    with torch.no_grad():
        logits, loss = model(av, return_type="both")
    assert utils.lm_cross_entropy_loss(logits, av).item() == pytest.approx(loss.item(), abs=1e-6)
    toks = model.to_tokens("hello world foo")
    with torch.no_grad():
        lg = model(toks)
    lp = lg.log_softmax(-1)[0, :-1].gather(-1, toks[0, 1:, None])[:, 0]
    assert utils.lm_cross_entropy_loss(lg, toks).item() == pytest.approx(-lp.mean().item(), abs=1e-5)


def _rank(logits_row, token):
    return int((logits_row > logits_row[token]).sum())


def test_test_prompt_on_text_and_av(model, av, capsys):
    answer = " world"
    ans = model.to_tokens(answer)[0]
    ranks = utils.test_prompt("hello", "world", model, print_details=True)
    with torch.no_grad():
        lg = model(torch.cat([model.to_tokens("hello")[0], ans])[None])
    n = model.to_tokens("hello").shape[1]
    assert [r for _, r in ranks] == [_rank(lg[0, n - 1 + j], int(ans[j])) for j in range(len(ans))]
    assert "Tokenized prompt" in capsys.readouterr().out
    ranks = utils.test_prompt(av, "world", model, print_details=False)
    with torch.no_grad():
        lg = model(av.extend(ans[None]))
    assert ranks[0][1] == _rank(lg[0, av.shape[1] - 1], int(ans[0]))


def test_transformer_lens_utilities_test_prompt_runs_on_av_lens(model, capsys):
    from transformer_lens.utilities import exploratory_utils

    exploratory_utils.test_prompt("hello", "world", model, top_k=3)
    out = capsys.readouterr().out
    assert "Tokenized prompt" in out and "Ranks of the answer tokens" in out
