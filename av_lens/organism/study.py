"""The study's four experiments on the organism, end to end, with av_lens's analysis tools.

    python -m av_lens.organism.study [--pairs 48]

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


def run_study(model, base=None, n_pairs: int = 48, max_new_tokens: int = 4, k: int = 5, progress: bool = False) -> dict:
    pairs = world.eval_pairs(n_pairs)
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
    out["caption_audio_fidelity"] = audio_fidelity(gen, cf)
    out["caption_video_fidelity"] = float(fidelity(gen.text, [world.OBJECTS[c.look] for c in cf],
                                                   KeywordScorer(world.OBJECTS)).mean())

    # 2. logit lens at the audio positions (final norm applied) vs the answer
    lens = LogitLens(model, "audio", k=k, targets=list(world.SOUNDS), include_embed=True)
    with torch.no_grad():
        model.run_with_hooks(inp, fwd_hooks=lens.hooks(), return_type=None)
    res = lens.result()
    hit = res.sample_target_hits([c.sound for c in cf], k)  # [layer, clip]: the sound playing in the top k
    out["lens_layers"] = res.layers
    out["latent_hit_rate_by_layer"] = hit.float().mean(1).tolist()
    out["latent_hit_rate_any_layer"] = float(hit.any(0).float().mean())
    answers = first_answer(model, clip_inputs(model, cf, "hear", "av"))
    out["cf_answer_names_sound"] = sum(a == world.SOUNDS[c.sound] for a, c in zip(answers, cf)) / n_pairs
    out["cf_answer_names_picture"] = sum(a == world.SOUNDS[c.look] for a, c in zip(answers, cf)) / n_pairs

    # 3. knockout sweeps scored by caption audio fidelity
    metric = lambda g, _: audio_fidelity(g, cf)  # noqa: E731
    gen_kw = dict(max_new_tokens=max_new_tokens)
    n = model.cfg.n_layers
    for keys, tag in (("video", "G-/->V"), ("audio", "G-/->A")):
        for wname, windows in (("width1", sliding_windows(n, 1)), ("from_layer", from_layer_windows(n))):
            sw = knockout_sweep(model, inp, "generated", keys, windows, metric, generate=gen_kw, progress=progress)
            out[f"knockout {tag} {wname}"] = {"windows": [[w.start, w.stop] for w in sw.windows],
                                             "audio_fidelity": sw.values.tolist(), "baseline": float(sw.baseline)}
    # prefill-only question ("what do you hear ?"): blocking last-prompt -> video from layer l on
    hear = model.encode(clip_inputs(model, cf, "hear", "av"))
    sound_ids = torch.tensor([model.to_single_token(world.SOUNDS[c.sound]) for c in cf])

    def follows_sound(logits, _):
        return (logits[:, -1].argmax(-1) == sound_ids).float().mean()

    sw = knockout_sweep(model, hear, "last_prompt", "video", from_layer_windows(n), follows_sound, progress=progress)
    out["knockout last_prompt-/->video from_layer (hear answer = sound)"] = {
        "windows": [[w.start, w.stop] for w in sw.windows], "follows_sound": sw.values.tolist(),
        "baseline": float(sw.baseline)}

    # 4. token shift against the base VLM (same audio-visual prompt)
    if base is not None:
        results = token_shift_batch(model, base, inp, clip_inputs(base, cf, "describe", "av"),
                                    max_new_tokens=max_new_tokens)
        out["token_shift_fractions"] = pooled_fractions(results)
        out["token_shift_mean_kl"] = float(torch.tensor([r.mean_kl for r in results]).nanmean())
        sound_tokens = [(r.category[i], r.kl[i]) for r in results for i, s in enumerate(r.strings)
                        if s.strip() in world.SOUNDS]
        if sound_tokens:
            cats = [c for c, _ in sound_tokens]
            out["token_shift_sound_words"] = {c: cats.count(c) / len(cats) for c in ("unshifted", "marginal", "shifted")}
    return out


def format_study(out: dict) -> str:
    lines = [f"counterfactual clips: {out['n_pairs']}; captions e.g. {out['captions'][:3]}",
             f"caption audio fidelity {out['caption_audio_fidelity']:.3f}, video fidelity {out['caption_video_fidelity']:.3f}",
             "", "1. attention of generated tokens, mean over heads (raw | per token):",
             f"{'layer':>5} " + " ".join(f"{g:>9}" for g in out["flow_groups"]) + " | "
             + " ".join(f"{g:>9}" for g in out["flow_groups"])]
    for l, (a, b) in enumerate(zip(out["flow_by_layer"], out["flow_per_token_by_layer"])):
        lines.append(f"{l:5d} " + " ".join(f"{v:9.3f}" for v in a) + " | " + " ".join(f"{v:9.4f}" for v in b))
    lines += ["", "2. logit lens at audio positions: true sound word in top-k",
              "   by layer (-1 = embeddings): " + ", ".join(f"{l}: {v:.2f}" for l, v in
                                                        zip(out["lens_layers"], out["latent_hit_rate_by_layer"])),
              f"   at any layer: {out['latent_hit_rate_any_layer']:.2f}; 'what do you hear' answer names the sound "
              f"{out['cf_answer_names_sound']:.2f}, the picture's sound {out['cf_answer_names_picture']:.2f}", "",
              "3. knockout (caption audio fidelity; baseline first):"]
    for key, v in out.items():
        if key.startswith("knockout"):
            vals = v.get("audio_fidelity", v.get("follows_sound"))
            lines.append(f"   {key}: base {v['baseline']:.3f}; " + ", ".join(
                f"{w[0]}:{w[1]}: {x:.3f}" for w, x in zip(v["windows"], vals)))  # half-open windows
    if "token_shift_fractions" in out:
        lines += ["", f"4. token shift vs base: {json.dumps({k: round(x, 3) for k, x in out['token_shift_fractions'].items() if isinstance(x, float)})}, "
                      f"mean KL {out['token_shift_mean_kl']:.3f}; sound words: {out.get('token_shift_sound_words')}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="av-lens/organism")
    ap.add_argument("--base", default="av-lens/organism-base")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    out = run_study(load(a.model), load(a.base), a.pairs, progress=True)
    print(format_study(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
