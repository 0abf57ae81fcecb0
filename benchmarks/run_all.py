"""Issue 7's whole performance table in one run: every ratio against a baseline measured in the same run.

Rows (all on one random-weight Qwen2.5-Omni thinker checkpoint, loaded by av_lens and by transformers):

* backbone forward, text-only ``seq x batch`` cells: av_lens without hooks vs transformers sdpa (target <= 1.05),
  and av_lens with a hook on every ``blocks.{l}.attn.hook_pattern`` vs transformers eager (target <= 1.0);
* on an audio-visual prompt (video + its soundtrack interleaved + text): ``run_with_cache`` with one filtered
  hook and with the full cache vs a plain forward (time); a knockout sweep of W single-layer windows vs its
  ideal, 1 encoder pass + (W + 1) language-model-only passes (``knockout_sweep`` also runs the unedited
  baseline; target <= 1.1); greedy generation with generated->video knocked out in every layer vs plain
  generation and vs transformers' ``generate``;
* peak memory: ``run_with_cache`` with one filtered hook (target <= 1.05x) and the full cache vs a plain
  forward on that prompt; attention flow over a ~4k-token study-like input vs a plain forward (target <= 1.2x).

Timing: the variants compared in a row run interleaved in one process (one warm-up round before the first
cell of each section, then rounds A, B, ..., B, A, ... alternating the order), and the row reports the median of
the per-round ratios with their min-max. Each cell runs between ``--min-repeats`` and ``--repeats`` rounds,
stopping early once its timed rounds pass ``--cell-seconds``. Ratios are ours / baseline in time or memory
(above 1: av_lens costs more), also for rows shown in tokens/s.

Peak memory: on the CPU, peak RSS (VmHWM reset through /proc/self/clear_refs just before the call) in a fresh
subprocess per measurement (``--quick``: one subprocess for all, indicative only); on CUDA,
torch.cuda.max_memory_allocated after reset_peak_memory_stats, all measurements in one subprocess that loads
only av_lens's model. "growth" is the peak minus the memory in use just before the call.

    python benchmarks/run_all.py --quick                                  # checks the script, < 1 min on 2 cores
    python benchmarks/run_all.py --json perf_cpu.json                     # Qwen2.5-0.5B dims, fp32, CPU
    python benchmarks/run_all.py --device cuda --dtype bfloat16 --dims omni-3b --json perf_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import build, peak_read, peak_start  # noqa: E402

import torch  # noqa: E402

DIMS = {  # language-model dimensions; the towers are always tiny (text rows do not run them)
    "0.5b": dict(layers=24, width=896, heads=14, kv=2, ffn=4864, vocab=151936),      # Qwen2.5-0.5B
    "omni-3b": dict(layers=36, width=2048, heads=16, kv=2, ffn=11008, vocab=151936),  # Qwen2.5-Omni-3B thinker
    "omni-7b": dict(layers=28, width=3584, heads=28, kv=4, ffn=18944, vocab=152064),  # Qwen2.5-Omni-7B thinker
    "tiny": dict(layers=2, width=128, heads=4, kv=2, ffn=256, vocab=4000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTIONS = ("backbone", "cache", "sweep", "generate", "memory")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- settings
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny dims, small inputs, 3 rounds, 1 thread: checks that the script works")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--dims", default=None, choices=list(DIMS), help="LM dimensions (default 0.5b; --quick: tiny)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    ap.add_argument("--seqs", default=None, help="backbone sequence lengths, comma-separated (default 512,2048)")
    ap.add_argument("--batches", default=None, help="backbone batch sizes, comma-separated (default 1,4)")
    ap.add_argument("--repeats", type=int, default=None, help="most timed rounds per cell (default cpu 7, cuda 20)")
    ap.add_argument("--min-repeats", type=int, default=None, help="fewest timed rounds per cell (default 3, cuda 5)")
    ap.add_argument("--cell-seconds", type=float, default=None,
                    help="stop adding rounds to a cell once its timed rounds pass this (default cpu 120, cuda 30)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the first cell of each section")
    ap.add_argument("--text", type=int, default=None, help="words of text in the audio-visual prompt (default 200)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds of video + audio in that prompt (default 8)")
    ap.add_argument("--windows", type=int, default=None, help="knockout windows W (default cpu 4, cuda 8)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per generate call (default cpu 16, cuda 32)")
    ap.add_argument("--flow-video", type=int, default=None, help="video tokens of the attention-flow input (3840)")
    ap.add_argument("--flow-audio", type=int, default=None, help="audio tokens of the attention-flow input (250)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, from {','.join(SECTIONS)}")
    ap.add_argument("--checkpoint", default=None,
                    help="folder for the random-weight checkpoint: reused if it holds one, else built there "
                         "(default: a temporary folder)")
    ap.add_argument("--note", default="", help="a line for the header (e.g. which commit a snapshot is)")
    ap.add_argument("--json", default=None, help="also write the table and machine facts to this JSON file")
    ap.add_argument("--child-mem", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    defaults = dict(dims="0.5b", seqs="512,2048", batches="1,4", repeats=20 if cuda else 7,
                    min_repeats=5 if cuda else 3, cell_seconds=30.0 if cuda else 120.0, text=200, seconds=8.0,
                    windows=8 if cuda else 4, tokens=32 if cuda else 16, flow_video=3840, flow_audio=250)
    if a.quick:
        defaults.update(dims="tiny", seqs="64,128", batches="1,2", repeats=3, min_repeats=3, cell_seconds=5.0,
                        text=30, seconds=2.0, windows=2, tokens=4, flow_video=256, flow_audio=25)
        if a.threads is None:  # tiny ops on two threads stall badly when another job holds a core
            a.threads = 1
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.only = [s for s in a.only.split(",") if s]
    unknown = set(a.only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if a.threads is None:
        a.threads = len(os.sched_getaffinity(0))
    a.min_repeats = min(a.min_repeats, a.repeats)
    return a


# ----------------------------------------------------------------------------------------------- machine
def machine_facts(a) -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import transformers

    import av_lens

    src = Path(av_lens.__file__).resolve().parent.parent  # the tree whose av_lens is measured
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "av_lens"],
                                    cwd=src, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    git = (commit + (" + uncommitted changes in av_lens/" if dirty else "")) if commit else "not a git checkout"
    facts = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 cpu=cpu, cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)), ram_gb=mem_gb,
                 python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                 git=git, note=a.note, device=a.device, dtype=a.dtype,
                 dims=a.dims, lm=DIMS[a.dims], threads=torch.get_num_threads(),
                 repeats=f"{a.min_repeats}-{a.repeats} per cell (budget {a.cell_seconds:g} s), warm-up {a.warmup}",
                 load_before=[round(x, 2) for x in os.getloadavg()])
    if a.device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(a.device))
    return facts


# ----------------------------------------------------------------------------------------------- timing
def interleave(fns: dict, a, warmup: int, label: str) -> dict[str, list[float]]:
    """Wall times of each callable, run in rounds (A, B, C / C, B, A / ...) after ``warmup`` untimed rounds.

    Runs at least ``a.min_repeats`` and at most ``a.repeats`` rounds, stopping once the timed rounds pass
    ``a.cell_seconds``. Outputs are freed outside the timed region, a full garbage collection starts each round,
    and CUDA is synchronised around each call."""
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    names = list(fns)
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                out = fns[n]()
                del out
        times = {n: [] for n in names}
        spent = 0.0
        for r in range(a.repeats):
            order = names if r % 2 == 0 else names[::-1]
            t_round = 0.0
            gc.collect()
            for n in order:
                sync()
                t = time.perf_counter()
                out = fns[n]()
                sync()
                dt = time.perf_counter() - t
                del out
                times[n].append(dt)
                t_round += dt
            spent += t_round
            if r + 1 >= a.min_repeats and spent + spent / (r + 1) > a.cell_seconds:
                break
    times["_load"] = [round(x, 2) for x in os.getloadavg()]  # load average when the cell ended
    log(f"{label}: {len(times[names[0]])} rounds, " + ", ".join(f"{n} {statistics.median(v):.3f} s"
                                                               for n, v in times.items() if n != "_load")
        + f"; load {times['_load']}")
    return times


def status(ratio: float, lo: float, hi: float, target: float | None) -> str:
    if target is None:
        return "—"
    if ratio <= target:
        return "pass" if hi <= target else "pass (spread crosses)"
    return "miss" if lo > target else "miss (spread crosses)"


def time_row(name, ours, base, base_name, target=None, unit="s", tokens=None) -> dict:
    """A row from per-round times of ours and the baseline: median ratio of the rounds, min-max."""
    ratios = [o / b for o, b in zip(ours, base)]
    r = statistics.median(ratios)
    lo, hi = min(ratios), max(ratios)
    mo, mb = statistics.median(ours), statistics.median(base)
    if unit == "tok/s":
        vo, vb = tokens / mo, tokens / mb
    else:
        vo, vb = mo, mb
    return dict(row=name, kind="time", ours=vo, baseline=vb, unit=unit, baseline_name=base_name, ratio=r,
                ratio_min=lo, ratio_max=hi, n=len(ratios), target=target, status=status(r, lo, hi, target),
                ours_times=ours, baseline_times=base)


def stamp(rows: list[dict], times: dict) -> list[dict]:
    """Record on each row the load average at the end of the cell it was measured in."""
    for r in rows:
        r["load_at_end"] = times["_load"]
    return rows


def mem_row(name, ours: dict, base: dict, base_name, target=None) -> dict:
    r = ours["peak_mb"] / base["peak_mb"]
    return dict(row=name, kind="memory", ours=ours["peak_mb"], baseline=base["peak_mb"], unit="MB",
                baseline_name=base_name, ratio=r, ratio_min=r, ratio_max=r, n=1, target=target,
                status=status(r, r, r, target), ours_growth_mb=ours["growth_mb"], baseline_growth_mb=base["growth_mb"],
                growth_ratio=ours["growth_mb"] / base["growth_mb"] if base["growth_mb"] > 0 else None,
                tokens=ours.get("tokens"))


# ----------------------------------------------------------------------------------------------- models
def load_models(folder, a, need_hf: bool):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as HF

    from av_lens import HookedAVTransformer

    dtype = DTYPES[a.dtype]
    ours = HookedAVTransformer.from_pretrained(folder, dtype=dtype, device=a.device)
    if not need_hf:
        return ours, None, None
    eager = HF.from_pretrained(folder, attn_implementation="eager", dtype=dtype).eval().to(a.device)
    sdpa = HF.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype).eval().to(a.device)
    # One set of weights for both transformers models (saves a model's memory); they differ only in attention.
    sdpa.load_state_dict(eager.state_dict(), strict=True, assign=True)
    gc.collect()
    return ours, eager, sdpa


def parity(ours, eager, sdpa, a) -> dict:
    """Max |logit difference| on a short prompt: a sanity check that the timed models compute the same thing."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 390, (1, 64), generator=g).to(a.device)
    inp = ours.to_input(ids).to(a.device)
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(ours.cfg.n_layers)]
    with torch.no_grad():
        lo = ours(inp).float()
        lh = ours.run_with_hooks(inp, fwd_hooks=hooks).float()
        le = eager(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        ls = sdpa(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    return {"ours vs HF sdpa": (lo - ls).abs().max().item(), "ours hooked vs HF eager": (lh - le).abs().max().item(),
            "HF eager vs HF sdpa": (le - ls).abs().max().item(), "logit std": ls.std().item()}


# ----------------------------------------------------------------------------------------------- sections
def section_backbone(ours, eager, sdpa, a) -> list[dict]:
    rows = []
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(ours.cfg.n_layers)]
    g = torch.Generator().manual_seed(0)
    warm = a.warmup
    for seq in [int(s) for s in a.seqs.split(",")]:
        for batch in [int(b) for b in a.batches.split(",")]:
            ids = torch.randint(20, 390, (batch, seq), generator=g).to(a.device)
            inp = ours.to_input(ids).to(a.device)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            t = interleave({"hf_eager": lambda: eager(**kw), "hf_sdpa": lambda: sdpa(**kw),
                            "ours": lambda: ours(inp),
                            "ours_pattern": lambda: ours.run_with_hooks(inp, fwd_hooks=hooks)},
                           a, warm, f"backbone {seq}x{batch}")
            warm = 0
            cell = f"{seq} x {batch}"
            rows += stamp([time_row(f"forward {cell}, no hooks", t["ours"], t["hf_sdpa"], "HF sdpa", 1.05),
                           time_row(f"forward {cell}, every hook_pattern hooked", t["ours_pattern"], t["hf_eager"],
                                    "HF eager", 1.0)], t)
    return rows


def av_input(ours, a):
    from bench_analysis import av_prompt

    return av_prompt(ours, a.text, a.seconds).to(a.device)


def section_cache(ours, a, inp) -> list[dict]:
    enc = ours.encode(inp)
    mid = f"blocks.{ours.cfg.n_layers // 2}.hook_resid_post"
    t = interleave({"plain": lambda: ours(enc), "one": lambda: ours.run_with_cache(enc, names_filter=mid),
                    "full": lambda: ours.run_with_cache(enc)}, a, a.warmup, "run_with_cache")
    T = inp.shape[1]
    return stamp([time_row(f"run_with_cache, one filtered hook, {T} tokens (time)", t["one"], t["plain"],
                           "plain forward"),
                  time_row(f"run_with_cache, full cache, {T} tokens (time)", t["full"], t["plain"], "plain forward")], t)


def section_sweep(ours, a, inp) -> list[dict]:
    from av_lens.analysis import knockout_sweep, sliding_windows

    W = min(a.windows, ours.cfg.n_layers)
    windows = sliding_windows(ours.cfg.n_layers, 1)[:W]

    def metric(logits, _):
        return logits[0, -1, 0]

    def ideal():
        enc = ours.encode(inp)
        for _ in range(W + 1):
            ours(enc)

    t = interleave({"sweep": lambda: knockout_sweep(ours, inp, "last_prompt", "video", windows, metric, progress=False),
                    "ideal": ideal}, a, a.warmup, "knockout sweep")
    return stamp([time_row(f"knockout sweep, {W} windows, last prompt token ↛ video, {inp.shape[1]} tokens",
                           t["sweep"], t["ideal"], f"1 encoder + {W + 1} LM passes", 1.1)], t)


def section_generate(ours, sdpa, a, inp) -> list[dict]:
    from av_lens.analysis import knockout_hooks

    n = a.tokens
    ko = knockout_hooks(ours, "generated", "video")
    hf_kw = inp.hf_kwargs()
    fns = {"plain": lambda: ours.generate(inp, max_new_tokens=n, stop_at_eos=False),
           "knockout": lambda: ours.generate(inp, max_new_tokens=n, stop_at_eos=False, fwd_hooks=ko)}
    if sdpa is not None:
        fns["hf"] = lambda: sdpa.generate(**hf_kw, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    t = interleave(fns, a, a.warmup, "generate")
    what = f"generate {n} tokens after {inp.shape[1]}"
    rows = [time_row(f"{what}, generated ↛ video in every layer", t["knockout"], t["plain"], "av_lens plain generate",
                     unit="tok/s", tokens=n)]
    if sdpa is not None:
        rows.append(time_row(f"{what}, generated ↛ video in every layer", t["knockout"], t["hf"],
                             "HF sdpa generate", unit="tok/s", tokens=n))
        rows.append(time_row(f"{what}, no hooks", t["plain"], t["hf"], "HF sdpa generate", unit="tok/s", tokens=n))
    return stamp(rows, t)


# ----------------------------------------------------------------------------------------------- memory
MEM_MODES = ["cache:plain", "cache:one_hook", "cache:full", "flow:plain", "flow:flow", "flow:flow_generated",
             "flow:pattern"]


def mem_child(spec: dict) -> list[dict]:
    """Runs in a fresh process: loads av_lens's model only and measures the peak of each mode in turn."""
    from bench_attention_flow import flow_hooks, long_input

    from av_lens import HookedAVTransformer

    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    model = HookedAVTransformer.from_pretrained(spec["folder"], dtype=DTYPES[spec["dtype"]], device=dev)
    ns = argparse.Namespace(text=spec["text"], seconds=spec["seconds"], device=dev)
    av = long = None
    out = []
    for mode in spec["modes"]:
        group, kind = mode.split(":")
        if group == "cache":
            if av is None:
                av = model.encode(av_input(model, ns))
            inp = av
            mid = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
            fn = {"plain": lambda: model(av), "one_hook": lambda: model.run_with_cache(av, names_filter=mid),
                  "full": lambda: model.run_with_cache(av)}[kind]
        else:
            if long is None:
                long = long_input(model, spec["video"], spec["audio"])
            inp = long
            hooks = flow_hooks(model, kind)
            fn = lambda: model.run_with_hooks(long, fwd_hooks=hooks, return_type=None)  # noqa: E731
        gc.collect()
        before = peak_start(dev)
        with torch.no_grad():
            res = fn()
        peak = peak_read(dev)
        del res
        gc.collect()
        out.append(dict(mode=mode, tokens=inp.shape[1], before_mb=before, peak_mb=peak, growth_mb=peak - before))
    return out


def section_memory(folder, a) -> list[dict]:
    spec = dict(folder=str(folder), device=a.device, dtype=a.dtype, threads=a.threads, text=a.text,
                seconds=a.seconds, video=a.flow_video, audio=a.flow_audio)
    one_process = a.quick or a.device.startswith("cuda")
    groups = [MEM_MODES] if one_process else [[m] for m in MEM_MODES]
    res = {}
    for modes in groups:
        log(f"memory: {', '.join(modes)}")
        p = subprocess.run([sys.executable, __file__, "--child-mem", json.dumps({**spec, "modes": modes})],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"memory child {modes} failed:\n{p.stderr[-4000:]}")
        for r in json.loads(p.stdout.strip().splitlines()[-1]):
            res[r["mode"]] = r
    c, f = res["cache:plain"], res["flow:plain"]
    T = c["tokens"]
    rows = [mem_row(f"run_with_cache, one filtered hook, {T} tokens (peak)", res["cache:one_hook"], c,
                    "plain forward", 1.05),
            mem_row(f"run_with_cache, full cache, {T} tokens (peak)", res["cache:full"], c, "plain forward"),
            mem_row(f"attention flow, query = text, {f['tokens']} tokens (peak)", res["flow:flow"], f,
                    "plain forward", 1.2),
            mem_row(f"attention flow, query = last prompt token, {f['tokens']} tokens (peak)",
                    res["flow:flow_generated"], f, "plain forward", 1.2),
            mem_row(f"attention flow read from hook_pattern, {f['tokens']} tokens (peak; contrast)",
                    res["flow:pattern"], f, "plain forward")]
    for r in rows:
        r["shared_process"] = one_process
    return rows


# ----------------------------------------------------------------------------------------------- output
def fmt_value(v, unit):
    if unit == "MB":
        return f"{v:,.0f} MB"
    if unit == "tok/s":
        return f"{v:.3g} tok/s"
    return f"{v:.3f} s" if v < 100 else f"{v:.1f} s"


def table(facts, rows, par) -> str:
    lm = facts["lm"]
    lines = [f"## av_lens performance table (benchmarks/run_all.py, {facts['date']})", "",
             f"- machine: {facts['cpu']}, {facts['cores']} cores ({facts['usable_cores']} usable), "
             f"{facts['ram_gb']} GB RAM" + (f", GPU {facts['gpu']}" if "gpu" in facts else ""),
             f"- software: python {facts['python']}, torch {facts['torch']}, transformers {facts['transformers']}, "
             f"av_lens at {facts['git']}" + (f"; {facts['note']}" if facts['note'] else ""),
             f"- run: device {facts['device']}, {facts['dtype']}, torch threads {facts['threads']}, "
             f"dims {facts['dims']} ({lm['layers']} layers, d_model {lm['width']}, {lm['heads']} heads / {lm['kv']} kv, "
             f"d_mlp {lm['ffn']}, vocab {lm['vocab']}), random weights; timed rounds {facts['repeats']}",
             f"- load average (1/5/15 min): before {facts['load_before']}, after {facts.get('load_after')}; 1-min load "
             f"at the end of the timed cells {facts.get('load_1min_at_cell_ends')}; wall time {facts.get('wall_s', 0):.0f} s"]
    if par:
        lines.append("- parity on a 64-token prompt, max |Δlogits|: " + ", ".join(
            f"{k} {v:.2g}" for k, v in par.items()))
    lines += ["- ratio = ours / baseline in time or peak memory (above 1: av_lens costs more), median of the "
              "per-round ratios; spread = min–max over the n rounds; memory rows are single measurements", "",
              "| row | ours | baseline | ratio | spread (n) | target | result |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f} ({r['n']})" if r["kind"] == "time" else "1 run"
        if r["kind"] == "memory" and r.get("growth_ratio") is not None:
            spread += f"; growth {r['ours_growth_mb']:,.0f} / {r['baseline_growth_mb']:,.0f} MB"
        target = "—" if r["target"] is None else f"≤ {r['target']:g}"
        lines.append(f"| {r['row']} | {fmt_value(r['ours'], r['unit'])} | {r['baseline_name']}: "
                     f"{fmt_value(r['baseline'], r['unit'])} | {r['ratio']:.3f} | {spread} | {target} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.child_mem:
        print(json.dumps(mem_child(json.loads(a.child_mem))))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    facts = machine_facts(a)
    log(f"start: load {facts['load_before']}, threads {facts['threads']}, dims {a.dims}, device {a.device}, {a.dtype}")
    tmp = None
    folder = Path(a.checkpoint) if a.checkpoint else None
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="av_lens_bench_")
        folder = Path(tmp.name)
    try:
        if not (folder / "config.json").exists():
            log(f"building the random-weight checkpoint in {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            build(folder, **DIMS[a.dims], dtype=DTYPES[a.dtype] if a.dtype != "float32" else None)
        need_hf = bool({"backbone", "generate"} & set(a.only))
        in_process = [s for s in a.only if s != "memory"]
        rows, par = [], None
        if in_process:
            log("loading models")
            ours, eager, sdpa = load_models(folder, a, need_hf)
            if need_hf:
                par = parity(ours, eager, sdpa, a)
                log(f"parity: {par}")
            if "backbone" in a.only:
                rows += section_backbone(ours, eager, sdpa, a)
            if {"cache", "sweep", "generate"} & set(a.only):
                inp = av_input(ours, a)
                log(f"audio-visual prompt: {inp.shape[1]} tokens {inp.layout.counts()}")
                if "cache" in a.only:
                    rows += section_cache(ours, a, inp)
                if "sweep" in a.only:
                    rows += section_sweep(ours, a, inp)
                if "generate" in a.only:
                    rows += section_generate(ours, sdpa, a, inp)
            del ours, eager, sdpa
            gc.collect()
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
        if "memory" in a.only:
            rows += section_memory(folder, a)
    finally:
        if tmp is not None:
            tmp.cleanup()
    facts["load_after"] = [round(x, 2) for x in os.getloadavg()]
    seen = [r["load_at_end"][0] for r in rows if "load_at_end" in r]
    facts["load_1min_at_cell_ends"] = f"{min(seen):.2f}-{max(seen):.2f}" if seen else None
    facts["wall_s"] = time.perf_counter() - t_start
    text = table(facts, rows, par)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(machine=facts, parity=par, rows=rows, markdown=text), indent=1) + "\n")
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
