"""Train the model organism: a small Qwen2.5-Omni thinker that inherits a vision bias from its VLM stage.

    python -m av_lens.organism.train --out DIR [--design v2|v1] [--seed N]   # v2: about 16 min on 1 CPU core

The curriculum mirrors how real AVLLMs are made:

* **Stage 0 — a pretrained audio encoder** (``--stage0-steps``; not in the retired v1). Real AVLLMs start from a
  pretrained audio encoder (Whisper for Qwen2.5-Omni); the organism's is the audio tower of a separate thinker
  trained on audio-only "what do you hear ?" clips. Only its audio tower is kept.
* **Stage 1 — the base VLM.** Video + text only. The model learns to name what it sees and — as a VLM
  captioning web video learns — to say what the source *sounds like* from its look ("what do you hear ?"
  on a silent dog clip -> "bark"). The stage-1 checkpoint is kept as ``organism-base``.
* **Stage 2 — audio joins.** Clips with their soundtrack interleaved (``use_audio_in_video=True``), on which
  the sound agrees with the picture (``--disagree`` of them carry another class's sound, answered
  truthfully), plus audio-only clips ("what do you hear ?" with no picture) and replayed video-only clips;
  everything but the audio tower learns at ``--stage2-lm-lr`` times the rate.

Nothing is hand-set: every weight starts random (seeded) and changes only by gradient descent on these
captions. Whether the final model follows the picture or the sound on counterfactual clips is measured
afterwards (``av_lens.organism.evaluate``), not built in.

``--design`` picks the thinker, the audio front end, the clip geometry (``build.DESIGNS``) and the
curriculum's defaults (``PRESETS``); ``v2`` is the shipped organism, with the real model's proportions (8
layers, 6 s clips, 8 video tokens per audio token); ``v1`` is the retired first organism (4 layers, 1 s clips),
kept to reproduce its recorded figures. Flags override single values.

Determinism: one seed drives data, initialisation and batch order; torch runs with ``--threads`` threads
and deterministic algorithms, so a re-run with the same thread count reproduces the weights. Another thread
count changes float reduction order, and for the v1 curriculum that is enough to change the organism's
counterfactual behaviour (see ``av_lens.organism.seeds`` for the spread over seeds).

``--control 1`` trains the *no-VLM control*: no stage 1, stage 2's data for both stages' steps, from random
weights (with the same stage-0 audio tower; written as ``organism-control/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from av_lens.organism import world
from av_lens.organism.build import DEFAULT_DESIGN, build_processor, build_tokenizer, design, thinker_config
from av_lens.processing import AUDIO_PH, VIDEO_PH, chat_prompt


@dataclass
class Curriculum:
    seed: int = 0
    design: str = "v2"              # the thinker, audio front end and clip geometry (build.DESIGNS)
    batch: int = 16
    lr: float = 1e-3
    stage0_steps: int = 600         # audio pretraining (the organism's "Whisper"): audio-only steps, audio tower kept
    stage1_steps: int = 600
    stage2_steps: int = 600
    stage1_clips: int = 1000        # distinct video-only training clips (each used with every question)
    stage2_av_clips: int = 800      # distinct audio-visual clips
    stage2_audio_clips: int = 600   # distinct audio-only clips
    disagree: float = 0.1           # fraction of stage-2 AV clips whose sound is another class's
    stage2_lm_lr: float = 0.03      # stage 2: learning-rate factor of everything but the audio tower (design G;
                                    # design E used 0.05 and tied in one seed of five: docs/organism.md)
    control: int = 0                # 1: the no-VLM control (no stage 1; stage 2 for both stages' steps)
    threads: int = 1                # torch threads (a run reproduces exactly only with the same count)
    mix: dict = field(default_factory=lambda: {"av": 0.35, "audio": 0.45, "video": 0.2})  # stage-2 batch mix
    arch: dict = field(default_factory=dict)

    @classmethod
    def preset(cls, design: str = "v2", **overrides) -> "Curriculum":
        """The curriculum of a design (``PRESETS``), with ``overrides``."""
        if design not in PRESETS:
            raise ValueError(f"unknown organism design {design!r}; use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[design], "design": design, **overrides})


#: per design, what differs from the dataclass defaults (v2: the shipped organism's curriculum; v1: the
#: retired first organism's)
PRESETS: dict[str, dict] = {
    "v2": {},
    "v1": dict(stage0_steps=0, stage1_steps=1200, stage2_steps=1200, stage1_clips=2000, stage2_av_clips=1200,
               stage2_audio_clips=600, disagree=0.05, stage2_lm_lr=1.0, threads=2,
               mix={"av": 0.5, "audio": 0.3, "video": 0.2}),
}


# ------------------------------------------------------------------------------------------------ encoding
def _prompt(mode: str, question: str) -> str:
    media = AUDIO_PH if mode == "audio" else VIDEO_PH
    return chat_prompt(media + world.QUESTIONS[question], system_prompt=None)


def encode_group(proc, mode: str, question: str, clips: list[world.Clip],
                 design_name: str = DEFAULT_DESIGN) -> dict[str, torch.Tensor]:
    """Processor output for same-shaped examples (one mode, one question), stacked along the batch, with
    ``labels`` marking the answer tokens and the closing <|im_end|>."""
    prompt = _prompt(mode, question)
    texts = [prompt + world.answer(question, c.look, c.sound) + "<|im_end|>" for c in clips]
    kw: dict = dict(return_tensors="pt", padding=True)
    if mode == "audio":
        kw["audio"] = [c.audio for c in clips]
    else:
        kw["videos"] = [c.frames for c in clips]
        d = design(design_name)
        kw["videos_kwargs"] = {"fps": clips[0].fps, "do_sample_frames": False,
                               "size": {"shortest_edge": 28 * 28, "longest_edge": world.SIDE ** 2}}
        if mode == "av":
            kw["audio"] = [c.audio for c in clips]
            kw["position_id_per_seconds"] = d.position_id_per_seconds  # the processor interleaves by 25 unless told
            kw["seconds_per_chunk"] = float(d.seconds_per_chunk)
            kw["load_audio_from_video"] = True
            kw["audio_from_video_indices"] = list(range(len(clips)))
    out = dict(proc(text=texts, **kw))
    ids = out["input_ids"]
    n_prompt = len(proc(text=[prompt], **{k: ([v[0]] if k in ("audio", "videos") else v) for k, v in kw.items()
                                             if k != "audio_from_video_indices"},
                        **({"audio_from_video_indices": [0]} if mode == "av" else {}))["input_ids"][0])
    labels = torch.full_like(ids, -100)
    labels[:, n_prompt:] = ids[:, n_prompt:]
    out["labels"] = labels
    return out


def _gather(group: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of a stacked group (per-example media tensors are equal-sized, so they reshape)."""
    n = group["input_ids"].shape[0]
    out = {}
    for k, v in group.items():
        if k in ("pixel_values_videos",):
            per = v.shape[0] // n
            out[k] = v.view(n, per, -1)[idx].reshape(len(idx) * per, -1)
        else:
            out[k] = v[idx]
    return out


def build_pools(proc, cur: Curriculum, log=print) -> dict[str, dict[tuple[str, str], dict]]:
    rng = np.random.default_rng(cur.seed)
    geometry = design(cur.design).geometry
    t0 = time.perf_counter()

    def clips(n: int, disagree: float = 0.0) -> list[world.Clip]:
        out = []
        for _ in range(n):
            look = int(rng.integers(world.N_CLASSES))
            snd = look
            if disagree and rng.random() < disagree:
                snd = int((look + rng.integers(1, world.N_CLASSES)) % world.N_CLASSES)
            out.append(world.make_clip(look, snd, rng, geometry))
        return out

    def groups(mode: str, cl: list[world.Clip], questions: tuple[str, ...]) -> dict:
        res, media = {}, None
        for q in questions:
            parts = [encode_group(proc, mode, q, cl[i:i + 64], cur.design) for i in range(0, len(cl), 64)]
            g = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            del parts
            if media is None:  # the clips' media tensors, shared by every question (only the text differs)
                media = {k: v for k, v in g.items() if k not in ("input_ids", "attention_mask", "labels")}
            g.update(media)
            res[(mode, q)] = g
        return res

    qs = tuple(world.QUESTIONS)
    pools = {"stage1": groups("video", clips(cur.stage1_clips), qs)}
    pools["stage2"] = {**groups("av", clips(cur.stage2_av_clips, cur.disagree), qs),
                       **groups("audio", clips(cur.stage2_audio_clips), ("hear",))}
    pools["stage2"].update({k: v for k, v in pools["stage1"].items()})  # replay (mode "video")
    log(f"encoded training pools in {time.perf_counter() - t0:.0f} s")
    return pools


# ------------------------------------------------------------------------------------------------ training
def _step(model, opt, batch: dict, mode: str) -> tuple[float, float]:
    """One optimiser step; returns (loss, accuracy of the first answer token in this batch)."""
    out = model(**batch, use_audio_in_video=(mode == "av"))
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    labels = batch["labels"]
    first = (labels != -100).float().argmax(-1)  # first answer position
    rows = torch.arange(labels.shape[0])
    acc = (out.logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean()
    return float(out.loss.detach()), float(acc)


def _run_stage(model, opt, sched, pools: dict, steps: int, weights: dict[str, float], cur: Curriculum,
               gen: torch.Generator, tag: str, log=print) -> None:
    keys = sorted(pools)
    w = torch.tensor([weights[m] / sum(1 for k in keys if k[0] == m) for m, _ in keys])
    t0, run = time.perf_counter(), []
    for it in range(steps):
        key = keys[int(torch.multinomial(w, 1, generator=gen))]
        group = pools[key]
        idx = torch.randint(group["input_ids"].shape[0], (cur.batch,), generator=gen)
        run.append(_step(model, opt, _gather(group, idx), key[0]))
        sched.step()
        if (it + 1) % 100 == 0 or it == steps - 1:
            loss, acc = np.mean(run, axis=0)
            log(f"{tag} step {it + 1:4d}/{steps}  loss {loss:.3f}  first-answer-token acc {acc:.2f}  "
                f"{time.perf_counter() - t0:.0f} s")
            run = []


def save_checkpoint(model, proc, folder: Path, meta: dict) -> None:
    """Write atomically: into a temporary sibling folder, then rename over ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        (tmp / "organism.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def audio_tower(model) -> torch.nn.Module:
    """The thinker's audio encoder (``model.audio_tower`` in transformers; one level down in some versions)."""
    towers = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "audio_tower"]
    if len(towers) != 1:
        raise RuntimeError(f"expected one audio_tower module in {type(model).__name__}, found {len(towers)}")
    return towers[0]


def pretrain_audio_tower(model, proc, pools: dict, cur: Curriculum, tok, log=print) -> None:
    """Stage 0, the organism's Whisper: a separate thinker (its own seeded initialisation) learns "what do you
    hear ?" on the audio-only clips; its audio tower (encoder and projection) replaces ``model``'s. Real AVLLMs
    start from a pretrained audio encoder the same way; the organism and the no-VLM control both get it."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(cur.seed + 7919)
    donor = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(tok, cur.arch, cur.design))
    opt = torch.optim.AdamW(donor.parameters(), lr=cur.lr, weight_decay=0.0)
    n = cur.stage0_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda a: min(1.0, (a + 1) / 50) * (1.0 - 0.9 * min(max(0.0, (a - 0.7 * n) / max(0.3 * n, 1)), 1.0)))
    gen = torch.Generator().manual_seed(cur.seed + 7919)
    donor.train()
    _run_stage(donor, opt, sched, {("audio", "hear"): pools["stage2"][("audio", "hear")]}, n, {"audio": 1.0}, cur,
               gen, "stage0", log)
    audio_tower(model).load_state_dict(audio_tower(donor).state_dict())


def train(out: Path, cur: Curriculum, evaluate: bool = True, log=print) -> dict:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(cur.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()
    tok = build_tokenizer()
    proc = build_processor(tok, cur.design)
    torch.manual_seed(cur.seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(tok, cur.arch, cur.design))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"organism: {n_params / 1e6:.2f} M parameters")
    pools = build_pools(proc, cur, log)
    gen = torch.Generator().manual_seed(cur.seed)
    audio = list(audio_tower(model).parameters())
    ids = {id(p) for p in audio}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": audio}, {"params": rest}], lr=cur.lr, weight_decay=0.0)
    warm = 50
    s1 = 0 if cur.control else cur.stage1_steps
    s2 = cur.stage1_steps + cur.stage2_steps if cur.control else cur.stage2_steps

    def lr_at(step: int) -> float:  # per stage: warm-up, constant, linear decay to 10% over the last 30%
        a, n = (step, s1) if step < s1 else (step - s1, s2)
        tail = max(0.0, (a - 0.7 * n) / max(0.3 * n, 1))
        return min(1.0, (a + 1) / warm) * (1.0 - 0.9 * min(tail, 1.0))

    def lr_rest(step: int) -> float:  # stage 2 fine-tunes what stage 1 trained at a lower rate
        return lr_at(step) * (cur.stage2_lm_lr if step >= s1 and s1 else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_at, lr_rest])
    meta = {"curriculum": asdict(cur), "n_params": n_params}
    out = Path(out)
    if cur.stage0_steps:
        pretrain_audio_tower(model, proc, pools, cur, tok, log)
    if not cur.control:
        model.train()
        _run_stage(model, opt, sched, pools["stage1"], s1, {"video": 1.0}, cur, gen, "stage1", log)
        model.eval()
        save_checkpoint(model, proc, out / "organism-base", {**meta, "stage": 1})
    model.train()
    _run_stage(model, opt, sched, pools["stage2"], s2, cur.mix, cur, gen, "stage2", log)
    model.eval()
    seconds = time.perf_counter() - t_start
    name = "organism-control" if cur.control else "organism"
    save_checkpoint(model, proc, out / name, {**meta, "stage": 2, "train_seconds": round(seconds, 1)})
    log(f"trained both stages in {seconds:.0f} s")
    result = {"train_seconds": seconds}
    if evaluate:
        from av_lens.organism.evaluate import evaluate_and_record

        result["eval"] = evaluate_and_record(out, log=log)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write organism/ and organism-base/ into")
    p.add_argument("--design", default="v2", choices=sorted(PRESETS),
                   help="v2: the shipped organism (8 layers, 6 s clips, 8 video tokens per audio token); "
                        "v1: the retired first organism (4 layers, 1 s clips)")
    for f in Curriculum.__dataclass_fields__.values():
        if f.type in ("int", "float"):
            p.add_argument("--" + f.name.replace("_", "-"), type=eval(f.type), default=None,
                           help=f"default: the design's ({f.default} for v2)")
    p.add_argument("--mix", type=json.loads, default=None, help='stage-2 batch mix, e.g. \'{"av":0.5,"audio":0.3,"video":0.2}\'')
    p.add_argument("--no-eval", action="store_true")
    a = p.parse_args(argv)
    given = {k: getattr(a, k) for k in Curriculum.__dataclass_fields__ if k not in ("design", "arch")
             and getattr(a, k, None) is not None}
    cur = Curriculum.preset(a.design, **given)
    train(Path(a.out), cur, evaluate=not a.no_eval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
