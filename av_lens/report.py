"""``av-lens report``: one self-contained HTML file with every view of a clip or a factual/counterfactual pair.

The data path in one pass: media -> native encoders -> modality layout -> hooked backbone -> analyses ->
views. For a clip (frames + soundtrack) and, optionally, a counterfactual soundtrack for the same frames,
the report shows the input's modality strip, the model's answers, where generated tokens look (attention by
layer and modality-pooled heads), what the audio positions would say (logit lens), what attention knockout
does to the answer, where patching factual -> counterfactual moves it, and, when a base model is given, how
far the captions shifted from it. For the embedded organism it adds probes over labelled clips.

    from av_lens.report import build_report, builtin_pair
    summary = build_report(model, *builtin_pair(), base=base, out="report.html")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from av_lens import views
from av_lens.errors import InputError
from av_lens.processing import VIDEO_PH

STUDY_PROMPTS = {"see": "Describe what you see.", "hear": "Describe what you hear.",
                 "describe": "Describe what you see and hear."}


@dataclass
class ClipMedia:
    """Frames (T, H, W, 3) uint8 at ``fps`` and a 16 kHz mono soundtrack; ``sound_label`` optional."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray
    name: str = "clip"
    sound_label: str | None = None   # a word naming what is heard (used as a logit-lens / fidelity target)
    look_label: str | None = None


@dataclass
class ReportSummary:
    path: Path
    answers: dict = field(default_factory=dict)
    flow_by_layer: dict = field(default_factory=dict)
    knockout: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def text(self) -> str:
        lines = [f"report: {self.path}"]
        for k, v in self.answers.items():
            lines.append(f"  {k:34s} {v}")
        if self.flow_by_layer:
            groups = list(self.flow_by_layer)
            lines.append("  attention of generated tokens by layer: "
                         + "; ".join(f"L{l} " + " ".join(f"{g} {self.flow_by_layer[g][l]:.2f}" for g in groups)
                                     for l in range(len(self.flow_by_layer[groups[0]]))))
        for k, v in self.knockout.items():
            lines.append(f"  {k}: {v}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def builtin_pair(look: int = 0, sound: int = 1, seed: int = 2026) -> tuple[ClipMedia, ClipMedia]:
    """The organism world's demo pair: a dog clip with its bark, and the same frames with a bell's ring."""
    from av_lens.organism import world

    rng = np.random.default_rng(seed)
    frames = world.frames(look, rng)
    fact = ClipMedia(frames, world.FPS, world.sound(look, rng), "factual", world.SOUNDS[look], world.OBJECTS[look])
    cf = ClipMedia(frames, world.FPS, world.sound(sound, rng), "counterfactual", world.SOUNDS[sound],
                   world.OBJECTS[look])
    return fact, cf


def _prompts(model) -> dict[str, str]:
    """The study's prompts, or the organism's closed-vocabulary questions when the tokenizer lacks the words."""
    if len(model.tokenizer) < 1000:  # a closed-vocabulary toy (the organism): ask in its own words
        from av_lens.organism import world

        return dict(world.QUESTIONS)
    return dict(STUDY_PROMPTS)


def _inputs(model, clip: ClipMedia, prompt: str):
    return model.prepare(VIDEO_PH + prompt, videos=[clip.frames], video_audio=[clip.audio], fps=clip.fps,
                         use_audio_in_video=True)


def _check_dictionary(model, sae) -> None:
    """Refuse a dictionary whose hook point this model lacks, before any stage runs (its width is checked on the
    clip's inputs by :func:`_check_dictionary_on`)."""
    name = sae.cfg.hook_name
    if name not in model.hook_dict:
        near = [n for n in model.hook_dict if n.split(".")[-1] == name.split(".")[-1]][:3]
        raise InputError(f"the dictionary reads {name!r}, which is not a hook point of {model.cfg.model_name}",
                         "pass a dictionary trained on this model" + (f" (hook points like {', '.join(near)})"
                                                                      if near else ""))


def _check_dictionary_on(model, sae, inputs, at: str) -> None:
    """With the clip's inputs: the dictionary's positions exist and its hook's activation has its width (caught
    here, right after the inputs are built, rather than as a shape error after every other stage)."""
    name = sae.cfg.hook_name
    if not bool(inputs.layout.mask(at).any()):
        raise InputError(f"the dictionary reads positions {at!r}, and the clip has none of them",
                         "pass a dictionary trained on positions this clip has (e.g. audio or video)")
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n == name)
    act = cache[name]
    if act.ndim != 3 or act.shape[-1] != sae.cfg.d_in:
        raise InputError(f"the dictionary's d_in is {sae.cfg.d_in}, but {name} of {model.cfg.model_name} gives "
                         f"activations of shape {tuple(act.shape)}",
                         "pass a dictionary trained on this hook of this model (per-head hooks such as hook_z are "
                         "read per position as [batch, pos, d]: not supported by the report)")


def _dictionary_positions(sae) -> tuple[str, str]:
    """The positions to read a dictionary at: those it was trained on when its metadata names a selector this
    version can parse, else the clip's media positions."""
    from av_lens.layout import LayoutError, as_selector

    sel = sae.cfg.metadata.get("selector")
    if isinstance(sel, str):
        try:
            as_selector(sel)
            return sel, sel
        except LayoutError:
            pass
    return "audio|video", "audio and video"


def _single_token(model, word: str | None) -> int | None:
    if word is None:
        return None
    try:
        return model.word_token(word)
    except InputError:  # a multi-token word just has no single-token target
        return None


def build_report(model, clip: ClipMedia, counterfactual: ClipMedia | None = None, *, base=None,
                 out: str | Path = "av_lens_report.html", max_new_tokens: int | None = None, probe_clips: int = 48,
                 progress: bool = True, sae=None, sae_features: int = 6) -> ReportSummary:
    """Write the report; ``sae`` (a :class:`av_lens.sae.SparseDictionary`, e.g. ``SparseDictionary.load(folder)``)
    adds a dictionary section: its ``sae_features`` features most active on the clip, with frame thumbnails and
    waveform snippets of the positions where they fire."""
    from tqdm.auto import tqdm

    from av_lens.analysis import (AttentionFlow, from_layer_windows, knockout_sweep, logit_lens, patch_by_modality,
                                  token_shift_batch)
    from av_lens.analysis.patching import check_aligned

    prompts = _prompts(model)
    closed = prompts != STUDY_PROMPTS
    max_new_tokens = max_new_tokens or (4 if closed else 32)
    main_clip = counterfactual or clip
    summary = ReportSummary(Path(out))
    n = model.cfg.n_layers
    steps = ["inputs", "answers", "attention", "logit lens", "knockout", "patching", "probes", "token shift",
             "dictionary", "write"]
    if sae is not None:
        _check_dictionary(model, sae)
    else:
        steps.remove("dictionary")
    if not (closed and probe_clips):
        steps.remove("probes")
    if base is None:
        steps.remove("token shift")
    bar = tqdm(total=len(steps), desc="report", disable=not progress, bar_format="{desc}: {n}/{total} stages "
               "|{bar}| {elapsed} elapsed{postfix}")
    bar.set_postfix_str(f"now: {steps[0]}")

    def step(name):
        """``name`` is done: advance the bar and name the stage that starts now."""
        if name not in steps:
            return
        bar.update(1)
        i = steps.index(name)
        bar.set_postfix_str(f"now: {steps[i + 1]}" if i + 1 < len(steps) else "done")

    page = views.Page(f"av_lens report — {model.cfg.model_name}",
                      intro=f"Model {views.html.esc(model.cfg.model_name)}: {n} layers, d_model {model.cfg.d_model}, "
                            f"{model.cfg.n_heads} heads. Clip{'s' if counterfactual else ''}: "
                            + ", ".join(f"{c.name} ({len(c.frames)} frames at {c.fps:g} fps, "
                                        f"{len(c.audio) / 16000:.2f} s audio"
                                        + (f", sound: {c.sound_label}" if c.sound_label else "") + ")"
                                        for c in ([clip, counterfactual] if counterfactual else [clip])))
    # -- inputs
    hear = {c.name: model.encode(_inputs(model, c, prompts["hear"])) for c in filter(None, [clip, counterfactual])}
    describe = {c.name: model.encode(_inputs(model, c, prompts["describe"])) for c in filter(None, [clip, counterfactual])}
    main_hear, main_desc = hear[main_clip.name], describe[main_clip.name]
    if sae is not None:
        _check_dictionary_on(model, sae, main_hear, _dictionary_positions(sae)[0])
    page.add(views.token_strip(main_hear.layout, model.tokenizer), f"Input: {main_clip.name} clip, by modality",
             "Each position coloured by its modality tag; media runs are folded (hover for positions, times and "
             "3-D TMRoPE positions).")
    page.add(f'<pre class="avl-summary">{views.html.esc(main_hear.layout.summary())}</pre>', "Modality layout")
    step("inputs")

    # -- answers
    rows = []
    for c in filter(None, [clip, counterfactual]):
        for q in ("see", "hear", "describe"):
            inp = describe[c.name] if q == "describe" else (hear[c.name] if q == "hear" else
                                                             model.encode(_inputs(model, c, prompts["see"])))
            text = model.generate(inp, max_new_tokens=max_new_tokens).text[0].strip()
            summary.answers[f"{c.name}: {prompts[q]}"] = repr(text)
            rows.append(f"<tr><td>{views.html.esc(c.name)}</td><td>{views.html.esc(prompts[q])}</td>"
                        f"<td><b>{views.html.esc(text)}</b></td></tr>")
    page.add('<table class="avl-grid"><tr><th>clip</th><th>prompt</th><th>greedy answer</th></tr>'
             + "".join(rows) + "</table>", "Answers")
    step("answers")

    # -- attention
    groups = {"audio": "audio", "video": "video", "text": "prompt - audio - video", "generated": "generated"}
    flows = {}
    for per_token in (False, True):
        flow = AttentionFlow(model, "generated", groups, per_token=per_token)
        model.generate(main_desc, max_new_tokens=max_new_tokens, fwd_hooks=flow.hooks())
        flows[per_token] = flow.result()
    m = flows[False].by_layer()
    summary.flow_by_layer = {g: [round(float(x), 3) for x in m[:, i]] for i, g in enumerate(groups) if g != "generated"}
    page.add(views.attention_by_layer(flows[False], title="Attention of generated tokens per layer"),
             "Where do generated tokens look?",
             "Mean over heads and generated tokens of the attention mass given to each key group (the study's "
             "Figure: audio early, video in the deep fusion layers).")
    page.add(views.attention_by_layer(flows[True], title="Same, per key token (corrects the token-count imbalance)"))
    video_col = list(groups).index("video")
    layer = int(m[:, video_col].argmax())
    page.add(views.attention_heads(model, main_hear, layer), f"Attention heads of layer {layer} (modality-pooled)",
             f"Layer {layer} gives video the most attention. Media runs are pooled into one row/column each: "
             "a row is the mean over that segment's queries of the mass given to each key segment.")
    step("attention")

    # -- logit lens at audio positions
    targets = [w for w in (main_clip.sound_label, clip.sound_label if counterfactual else None) if w]
    target_ids = [t for t in (_single_token(model, w) for w in dict.fromkeys(targets)) if t is not None]
    if main_hear.layout.count("audio"):
        lens = logit_lens(model, main_hear, "audio", k=5, targets=target_ids, include_embed=True)
        page.add(views.logit_lens_grid(lens, main_hear.layout), "Logit lens at the audio positions",
                 "Top-1 token of the final-norm logit lens per layer (rows) and audio position (columns); "
                 "shade = probability; outlined where the sound's word is the top-1 token (hover a cell for its top 5).")
    else:
        summary.notes.append("no audio positions: logit lens skipped")
    step("logit lens")

    # -- knockout: probability of the answer word at the hear prompt, blocking last prompt -> video / audio
    with torch.no_grad():
        clean_top = int(model(main_hear)[0, -1].argmax())
    tgt = _single_token(model, main_clip.sound_label) if main_clip.sound_label else None
    tid = tgt if tgt is not None else clean_top
    tname = model.tokenizer.convert_ids_to_tokens(tid)
    metric = lambda logits, _: logits[0, -1].softmax(-1)[tid]  # noqa: E731
    sweeps = {f"last prompt ↛ {k}": knockout_sweep(model, main_hear, "last_prompt", k, from_layer_windows(n), metric,
                                                   progress=False) for k in ("video", "audio")}
    page.add(views.knockout_curves(sweeps, title=f"p({tname}) at the answer, knockout from layer l on",
                                   y_label=f"p({tname}) (probability)"),
             "Attention knockout",
             f"Attention from the last prompt token to video (or audio) keys blocked in layers l..{n - 1}; the "
             f"curve is the probability of '{views.html.esc(tname)}' "
             + ("(the sound playing)" if tgt is not None else "(the unedited answer)") + ".")
    for k, s in sweeps.items():
        summary.knockout[f"p({tname}) with {k} from layer l"] = (
            f"none {float(s.baseline):.3f}; " + ", ".join(f"{w.start}: {float(v):.3f}" for w, v in zip(s.windows, s.values)))
    step("knockout")

    # -- patching factual -> counterfactual
    if counterfactual is not None:
        a, b = hear[clip.name], hear[counterfactual.name]
        try:
            check_aligned(a, b)
            with torch.no_grad():
                ta, tb = int(model(a)[0, -1].argmax()), int(model(b)[0, -1].argmax())
            if ta == tb:
                pm = lambda logits: logits[0, -1].log_softmax(-1)[ta]  # noqa: E731
                what = f"log p({model.tokenizer.convert_ids_to_tokens(ta)})"
            else:
                pm = lambda logits: logits[0, -1, ta] - logits[0, -1, tb]  # noqa: E731
                what = (f"logit({model.tokenizer.convert_ids_to_tokens(ta)}) - "
                        f"logit({model.tokenizer.convert_ids_to_tokens(tb)})")
            res = patch_by_modality(model, a, b, pm, components=("resid_pre", "attn_out", "mlp_out"),
                                    sets=("audio", "video", "text"), progress=False)
            if abs(res.clean - res.corrupted) > 1e-6:
                remark = ""
                if ta == tb:
                    remark = (f" Both clips give the same answer ({views.html.esc(model.tokenizer.convert_ids_to_tokens(ta))}),"
                              f" so the metric is its log-probability and the factual-counterfactual gap is small "
                              f"({float(res.clean):.3f} vs {float(res.corrupted):.3f}): a patch that makes the answer "
                              "more likely than in the factual run scores above 1.")
                for comp in ("resid_pre", "attn_out", "mlp_out"):
                    page.add(views.patching_heatmap(res, comp), f"Patching {comp}, factual → counterfactual" if comp == "resid_pre" else None,
                             f"Metric {views.html.esc(what)}; 1 = the factual value fully restored, 0 = the "
                             f"counterfactual value.{remark}" if comp == "resid_pre" else "")
            else:
                summary.notes.append("factual and counterfactual give the same metric: patching skipped")
        except InputError as e:
            summary.notes.append(f"patching skipped: {e}")
    step("patching")

    # -- probes over labelled clips (the organism's world)
    if closed and probe_clips:
        from av_lens.analysis import pooled_residuals, probe_layers
        from av_lens.organism import world
        from av_lens.organism.evaluate import clip_inputs

        pairs = world.eval_pairs(probe_clips)
        clips = [p[1] for p in pairs] + [p[0] for p in pairs]
        labels = torch.tensor([c.sound for c in clips])
        results = {}
        for name, mdl in (("model", model), ("base", base)):
            if mdl is not None:
                feats = pooled_residuals(mdl, clip_inputs(mdl, clips, "hear", "av"), "audio")
                results[name] = probe_layers(feats, labels, n_classes=world.N_CLASSES)
        page.add(views.probe_accuracy(results, title="Sound class from the audio positions"), "Linear probes",
                 f"Held-out accuracy of a linear probe for the class of the sound playing, on audio residuals "
                 f"pooled per clip ({len(clips)} labelled clips; control = shuffled labels).")
    step("probes")

    # -- token shift vs base
    if base is not None:
        base_inp = _inputs(base, main_clip, prompts["describe"])
        res = token_shift_batch(model, base, main_desc, base_inp, max_new_tokens=max_new_tokens)[0]
        page.add(views.token_shift(res), "Inherited from the base?",
                 "The model's caption teacher-forced into the base model: green = the base's top-1 token "
                 "(unshifted), amber = rank 2-3, red = shifted.")
        summary.answers["token shift vs base"] = ", ".join(
            f"{k} {v:.0%}" for k, v in res.fractions().items() if isinstance(v, float) and math.isfinite(v))
    step("token shift")

    # -- a sparse dictionary's features at the clip's positions
    if sae is not None:
        from av_lens.sae import dashboard, feature_activations

        at, where = _dictionary_positions(sae)
        clips = [c for c in filter(None, [clip, counterfactual]) if bool(hear[c.name].layout.mask(at).any())]
        fa = feature_activations(model, sae, [hear[c.name] for c in clips], at=at)
        main_rows = fa.batch == next(i for i, c in enumerate(clips) if c is main_clip)
        peak = fa.acts[main_rows].max(0).values
        feats = [int(f) for f in peak.argsort(descending=True)[:sae_features] if float(peak[f]) > 0]
        summary.answers["dictionary features (most active on the clip)"] = (
            ", ".join(f"{f} ({float(peak[f]):.2f})" for f in feats) or "none active")
        if feats:
            page.add(dashboard(fa, model, sae, feats, media=[[c] for c in clips], names=[c.name for c in clips]),
                     f"Dictionary features at {sae.cfg.hook_name}",
                     f"The {len(feats)} features of the dictionary ({sae.cfg.architecture}, d_sae {sae.cfg.d_sae}) "
                     f"most active at the {views.html.esc(where)} positions of the {views.html.esc(main_clip.name)} "
                     "clip, on the 'hear' prompt of every clip: density by modality, the tokens each decoder row "
                     "promotes (W_dec @ W_U), and the top positions with their frame (the token's patch "
                     "outlined) or waveform (the token's span shaded).")
        else:
            summary.notes.append("dictionary: no feature is active on the clip")
    step("dictionary")
    summary.path = page.save(out)
    step("write")
    bar.close()
    return summary
