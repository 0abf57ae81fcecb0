"""The hooked model equals transformers' Qwen2_5OmniThinkerForConditionalGeneration (eager, fp32):
logits and every layer's residual stream within 1e-4, greedy generation token for token, on tiny random
thinkers of several shapes loaded through from_pretrained(folder)."""

import pytest
import torch

from av_lens import HookedAVTransformer
from conftest import PAD_A, SPECS, cases, load_reference, padded_batch

TOL = 1e-4
CASES = ["text", "audio", "image", "video", "video_with_audio", "image_video_audio"]


@pytest.fixture(scope="module")
def pairs(tiny_dirs):
    return {name: (HookedAVTransformer.from_pretrained(d), load_reference(d)) for name, d in tiny_dirs.items()}


def hf_hidden(ref, inp):
    with torch.no_grad():
        out = ref(**inp.hf_kwargs(), output_hidden_states=True)
    return out.logits, out.hidden_states


def check_parity(ours, ref, inp):
    with torch.no_grad():
        logits, cache = ours.run_with_cache(inp, names_filter=lambda n: n == "hook_embed" or n.endswith("hook_resid_post"))
    hf_logits, hidden = hf_hidden(ref, inp)
    real = inp.attention_mask.bool()  # pad positions are not compared (their rows attend to nothing)
    assert (logits - hf_logits)[real].abs().max().item() <= TOL
    assert (cache["hook_embed"] - hidden[0])[real].abs().max().item() <= TOL
    n = ours.cfg.n_layers
    # transformers' last hidden state is after the final norm; compare it with ln_final applied to ours
    for layer in range(n - 1):
        d = (cache[f"blocks.{layer}.hook_resid_post"] - hidden[layer + 1])[real].abs().max().item()
        assert d <= TOL, f"layer {layer}: {d}"
    last = ours.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"])
    assert (last - hidden[n])[real].abs().max().item() <= TOL


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("case", CASES)
def test_forward_parity(pairs, media, spec, case):
    ours, ref = pairs[spec]
    inp = ours.prepare(**cases(media)[case])
    check_parity(ours, ref, inp)


@pytest.mark.parametrize("spec", ["gqa2_untied", "mqa_tied"])
def test_padded_batch_parity(pairs, media, spec):
    ours, ref = pairs[spec]
    inp = padded_batch(ours, media)
    assert inp.attention_mask[0].sum() < inp.attention_mask[1].sum()  # sample 0 is left-padded
    assert not inp.attention_mask[0, 0]
    check_parity(ours, ref, inp)
    # each row equals the same prompt run alone
    with torch.no_grad():
        batched = ours(inp)
        alone = ours(ours.prepare(PAD_A,
                                  audio=[media["wav3"]], chat=False))
    real0 = inp.attention_mask[0].bool()
    assert (batched[0, real0] - alone[0]).abs().max().item() <= TOL


def hf_generate(ref, inp, n):
    with torch.no_grad():
        out = ref.generate(**inp.hf_kwargs(), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, inp.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("case", CASES + ["padded_batch"])
def test_greedy_generate_matches(pairs, media, case):
    ours, ref = pairs["gqa2_untied"]
    inp = padded_batch(ours, media) if case == "padded_batch" else ours.prepare(**cases(media)[case])
    gen = ours.generate(inp, max_new_tokens=8, stop_at_eos=False, return_logits=True)
    hf_tokens, hf_logits = hf_generate(ref, inp, 8)
    assert gen.new_tokens.shape == (inp.shape[0], 8)
    assert torch.equal(gen.new_tokens, hf_tokens)
    assert (torch.stack(gen.logits, 1) - hf_logits).abs().max().item() <= TOL
    assert gen.layout.count("generated") == 8


def test_generate_on_tied_mqa_model(pairs, media):
    ours, ref = pairs["mqa_tied"]
    inp = ours.prepare(**cases(media)["video_with_audio"])
    gen = ours.generate(inp, max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(gen.new_tokens, hf_generate(ref, inp, 8)[0])


@pytest.mark.parametrize("rate", [5, 13])
def test_audio_in_video_uses_the_checkpoints_position_rate(tmp_path, media, rate):
    """A checkpoint whose ``position_id_per_seconds`` is not the processor's default of 25 interleaves its
    audio-in-video chunks by its own rate (the processor is told), and matches transformers fed the same ids."""
    import json as _json

    from av_lens.layout import Modality
    from av_lens.testing.tiny import save_tiny_qwen2_5_omni

    folder = save_tiny_qwen2_5_omni(tmp_path / "m")
    cfg = _json.loads((folder / "config.json").read_text())
    cfg["position_id_per_seconds"] = rate
    (folder / "config.json").write_text(_json.dumps(cfg))
    ours = HookedAVTransformer.from_pretrained(folder)
    inp = ours.prepare("Describe what you see and hear.", videos=[media["video"]], video_audio=[media["wav5"]],
                       use_audio_in_video=True)
    mods = inp.layout.modality[0].tolist()
    runs = sum(1 for a, b in zip(mods, mods[1:]) if a != b and b == int(Modality.AUDIO))
    assert runs >= 2, "audio-in-video should be interleaved in several 2-second chunks at this rate"
    ref = load_reference(folder)
    with torch.no_grad():
        assert (ours(inp) - ref(**inp.hf_kwargs()).logits).abs().max() < 1e-4
