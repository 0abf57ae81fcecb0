"""Sampling, stopping and the processor-dict path of generation."""

import torch

from conftest import cases


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    greedy = model.generate(inp, max_new_tokens=6, stop_at_eos=False).new_tokens
    a = model.generate(inp, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, stop_at_eos=False).new_tokens
    b = model.generate(inp, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, stop_at_eos=False).new_tokens
    c = model.generate(inp, max_new_tokens=6, do_sample=True, temperature=1.5, seed=4, stop_at_eos=False).new_tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # at temperature 1.5 over ~400 tokens, two seeds differ
    k1 = model.generate(inp, max_new_tokens=6, do_sample=True, top_k=1, seed=5, stop_at_eos=False).new_tokens
    assert torch.equal(k1, greedy)
    p0 = model.generate(inp, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=5, stop_at_eos=False).new_tokens
    assert torch.equal(p0, greedy)


def test_stops_at_eos_and_pads_finished_rows(model, media):
    inp = model.prepare(**cases(media)["audio"])
    first = int(model.generate(inp, max_new_tokens=1).new_tokens[0, 0])
    gen = model.generate(inp, max_new_tokens=5, eos_token_ids=(first,))
    assert gen.new_tokens.shape == (1, 1)  # stopped after the "end" token


def test_generation_grows_layout_and_positions(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    gen = model.generate(inp, max_new_tokens=4, stop_at_eos=False)
    L = gen.layout
    start = int(inp.layout.position_ids.max()) + 1
    assert L.position_ids[:, 0, -4:].tolist() == [[start + k for k in range(4)]] * 3
    assert L.positions("generated").tolist() == list(range(inp.shape[1], inp.shape[1] + 4))
    assert torch.equal(gen.sequences[:, -4:], gen.new_tokens)


def test_processor_dict_is_accepted(model, media):
    proc = model.processor
    text = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>hi<|im_end|>\n<|im_start|>assistant\n"
    data = proc(text=[text], audio=[media["wav3"]], return_tensors="pt")
    via_dict = model.prepare(processor_output=data)
    via_media = model.prepare(text, audio=[media["wav3"]], chat=False)
    with torch.no_grad():
        assert torch.equal(model(dict(data)), model(via_media))
    assert torch.equal(via_dict.layout.position_ids, via_media.layout.position_ids)


# ------------------------------------------------------------------------------------------ TL keywords
def test_tl_return_types_and_kv_cache_off(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    g = model.generate(inp, max_new_tokens=4, stop_at_eos=False)
    toks = model.generate(inp, max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    assert torch.equal(toks, g.sequences)
    no_cache = model.generate(inp, max_new_tokens=4, stop_at_eos=False, use_past_kv_cache=False, return_type="tokens")
    assert torch.equal(no_cache, g.sequences)  # same greedy tokens with and without the KV cache
    extended = model.generate(inp, max_new_tokens=4, stop_at_eos=False, return_type="input")
    assert torch.equal(extended.input_ids, g.sequences) and extended.layout.count("generated") == 4
    s = model.generate("hello world", max_new_tokens=3, stop_at_eos=False, return_type="input")
    ids = model.generate(model.to_tokens("hello world"), max_new_tokens=3, stop_at_eos=False, return_type="input")
    assert isinstance(s, str) and s == model.to_string(ids[0])
    assert model.generate(["hello world"], max_new_tokens=3, stop_at_eos=False, return_type="str") == [s]


def test_tl_eos_token_id_and_freq_penalty(model, media):
    inp = model.prepare(**cases(media)["audio"])
    first = int(model.generate(inp, max_new_tokens=1).new_tokens[0, 0])
    assert model.generate(inp, max_new_tokens=5, eos_token_id=first).new_tokens.shape == (1, 1)
    assert model.generate(inp, max_new_tokens=5, eos_token_id=[first, 3]).new_tokens.shape == (1, 1)
    # a huge frequency penalty forbids repeating any token of the sequence (top_k=1: greedy after the penalty)
    seen = set(inp.input_ids[0].tolist())
    new = model.generate(inp, max_new_tokens=6, do_sample=True, top_k=1, freq_penalty=1e4, seed=0,
                         stop_at_eos=False).new_tokens[0].tolist()
    assert not seen & set(new) and len(set(new)) == len(new)
    greedy = model.generate(inp, max_new_tokens=6, freq_penalty=1e4, stop_at_eos=False).new_tokens
    assert torch.equal(greedy, model.generate(inp, max_new_tokens=6, stop_at_eos=False).new_tokens)  # TL: sampling only
