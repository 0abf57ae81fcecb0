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
