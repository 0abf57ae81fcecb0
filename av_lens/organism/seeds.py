"""Train and evaluate the organism over several training seeds, with its no-VLM controls: every seed reported.

    python -m av_lens.organism.seeds --out DIR [--seeds 0 1 2 3 4] [--control-seeds 0 1 2] [--jobs 2]

A vision bias that appears in one training run and not the next is a property of that run, not of the
curriculum. This script trains the curriculum once per seed (``organism`` and its VLM stage
``organism-base``), and the *no-VLM control* once per control seed (the same stage-2 data and steps, with no
vision-language stage before it), each in its own process with one torch thread (so ``--jobs`` runs share
the cores and every run reproduces exactly). Then it evaluates every checkpoint on the same 384 held-out
counterfactual pairs and writes ``seeds.json``: per run the figures of
:func:`av_lens.organism.evaluate.evaluate_model` with Wilson 95 % intervals, and whether the counterfactual
answer follows the picture with intervals that do not overlap those of following the sound.

Runs that already have their checkpoint are not retrained, and checkpoints already evaluated on as many
pairs are not re-evaluated (delete the folder to redo both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from av_lens.errors import InputError
from av_lens.sweeps import _atomic_write

#: held-out pairs per run: enough for Wilson intervals of about +-0.05
DEFAULT_PAIRS = 384


def _train_cmd(out: Path, seed: int, control: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "av_lens.organism.train", "--out", str(out), "--seed", str(seed), "--no-eval",
           "--threads", "1"]
    return cmd + (["--control", "1"] if control else []) + extra


def _runs(out: Path, seeds: list[int], control_seeds: list[int]) -> list[tuple[str, Path, int, bool]]:
    return ([(f"seed{s}", out / f"seed{s}", s, False) for s in seeds]
            + [(f"control{s}", out / f"control{s}", s, True) for s in control_seeds])


def train_all(out: Path, seeds: list[int], control_seeds: list[int], jobs: int = 2, extra: list[str] = (),
              log=print) -> None:
    """Train every missing run (``jobs`` processes at a time); a failed run raises with its log's tail."""
    todo = [(n, f, s, c) for n, f, s, c in _runs(out, seeds, control_seeds)
            if not (f / ("organism-control" if c else "organism") / "model.safetensors").is_file()]

    def one(run):
        name, folder, seed, control = run
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.log", "w") as f:
            rc = subprocess.call(_train_cmd(folder, seed, control, list(extra)), stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        if rc:
            tail = (folder / "train.log").read_text().splitlines()[-5:]
            raise RuntimeError(f"training {name} failed (rc {rc}): " + " | ".join(tail))
        log(f"trained {name}")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, todo))


def evaluate_all(out: Path, seeds: list[int], control_seeds: list[int], n_pairs: int | None = None,
                 log=print) -> dict:
    """Evaluate every run's checkpoints on the same held-out pairs; returns (and writes) ``seeds.json``."""
    import torch

    from av_lens import HookedAVTransformer
    from av_lens.organism import world
    from av_lens.organism.evaluate import cf_probe, evaluate_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from av_lens.organism.build import design_of

    n_pairs = n_pairs or DEFAULT_PAIRS
    res: dict = {"n_pairs": n_pairs, "runs": {}}
    for name, folder, seed, control in _runs(out, seeds, control_seeds):
        subs = ["organism-control"] if control else ["organism", "organism-base"]
        for sub in subs:
            if not (folder / sub).is_dir():
                raise InputError(f"{folder / sub} is missing", "train it first (run this script without --eval-only)")
            meta = json.loads((folder / sub / "organism.json").read_text())
            pairs = world.eval_pairs(n_pairs, design_of(folder / sub).geometry)
            cache = folder / f"{sub}.eval-{len(pairs)}.json"  # per-checkpoint figures, reused on a rerun
            digest = hashlib.sha256((folder / sub / "model.safetensors").read_bytes()).hexdigest()
            if cache.is_file() and json.loads(cache.read_text()).get("weights_sha256") == digest:
                r = json.loads(cache.read_text())["figures"]
                if "probe_cf_audio_sound" not in r:  # a cache from before the counterfactual-only probe
                    r["probe_cf_audio_sound"] = cf_probe(HookedAVTransformer.from_pretrained(folder / sub),
                                                         [p[1] for p in pairs])
                    _atomic_write(cache, json.dumps({"weights_sha256": digest, "figures": r}))
            else:
                r = evaluate_model(HookedAVTransformer.from_pretrained(folder / sub), pairs)
                _atomic_write(cache, json.dumps({"weights_sha256": digest, "figures": r}))
            r["seed"], r["kind"], r["design"] = seed, sub, meta["curriculum"].get("design", "v1")
            r["train_seconds"] = meta.get("train_seconds")
            lo_pic, hi_snd = r["ci95"]["hear_cf_picture"][0], r["ci95"]["hear_cf_sound"][1]
            lo_snd, hi_pic = r["ci95"]["hear_cf_sound"][0], r["ci95"]["hear_cf_picture"][1]
            r["follows"] = "picture" if lo_pic > hi_snd else "sound" if lo_snd > hi_pic else "neither"
            key = name if sub != "organism-base" else f"base{seed}"
            res["runs"][key] = r
            log(f"{key:10s} picture {r['hear_cf_picture']:.3f} {r['ci95']['hear_cf_picture']}  "
                f"sound {r['hear_cf_sound']:.3f} {r['ci95']['hear_cf_sound']}  audio alone "
                f"{r['hear_audio_only']:.3f}  -> {r['follows']}")
    _atomic_write(out / "seeds.json", json.dumps(res, indent=1))
    return res


def middle_layers(per_layer: list) -> list:
    """The middle half of a per-residual-layer list (index 0 = embeddings): layers L/4 .. 3L/4."""
    return per_layer[len(per_layer) // 4: 3 * len(per_layer) // 4 + 1]


def format_table(res: dict) -> str:
    """A Markdown table of every run: the counterfactual answer, audio alone, the probe's best middle layer."""
    lines = ["| run | seed | names the picture's sound | names the sound playing | audio alone | "
             "probe, middle layers (min) | counterfactual-only probe, middle layers (min) | follows |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        mids = []
        for k in ("probe_audio_sound", "probe_cf_audio_sound"):
            acc = r.get(k, {}).get("accuracy")
            mids.append(f"{min(middle_layers(acc)):.2f}" if acc else "-")
        ci = r["ci95"]
        lines.append(f"| {r['kind']} | {r['seed']} | {r['hear_cf_picture']:.2f} [{ci['hear_cf_picture'][0]:.2f}, "
                     f"{ci['hear_cf_picture'][1]:.2f}] | {r['hear_cf_sound']:.2f} [{ci['hear_cf_sound'][0]:.2f}, "
                     f"{ci['hear_cf_sound'][1]:.2f}] | {r['hear_audio_only']:.2f} | {mids[0]} | {mids[1]} | "
                     f"{r['follows']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for seed<N>/ and control<N>/ runs and seeds.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--control-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (each uses one thread)")
    p.add_argument("--pairs", type=int, default=None, help=f"held-out pairs (default {DEFAULT_PAIRS})")
    p.add_argument("--eval-only", action="store_true")
    a, extra = p.parse_known_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.eval_only:
        train_all(a.out, a.seeds, a.control_seeds, a.jobs, extra)
    print(format_table(evaluate_all(a.out, a.seeds, a.control_seeds, a.pairs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
