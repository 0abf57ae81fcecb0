"""A dictionary on the organism's audio positions: is each sound a feature, and does it survive the picture?

    python -m av_lens.sae.organism_study [--json docs/sae_organism_study.json]

A TopK SAE is trained on ``blocks.3.hook_resid_post`` (the middle of the organism's 8 layers) at the audio
positions of audio-visual clips (half factual, half counterfactual). For each of the 8 sound classes the feature
whose per-clip maximum best separates "this sound is playing" (AUROC, one-vs-rest) is chosen on a *selection*
set of counterfactual clips (picture of another class, so a feature that reads the picture cannot win), then
measured on held-out factual clips and held-out counterfactual clips — where the organism's answer follows the
picture (docs/organism.md): a feature that still fires there shows the audio represented but unused.
Splicing with the error term is checked to leave the logits unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HOOK = "blocks.3.hook_resid_post"


def organism_sae_study(*, n_train_batches: int = 8, clips_per_batch: int = 16, n_select: int = 128, n_test: int = 96,
                       d_sae: int = 512, k: int = 16, tokens: int = 200_000, seed: int = 0, hook: str | None = None) -> dict:
    from av_lens import HookedAVTransformer
    from av_lens.organism import world
    from av_lens.organism.evaluate import clip_inputs, first_answer
    from av_lens.sae import (collect_rows, explained_variance, feature_activations, reconstruction_report, splice,
                             train_dictionary)

    hook = hook or HOOK
    torch.manual_seed(seed)
    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    rng = np.random.default_rng(seed + 1000)

    def clips(n, cf):
        out = []
        for _ in range(n):
            look = int(rng.integers(world.N_CLASSES))
            sound = (look + int(rng.integers(1, world.N_CLASSES))) % world.N_CLASSES if cf else look
            out.append(world.make_clip(look, sound, rng))
        return out

    train = [clip_inputs(model, clips(clips_per_batch, cf=i % 2 == 1), "hear", "av") for i in range(n_train_batches)]
    sae = train_dictionary(model, train, hook, at="audio", d_sae=d_sae, architecture="topk", k=k, tokens=tokens,
                           seed=seed, progress=False)

    def measure(cl):
        inp = clip_inputs(model, cl, "hear", "av")
        fa = feature_activations(model, sae, [inp], at="audio")
        acts, _, samples = fa.pooled("max")
        labels = torch.tensor([cl[s].sound for s in samples.tolist()])
        return inp, fa, labels, fa.class_auroc(labels, world.N_CLASSES, pool="max")

    sel_inp, _, _, sel_au = measure(clips(n_select, cf=True))
    chosen = sel_au.nan_to_num(0).argmax(0)                              # [class] feature index
    fact = clips(n_test, cf=False)
    cf = clips(n_test, cf=True)
    f_inp, _, _, f_au = measure(fact)
    c_inp, _, _, c_au = measure(cf)
    X, _, _ = collect_rows(model, f_inp, hook, "audio")
    ans = first_answer(model, c_inp)
    follows_picture = float(np.mean([a == world.SOUNDS[c.look] for a, c in zip(ans, cf)]))
    with torch.no_grad():
        plain = model(c_inp)
        with splice(model, sae, at="audio"):
            spliced = model(c_inp)
    # the dictionary was trained on audio positions; its reconstruction spliced in at each position group
    # (without the error term) says how much of the model's next-token loss it keeps there, and what it does
    # to positions it never saw
    recon = {name: {g: {k: round(v, 4) if isinstance(v, float) else v for k, v in rep.items()}
                    for g, rep in reconstruction_report(model, sae, inp, groups=("audio", "video", "text")).items()}
             for name, inp in (("factual", f_inp), ("counterfactual", c_inp))}
    rows = []
    for c in range(world.N_CLASSES):
        f = int(chosen[c])
        rows.append({"class": world.SOUNDS[c], "feature": f, "auroc_selection_cf": float(sel_au[f, c]),
                     "auroc_factual": float(f_au[f, c]), "auroc_counterfactual": float(c_au[f, c])})
    return {"hook": hook, "d_sae": d_sae, "k": k, "tokens": tokens, "seed": seed,
            "explained_variance_train": sae.cfg.metadata["explained_variance_train"],
            "explained_variance_test": round(explained_variance(sae, X), 4),
            "splice_max_abs_logit_diff": float((spliced - plain).abs().max()),
            "counterfactual_answer_follows_picture": round(follows_picture, 4), "n_test": n_test,
            "reconstruction": recon, "classes": rows}


def format_study(r: dict) -> str:
    out = [f"TopK SAE (d_sae {r['d_sae']}, k {r['k']}) at {r['hook']} @ audio positions; explained variance "
           f"{r['explained_variance_test']:.3f} on held-out factual clips; splice with error term: max |Δ logit| "
           f"{r['splice_max_abs_logit_diff']:.1e}; the organism follows the picture on "
           f"{r['counterfactual_answer_follows_picture']:.2f} of the {r['n_test']} held-out counterfactual clips",
           "", "| sound | feature | AUROC, selection (cf) | AUROC, held-out factual | AUROC, held-out counterfactual |",
           "|---|---|---|---|---|"]
    out += [f"| {c['class']} | {c['feature']} | {c['auroc_selection_cf']:.3f} | {c['auroc_factual']:.3f} | "
            f"{c['auroc_counterfactual']:.3f} |" for c in r["classes"]]
    out += ["", "| held-out clips | positions spliced (no error term) | positions | explained variance | CE clean | "
                "CE spliced | CE zero-ablated | CE recovered |", "|---|---|---|---|---|---|---|---|"]
    for cond, groups in r.get("reconstruction", {}).items():
        out += [f"| {cond} | {g} | {v['positions']} | {v['explained_variance']:.3f} | {v['ce_clean']:.4f} | "
                f"{v['ce_spliced']:.4f} | {v['ce_zero_ablated']:.4f} | {v['ce_recovered']:.3f} |"
                for g, v in groups.items()]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train an SAE on the organism's audio positions and read its sounds.")
    ap.add_argument("--seed", type=int, default=0, help="training and clip seed (default 0)")
    ap.add_argument("--hook", default=HOOK, help=f"hook point to train on (default {HOOK})")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    r = organism_sae_study(seed=a.seed, hook=a.hook)
    print(format_study(r))
    if a.json:
        from av_lens.sweeps import _atomic_write

        _atomic_write(Path(a.json), json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
