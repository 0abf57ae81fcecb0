"""Dataset-scale knockout sweeps: sharded over torch.distributed ranks, resumable, gathered into one table.

The idea: the study's protocol is a table with one row per *work item* — a clip pair, a condition (the
factual clip or its counterfactual with the soundtrack swapped), and a knockout (no knockout, or a query
group cut off from a key group in a window of layers). Each row is the model's caption under that knockout
and its fidelity scores. The items are fixed up front, so:

* **sharding** is deterministic: items are grouped by sample (pair × condition) and group ``g`` goes to
  rank ``g % world_size`` (:func:`shard`), so each rank runs the encoders once per sample it owns
  (``model.encode``) and reuses them for every knockout of that sample;
* **resume** is by key: each rank appends its rows to ``rows-rank{r}.jsonl`` in the output folder, one JSON
  object per line, flushed and fsynced per row (:class:`RowLog`). A restarted run reads every rank file,
  skips items already written (by any rank — the world size may change between runs) and computes the rest.
  A torn last line (a crash mid-write) is cut off and its row recomputed;
* **gathering** happens on rank 0 after a barrier (:func:`gather`): every item's key must appear exactly
  once across the rank files — a :class:`SweepError` names missing, duplicated or unexpected keys — and
  the table is written atomically (temporary file + ``os.replace``) to ``table.jsonl``, rows in item order.

Pieces, each usable alone: :func:`study_items` (the protocol's items), :func:`shard`, :class:`RowLog`,
:func:`run_shard` (evaluate one rank's items with :func:`~av_lens.analysis.knockout.knockout_hooks` and
``model.generate``, scoring captions with a :class:`~av_lens.analysis.pairs.KeywordScorer`), :func:`gather`,
and :func:`run` (all of it under ``torchrun``, or in one process). The command line is ``av-lens sweep``::

    torchrun --nproc_per_node 2 -m av_lens.cli sweep --pairs 500 --out runs/ko   # or without torchrun

Samples are :class:`~av_lens.analysis.pairs.Pair` objects whose ``meta`` names the sound heard in each
condition (``"sound"``, ``"counterfactual_sound"``) and the sound that goes with the picture
(``"picture_sound"``): :func:`organism_samples` builds them from the organism's world, :func:`manifest_samples`
from a JSONL manifest of real clips. A row is::

    {"key": "3/counterfactual/generated->video/2:4", "sample": 3, "condition": "counterfactual",
     "query": "generated", "keys": "video", "window": [2, 4], "caption": "dog and ring",
     "audio_fidelity": 1.0, "picture_fidelity": 0.0}

(``window`` is half-open ``[start, stop]``, layers start..stop-1 as in ``range``; null, with query/keys
``"none"``, for the run without knockout). ``sweep.json`` in the folder records
the sweep's arguments; a restart with other arguments is refused.

Testing hook: ``AV_LENS_SWEEP_FAIL_AFTER=RANK:K`` makes rank RANK write K rows, then half of the next line,
and raise (a crash mid-write), as the resume test does.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from av_lens.errors import AVLensError, InputError

TABLE = "table.jsonl"
SPEC = "sweep.json"


class SweepError(AVLensError):
    """A sweep's output folder that does not hold exactly one row per work item, or holds another sweep."""


# ------------------------------------------------------------------------------------------------ items
@dataclass(frozen=True)
class WorkItem:
    """One row of the table: a sample, a condition and a knockout (``window=None``: no knockout); or, with
    ``analysis="atp"``, a sample's attribution patching from its factual into its counterfactual clip."""

    sample: int
    condition: str  # "factual" | "counterfactual" | "pair" (attribution)
    query: str = "none"
    keys: str = "none"
    window: tuple[int, int] | None = None  # (start, stop): layers start..stop-1, half-open like range()
    analysis: str = "knockout"  # | "atp"

    @property
    def key(self) -> str:
        if self.analysis == "atp":
            return f"{self.sample}/atp"
        ko = "none" if self.window is None else f"{self.query}->{self.keys}/{self.window[0]}:{self.window[1]}"
        return f"{self.sample}/{self.condition}/{ko}"

    @property
    def group(self) -> tuple[int, str]:
        """Items of one group share one input and one encoder run."""
        return (self.sample, self.condition)


CONDITIONS = ("factual", "counterfactual")


def study_items(n_samples: int, windows: Sequence[range], *, conditions: Sequence[str] = CONDITIONS,
                knockouts: Sequence[tuple[str, str]] = (("generated", "video"), ("generated", "audio"))) -> list[WorkItem]:
    """Per sample and condition: one item without knockout, then one per knockout and window (``windows``:
    half-open ``range(start, stop)`` objects or ``"start:stop"`` strings)."""
    from av_lens.analysis._common import as_window

    if n_samples < 1:
        raise InputError(f"a sweep needs at least one sample, got {n_samples}", "pass --pairs 1 or more")
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise InputError(f"unknown conditions {bad or list(conditions)}", f"use some of {list(CONDITIONS)}")
    wins = [(r.start, r.stop) for r in (as_window(w) for w in windows)]
    items = []
    for s in range(n_samples):
        for c in conditions:
            items.append(WorkItem(s, c))
            items += [WorkItem(s, c, q, k, w) for q, k in knockouts for w in wins]
    return items


def attribution_items(n_samples: int) -> list[WorkItem]:
    """One attribution item per sample: AtP from its factual (clean) into its counterfactual (corrupted) clip."""
    if n_samples < 1:
        raise InputError(f"a sweep needs at least one sample, got {n_samples}", "pass --pairs 1 or more")
    return [WorkItem(s, "pair", analysis="atp") for s in range(n_samples)]


def parse_windows(text: str, n_layers: int | None = None) -> list[range]:
    """``"0:2,2:4,3"`` -> [range(0, 2), range(2, 4), range(3, 4)]: half-open start:stop layer windows, as Python
    slices (a lone number is that one layer), checked against the model's layers when ``n_layers`` is given.
    The old first-last form (``0-3``) is refused: it would silently mean one layer more than ``0:3``."""
    from av_lens.analysis._common import as_window

    out = []
    for part in text.split(","):
        p = part.strip()
        if re.fullmatch(r"\d+\s*-\s*\d+", p):
            a, b = (int(x) for x in p.split("-"))
            raise InputError(f"the window {p!r} uses the old first-last form",
                             f"write half-open start:stop windows, as Python slices: --windows {a}:{b + 1} for "
                             f"layers {a}..{b}")
        if re.fullmatch(r"\d+", p):
            p = f"{p}:{int(p) + 1}"
        w = as_window(p, None, "window")
        if n_layers is not None and w.stop > n_layers:
            raise InputError(f"the window {part.strip()!r} is outside the model's layers 0:{n_layers}",
                             f"use windows within 0:{n_layers} (half-open; the last layer is {n_layers - 1})")
        out.append(w)
    return out


def shard(items: Sequence[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """The items of ``rank``: whole groups (sample × condition), group ``g`` (in order of first appearance) to
    rank ``g % world_size``. Disjoint across ranks, together all items, the same on every run."""
    order: dict[tuple[int, str], int] = {}
    for it in items:
        order.setdefault(it.group, len(order))
    return [it for it in items if order[it.group] % world_size == rank]


# ------------------------------------------------------------------------------------------------ row files
class RowLog:
    """One rank's append-only JSONL of rows. Each row is written as one line, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self, repair: bool = False) -> list[dict]:
        """The complete rows. A torn last line (no newline, or not JSON) is ignored, and with ``repair``
        cut off the file so that appending continues on a line boundary."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows, good_end, pos = [], 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            line = data[pos:] if nl < 0 else data[pos:nl]
            try:
                row = json.loads(line) if nl >= 0 else None
            except ValueError:
                row = None
            if row is None or not isinstance(row, dict) or "key" not in row:
                if nl >= 0 and data[nl + 1:].strip():
                    raise SweepError(f"{self.path} has an unreadable line in the middle (byte {pos})",
                                     "the file was edited or damaged; delete it and rerun to recompute its rows")
                break
            rows.append(row)
            pos = good_end = nl + 1
        if repair and good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return rows

    def append(self, row: dict, torn: bool = False) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line[: len(line) // 2] if torn else line)
            f.flush()
            os.fsync(f.fileno())


def rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("rows-rank*.jsonl"))


def done_keys(out: Path, own: Path | None = None) -> set[str]:
    """Keys of complete rows in every rank file of ``out`` (repairing ``own``, this rank's file)."""
    keys = set()
    for f in rank_files(out):
        keys |= {r["key"] for r in RowLog(f).read(repair=f == own)}
    return keys


# ------------------------------------------------------------------------------------------------ samples
def organism_samples(model, n: int, seed: int = 0, question: str = "describe"):
    """``n`` counterfactual pairs from the organism's world (:func:`~av_lens.analysis.pairs.organism_pairs`),
    with the sound words the scorer needs in ``meta``."""
    from av_lens.analysis.pairs import organism_pairs
    from av_lens.organism import world

    pairs = organism_pairs(model, n, seed, question=question)
    for p in pairs:
        p.meta.update(sound=world.SOUNDS[p.meta["sound"]], counterfactual_sound=world.SOUNDS[p.meta["counterfactual_sound"]],
                      picture_sound=world.SOUNDS[p.meta["look"]])
    return pairs


def manifest_samples(model, path: str | os.PathLike) -> list:
    """Pairs from a JSONL manifest of real clips, one per line::

        {"video": "clips/dog.mp4", "counterfactual_audio": "sounds/bell.wav", "question": "Describe what you
         see and hear.", "sound": "bark", "counterfactual_sound": "ring", "picture_sound": "bark"}

    (optional ``"audio"``: another soundtrack for the factual clip; ``"fps"``, default 2; relative paths start at
    the manifest's folder). Media are decoded when a sample is first used, so each rank decodes only its own.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the manifest {str(path)!r} does not exist", "pass a JSONL file with one clip pair per line")
    entries = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            raise InputError(f"line {i + 1} of {path} is not JSON", "write one JSON object per line") from None
        need = [k for k in ("video", "counterfactual_audio", "question", "sound", "counterfactual_sound") if k not in e]
        if need:
            raise InputError(f"line {i + 1} of {path} lacks {need}",
                             "give video, counterfactual_audio, question, sound and counterfactual_sound")
        entries.append(e)
    return _LazyPairs(model, entries, path.parent)


class _LazyPairs:
    def __init__(self, model, entries, root: Path):
        self.model, self.entries, self.root = model, entries, root

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i: int):
        from av_lens.analysis.pairs import counterfactual_pair
        from av_lens.media import load_audio, load_clip

        e = self.entries[i]
        at = lambda p: str(self.root / p)  # noqa: E731 (absolute paths stay absolute)
        clip = load_clip(at(e["video"]), at(e["audio"]) if e.get("audio") else None, fps=float(e.get("fps", 2.0)))
        meta = {"sound": e["sound"], "counterfactual_sound": e["counterfactual_sound"],
                "picture_sound": e.get("picture_sound", e["sound"])}
        return counterfactual_pair(self.model, clip.frames, clip.audio, load_audio(at(e["counterfactual_audio"])),
                                   e["question"], fps=clip.fps, meta=meta)


def vocabulary(samples) -> list[str]:
    """Every sound word the samples name (the keyword scorer's closed vocabulary)."""
    if hasattr(samples, "entries"):
        metas = [{k: e.get(k, e["sound"]) for k in ("sound", "counterfactual_sound", "picture_sound")}
                 for e in samples.entries]
    else:
        metas = [p.meta for p in samples]
    return sorted({m[k] for m in metas for k in ("sound", "counterfactual_sound", "picture_sound")})


# ------------------------------------------------------------------------------------------------ evaluation
def _fail_after(rank: int) -> int | None:
    spec = os.environ.get("AV_LENS_SWEEP_FAIL_AFTER")
    if not spec:
        return None
    r, _, k = spec.partition(":")
    return int(k) if int(r) == rank else None


ATP_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "z")


def atp_row(model, pair, item: WorkItem, *, components: Sequence[str] = ATP_COMPONENTS, metric: str = "logit_diff",
            max_new_tokens: int = 4, star: bool = False) -> dict:
    """One attribution row: AtP estimates over layers x {audio, video, text} for ``components`` from the pair's
    factual clip into its counterfactual one (AtP* with ``star``). ``metric="logit_diff"``: the logit of the
    factual sound's word minus the counterfactual sound's at the last prompt position; ``"caption"``: the mean
    log-probability of the factual clip's greedy caption (``max_new_tokens``), teacher-forced in both runs."""
    from av_lens.analysis.attribution import attribution_patch, teacher_forced

    clean, corrupted = model.encode(pair.factual), model.encode(pair.counterfactual)
    if metric == "logit_diff":
        a, b = pair.meta["sound"], pair.meta["counterfactual_sound"]
        ta, tb = model.word_token(a), model.word_token(b)
        if ta == tb:
            raise InputError(f"sample {item.sample}: the two sounds {a!r} and {b!r} share one token",
                             "use --atp-metric caption, or pairs whose sounds differ")
        fn = lambda logits: (logits[:, -1, ta] - logits[:, -1, tb]).mean()  # noqa: E731
        what = f"logit({a}) - logit({b}) at the last prompt position"
    else:
        gen = model.generate(clean, max_new_tokens=max_new_tokens)
        clean, corrupted, fn = teacher_forced(clean, corrupted, gen)
        caption = gen.text[0] if gen.text is not None else " ".join(map(str, gen.new_tokens[0].tolist()))
        what = f"mean log-probability of the factual caption {caption!r}"
    res = attribution_patch(model, clean, corrupted, fn, components=components, sets=("audio", "video", "text"),
                            recompute_qk=star, grad_drop=star)
    row = {"key": item.key, "sample": item.sample, "analysis": "atp", "method": res.method, "metric": what,
           "clean": res.clean, "corrupted": res.corrupted, "sets": res.sets, "layers": res.layers,
           "effects": {c: res.effect(c).tolist() for c in components}}
    if res.grad_drop is not None:
        row["grad_drop"] = {c: res.magnitude(c).tolist() for c in components}
    return row


def run_shard(model, samples, items: Sequence[WorkItem], out: str | os.PathLike, rank: int = 0, world_size: int = 1,
              *, max_new_tokens: int = 4, scorer=None, log: Callable[[str], None] = print, progress: bool = False,
              atp: dict | None = None) -> int:
    """Evaluate this rank's not-yet-written items and append their rows; returns how many were computed.
    ``progress``: a tqdm bar over the items; ``atp``: keyword arguments of :func:`atp_row` for attribution items."""
    from tqdm.auto import tqdm

    from av_lens.analysis.knockout import knockout_hooks
    from av_lens.analysis.pairs import KeywordScorer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = RowLog(out / f"rows-rank{rank}.jsonl")
    done = done_keys(out, own=rows.path)
    mine = shard(items, rank, world_size)
    todo = [it for it in mine if it.key not in done]
    log(f"sweep rank {rank}/{world_size}: {len(mine)} items in this shard, {len(mine) - len(todo)} already done, "
        f"computing {len(todo)}")
    scorer = scorer or KeywordScorer(vocabulary(samples))
    fail_after = _fail_after(rank)
    n = 0
    groups: dict[tuple[int, str], list[WorkItem]] = {}
    for it in todo:
        groups.setdefault(it.group, []).append(it)
    bar = tqdm(total=len(todo), desc=f"sweep rank {rank}", unit="item", disable=not progress)
    for (s, cond), its in groups.items():
        pair = samples[s]
        if cond == "pair":
            for it in its:
                row = atp_row(model, pair, it, max_new_tokens=max_new_tokens, **(atp or {}))
                rows.append(row)
                n += 1
                bar.update()
            continue
        inp = model.encode(pair.factual if cond == "factual" else pair.counterfactual)  # encoders once per sample
        heard = pair.meta["sound" if cond == "factual" else "counterfactual_sound"]
        for it in its:
            hooks = [] if it.window is None else knockout_hooks(model, it.query, it.keys,
                                                                range(it.window[0], it.window[1]))
            gen = model.generate(inp, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
            caption = gen.text[0] if gen.text is not None else " ".join(map(str, gen.new_tokens[0].tolist()))
            row = {"key": it.key, "sample": s, "condition": cond, "query": it.query, "keys": it.keys,
                   "window": None if it.window is None else list(it.window), "caption": caption,
                   "audio_fidelity": float(scorer.score(caption, heard)),
                   "picture_fidelity": float(scorer.score(caption, pair.meta["picture_sound"]))}
            if fail_after is not None and n == fail_after:
                rows.append(row, torn=True)
                raise RuntimeError(f"AV_LENS_SWEEP_FAIL_AFTER: rank {rank} stops after {n} rows, mid-write")
            rows.append(row)
            n += 1
            bar.update()
    bar.close()
    log(f"sweep rank {rank}/{world_size}: computed {n} rows")
    return n


# ------------------------------------------------------------------------------------------------ gathering
def gather(out: str | os.PathLike, items: Sequence[WorkItem]) -> list[dict]:
    """One row per item from all rank files, in item order, written atomically to ``out/table.jsonl``.
    Raises :class:`SweepError` naming missing, duplicated or unexpected keys."""
    out = Path(out)
    seen: dict[str, list[tuple[str, dict]]] = {}
    for f in rank_files(out):
        for r in RowLog(f).read():
            seen.setdefault(r["key"], []).append((f.name, r))
    want = [it.key for it in items]
    dup = {k: [f for f, _ in v] for k, v in seen.items() if len(v) > 1}
    missing = [k for k in want if k not in seen]
    extra = sorted(set(seen) - set(want))

    def few(keys) -> str:
        keys = list(keys)
        return ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    if dup:
        raise SweepError(f"{out} holds {len(dup)} keys more than once: "
                         + few(f"{k} (in {', '.join(fs)})" for k, fs in dup.items()),
                         "a row was computed twice; delete the later copies (or the folder) and rerun")
    if missing:
        raise SweepError(f"{out} lacks rows for {len(missing)} of {len(want)} items: {few(missing)}",
                         "rerun the same sweep command: it computes only the missing rows")
    if extra:
        raise SweepError(f"{out} holds {len(extra)} rows that are not items of this sweep: {few(extra)}",
                         "write each sweep to its own --out folder")
    table = [seen[k][0][1] for k in want]
    _atomic_write(out / TABLE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in table))
    return table


def _atomic_write(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_spec(out: Path, spec: dict, rank: int) -> None:
    """Refuse a folder that holds another sweep; rank 0 records the spec of a new one."""
    path = out / SPEC
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            what = "; ".join(f"{k}: {old.get(k)!r} there, {spec.get(k)!r} now" for k in diff)
            raise SweepError(f"{out} holds a sweep with other arguments ({what})",
                             "rerun with the original arguments to resume it, or pass a new --out folder")
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(spec, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------------ the whole run
def dist_context(timeout_hours: float = 48.0) -> tuple[int, int]:
    """(rank, world size), initialising a gloo process group when launched by torchrun with several ranks.
    gloo serves the only collective used (a barrier) on CPU and GPU nodes alike."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=timeout_hours))
    return rank, world


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def rank_device(device: str, gpus_per_rank: int) -> str | dict:
    """This rank's device (``device="auto"``: its own GPU(s) by LOCAL_RANK, else the CPU), or a planned device
    map over ``gpus_per_rank`` GPUs."""
    if device != "auto":
        return device
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    ids = list(range(local * gpus_per_rank, (local + 1) * gpus_per_rank))
    if ids[-1] >= torch.cuda.device_count():
        raise InputError(f"rank {local} needs GPUs {ids} but {torch.cuda.device_count()} are visible",
                         "lower --gpus-per-rank or --nproc_per_node so that their product fits the node's GPUs")
    return f"cuda:{ids[0]}" if gpus_per_rank == 1 else {"gpus": ids}


def load_model(name: str, dtype: str, where):
    from av_lens import HookedAVTransformer
    from av_lens.placement import gpu_budgets, meta_model, plan_device_map

    if isinstance(where, dict):
        plan = plan_device_map(meta_model(name, dtype), gpu_budgets(devices=where["gpus"]))
        return HookedAVTransformer.from_pretrained(name, dtype=dtype, device_map=plan)
    return HookedAVTransformer.from_pretrained(name, dtype=dtype, device=where)


def check_args(args) -> list[tuple[str, str]]:
    """``av-lens sweep``'s arguments, checked before any model loads or row is computed; returns the knockouts."""
    from av_lens.cli import check_out
    from av_lens.layout import as_selector
    from av_lens.loading import _parse_dtype, resolve_folder

    check_out(args.out, "folder")
    for opt, v, lo in (("--max-new-tokens", args.max_new_tokens, 1), ("--pairs", args.pairs, 1),
                       ("--gpus-per-rank", args.gpus_per_rank, 1), ("--seed", args.seed, 0)):
        if v < lo:
            raise InputError(f"{opt} must be at least {lo}, got {v}", f"pass e.g. {opt} {max(lo, 4 if lo else 0)}")
    _parse_dtype(args.dtype)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise InputError(f"unknown --device {args.device!r}", "pass auto, cpu, cuda or cuda:N")
    if args.manifest is None:
        from av_lens.organism.world import QUESTIONS

        if args.question not in QUESTIONS:
            raise InputError(f"unknown --question {args.question!r}", f"use one of {sorted(QUESTIONS)}")
    elif not Path(args.manifest).is_file():
        raise InputError(f"the manifest {args.manifest!r} does not exist", "pass a JSONL file with one clip pair per line")
    analysis = getattr(args, "analysis", "knockout")
    if analysis not in ("knockout", "atp"):
        raise InputError(f"unknown --analysis {analysis!r}", "use knockout or atp")
    if analysis == "atp":
        from av_lens.analysis.attribution import COMPONENTS

        comps = [c.strip() for c in args.components.split(",")]
        bad = [c for c in comps if c not in COMPONENTS]
        if bad or not comps:
            raise InputError(f"unknown --components {bad or comps}", f"use some of {sorted(COMPONENTS)}, comma-separated")
        if args.atp_metric not in ("logit_diff", "caption"):
            raise InputError(f"unknown --atp-metric {args.atp_metric!r}", "use logit_diff or caption")
        if args.windows is not None:
            raise InputError("--windows is a knockout option; an attribution sweep covers every layer",
                             "drop --windows, or use --analysis knockout")
    conditions = [c.strip() for c in args.conditions.split(",")]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise InputError(f"unknown --conditions {bad or conditions}", f"use some of {list(CONDITIONS)}, comma-separated")
    if args.windows is not None:
        parse_windows(args.windows)
    knockouts = []
    for k in args.knockouts.split(","):
        q, sep, keys = k.strip().partition(":")
        if not sep or not q or not keys:
            raise InputError(f"cannot read the knockout {k!r}", "write knockouts as query:keys, e.g. generated:video")
        for part in (q, keys):
            try:
                as_selector(part)
            except AVLensError as e:
                raise InputError(f"--knockouts {k.strip()!r}: {e.problem}", e.fix) from None
        knockouts.append((q, keys))
    resolve_folder(args.model)
    return knockouts


def check_knockouts_match(knockouts, samples) -> None:
    """Refuse a knockout whose positions the (first) sample does not have, before any row is computed: its rows
    would silently equal the rows without knockout."""
    from av_lens.analysis._common import selector_mask

    if not len(samples):
        return
    layout = samples[0].factual.layout
    for q, k in knockouts:
        for sel, what in ((k, "key"), (q, "query")):
            if what == "query" and "generated" in sel:
                continue
            if not bool(selector_mask(layout, sel, what, require=False).any()):
                raise InputError(f"the knockout {q}:{k} cannot act: its {what} selector {sel!r} matches no position "
                                 f"of sample 0, so its rows would equal the rows without knockout",
                                 f"choose positions these samples have: {layout.counts()}")


def run(args, log: Callable[[str], None] = print) -> list[dict] | None:
    """``av-lens sweep``: shard, evaluate, barrier, gather on rank 0 (returns the table there, None elsewhere)."""
    knockouts = check_args(args)  # everything that can be checked before the model loads
    rank, world = dist_context()
    out = Path(args.out)
    model = load_model(args.model, args.dtype, rank_device(args.device, args.gpus_per_rank))
    n_layers = model.cfg.n_layers
    windows = parse_windows(args.windows, n_layers) if args.windows else [range(l, l + 1) for l in range(n_layers)]
    samples = (manifest_samples(model, args.manifest) if args.manifest
               else organism_samples(model, args.pairs, args.seed, question=args.question))
    n = len(samples)
    analysis = getattr(args, "analysis", "knockout")
    if analysis == "atp":
        return _run_atp(args, model, samples, rank, world, out, log)
    check_knockouts_match(knockouts, samples)
    items = study_items(n, windows, conditions=tuple(c.strip() for c in args.conditions.split(",")), knockouts=knockouts)
    spec = {"model": args.model, "samples": _samples_spec(args),
            "n_samples": n, "windows": [f"{w.start}:{w.stop}" for w in windows], "knockouts": [list(k) for k in knockouts],
            "conditions": args.conditions, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
    check_spec(out, spec, rank)
    run_shard(model, samples, items, out, rank, world, max_new_tokens=args.max_new_tokens, log=log,
              progress=not getattr(args, "quiet", True))
    return _finish(out, items, rank, world, log, "rows")


def _finish(out: Path, items, rank: int, world: int, log, what: str) -> list[dict] | None:
    """Barrier, then the gather on rank 0 (None elsewhere)."""
    barrier(world)
    if rank != 0:
        return None
    table = gather(out, items)
    log(f"sweep: {len(table)} {what} from {world} rank(s) -> {out / TABLE}")
    return table


def _samples_spec(args) -> str:
    return args.manifest or f"organism_pairs(n={args.pairs}, seed={args.seed}, question={args.question!r})"


def _run_atp(args, model, samples, rank: int, world: int, out: Path, log) -> list[dict] | None:
    """``av-lens sweep --analysis atp``: one attribution row per sample, sharded, resumable, gathered like
    knockout sweeps."""
    comps = tuple(c.strip() for c in args.components.split(","))
    items = attribution_items(len(samples))
    spec = {"model": args.model, "samples": _samples_spec(args), "n_samples": len(samples), "analysis": "atp",
            "components": list(comps), "atp_metric": args.atp_metric, "atp_star": bool(args.atp_star),
            "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
    check_spec(out, spec, rank)
    run_shard(model, samples, items, out, rank, world, max_new_tokens=args.max_new_tokens, log=log,
              progress=not getattr(args, "quiet", True),
              atp={"components": comps, "metric": args.atp_metric, "star": bool(args.atp_star)})
    return _finish(out, items, rank, world, log, "attribution rows")
