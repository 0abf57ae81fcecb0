"""The study's four experiments on the organism, end to end, with av_lens's analysis tools.

    python -m av_lens.organism.study [--pairs 384]

1. attention flow: the attention that generated caption tokens pay to audio / video / text, per layer;
2. logit lens on the audio positions: how often the *true* sound word is in the top-k at some layer
   ("latent audio understanding"), against how often the answer names it;
3. attention knockout of generated->video (G↛V) and generated->audio (G↛A) edges over layer windows, scored
   by the caption's audio fidelity (keyword scorer: does the caption name the sound that is playing?);
4. token shift of the organism's captions against its base VLM (teacher-forced).

Everything runs on counterfactual clips (picture of A, sound of B) from the held-out set. Figures go to
docs/analysis.md; tutorials call the same functions.
"""

from __future__ import annotations

import argparse
import json

import torch

from av_lens.analysis import (AttentionFlow, KeywordScorer, LogitLens, fidelity, from_layer_windows,
                              knockout_sweep, sliding_windows, token_shift_batch)
from av_lens.analysis.token_shift import pooled_fractions
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs, first_answer

FLOW_GROUPS = {"audio": "audio", "video": "video", "text": "prompt - audio - video", "generated": "generated"}


def load(name: str = "av-lens/organism"):
    from av_lens import HookedAVTransformer

    return HookedAVTransformer.from_pretrained(name)


def audio_fidelity(gen, clips) -> float:
    """Mean keyword fidelity of the captions to the sound actually playing."""
    scorer = KeywordScorer(world.SOUNDS)
    return float(fidelity(gen.text, [world.SOUNDS[c.sound] for c in clips], scorer).mean())


def uninvolved(clip: world.Clip) -> int:
    """A sound class neither seen nor heard in ``clip`` (the next class after the playing one that is
    neither): the comparator that says what a logit-lens "hit" means by chance in a closed vocabulary."""
    k = (clip.sound + 1) % world.N_CLASSES
    while k in (clip.look, clip.sound):
        k = (k + 1) % world.N_CLASSES
    return k


def well_formed(caption: str) -> bool:
    """The trained caption form "<object> and <sound>": an object word, "and", a sound word, nothing else."""
    w = caption.split()
    return len(w) == 3 and w[0] in world.OBJECTS and w[1] == "and" and w[2] in world.SOUNDS


def caption_stats(texts, clips) -> torch.Tensor:
    """[4, clip] per caption: names the playing sound, is well formed, names the picture's sound, names the
    object shown."""
    rows = [[world.SOUNDS[c.sound] in t.split(), well_formed(t), world.SOUNDS[c.look] in t.split(),
             world.OBJECTS[c.look] in t.split()] for t, c in zip(texts, clips)]
    return torch.tensor(rows, dtype=torch.float32).T


def _scored(stats: torch.Tensor, base: torch.Tensor) -> dict:
    """A knockout window's caption figures, beside the unablated captions ``base`` (both from caption_stats)."""
    sound, ok = stats[0], stats[1]
    return {"audio_fidelity": float(sound.mean()), "well_formed": float(ok.mean()),
            "audio_fidelity_well_formed": float((sound * ok).mean()),
            "names_picture_sound": float(stats[2].mean()), "names_object": float(stats[3].mean()),
            "gained": int(((sound > 0) & (base[0] == 0)).sum()), "lost": int(((sound == 0) & (base[0] > 0)).sum())}


#: key groups knocked out from the generated tokens (text = the prompt's words: the comparator group)
KNOCKOUT_KEYS = {"video": "G-/->V", "audio": "G-/->A", "prompt - audio - video": "G-/->T"}


def run_study(model, base=None, n_pairs: int = 384, max_new_tokens: int = 4, k: int = 5, progress: bool = False,
              unrelated_base=None, geometry: world.Geometry = world.DEFAULT) -> dict:
    """The four experiments on ``n_pairs`` held-out counterfactual clips, each with its control.

    ``base``: the organism's own VLM stage (token shift); ``unrelated_base``: a VLM from another training seed,
    the comparator that says how much of the token shift any VLM shares with the organism; ``geometry``: the
    clips of the organism's design (``build.design_of(checkpoint).geometry``)."""
    pairs = world.eval_pairs(n_pairs, geometry)
    cf = [p[1] for p in pairs]
    inp = model.encode(clip_inputs(model, cf, "describe", "av"))
    out: dict = {"n_pairs": n_pairs}

    # 1. attention flow of generated tokens (and its per-token normalisation)
    flows = {}
    for per_token in (False, True):
        flow = AttentionFlow(model, "generated", FLOW_GROUPS, per_token=per_token)
        gen = model.generate(inp, max_new_tokens=max_new_tokens, fwd_hooks=flow.hooks())
        flows[per_token] = flow.result().by_layer()
    out["flow_groups"] = list(FLOW_GROUPS)
    out["flow_by_layer"] = flows[False].tolist()
    out["flow_per_token_by_layer"] = flows[True].tolist()
    out["captions"] = gen.text[:6]
    base_stats = caption_stats(gen.text, cf)
    out["caption_audio_fidelity"] = audio_fidelity(gen, cf)
    out["caption_video_fidelity"] = float(fidelity(gen.text, [world.OBJECTS[c.look] for c in cf],
                                                   KeywordScorer(world.OBJECTS)).mean())
    out["caption_well_formed"] = float(base_stats[1].mean())

    # 2. logit lens at the audio positions (final norm applied) vs the answer, against an uninvolved sound word
    lens = LogitLens(model, "audio", k=k, targets=list(world.SOUNDS), include_embed=True)
    with torch.no_grad():
        model.run_with_hooks(inp, fwd_hooks=lens.hooks(), return_type=None)
    res = lens.result()
    out["lens_layers"] = res.layers
    for tag, cls in (("", [c.sound for c in cf]), ("picture_", [c.look for c in cf]),
                     ("uninvolved_", [uninvolved(c) for c in cf])):
        hit = res.sample_target_hits(cls, k)  # [layer, clip]: that sound word in the top k at an audio position
        out[f"latent_{tag}hit_rate_by_layer"] = hit.float().mean(1).tolist()
        out[f"latent_{tag}hit_rate_any_layer"] = float(hit.any(0).float().mean())
        # best rank over a clip's audio positions, median over clips, per layer (1 = top-1; chance ~ vocab / 2)
        cols = torch.tensor([cls[b] for b, _ in res.positions])
        rank = res.target_rank[:, torch.arange(len(cols)), cols].float()  # [layer, position]
        best = torch.full((len(res.layers), n_pairs), float("inf"))
        for j, (b, _) in enumerate(res.positions):
            best[:, b] = torch.minimum(best[:, b], rank[:, j])
        out[f"latent_{tag}median_rank_by_layer"] = best.median(1).values.tolist()
    out["lens_vocabulary"] = int(model.cfg.d_vocab)
    answers = first_answer(model, clip_inputs(model, cf, "hear", "av"))
    out["cf_answer_names_sound"] = sum(a == world.SOUNDS[c.sound] for a, c in zip(answers, cf)) / n_pairs
    out["cf_answer_names_picture"] = sum(a == world.SOUNDS[c.look] for a, c in zip(answers, cf)) / n_pairs

    # 3. knockout sweeps, scored per caption (playing sound named, well formed, gained / lost vs no knockout)
    metric = lambda g, _: caption_stats(g.text, cf)  # noqa: E731
    gen_kw = dict(max_new_tokens=max_new_tokens)
    n = model.cfg.n_layers
    for keys, tag in KNOCKOUT_KEYS.items():
        for wname, windows in (("width1", sliding_windows(n, 1)), ("from_layer", from_layer_windows(n))):
            sw = knockout_sweep(model, inp, "generated", keys, windows, metric, generate=gen_kw, progress=progress)
            scored = [_scored(v, base_stats) for v in sw.values]
            entry = {"windows": [[w.start, w.stop] for w in sw.windows], "baseline": out["caption_audio_fidelity"],
                     "baseline_well_formed": out["caption_well_formed"]}
            entry.update({key: [s[key] for s in scored] for key in scored[0]})
            out[f"knockout {tag} {wname}"] = entry
    # prefill-only question ("what do you hear ?"): blocking last-prompt -> video (or -> text) from layer l on
    hear = model.encode(clip_inputs(model, cf, "hear", "av"))
    sound_ids = torch.tensor([model.to_single_token(world.SOUNDS[c.sound]) for c in cf])

    def follows_sound(logits, _):
        return (logits[:, -1].argmax(-1) == sound_ids).float().mean()

    for keys, name in (("video", "video"), ("prompt - audio - video - last_prompt", "text")):
        sw = knockout_sweep(model, hear, "last_prompt", keys, from_layer_windows(n), follows_sound, progress=progress)
        out[f"knockout last_prompt-/->{name} from_layer (hear answer = sound)"] = {
            "windows": [[w.start, w.stop] for w in sw.windows], "follows_sound": sw.values.tolist(),
            "baseline": float(sw.baseline)}

    # 4. token shift against the base VLM (same audio-visual prompt), and against an unrelated base
    for tag, b in (("", base), ("unrelated_", unrelated_base)):
        if b is None:
            continue
        results = token_shift_batch(model, b, inp, clip_inputs(b, cf, "describe", "av"),
                                    max_new_tokens=max_new_tokens)
        out[f"token_shift_{tag}fractions"] = pooled_fractions(results)
        out[f"token_shift_{tag}mean_kl"] = float(torch.tensor([r.mean_kl for r in results]).nanmean())
        sound_tokens = [r.category[i] for r in results for i, s in enumerate(r.strings) if s.strip() in world.SOUNDS]
        if sound_tokens:
            out[f"token_shift_{tag}sound_words"] = {c: sound_tokens.count(c) / len(sound_tokens)
                                                   for c in ("unshifted", "marginal", "shifted")}
    return out


def format_study(out: dict) -> str:
    lines = [f"counterfactual clips: {out['n_pairs']}; captions e.g. {out['captions'][:3]}",
             f"caption audio fidelity {out['caption_audio_fidelity']:.3f}, video fidelity {out['caption_video_fidelity']:.3f}, "
             f"well formed {out.get('caption_well_formed', float('nan')):.3f}",
             "", "1. attention of generated tokens, mean over heads (raw | per token):",
             f"{'layer':>5} " + " ".join(f"{g:>9}" for g in out["flow_groups"]) + " | "
             + " ".join(f"{g:>9}" for g in out["flow_groups"])]
    for l, (a, b) in enumerate(zip(out["flow_by_layer"], out["flow_per_token_by_layer"])):
        lines.append(f"{l:5d} " + " ".join(f"{v:9.3f}" for v in a) + " | " + " ".join(f"{v:9.4f}" for v in b))
    lines += ["", "2. logit lens at audio positions: sound word in the top-k (playing | picture's | uninvolved), "
                  "median best rank (playing | uninvolved)"]
    for i, l in enumerate(out["lens_layers"]):
        row = [out[f"latent_{t}hit_rate_by_layer"][i] for t in ("", "picture_", "uninvolved_") if
               f"latent_{t}hit_rate_by_layer" in out]
        ranks = [out[f"latent_{t}median_rank_by_layer"][i] for t in ("", "uninvolved_")
                 if f"latent_{t}median_rank_by_layer" in out]
        lines.append(f"   layer {l:3d}: " + " | ".join(f"{v:.2f}" for v in row)
                     + ("   ranks " + " | ".join(f"{v:.0f}" for v in ranks) if ranks else ""))
    lines += [f"   at any layer: playing {out['latent_hit_rate_any_layer']:.2f}"
              + (f", uninvolved {out['latent_uninvolved_hit_rate_any_layer']:.2f}"
                 if "latent_uninvolved_hit_rate_any_layer" in out else "")
              + f"; 'what do you hear' answer names the sound {out['cf_answer_names_sound']:.2f}, the picture's sound "
              f"{out['cf_answer_names_picture']:.2f}", "",
              "3. knockout (caption audio fidelity [well formed, gained/lost]; no knockout first):"]
    for key, v in out.items():
        if key.startswith("knockout"):
            vals = v.get("audio_fidelity", v.get("follows_sound"))
            extra = ([f" [{w:.2f}, +{g}/-{lo}]" for w, g, lo in zip(v["well_formed"], v["gained"], v["lost"])]
                     if "well_formed" in v else [""] * len(vals))
            lines.append(f"   {key}: base {v['baseline']:.3f}; " + ", ".join(
                f"{w[0]}:{w[1]}: {x:.3f}{e}" for w, x, e in zip(v["windows"], vals, extra)))  # half-open windows
    for tag, name in (("", "its base"), ("unrelated_", "an unrelated base")):
        if f"token_shift_{tag}fractions" in out:
            fr = {k: round(x, 3) for k, x in out[f"token_shift_{tag}fractions"].items() if isinstance(x, float)}
            lines += [f"4. token shift vs {name}: {json.dumps(fr)}, mean KL {out[f'token_shift_{tag}mean_kl']:.3f}; "
                      f"sound words: {out.get(f'token_shift_{tag}sound_words')}"]
    return "\n".join(lines)


#: the per-layer curves and scalars averaged over training seeds by :func:`study_over_seeds`
CURVES = ("flow_by_layer", "latent_hit_rate_by_layer", "latent_picture_hit_rate_by_layer",
          "latent_uninvolved_hit_rate_by_layer", "latent_median_rank_by_layer",
          "latent_uninvolved_median_rank_by_layer")
SCALARS = ("caption_audio_fidelity", "caption_well_formed", "latent_hit_rate_any_layer",
           "latent_picture_hit_rate_any_layer", "latent_uninvolved_hit_rate_any_layer", "cf_answer_names_sound",
           "cf_answer_names_picture", "token_shift_mean_kl", "token_shift_unrelated_mean_kl")


def _mean_sd(values: list) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    sd = t.std(0, unbiased=True) if len(values) > 1 else torch.zeros_like(t[0])
    return {"mean": t.mean(0).tolist(), "sd": sd.tolist(), "n": len(values)}


def study_over_seeds(root, seeds, control_seeds=(), n_pairs: int = 384, progress: bool = False, log=print) -> dict:
    """The study on every training seed under ``root`` (the layout of :mod:`av_lens.organism.seeds`:
    ``seed<N>/organism``, ``seed<N>/organism-base``, ``control<N>/organism-control``), each organism with its own
    base and an unrelated one (the previous seed's; the first seed's: the second's), each control without a
    base; then mean and sd over seeds of every curve. Per-run figures are cached as ``study-<checkpoint>.json``
    beside each checkpoint (with the unrelated base used)."""
    from pathlib import Path

    from av_lens.organism.build import design_of
    from av_lens.sweeps import _atomic_write

    root = Path(root)
    seeds, control_seeds = list(seeds), list(control_seeds)
    runs: dict = {}

    def one(key, folder, base=None, unrelated=None):
        cache = folder.parent / f"study-{folder.name}.json"
        if cache.is_file() and json.loads(cache.read_text()).get("n_pairs") == n_pairs:
            runs[key] = json.loads(cache.read_text())
            return
        out = run_study(load(folder), load(base) if base else None, n_pairs, progress=progress,
                        unrelated_base=load(unrelated) if unrelated else None, geometry=design_of(folder).geometry)
        out["unrelated_base"] = str(unrelated.relative_to(root)) if unrelated else None
        _atomic_write(cache, json.dumps(out, indent=1))
        runs[key] = out
        log(f"studied {key}")

    for i, s in enumerate(seeds):
        other = (seeds[i - 1] if i else seeds[1]) if len(seeds) > 1 else None
        one(f"seed{s}", root / f"seed{s}" / "organism", root / f"seed{s}" / "organism-base",
            root / f"seed{other}" / "organism-base" if other is not None else None)
    for s in control_seeds:
        one(f"control{s}", root / f"control{s}" / "organism-control")
    summary: dict = {"n_pairs": n_pairs, "runs": runs}
    for group, keys in (("organism", [f"seed{s}" for s in seeds]), ("control", [f"control{s}" for s in control_seeds])):
        if not keys:
            continue
        agg = {}
        for name in CURVES + SCALARS:
            vals = [runs[k][name] for k in keys if name in runs[k]]
            if vals:
                agg[name] = _mean_sd(vals)
        for name in runs[keys[0]]:
            if name.startswith("knockout"):
                field = "audio_fidelity" if "audio_fidelity" in runs[keys[0]][name] else "follows_sound"
                agg[f"{name} {field}"] = _mean_sd([runs[k][name][field] for k in keys])
                if field == "audio_fidelity":
                    agg[f"{name} well_formed"] = _mean_sd([runs[k][name]["well_formed"] for k in keys])
        summary[group] = agg
    return summary


def format_over_seeds(summary: dict) -> str:
    """Mean +- sd over seeds of the headline curves, organism beside control."""
    lines = [f"study over training seeds, {summary['n_pairs']} counterfactual pairs each"]
    groups = [g for g in ("organism", "control") if g in summary]
    for name in SCALARS:
        cells = [f"{g} {summary[g][name]['mean']:.3f} +- {summary[g][name]['sd']:.3f} (n={summary[g][name]['n']})"
                 for g in groups if name in summary[g]]
        if cells:
            lines.append(f"{name:40s} " + " | ".join(cells))
    flow_groups = next(iter(summary["runs"].values()))["flow_groups"]
    for g in groups:
        f = summary[g]["flow_by_layer"]
        lines.append(f"attention of generated tokens, {g} (mean +- sd): " + "; ".join(
            f"L{l} " + " ".join(f"{n[0]}={m:.2f}+-{d:.2f}" for n, m, d in zip(flow_groups, ml, sl))
            for l, (ml, sl) in enumerate(zip(f["mean"], f["sd"]))))
        for name in ("latent_hit_rate_by_layer", "latent_uninvolved_hit_rate_by_layer"):
            c = summary[g][name]
            lines.append(f"{name}, {g}: " + ", ".join(f"{m:.2f}+-{d:.2f}" for m, d in zip(c["mean"], c["sd"])))
        for name, c in summary[g].items():
            if name.startswith("knockout"):
                lines.append(f"{name}, {g}: " + ", ".join(f"{m:.2f}+-{d:.2f}" for m, d in zip(c["mean"], c["sd"])))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="av-lens/organism")
    ap.add_argument("--base", default="av-lens/organism-base")
    ap.add_argument("--unrelated-base", default=None, help="a VLM from another training seed (token-shift comparator)")
    ap.add_argument("--pairs", type=int, default=384)
    ap.add_argument("--seeds-dir", default=None, help="study every run of an av_lens.organism.seeds folder instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--control-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    if a.seeds_dir:
        out = study_over_seeds(a.seeds_dir, a.seeds, a.control_seeds, a.pairs, progress=True)
        print(format_over_seeds(out))
    else:
        from av_lens.organism.build import design_of

        out = run_study(load(a.model), load(a.base), a.pairs, progress=True,
                        unrelated_base=load(a.unrelated_base) if a.unrelated_base else None,
                        geometry=design_of(a.model).geometry)
        print(format_study(out))
    if a.json:
        from pathlib import Path

        from av_lens.sweeps import _atomic_write

        _atomic_write(Path(a.json), json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
