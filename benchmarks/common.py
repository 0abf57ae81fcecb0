"""What the benchmark scripts share: the random-weight checkpoint, model-size arguments, timing, peak memory."""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download

import torch  # noqa: E402


def add_model_args(ap: argparse.ArgumentParser, *, layers: int, width: int, heads: int, kv: int, ffn: int,
                   vocab: int) -> None:
    """--layers/--width/--heads/--kv/--ffn/--vocab with the given defaults."""
    for name, default in (("layers", layers), ("width", width), ("heads", heads), ("kv", kv), ("ffn", ffn),
                          ("vocab", vocab)):
        ap.add_argument(f"--{name}", type=int, default=default)


def build(folder, layers, width, heads, kv, ffn, vocab, dtype=None):
    """Save a random-weight Qwen2.5-Omni thinker of these LM dimensions (tiny towers, tiny processor).

    ``dtype`` (e.g. torch.bfloat16) converts the weights before saving; the default keeps fp32."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from av_lens.testing.tiny import TinySpec, build_tiny_processor, build_tiny_tokenizer, tiny_thinker_config

    tok = build_tiny_tokenizer()
    spec = TinySpec(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=kv, d_mlp=ffn,
                    mrope_section=(16, 24, 24) if width // heads == 128 else _sections(width // heads))
    cfg = tiny_thinker_config(spec, tok)
    cfg.text_config.vocab_size = vocab
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    build_tiny_processor(tok).save_pretrained(folder)


def build_from_args(folder, a) -> None:
    build(folder, a.layers, a.width, a.heads, a.kv, a.ffn, a.vocab)


def _sections(d_head):
    half = d_head // 2
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


def timed(fn, reps):
    """Median wall time of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so set-up peaks do not count; returns RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")



def peak_start(device: str = "cpu") -> float:
    """Start a peak-memory measurement; returns the memory in use now (MB).

    CPU: the process's RSS, after resetting its peak mark (VmHWM) through /proc/self/clear_refs.
    CUDA: torch.cuda.memory_allocated, after torch.cuda.reset_peak_memory_stats."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return reset_peak()


def peak_read(device: str = "cpu") -> float:
    """The peak memory (MB) since :func:`peak_start`: VmHWM on the CPU, torch.cuda.max_memory_allocated on CUDA."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mb("VmHWM")
