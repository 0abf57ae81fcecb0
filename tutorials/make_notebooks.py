"""Write the tutorial notebooks. This file is their source of truth: edit the cells here, then run

    python tutorials/make_notebooks.py

The notebooks are committed executed, with their outputs (deterministic: stderr, widgets and timings are left
out; tests/test_tutorials.py executes each again and checks that the outputs are the committed ones). Each runs top to
bottom on the embedded model organism, offline, in seconds on a CPU; changing the ``MODEL = ...`` line of its
first code cell points it at a real checkpoint ("Qwen/Qwen2.5-Omni-3B" or a local folder).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------ shared cells
SETUP = '''\
import os

MODEL = "av-lens/organism"  # or "Qwen/Qwen2.5-Omni-3B", or a local folder

# The organism ships inside av_lens, so nothing is downloaded; a hub checkpoint may download once.
os.environ["HF_HUB_OFFLINE"] = "1" if MODEL.startswith("av-lens/") else os.environ.get("HF_HUB_OFFLINE", "0")'''

LOAD = '''\
import torch
from av_lens import HookedAVTransformer, S

organism = MODEL.startswith("av-lens/")  # the organism runs on the CPU in float32; a real checkpoint in bf16 on a GPU
device = "cuda" if torch.cuda.is_available() and not organism else "cpu"
model = HookedAVTransformer.from_pretrained(MODEL, dtype="float32" if organism else "bfloat16", device=device)
cfg = model.cfg
print(f"{MODEL}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_key_value_heads} kv), "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, on {model.device}")'''

WORD_ID = '''\
def word_id(word: str) -> int:
    """A word's token id: the organism's words are single tokens; in a BPE vocabulary, the first token of ' word'."""
    return model.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]'''

REAL_MEDIA = '''\
**With your own media.** The cell below takes clips from the organism's synthetic world. For a real checkpoint,
build the same kind of input from a video file instead:

```python
from av_lens.media import load_clip

clip = load_clip("my_video.mp4")   # .frames (T, H, W, 3) uint8, .fps, .audio (16 kHz mono float)
inputs = model.prepare("Describe what you see and hear.", videos=[clip.frames], video_audio=[clip.audio],
                       fps=clip.fps, use_audio_in_video=True)
```

(`model.prepare(text, videos=[frames], video_audio=[wav], fps=2.0, use_audio_in_video=True)` with arrays you
already have works the same way; a list of prompts makes a batch.)'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ------------------------------------------------------------------------------------------ 01 quickstart
NB01 = [
    md('''
# 1 · Quickstart: an audio-visual LLM, position by position

*Do Audio-Visual LLMs Really See and Hear?* (arXiv 2604.02605) asks what an audio-visual LLM does with the
sound it is given. Its answer: the audio **is** represented — sound words can be read from the hidden states at
the audio positions in the middle layers — yet when picture and sound disagree, the answer follows the
picture: **vision wins in the fusion layers**.

Every question of that kind is about *groups of token positions*: the audio tokens, the video tokens, the
prompt, the generated answer. This notebook shows the objects av_lens gives you to ask them:

1. load a hooked model — the embedded **model organism**, or a real Qwen2.5-Omni checkpoint;
2. build inputs and read their **modality layout** (what every position is);
3. pick positions with **selectors** (`"audio"`, `"all but video"`, `S.video.between(0, 0.5)`);
4. cache activations, browse the **hook points**, and **generate**.

The organism (see `docs/organism.md`) is a 0.75 M-parameter Qwen2.5-Omni thinker (8 layers, width 64) trained
on a synthetic world of eight sound sources (a dog that looks brown and barks, a bell that rings, ...). It runs
on a CPU in seconds and, trained with the curriculum real models follow (a pretrained audio encoder, then
vision, then audio joins), it shows the study's vision bias — not on every clip: the end of this notebook
counts how often. Change `MODEL` in the next cell to run the same code on a real checkpoint.
'''),
    code(SETUP),
    code(LOAD),
    md('''
## Inputs

`world.eval_pairs(n)` returns held-out (factual, counterfactual) clip pairs of 6 s: the same twelve frames (2
fps), with the object's own sound or with another class's sound — the study's manipulation. `clip_inputs` asks
one of the world's questions about each clip, with the soundtrack interleaved into the video
(`use_audio_in_video=True`) as Qwen2.5-Omni does; it calls `model.prepare`, which runs the checkpoint's native
processor.
'''),
    md(REAL_MEDIA),
    code('''
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

fact, cf = world.eval_pairs(1)[0]
print(f"factual:        looks like a {fact.names[0]}, sounds like {fact.names[1]!r}; frames {fact.frames.shape} "
      f"{fact.frames.dtype}, audio {fact.audio.shape} at {world.SAMPLE_RATE} Hz")
print(f"counterfactual: looks like a {cf.names[0]}, sounds like {cf.names[1]!r}")
inputs = clip_inputs(model, [fact, cf], "describe", "av")  # a batch of two prompts
print(inputs)
'''),
    md('''
## The modality layout

`inputs.layout` tags every position with its modality, media item, time stamp and 3-D TMRoPE position
(time, height, width). `summary()` prints it run-length encoded: note that the video and its soundtrack start
at the same time position and are interleaved in 2-second chunks, video first. The organism's 6 s clips make
three chunks, each of 32 video tokens (two temporal patches of two frames, 16 merged patches each) followed by
4 audio tokens (2 per second).
'''),
    code('''
L = inputs.layout
print(L.summary())
print("\\ncounts:", L.counts())
'''),
    md('''
## Selectors

A selector turns a layout into a boolean `[batch, pos]` mask. Strings (`"audio"`, `"audio|video"`,
`"all but video"`, `"last_prompt"`, marker names) and `S` expressions (`S.audio & S.item(0)`,
`S.video.between(t0, t1)` in seconds) compose with `| & - ~`. Every analysis tool takes them, and they are
resolved against the layout of the forward that is running — so `"generated"` means the new tokens during
`generate`.
'''),
    code('''
for sel in ["audio", "video", "all but video", S.video.between(0, 0.5), S.audio.between(2, 4),
            S.audio | S.video, "last_prompt", "audio_bos"]:
    name = sel if isinstance(sel, str) else sel.name
    print(f"{name:24s} {L.count(sel):3d} positions, spans {L.spans(sel)}")
print("\\nmask shape:", tuple(L.mask("audio").shape), "| first audio positions:", L.positions("audio")[:4].tolist())
print("labels 35..39:", L.labels()[35:40])
print("to_str_tokens 35..39:", model.to_str_tokens(inputs[0])[35:40])  # TransformerLens's view, media labelled
'''),
    md('''
## Activations: `run_with_cache`

`run_with_cache` works as in TransformerLens; a `names_filter` keeps only the hooks you need. The cache also
carries the layout (`cache.layout`), so it can be indexed by modality. Here: how far apart are the residual
streams of the factual clip (sample 0) and the counterfactual one (sample 1), position group by position
group? Only the soundtrack differs. The video positions of the first chunk come *before* any audio and cannot
attend to it; those of the later chunks come after the audio of the earlier ones and can.
'''),
    code('''
from av_lens import utils  # TransformerLens 3's utils helpers (get_act_name, to_numpy, test_prompt, ...)

logits, cache = model.run_with_cache(inputs, names_filter=lambda name: name.endswith("hook_resid_post")
                                     or name == utils.get_act_name("pattern", 0))
print("logits", tuple(logits.shape), "| cached:", list(cache.keys()))
print("layer-0 attention pattern", tuple(cache["pattern", 0].shape))  # TL's shorthand keys work

after_media = S.index(range(int(L.positions("media")[-1]) + 1, len(L)))  # explicit positions, as a selector
groups = {"audio": "audio", "video, chunk 1": S.video.between(0, 2), "video, chunks 2-3": S.video.between(2, 6),
          "text after media": S.text & after_media}
print(f"\\nrelative distance |r_cf - r_fact| / |r_fact| by layer")
print(f"{'layer':>5} " + " ".join(f"{g:>17}" for g in groups))
for l in range(cfg.n_layers):
    r = cache["resid_post", l].float()
    row = []
    for sel in groups.values():
        pos = cache.layout.positions(sel, batch=0).to(r.device)  # the two samples share the layout
        row.append(((r[1, pos] - r[0, pos]).norm(dim=-1) / r[0, pos].norm(dim=-1)).mean().item())
    print(f"{l:5d} " + " ".join(f"{v:17.3f}" for v in row))
'''),
    md('''
The audio positions differ by about their own norm at every layer (1.28 after layer 0, 1.09 after layer 7).
The first chunk's video positions stay identical (0.000). Those of the later chunks, which can attend to the
earlier audio, differ only slightly (0.009 to 0.029, growing with depth): the video stream barely takes the
sound up. The text positions after the media inherit the difference through attention: 0.08 after layer 0,
about 0.26 from layer 5 on.
'''),
    md('''
## Hook points

The model's hook points follow TransformerLens's names (`blocks.{l}.hook_resid_pre`, `blocks.{l}.attn.hook_pattern`,
...), plus the native encoders' outputs and where each modality's embeddings enter the stream
(`hook_audio_embed`, `hook_video_embed`). `model.hook_dict` maps every name to its `HookPoint`:
'''),
    code('''
import re
from collections import defaultdict

by_module = defaultdict(set)
for name in model.hook_dict:
    module, _, hook = re.sub(r"\\.\\d+(?=\\.)", ".{i}", name).rpartition(".")
    by_module[module or "(model)"].add(hook)
print(len(model.hook_dict), "hook points")
for module, hooks in by_module.items():
    print(f"  {module:28s} {', '.join(sorted(hooks))}")
'''),
    md('''
## Generate

`model.generate` decodes greedily with a KV cache and the right TMRoPE decode positions; hooks passed as
`fwd_hooks` are active in the prefill and in every decoding step (notebooks 2, 3 and 6 use that). The
returned layout has grown by the `generated` positions.
'''),
    code('''
gen = model.generate(inputs, max_new_tokens=8)
hear = model.generate(clip_inputs(model, [fact, cf], "hear", "av"), max_new_tokens=4)
for clip, describe, heard in zip([fact, cf], gen.text, hear.text):
    print(f"{clip.names[0]} + sound of {clip.names[1]:7s} describe -> {describe!r:22s} what do you hear -> {heard!r}")
print("\\nlayout after generation:", gen.layout.counts())
print("\\n".join(gen.layout.summary().splitlines()[-2:]))
'''),
    md('''
On this pair both answers follow the soundtrack: the counterfactual clip, a phone with a piano's sound, is
described and heard as "chord". One clip is an anecdote. Over 48 held-out counterfactual clips: how often does
the answer to "what do you hear?" name the sound playing, and how often the sound the *picture* makes — the
study's vision bias?
'''),
    code('''
cfs = [cf for _, cf in world.eval_pairs(48)]
heard = model.generate(clip_inputs(model, cfs, "hear", "av"), max_new_tokens=2).text
playing = sum(world.SOUNDS[c.sound] in a.split() for c, a in zip(cfs, heard)) / len(cfs)
picture = sum(world.SOUNDS[c.look] in a.split() for c, a in zip(cfs, heard)) / len(cfs)
print(f"'what do you hear?' on {len(cfs)} counterfactual clips: the sound playing {playing:.2f}, "
      f"the picture's sound {picture:.2f}")
alone = model.generate(clip_inputs(model, cfs, "hear", "audio"), max_new_tokens=2).text  # the soundtracks only
print(f"the same soundtracks without the picture: the sound playing "
      f"{sum(world.SOUNDS[c.sound] in a.split() for c, a in zip(cfs, alone)) / len(cfs):.2f}")
'''),
    md('''
About seven answers in ten name the sound the picture makes (0.71) and three in ten the sound actually
playing (0.29): the vision bias, on most clips but not all. Without the picture, the same soundtracks are
named correctly (last line): the sound is heard, and the picture overrides it. (The organism's no-VLM control,
`av-lens/organism-control`, trained on the same audio-visual data without the vision-first stage, follows
the sound; notebook 5 compares the organism with its VLM stage, `av-lens/organism-base`.)
'''),
    md('''
## Views

`av_lens.views` draws the same objects as HTML in the notebook: here the token strip of the prompt, coloured
by modality.
'''),
    code('''
from av_lens import views

views.token_strip(inputs.layout, model.tokenizer)
'''),
]

# ------------------------------------------------------------------------------------------ 02 attention flow, lens
NB02 = [
    md("""
# 2 · Where does the audio go? Attention flow and the logit lens

The study (arXiv 2604.02605) makes two observations about *where* sound lives inside an audio-visual LLM:

1. **Attention flow.** The tokens the model generates attend to the audio tokens in the first layers, then
   turn to the video tokens in the deep "fusion" layers.
2. **Latent audio.** Decoding the hidden states at the audio positions through the unembedding (the logit
   lens) finds the sound playing — "drill", "engine" — in the middle layers, for 61 % of counterfactual clips
   in the study's Qwen2.5-Omni, although the answer names it for only 23 %: the audio is *there*, and the
   answer ignores it.

We measure both on the organism's counterfactual clips (the picture of one object with the sound of another)
with `av_lens.analysis.AttentionFlow` and `av_lens.analysis.logit_lens` — and the organism reproduces the
second observation only in part and the first not at all.
"""),
    code(SETUP),
    code(LOAD),
    code(WORD_ID),
    md("""
## Inputs: counterfactual clips

24 held-out clips, each the picture of one class with the sound of another, asked to "describe what you see
and hear". `model.encode` runs the audio and vision towers once and returns inputs that carry their outputs,
so the runs below skip the encoders.
"""),
    md(REAL_MEDIA),
    code("""
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

N = 24
clips = [cf for _, cf in world.eval_pairs(N)]  # (factual, counterfactual) pairs: keep the counterfactuals
inputs = model.encode(clip_inputs(model, clips, "describe", "av"))
print(inputs)
"""),
    md("""
## Attention flow of the generated tokens

`AttentionFlow(model, query, keys)` gives hooks that, inside the forward, reduce each layer's attention of the
`query` positions to its mass on each named key group — nothing of size layers × heads × T² is stored. With
`query="generated"` and `generate(..., fwd_hooks=flow.hooks())` it measures the new tokens at every decoding
step. Key groups are selectors; here the prompt's text and markers form one group.
"""),
    code("""
from av_lens.analysis import AttentionFlow

KEYS = {"audio": "audio", "video": "video", "text": "prompt - audio - video", "generated": "generated"}
flow = AttentionFlow(model, query="generated", keys=KEYS)
gen = model.generate(inputs, max_new_tokens=4, fwd_hooks=flow.hooks())
res = flow.result()  # res.mass: [clip, layer, head, group]
print("captions:", gen.text[:4], "...\\n")
print("share of the generated tokens' attention (mean over heads, tokens and clips):")
print(res.table())
"""),
    md("""
The organism does **not** reproduce the study's attention pattern: its generated tokens give most of their
attention to the video in *every* layer (0.56 to 0.83 of the mass) and 0.09 to 0.17 to the audio, with no early
layers where the audio dominates. What changes with depth is the text's share, which grows in the last layers
(0.34 in layer 7).

A share of attention mass favours groups with many tokens — here 96 video tokens against 12 audio ones.
`per_token=True` divides each group's mass by the number of its keys the query can see — the mean attention *per
key token* — which matters even more on a real model, where a 10-second clip gives ~3,000 video tokens and ~250
audio tokens.
"""),
    code("""
flow_pt = AttentionFlow(model, query="generated", keys=KEYS, per_token=True)
model.generate(inputs, max_new_tokens=4, fwd_hooks=flow_pt.hooks())
print("mean attention per key token:")
print(flow_pt.result().table(digits=4))
"""),
    md("""
Per key token, an audio token gets more attention than a video token in every layer: the audio is not
ignored, it is outnumbered. Per head: `res.group(name)` is the `[layer, head]` map of one key group — notebook 4
ablates the heads one by one.
"""),
    code("""
for group in ("audio", "video"):
    m = res.group(group)
    print(f"{group:5s} " + " ".join(f"head {h:<3d}" for h in range(m.shape[1])))
    for i, l in enumerate(res.layers):
        print(f"L{l:<4d} " + " ".join(f"{v:8.3f}" for v in m[i].tolist()))
"""),
    md("""
Heads differ within a layer, most in the deep layers: in layer 7 head 2 gives 0.21 of its attention to the
audio while heads 0 and 1 give about 0.04; in layer 4 the heads' video shares range from 0.46 to 0.79.

## Logit lens at the audio positions

`logit_lens(model, inputs, "audio", targets=..., k=5)` decodes the residual stream after every layer at the
audio positions (with the final norm applied; `include_embed=True` adds the embeddings — for audio positions,
the audio tower's output — as layer -1). It keeps only the top-k tokens and the ranks of the `targets`:
`target_rank` is `[layer, position, target]` (1 = top-1), and `positions` lists the `(clip, position)` of each
column. Below, for one clip: how high the sound playing and the picture's sound rank at its audio positions.
"""),
    code("""
from av_lens.analysis import logit_lens

SOUND_WORDS = list(world.SOUNDS)  # the targets: every sound word
lens = logit_lens(model, inputs, "audio", targets=[word_id(w) for w in SOUND_WORDS], k=5, include_embed=True)
print("layers", lens.layers, "| columns", len(lens.positions), "| target_rank", tuple(lens.target_rank.shape))
c = clips[0]
cols = [j for j, (b, _) in enumerate(lens.positions) if b == 0]  # the columns of clip 0
print(f"\\nclip 0: picture of a {c.names[0]}, sound of {c.names[1]!r}.")
print(f"Best rank over its {len(cols)} audio positions of the sound playing and of the picture's sound:")
print(f"{'layer':>5} {'playing':>8} {'picture':>8}   top 5 where the sound playing ranks best")
for i, l in enumerate(lens.layers):
    ranks = lens.target_rank[i, cols]                        # [position, target]
    j = cols[int(ranks[:, c.sound].argmin())]
    top = ", ".join(f"{w} {p:.2f}" for w, p in lens.top_tokens(l, j))
    print(f"{l:5d} {int(ranks[:, c.sound].min()):8d} {int(ranks[:, c.look].min()):8d}   {top}")
"""),
    md("""
On this clip (a phone with a piano's chord) the lens sees the sound playing at every layer: at its best audio
position "chord" ranks first or second from the embeddings on, though with little probability (0.04 to 0.07 up
to layer 4, 0.21 and 0.24 in layers 5 and 6). The picture's sound ("buzz") ranks 40 to 42 of the 53 words up to
layer 2 and climbs to 4–7 from layer 4 on. Where the chord ranks best, it tops the lens itself except in layers
0, 4 and 7 ("i", "and", and at layer 7 "neigh" with 0.44).

## Latent hit vs the answer

For each clip: is the sound actually playing in the top 5 at *some* audio position of layer l? And for
comparison, the picture's sound (the audio positions come after the video of their chunk and attend to it,
so the picture leaks into them). The embedding row (layer -1, the audio tower's output) gives the level reached
by chance, for the picture's sound too: the audio tower never sees the picture. Then: how often does the answer
to "what do you hear?" name the sound playing?
"""),
    code("""
def hit_rate(class_of_clip):
    \"\"\"Fraction of clips whose given sound word is in the top 5 at some audio position, per layer and at any.\"\"\"
    cols = torch.arange(len(lens.positions))
    target = torch.tensor([class_of_clip(clips[b]) for b, _ in lens.positions])  # index into SOUND_WORDS
    in_top = lens.target_rank[:, cols, target] <= 5                             # [layer, column]
    hit = torch.zeros(len(lens.layers), N, dtype=torch.bool)
    for j, (b, _) in enumerate(lens.positions):
        hit[:, b] |= in_top[:, j]
    return hit.float().mean(1), hit.any(0).float().mean().item()

playing, playing_any = hit_rate(lambda c: c.sound)
picture, picture_any = hit_rate(lambda c: c.look)
print(f"{'layer':>5} {'sound playing':>14} {'picture sound':>14}")
for l, a, b in zip(lens.layers, playing.tolist(), picture.tolist()):
    print(f"{l:5d} {a:14.2f} {b:14.2f}")
print(f"{'any':>5} {playing_any:14.2f} {picture_any:14.2f}")

hear = model.generate(clip_inputs(model, clips, "hear", "av"), max_new_tokens=4)
def names(word, text):
    return word in text.lower().split()
said_sound = sum(names(world.SOUNDS[c.sound], t) for c, t in zip(clips, hear.text)) / N
said_picture = sum(names(world.SOUNDS[c.look], t) for c, t in zip(clips, hear.text)) / N
print(f"\\n'what do you hear?' names the sound playing for {said_sound:.2f} of the clips, "
      f"the picture's sound for {said_picture:.2f}")
"""),
    md("""
Only partly as in the study. The sound playing is in the lens's top 5 at the audio positions at about the
embeddings' level (0.21; 0.12 in layers 1 and 2) up to layer 3, then rises in the last layers (0.46 at layer 5,
0.62 at layers 6 and 7), for 0.71 of the clips at some layer — well above the 0.38 whose answer names it, a gap
like the study's. But what the lens reads most at the audio positions is the picture's sound: above its
embedding level (0.42) from layer 1 on, 0.83 at layer 6, 0.88 at some layer — the picture leaks into the audio
positions more visibly than the soundtrack does (over 384 clips and five seeds, docs/organism.md finds the
playing sound no more often than an uninvolved one). The lens reads only the unembedding directions; notebook 5's linear probes find the playing
sound's class at the audio positions in every layer. Notebook 3 tests causally what the picture does, by cutting
the generated tokens' access to the video.

## Views
"""),
    code("""
from av_lens import views

display(views.attention_by_layer(res))
one = clip_inputs(model, clips[:1], "describe", "av")  # the lens grid of one clip: layers x audio positions
views.logit_lens_grid(logit_lens(model, one, "audio", targets=[word_id(clips[0].names[1])], k=5, include_embed=True),
                      one.layout)
"""),
]

# ------------------------------------------------------------------------------------------ 03 knockout
NB03 = [
    md("""
# 3 · Knocking out the picture recovers the sound

The organism hears every soundtrack alone, yet names the picture's sound for most counterfactual clips
(notebook 1), and the soundtrack does reach its audio positions (notebooks 2 and 5). The study's causal test is **attention
knockout**: block the edges from the generated tokens to the video tokens (G↛V) in a window of layers — in
the prefill and at every decoding step — and the captions of counterfactual clips name the sound actually
playing more often (in Qwen2.5-Omni the study reports ≈ +50 % relative audio fidelity for deep layers); block
the edges to the audio tokens (G↛A) instead and fidelity falls. The picture wins because of where attention is
routed in the fusion layers. The organism shows the asymmetry, but not in its deep layers.

Tools: `knockout_hooks` (hooks for `generate` or `run_with_hooks`), `knockout_sweep` over
`sliding_windows` / `from_layer_windows`, and a caption-fidelity metric (`KeywordScorer`, `fidelity`).
"""),
    code(SETUP),
    code(LOAD),
    code(WORD_ID),
    md("""
## Inputs and the metric

24 held-out counterfactual clips, asked to describe what they show and sound like. **Audio fidelity** of a
caption: does it name the sound that is playing? `KeywordScorer(vocabulary)` scores a caption against a
reference by the vocabulary's keywords it contains; `fidelity` scores a list. For a real model, use a
vocabulary that fits your clips, or `LLMJudgeScorer(judge)` with a judge model you supply (any callable from
prompt to reply).
"""),
    md(REAL_MEDIA),
    code("""
from av_lens.analysis import KeywordScorer, fidelity
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

N = 24
clips = [cf for _, cf in world.eval_pairs(N)]
inputs = model.encode(clip_inputs(model, clips, "describe", "av"))  # encoders run once

scorer = KeywordScorer(world.SOUNDS)                  # closed vocabulary: the eight sound words
references = [world.SOUNDS[c.sound] for c in clips]   # what is actually heard

def audio_fidelity(gen, _inputs=None):
    \"\"\"Mean caption fidelity to the sound playing (a knockout_sweep metric takes (generation, inputs)).\"\"\"
    return fidelity(gen.text, references, scorer).mean()
"""),
    md("""
## One knockout, in `generate`

`knockout_hooks(model, query, keys, layers)` edits each chosen layer's additive attention mask
(`blocks.{l}.attn.hook_attn_mask`): blocked query→key entries get −∞, and the selectors are resolved in every
forward, so `"generated"` blocks the new token at each decoding step. The organism has 8 layers; we block its
deep half, 4–7, the counterpart of e.g. `range(20, 36)` of Qwen2.5-Omni-3B's 36 layers.
"""),
    code("""
from av_lens.analysis import knockout_hooks

KO_LAYERS = list(range(4, 8))
plain = model.generate(inputs, max_new_tokens=4)
no_video = model.generate(inputs, max_new_tokens=4, fwd_hooks=knockout_hooks(model, "generated", "video", KO_LAYERS))
print(f"{'picture + sound playing':26s} {'caption':18s} caption with G-/->V in layers {KO_LAYERS}")
for c, a, b in list(zip(clips, plain.text, no_video.text))[:8]:
    print(f"{c.names[0] + ' + ' + c.names[1]:26s} {a!r:18s} {b!r}")
print(f"\\naudio fidelity: {audio_fidelity(plain):.3f} -> {audio_fidelity(no_video):.3f} with the knockout")
"""),
    md("""
Blocking the video in the deep layers raises fidelity by only one clip of 24 (0.250 → 0.292), and most
captions run on past their end ("bell and ring and"): in these layers the video edges matter more to ending
the caption than to choosing its sound.

## Sweeps over layer windows

`knockout_sweep(model, inputs, query, keys, windows, metric, generate=...)` runs the metric once without
knockout (the baseline) and once per window; with `generate=dict(max_new_tokens=...)` the metric receives
each generation. `sliding_windows(n, width)` gives windows of `width` layers; `from_layer_windows(n)` gives
"from layer l to the last".
"""),
    code("""
from av_lens.analysis import from_layer_windows, knockout_sweep, sliding_windows

n = cfg.n_layers
GEN = dict(max_new_tokens=4)
single = {keys: knockout_sweep(model, inputs, "generated", keys, sliding_windows(n, 1), audio_fidelity,
                               generate=GEN, progress=False) for keys in ("video", "audio")}
onward = {keys: knockout_sweep(model, inputs, "generated", keys, from_layer_windows(n)[:-1], audio_fidelity,
                               generate=GEN, progress=False) for keys in ("video", "audio")}

print(f"caption audio fidelity (no knockout: {float(single['video'].baseline):.3f})")
print(f"{'layers':>8} {'G-/->V':>8} {'G-/->A':>8}")
for sweeps in (single, onward):
    for w, v, a in zip(sweeps["video"].windows, sweeps["video"].values.tolist(), sweeps["audio"].values.tolist()):
        print(f"{f'{w.start}-{w.stop - 1}':>8} {v:8.3f} {a:8.3f}")
"""),
    md("""
One clip is 0.042 of fidelity here (24 clips). Blocking the picture in any single layer moves fidelity by
at most one clip (0.250 to 0.292); blocking the sound in layer 2 or 3 lowers it by two (to 0.167). Windows that
run to the last layer show where the picture wins. G↛V from layer 1 or 2 on more than doubles fidelity
(0.250 → 0.583); starting at layer 3 instead keeps little of that gain (0.292, the same as the deep half 4–7
above), 5–7 nothing. Blocking the video in *all* layers (0–7) gives less than starting at layer 1 (0.375).
G↛A from layer 0, 1 or 2 on removes the sound from every caption (0.000). So the organism shows
the study's G↛V / G↛A asymmetry, but the video edges that matter are those of layers 1 and 2, not of the deep
layers.

Each sweep also has a `table()` with the effect (metric − baseline) per window:
"""),
    code("""
print(single["video"].table())
"""),
    md("""
## A one-word answer: knockout in the prefill only

Without `generate`, the metric receives the logits of one forward. Ask "what do you hear?" and block the
**last prompt token** (which produces the answer) from the video keys from layer l on; the metric is the
fraction of clips whose answer is the sound playing.
"""),
    code("""
hear = model.encode(clip_inputs(model, clips, "hear", "av"))
playing = torch.tensor([word_id(world.SOUNDS[c.sound]) for c in clips])

def follows_sound(logits, _inputs=None):
    return (logits[:, -1].argmax(-1).cpu() == playing).float().mean()

sweep = knockout_sweep(model, hear, "last_prompt", "video", from_layer_windows(n), follows_sound, progress=False)
print("answer names the sound playing; window = last prompt token -/-> video from layer l on")
print(sweep.table())
"""),
    md("""
The answer position reads the picture in the first layers. Cut from the video in every layer, the answer
names the sound playing for every clip (1.00, against 0.375 without knockout); from layer 1 on for 0.79, from
layer 2 on for 0.625; from layer 3 or 4 on the gain is one clip (0.417), from layer 5 on nothing. In this organism
vision wins early: the deep layers' video edges to the answer position change almost nothing.

## Views
"""),
    code("""
from av_lens import views

views.knockout_curves({"G-/->V": single["video"], "G-/->A": single["audio"]},
                      title="Caption audio fidelity, one layer knocked out")
"""),
]

# ------------------------------------------------------------------------------------------ 04 patching
NB04 = [
    md("""
# 4 · Patching and ablation: which activations carry the sound into the answer?

The study's counterfactual pairs keep a clip's frames and swap its soundtrack. Run both, copy one
activation from one run into the other, and watch the answer: **activation patching** localises where the
difference between the runs — the sound — is carried. av_lens does this by *modality*: patch the audio, the
video or the text positions of a layer's residual stream, attention output or MLP output; patch only the
edges from video (or audio) positions to the answer position (**path patching**); ablate, head by head, the
part of a head's output read from audio or from video keys (**head effect tables**).

If vision wins in the fusion layers, the sound's information should reach the answer through few routes —
and some heads should carry the picture *against* it.
"""),
    code(SETUP),
    code(LOAD),
    code(WORD_ID),
    md("""
## A position-aligned pair

Patching position by position needs the two inputs to have the same tokens at the same positions.
`counterfactual_pair(model, frames, audio, other_audio, question)` builds the factual input and the
counterfactual one, trimming or padding the swapped soundtrack so that they align, and records what it did;
`organism_pairs` does it for clips of the organism's world (the held-out set uses `world.EVAL_SEED`).

**With your own media:** `pair = counterfactual_pair(model, clip.frames, clip.audio, other.audio,
"What do you hear?", fps=clip.fps)` with clips from `av_lens.media.load_clip`, then `require_aligned(pair)`.
"""),
    code("""
from av_lens.analysis import organism_pairs, require_aligned
from av_lens.organism import world

pair = require_aligned(organism_pairs(model, 1, seed=world.EVAL_SEED, question="hear")[0])
print("aligned:", pair.aligned, "|", pair.note)
print("meta:", pair.meta)
for name, inp in (("factual", pair.factual), ("counterfactual", pair.counterfactual)):
    print(f"{name:15s} {inp.layout.counts()} -> {model.generate(inp, max_new_tokens=2).text[0]!r}")
"""),
    md("""
## A batch of pairs and a metric

For statistics, batch 16 held-out pairs: the counterfactual clips (picture of A, sound of B) and their
factual twins (picture of A, sound of A), asked "what do you hear?". Both batches are aligned (same frames,
soundtracks of the same length).

The metric traces the sound B: the logit of B's sound word minus that of A's at the answer position, averaged
over the batch. **Clean** run = the counterfactual clips (they carry B); **corrupted** run = the factual ones.
Patching an activation from clean into corrupted and recovering the metric means that activation carries
the sound B to the answer.
"""),
    code("""
from av_lens.organism.evaluate import clip_inputs

N = 16
pairs = world.eval_pairs(N)
clean = model.encode(clip_inputs(model, [cf for _, cf in pairs], "hear", "av"))       # picture A, sound B
corrupted = model.encode(clip_inputs(model, [f for f, _ in pairs], "hear", "av"))     # picture A, sound A
sound_b = torch.tensor([word_id(world.SOUNDS[cf.sound]) for _, cf in pairs])
sound_a = torch.tensor([word_id(world.SOUNDS[cf.look]) for _, cf in pairs])

def sound_b_vs_a(logits):
    last = logits[:, -1].float().cpu()
    return (last.gather(1, sound_b[:, None]) - last.gather(1, sound_a[:, None])).mean()

with torch.no_grad():
    print(f"metric: clean {sound_b_vs_a(model(clean)):.3f}, corrupted {sound_b_vs_a(model(corrupted)):.3f}")
"""),
    md("""
The clean metric is negative: even when B is playing, the answer position prefers A's word on average — the
vision bias. B's soundtrack still moves the metric by about 3.9 logits, and that difference is what we trace.
"""),
    md("""
## Patching by modality

`patch_by_modality(model, clean, corrupted, metric, components, sets)` patches each component at each layer,
at the positions of each set, and returns the metric per `[layer, set]`; `recovered(component)` rescales it
to the fraction of the clean − corrupted gap restored (1 = all of it). It drives TransformerLens's
`generic_activation_patch` (which prints a progress bar).
"""),
    code("""
from av_lens.analysis import patch_by_modality

patch = patch_by_modality(model, clean, corrupted, sound_b_vs_a,
                          components=("resid_pre", "attn_out", "mlp_out"), sets=("audio", "video", "text"))
print(f"\\nfraction of the gap recovered (clean {patch.clean:.3f}, corrupted {patch.corrupted:.3f})")
print(f"{'layer':>5} | " + " | ".join(f"{c:^23s}" for c in patch.values))
print(f"{'':>5} | " + " | ".join(" ".join(f"{s:>7s}" for s in patch.sets) for _ in patch.values))
for i, l in enumerate(patch.layers):
    cells = [" ".join(f"{v:7.2f}" for v in patch.recovered(c)[i].tolist()) for c in patch.values]
    print(f"{l:5d} | " + " | ".join(cells))
"""),
    md("""
Reading the table: at layer 0 the audio positions hold everything (the soundtrack is the only difference).
Layer by layer it moves into the text positions — the question and the answer position: patching the text
positions' residual recovers 0.31 at layer 2, 0.71 at layer 4, 0.96 at layer 7, while the audio positions'
share falls to 0.01. The move is gradual over all eight layers, through attention at the text positions
(`attn_out`: 0.14 at layer 0, 0.03 to 0.10 in layers 1–5) and, in layers 5–7, their MLPs (`mlp_out` 0.15 to
0.19). The video positions carry none of it: the second and third chunks' video tokens come after earlier
audio and could attend to it, but their residuals barely change (notebook 1) and patching them recovers
nothing.

## Path patching: video → answer, audio → answer

`path_patch(model, clean, corrupted, metric, senders, receivers)` patches, in one layer's heads, only the
contribution `Σ_{k∈senders} A[q,k]·v[k]` at the receiver queries, and returns the metric per layer (or per
layer and head with `heads_per_layer=True`).
"""),
    code("""
from av_lens.analysis import path_patch

gap = patch.clean - patch.corrupted
pp = {s: (path_patch(model, clean, corrupted, sound_b_vs_a, senders=s, receivers="last_prompt") - patch.corrupted) / gap
      for s in ("video", "audio")}
print(f"{'layer':>5} {'video -> answer':>16} {'audio -> answer':>16}   (fraction recovered)")
for l in range(cfg.n_layers):
    print(f"{l:5d} {pp['video'][l]:16.3f} {pp['audio'][l]:16.3f}")

heads = (path_patch(model, clean, corrupted, sound_b_vs_a, senders="audio", receivers="last_prompt",
                    heads_per_layer=True) - patch.corrupted) / gap
print("\\naudio -> answer, per head:")
for l in range(cfg.n_layers):
    print(f"  layer {l}: " + " ".join(f"{v:6.3f}" for v in heads[l].tolist()))
"""),
    md("""
The direct video → answer edges carry none of the sound (the video activations are almost the same in both
runs; only the answer's attention to them changes). The direct audio → answer edges carry a small part, most
in layer 0 (0.13) and about 0.05 in layers 1–2, spread over several heads; most of the sound reaches the
answer through the text positions before it, as the table above shows.

## Head effect tables: who reads audio, who reads video?

`head_effect_table(model, inputs, metric, keys=..., query=...)` ablates, one head at a time, the part of the
head's output read from `keys` at the `query` positions, and returns metric(ablated) − metric(clean) as
`[layer, head]`. On the counterfactual clips: a negative effect with `keys="audio"` marks a head that
carries the sound playing into the answer; a positive effect with `keys="video"` marks a head that carries
the picture *against* it.
"""),
    code("""
from av_lens.analysis import head_effect_table

effects = {keys: head_effect_table(model, clean, sound_b_vs_a, keys=keys, query="last_prompt", progress=False)
           for keys in ("audio", "video")}
print("change of the metric when one head's reads from audio / video keys are zeroed (answer position only)")
print(f"{'':7s}" + "".join(f"{'audio h' + str(h):>10s}" for h in range(cfg.n_heads))
      + "".join(f"{'video h' + str(h):>10s}" for h in range(cfg.n_heads)))
for l in range(cfg.n_layers):
    print(f"layer {l}" + "".join(f"{v:10.3f}" for v in effects["audio"][l].tolist())
          + "".join(f"{v:10.3f}" for v in effects["video"][l].tolist()))
layer, head = divmod(int(effects["video"].argmax()), cfg.n_heads)
print(f"\\nstrongest head carrying the picture against the sound: layer {layer}, head {head}")
"""),
    md("""
The heads whose audio reads carry the sound are mostly in layers 0–2 (the largest: layer 0, heads 1 and 2). The
heads whose video reads work against it are early too — layer 0 head 0 and layer 2 heads 2 and 3 — with a
smaller one in the last layer (layer 7 head 3); layer 0 head 1's video reads work *for* the sound (−0.220).
Every single-head effect is small next to the 3.9-logit gap: no head, and no deep "fusion" layer, stands out as
where the picture beats the sound.

`head_ablation_hooks(model, [(layer, head)], keys="video", query="generated")` gives the same ablation as
hooks for `generate`; `mode="mean"` or `"resample"` replace the removed part instead of zeroing it.

## Views
"""),
    code("""
from av_lens import views

display(views.patching_heatmap(patch, "resid_pre"))
views.patching_heatmap(patch, "attn_out")
"""),
]

# ------------------------------------------------------------------------------------------ 05 base model
NB05 = [
    md("""
# 5 · Inherited from the base: token shift and probes

Audio-visual LLMs are built on a vision-language (or text) model and tuned further with audio. The study asks
what that tuning changed: teacher-force the AVLLM's captions into its base model, and most tokens — most sound
words too — are ones the base would have said as well (for Qwen2.5-Omni the study reports, of the sound words,
66 % unshifted and 85 % within the base's top 3). The AVLLM describes a clip much as its vision-language base
did; the sound has to fight a prior learned from pictures. Yet the audio is decodable from its hidden states:
linear probes read the sound's class at the audio positions.

The organism was built the same way: `av-lens/organism-base` is its vision-language stage, before audio was
added to the language model (its audio tower had been pretrained before, in stage 0, as a real AVLLM starts from
a pretrained audio encoder). We compare the two with `token_shift_batch` and with per-layer linear probes
(`pooled_residuals` + `probe_layers`).
"""),
    code(SETUP),
    code(LOAD + """

# a real model's base: Qwen2.5-Omni's thinker grew from Qwen2.5-VL (same token ids); it takes no audio, so give
# it the clips' video only (base_inputs = base.prepare(text, videos=[frames], fps=...))
BASE = "av-lens/organism-base" if organism else "Qwen/Qwen2.5-VL-3B-Instruct"
base = HookedAVTransformer.from_pretrained(BASE, dtype="float32" if organism else "bfloat16", device=device)"""),
    md("""
## Token shift on counterfactual captions

`token_shift_batch(model, base, inputs, base_inputs)` generates the AVLLM's answers (greedy), teacher-forces
them into the base with its own prompt, and returns, per prompt, each output token's rank under the base:
**unshifted** (rank 1), **marginal** (2–3) or **shifted**, with the base's probability and the KL divergence
between the two next-token distributions. The base sees the same clips; it never learned to use audio.
"""),
    md(REAL_MEDIA),
    code("""
from av_lens.analysis import token_shift_batch
from av_lens.analysis.token_shift import pooled_fractions
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

N = 24
clips = [cf for _, cf in world.eval_pairs(N)]
results = token_shift_batch(model, base, clip_inputs(model, clips, "describe", "av"),
                            clip_inputs(base, clips, "describe", "av"), max_new_tokens=4)
print(results[0].table())
print("\\nall tokens:", {k: round(v, 3) for k, v in pooled_fractions(results).items()},
      f"| mean KL {torch.tensor([r.mean_kl for r in results]).nanmean():.3f} nats")
own = base.generate(clip_inputs(base, clips[:4], "describe", "av"), max_new_tokens=4).text
print("the base's own captions of the first clips:", own)
"""),
    md("""
The base's own captions stop after the object word on these inputs, which carry audio tokens it never saw in
training; so "and" is its second choice, at a tiny probability (p_base), and the KL there is large although the
rank is 2: the rank categories measure *which* words the base prefers, the KL how much the two distributions
differ.

Only the sound words matter for the study's question: did the tuning change *what is heard*?
"""),
    code("""
sound = [(r.category[i], int(r.ranks[i]))
         for r in results for i, s in enumerate(r.strings) if s.strip() in world.SOUNDS]
cats = [c for c, _ in sound]
print(f"{len(sound)} sound words:",
      {c: round(cats.count(c) / len(cats), 3) for c in ("unshifted", "marginal", "shifted")})
print(f"within the base's top 3: {sum(r <= 3 for _, r in sound) / len(sound):.2f}")
# which sound does each caption's sound word name: the picture's or the one playing?
named = [(world.SOUNDS.index(s.strip()), c, r.category[i]) for c, r in zip(clips, results)
         for i, s in enumerate(r.strings) if s.strip() in world.SOUNDS]
for what, pick in (("the picture's sound", lambda c: c.look), ("the sound playing", lambda c: c.sound)):
    cats = [cat for w, c, cat in named if w == pick(c)]
    print(f"  naming {what:19s} {len(cats):2d} words, unshifted {cats.count('unshifted') / max(len(cats), 1):.2f}")
print("\\ncaptions with a token the base ranks below 1 (picture + sound playing: caption, base's rank per token):")
for c, r in [(c, r) for c, r in zip(clips, results) if int(r.ranks.max()) > 1][:6]:
    print(f"  {c.names[0] + ' + ' + c.names[1]:16s} {' '.join(s.strip() for s in r.strings):28s} {r.ranks.tolist()}")
"""),
    md("""
Of the 24 sound words, 0.625 are ones the base would have said too and 0.79 are within its top 3 — close to
the study's figures. The split is sharp: the 15 that name the picture's sound are all unshifted — the base
says the same from the look — and none of the 6 that name the sound playing is: those are what the audio
tuning added ("phone and chord" and, for a bird with a horse's sound, "phone and neigh" above, where the base
ranks the sound word 4). The other 3 name neither sound.
"""),
    md("""
## Is the audio there? Linear probes by layer

`pooled_residuals(model, inputs, "audio")` mean-pools the residual stream over each clip's audio positions at
every layer, inside the forward: `[layer, clip, d_model]`, layer 0 = the embeddings (the audio tower's
output). `probe_layers(features, labels)` fits one L2-regularised logistic-regression probe per layer on a
seeded split and reports held-out accuracy, with a shuffled-label control. We probe the class of the sound
*playing*, on factual and counterfactual clips, in both models.
"""),
    code("""
from av_lens.analysis import pooled_residuals, probe_layers

pairs = world.eval_pairs(48)
probe_clips = [f for f, _ in pairs] + [cf for _, cf in pairs]
labels = torch.tensor([c.sound for c in probe_clips])
probes = {}
for name, m in (("organism", model), ("base", base)):
    feats = pooled_residuals(m, clip_inputs(m, probe_clips, "hear", "av"), "audio")
    probes[name] = probe_layers(feats, labels, n_classes=world.N_CLASSES, seed=0)

o, b = probes["organism"], probes["base"]
print(f"probe for the sound's class at the audio positions (held-out; chance {o.chance:.2f})")
print(f"{'residual':>12} {'organism':>9} {'control':>8} {'base':>7} {'control':>8}")
for i, l in enumerate(o.layers):
    print(f"{'embeddings' if l == 0 else f'after L{l - 1}':>12} {o.accuracy[i]:9.2f} {o.control_accuracy[i]:8.2f} "
          f"{b.accuracy[i]:7.2f} {b.control_accuracy[i]:8.2f}")
"""),
    md("""
Read together: the organism's audio positions carry the class of the sound playing at every layer (1.00; the
shuffled-label control at most 0.21) — the audio is there — while its captions keep mostly the base's words.
The base's audio positions carry it too: its audio tower was pretrained (stage 0), so the classes are separated
at the embeddings (1.00), and its language layers, never trained on audio, keep most of it (0.93 after the
last layer). Probes at the audio positions cannot tell the AVLLM from its base; the difference lies in what
the language model does with what is there.

## Views
"""),
    code("""
from av_lens import views

display(views.token_shift(results[0]))
views.probe_accuracy(probes)
"""),
]

# ------------------------------------------------------------------------------------------ 06 your own hook
NB06 = [
    md("""
# 6 · Writing your own hook

The built-in tools are hooks plus bookkeeping. When a question needs something they do not offer — *the
study finds that vision wins in the fusion layers: what if the video tokens carried nothing specific to the
picture, with attention left as it is?* — you write a TransformerLens hook: a function `fn(activation, hook)` that returns a replacement
(or `None` to leave it unchanged). What av_lens adds is `model.run_state`: while a hook runs, it holds the
**layout** of everything seen so far and which positions the current forward computes, so a hook can act on
audio or video positions only — in a prefill, in every decoding step of `generate`, and in a teacher-forced
forward alike.
"""),
    code(SETUP),
    code(LOAD + "\n\n" + WORD_ID),
    md(REAL_MEDIA),
    code("""
from av_lens.analysis import KeywordScorer, fidelity
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

N = 24
clips = [cf for _, cf in world.eval_pairs(N)]                         # picture of A, sound of B
hear = model.encode(clip_inputs(model, clips, "hear", "av"))          # "what do you hear?"
describe = model.encode(clip_inputs(model, clips, "describe", "av"))
playing = torch.tensor([word_id(world.SOUNDS[c.sound]) for c in clips])
picture = torch.tensor([word_id(world.SOUNDS[c.look]) for c in clips])
scorer, refs = KeywordScorer(world.SOUNDS), [world.SOUNDS[c.sound] for c in clips]

def answers(logits):
    \"\"\"(fraction of answers naming the sound playing, fraction naming the picture's sound).\"\"\"
    top = logits[:, -1].argmax(-1).cpu()
    return round((top == playing).float().mean().item(), 3), round((top == picture).float().mean().item(), 3)

def audio_fidelity(gen):
    return fidelity(gen.text, refs, scorer).mean().item()
"""),
    md("""
## What a hook sees: `model.run_state`

`run_state.layout` covers every position so far; the current forward computes positions
`query_start .. query_start + n_query - 1` (the whole prompt in the prefill, one new token per decoding step).
"""),
    code("""
seen = []

def spy(resid, hook):
    st = model.run_state
    seen.append((hook.name, tuple(resid.shape), st.query_start, st.n_query, st.is_decoding, len(st.layout),
                 st.layout.count("audio"), st.layout.count("generated")))

model.generate(clip_inputs(model, clips[:1], "describe", "av"), max_new_tokens=3,
               fwd_hooks=[("blocks.2.hook_resid_pre", spy)])
print(f"{'hook':24s} {'shape':>14s} {'start':>5s} {'n':>3s} {'decoding':>8s} {'len':>4s} {'audio':>5s} {'gen':>4s}")
for name, shape, start, n, decoding, length, audio, generated in seen:
    print(f"{name:24s} {str(shape):>14s} {start:5d} {n:3d} {str(decoding):>8s} {length:4d} {audio:5d} {generated:4d}")
"""),
    md("""
## A hook on the audio positions: scale the audio residual at layer 2

The selector's mask on the running layout, sliced to the positions this forward computes, says where to act.
The same hook is a no-op in decoding steps (no audio among the new positions).
"""),
    code("""
def scale_positions(sel, factor):
    \"\"\"A hook multiplying the residual stream at `sel`'s positions by `factor`.\"\"\"
    def hook(resid, hook):
        st = model.run_state
        here = st.layout.mask(sel)[:, st.query_start:st.query_start + st.n_query].to(resid.device)
        return torch.where(here[..., None], resid * factor, resid)
    return hook

print(f"{'audio x':>8} {'answers (sound, picture)':>26}")
with torch.no_grad():
    for factor in (0.0, 0.5, 1.0, 2.0, 4.0):
        logits = model.run_with_hooks(hear, fwd_hooks=[("blocks.2.hook_resid_pre", scale_positions("audio", factor))])
        print(f"{factor:8.1f} {str(answers(logits)):>26}")
"""),
    md("""
Removing the audio residual (×0) pushes the answers further to the picture (a few still name the sound: layers
0–1 have already carried some of it to the text positions, notebook 4), but making it *louder* changes nothing:
every layer reads a position through an RMSNorm — its direction, not its size. (To change how much a position is
*read*, edit attention instead; the study cuts edges — notebook 3.)
"""),
    md("""
## A hook on values: mean-ablate the video

Attention reads a key position's *value*. Replacing the values at the video positions by their mean (per
clip) removes what is specific to the picture while keeping the attention pattern. `hook_v` is
`[batch, pos, kv_head, d_head]`. In `generate`, decoding steps compute only the new token's value: the cached
video values were already replaced in the prefill, so the hook leaves the new positions alone.
"""),
    code("""
def mean_ablate_values(sel):
    \"\"\"A hook replacing the attention values at `sel`'s positions by their mean over those positions, per sample.\"\"\"
    def hook(v, hook):
        st = model.run_state
        here = st.layout.mask(sel)[:, st.query_start:st.query_start + st.n_query].to(v.device)
        if not here.any():  # a decoding step: nothing of `sel` among the new positions
            return v
        w = here[..., None, None].to(v.dtype)
        mean = (v * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        return torch.where(here[..., None, None], mean, v)
    return hook

def mean_ablated_video(layers):
    return [(f"blocks.{l}.attn.hook_v", mean_ablate_values("video")) for l in layers]

print(f"{'video values mean-ablated in':>30} {'answers (sound, picture)':>26} {'caption fidelity':>17}")
for layers in ([], [0], [0, 1, 2, 3], [4, 5, 6, 7], list(range(8))):
    hooks = mean_ablated_video(layers)
    with torch.no_grad():
        ans = answers(model.run_with_hooks(hear, fwd_hooks=hooks))
    cap = audio_fidelity(model.generate(describe, max_new_tokens=4, fwd_hooks=hooks))
    print(f"{str(layers) if layers else 'none':>30} {str(ans):>26} {cap:17.3f}")
"""),
    md("""
Removing what is specific to the picture from the video's values in the early layers 0–3 almost stops the
one-word answers naming the picture's sound (0.625 → 0.167) but moves only one of them to the sound playing
(0.375 → 0.417): most of the freed answers name neither sound. Doing it in the deep layers 4–7 leaves the
answers unchanged. Layer 0 alone takes answers away from the picture's sound (0.458) without giving them to the
sound playing. Captions move less: at most one more of the 24 names the sound playing (0.292, layers 0–3). As notebook 3's knockouts found, the picture's
specifics reach the answer in the early layers, not the deep ones.
"""),
    md("""
## Composing with the built-in tools

Hooks are plain `(name, fn)` pairs or a `model.hooks(...)` context, so yours compose with everything else.
First, check that the hook does what it says: cache layer 0's values while it runs — every video position
should now hold the same value.
"""),
    code("""
for name, extra in (("plain", []), ("mean-ablated in layer 0", mean_ablated_video([0]))):
    with model.hooks(fwd_hooks=extra):
        _, cache = model.run_with_cache(hear, names_filter="blocks.0.attn.hook_v")
    v = cache["blocks.0.attn.hook_v"]                        # [batch, pos, kv_head, d_head]
    video = cache.layout.mask("video").to(v.device)
    spread = v[video].reshape(N, -1, *v.shape[2:]).std(dim=1).mean().item()  # over each clip's video positions
    print(f"{name:24s} std of layer-0 values across video positions: {spread:.4f}")
"""),
    md("""
Then with a built-in knockout and attention flow in `generate`: block the generated tokens from the video in the
deep layers 4–7 (`knockout_hooks`, as in notebook 3), add your mean-ablation in the early layers 0–3, and
measure where the generated tokens look (`AttentionFlow`). Its default method recomputes attention from q and k
with the plain causal mask; when another hook edits the mask, as a knockout does, use `method="pattern"`.
"""),
    code("""
from av_lens.analysis import AttentionFlow, knockout_hooks

KEYS = {"audio": "audio", "video": "video", "text": "prompt - audio - video"}
knockout = knockout_hooks(model, "generated", "video", [4, 5, 6, 7])
for name, extra in (("plain", []), ("G-/->V in layers 4-7", knockout),
                    ("same + video values mean-ablated in 0-3", knockout + mean_ablated_video([0, 1, 2, 3]))):
    flow = AttentionFlow(model, "generated", KEYS, method="pattern")
    gen = model.generate(describe, max_new_tokens=4, fwd_hooks=extra + flow.hooks())
    to_video = flow.result().by_layer()[:, list(KEYS).index("video")]
    print(f"{name:40s} caption fidelity {audio_fidelity(gen):.3f} | attention to video by layer "
          + " ".join(f"{v:.2f}" for v in to_video.tolist()))
    print(f"{'':40s} e.g. {gen.text[1:4]}")
"""),
    md("""
Read the outputs, not only the metric. The attention line confirms the knockout (no attention to the video in
layers 4–7) and shows that the mean-ablation keeps the attention pattern (0.70 to 0.83 on the video in layers
0–3, as before). The knockout alone makes some captions run on ("bell and ring and"). With the mean-ablation
added, fidelity is the highest of the three (0.417), yet the captions shown are broken — "phone and and and"
for a bell — the intervention broke the caption's format rather than redirecting it to the sound.
"""),
    md("""
## Hooks are removed, even after an exception

`run_with_hooks`, `run_with_cache` and `generate` attach the hooks for the call and remove them afterwards —
also when a hook raises. `model.hooks(fwd_hooks=...)` does the same as a context manager; `model.add_hook`
attaches a hook until `model.reset_hooks()`.
"""),
    code("""
def broken(resid, hook):
    raise RuntimeError(f"a bug in my hook at {hook.name}")

point = model.hook_dict["blocks.2.hook_resid_pre"]
for run in (lambda hooks: model.run_with_hooks(hear, fwd_hooks=hooks),
            lambda hooks: model.generate(describe, max_new_tokens=2, fwd_hooks=hooks)):
    try:
        run([("blocks.2.hook_resid_pre", scale_positions("audio", 2.0)), ("blocks.3.hook_resid_pre", broken)])
    except RuntimeError as e:
        print("caught:", e)
    print("  hooks left on blocks.2.hook_resid_pre:", point.has_hooks(), "| model.run_state:", model.run_state)

with torch.no_grad():
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", scale_positions("audio", 0.0))]):
        print("\\ninside model.hooks(...):", point.has_hooks(), "| answers (sound, picture):", answers(model(hear)))
    print("after:                  ", point.has_hooks(), "| answers (sound, picture):", answers(model(hear)))
"""),
    md("""
## Views

`views.attention_heads(model, inputs, layer)` runs its own forward — inside `model.hooks(...)` it sees your
hooks too. Below: layer 4's heads (attention pooled by modality segment) on one clip, then with the video's
values mean-ablated in layers 0–3.
"""),
    code("""
from av_lens import views

one = clip_inputs(model, clips[:1], "describe", "av")
display(views.attention_heads(model, one, layer=4))
with model.hooks(fwd_hooks=mean_ablated_video([0, 1, 2, 3])):
    ablated = views.attention_heads(model, one, layer=4)
ablated
"""),
]


# ------------------------------------------------------------------------------ 07 steering & representations
NB07 = [
    md("""
# 7 · Steering and representations by modality

The tools 2026 papers on audio(-visual) LLM internals keep re-implementing, with modality and time targeting:
**steering** a direction at the audio positions (or the last prompt token, or every generated token), **probes**
with AUROC on the last prompt token, **CKA** between the audio positions' layers and the answer position's,
**attention sinks / massive activations** per modality, and **token-drop curves** ("remove the audio from
layer L on"). Each tool is tested against an independent computation (tests/analysis/).
"""),
    code(SETUP),
    code(LOAD),
    code("""
import numpy as np
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

rng = np.random.default_rng(0)
def hear(cls, n=8):
    \"\"\"n audio-only clips of class cls, asked 'what do you hear ?'\"\"\"
    return clip_inputs(model, [world.make_clip(cls, cls, rng) for _ in range(n)], "hear", "audio")

bark, ring = model.tokenizer.convert_tokens_to_ids(["bark", "ring"])
says = lambda tok: (lambda logits, _: (logits[:, -1].argmax(-1) == tok).float())
"""),
    md("""
## Steering: make the organism hear *bark* in a *ring*

The direction is the mean residual at the audio positions of *bark* clips minus that of *ring* clips, one row
per residual-stream index. Added at the audio positions of fresh *ring* clips, one layer at a time: how often
does the answer become *bark*? The control is a random direction with the same norm per layer.
"""),
    code("""
from av_lens.analysis import mean_difference, random_direction_like, steering_sweep

d = mean_difference(model, hear(0), hear(1), at="audio")
test = hear(1)
sweeps = {name: steering_sweep(model, test, direction, "audio", layers=range(cfg.n_layers), coeffs=[0.5, 1, 2],
                               metric=says(bark), progress=False)
          for name, direction in (("bark - ring", d), ("random, same norm", random_direction_like(d)))}
for name, sw in sweeps.items():
    print(name); print(sw.table())
sweeps["bark - ring"].view()
"""),
    md("""
Steering works only in the first layers (at c = 1: every answer becomes *bark* at layers 0 and 1, 0.375 at
layer 2); from layer 3 on it does nothing at these strengths, and c = 2 works only at layer 0 (0.875). The
random direction of the same norm never makes *bark*. The token-drop curve below suggests why: by layer 4 the
answer position has already read the audio. The same hooks work in `generate` — `steering_hooks(model,
d, "generated", layers=[1])` steers every new token.

## Last-prompt-token probes with AUROC
"""),
    code("""
from av_lens.analysis import pooled_residuals, probe_layers

clips = [world.make_clip(int(c), int(c), rng) for c in rng.integers(0, 8, 64)]
feats = pooled_residuals(model, clip_inputs(model, clips, "hear", "audio"), "last_prompt", per_item=False)
print(probe_layers(feats, [c.sound for c in clips], n_classes=8).table())
"""),
    md("""
Layer 0 is the last prompt token's embedding — the same word for every clip, so the probe is at chance; from
layer 1 on the answer position holds the sound's class perfectly (accuracy and AUROC 1.0, shuffled-label
control 0.16 to 0.42: with 19 held-out clips the shuffled control is noisy).
"""),
    md("## CKA: audio positions vs the answer position, layer by layer"),
    code("""
from av_lens.analysis import cka_matrix

res = cka_matrix(model, [hear(c, 4) for c in range(8)], "audio", "last_prompt",
                 layers_b=range(1, cfg.n_layers + 1))   # the last token's layer-0 residual is constant
res.view()
"""),
    md("## Sinks, massive activations, and the audio's token-drop curve"),
    code("""
from av_lens.analysis import scan_sinks, token_drop_sweep

print(scan_sinks(model, test).table(threshold=0.3, top=5))
print(token_drop_sweep(model, test, "audio", says(ring), progress=False).table())
"""),
    md("""
No position draws 0.3 of a layer's attention and no activation is 100× its layer's median: the organism has no
sinks or massive activations at these thresholds. Dropping the audio from layer 0 on, no answer is
*ring*; from layer 1 on 0.375 still are, yet from layer 2 or 3 on none again — dropping later is not always
milder, since what a layer reads depends on the layers before it — and from layer 4 on all of them: the answer
has read the audio by layer 4.
"""),
]

NB08 = [
    md("""
# 8 · Attribution patching: candidates from one backward pass, checked by exact patching

Activation patching (notebook 4) needs one forward per node — at real scale (36 layers × 16 heads × thousands
of video tokens) thousands of forwards per clip. **Attribution patching** (AtP; Nanda 2023, Syed et al. 2023,
Kramár et al. 2024) estimates every node's patching effect at once from a first-order expansion around the
corrupted run:

    effect(node) ≈ (a_clean(node) − a_corrupted(node)) · ∂metric/∂a  (at the corrupted run)

— one clean forward, one corrupted forward and one backward. This notebook computes it on the organism, compares
it with exact patching node by node, and shows the workflow that follows from the comparison: let AtP choose the
candidates, then patch them exactly.
"""),
    code(SETUP),
    code(LOAD),
    md("""
## A picture counterfactual and its metric

Clean: a dog clip with a bark. Corrupted: a bell clip with the *same* bark. Only the picture differs, so
patching clean into corrupted asks which activations carry the picture's effect on the answer to "what do you
hear?". Metric: the logit of *bark* minus that of *ring* (the bell's sound) at the answer position.
"""),
    code("""
import numpy as np
import torch
from av_lens.organism import world
from av_lens.organism.evaluate import clip_inputs

rng = np.random.default_rng(3)
sound = world.sound(0, rng)                                                                    # a bark
clean = clip_inputs(model, [world.Clip(0, 0, world.frames(0, rng), sound)], "hear", "av")      # dog + bark
corrupted = clip_inputs(model, [world.Clip(1, 0, world.frames(1, rng), sound)], "hear", "av")  # bell + bark
bark, ring = model.tokenizer.convert_tokens_to_ids(["bark", "ring"])
metric = lambda logits: (logits[:, -1, bark] - logits[:, -1, ring]).mean()
with torch.no_grad():
    print(f"metric: clean {float(metric(model(clean))):.3f}, corrupted {float(metric(model(corrupted))):.3f}")
"""),
    md("""
## Every node from one backward pass

`attribution_patch(model, clean, corrupted, metric, components, sets)` returns, per component, the estimated
effect of patching each (layer[, head]) × position set; `res["z"]` is on the scale of `patch_by_modality`'s
values, `res.effect("z")` the change from the corrupted metric, `res.table("z")` the largest nodes. Heads are
read at `hook_z` (a head's output is `z @ W_O[h]`, a linear map).
"""),
    code("""
from av_lens.analysis import attribution_patch

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "z")
atp = attribution_patch(model, clean, corrupted, metric, components=COMPONENTS, sets=("audio", "video", "text"))
print(atp.table("z", k=8))
"""),
    md("""
## Against exact patching

`patch_by_modality` patches each node for real (one forward each). Spearman's ρ compares the two rankings —
on the signed effects and on their magnitudes — and for the heads, how many of AtP's top 10 are exact patching's
top 10.
"""),
    code("""
from av_lens.analysis import patch_by_modality

exact = patch_by_modality(model, clean, corrupted, metric, components=COMPONENTS, sets=("audio", "video", "text"),
                          progress=False)

def spearman(a, b):
    rank = lambda x: x.flatten().argsort().argsort().double()
    ra, rb = rank(a), rank(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

print(f"{'component':>10} {'nodes':>6} {'rho signed':>11} {'rho |.|':>8}")
for c in COMPONENTS:
    est, true = atp.effect(c), exact[c] - exact.corrupted
    print(f"{c:>10} {est.numel():6d} {spearman(est, true):11.2f} {spearman(est.abs(), true.abs()):8.2f}")
est_z, true_z = atp.effect("z"), exact["z"] - exact.corrupted
top = lambda e: set(e.abs().flatten().argsort(descending=True)[:10].tolist())
print(f"top-10 heads shared: {len(top(est_z) & top(true_z))} of 10")
"""),
    md("""
On this pair AtP ranks the nodes almost as exact patching does: ρ on magnitudes 0.94 to 1.00 for every
component and 0.85 to 0.98 on the signed effects, and 9 of its top 10 head nodes are exact patching's. All eight
of its largest head nodes act at the text positions: the picture reaches the answer through heads at the
prompt's text, after the video has been read (notebook 4 finds the same route for the sound). AtP is not always
this good: over six such pairs the signs of the small nodes go wrong where the video swap moves saturated
softmaxes (docs/analysis.md: signed ρ 0.54 to 1.00, magnitudes 0.90 to 1.00).
"""),
    md("""
## The workflow: AtP chooses, exact patching decides

Patch the k largest head nodes by AtP *together*, exactly (a hook that writes the clean `hook_z` values of those
heads at those positions into the corrupted run), and compare with the k largest by exact patching (what AtP
tries to predict) and with k nodes drawn at random. The fraction recovered is of the clean − corrupted gap.
"""),
    code("""
from av_lens.analysis.patching import metric_gap

def recovered(nodes):
    \"\"\"Fraction of the gap restored by patching (layer, head, set index) nodes jointly and exactly.\"\"\"
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("attn.hook_z"))
    masks = [corrupted.layout.mask(s)[0] for s in ("audio", "video", "text")]
    def hook(z, hook):
        l = int(hook.name.split(".")[1])
        z = z.clone()
        for nl, h, si in nodes:
            if nl == l:
                z[0, masks[si], h] = cache[hook.name][0, masks[si], h]
        return z
    names = sorted({f"blocks.{l}.attn.hook_z" for l, _, _ in nodes})
    with torch.no_grad():
        m = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(n, hook) for n in names])))
    return (m - exact.corrupted) / metric_gap(exact.clean, exact.corrupted)

node = lambda i: tuple(int(v) for v in torch.unravel_index(torch.tensor(i), est_z.shape))
by_atp = [node(i) for i in est_z.abs().flatten().argsort(descending=True).tolist()]
by_exact = [node(i) for i in true_z.abs().flatten().argsort(descending=True).tolist()]
g = torch.Generator().manual_seed(0)
shuffles = [[node(i) for i in torch.randperm(est_z.numel(), generator=g).tolist()] for _ in range(3)]
print("the 5 largest head nodes by AtP (layer, head, set):", by_atp[:5])
print(f"{'k':>4} {'AtP order':>10} {'exact order':>12} {'random order (3 draws)':>24}")
for k in (1, 5, 10, 20, 40, 96):
    rnd = " ".join(f"{recovered(o[:k]):6.2f}" for o in shuffles)
    print(f"{k:4d} {recovered(by_atp[:k]):10.2f} {recovered(by_exact[:k]):12.2f} {rnd:>24}")
"""),
    md("""
No single head carries the picture: the largest by AtP recovers 0.04 of the gap alone, and the largest by
exact patching (layer 0 head 1 at the text) works *against* it (−0.08); five together recover 0.07 to 0.14. But
ten together recover 0.82 and twenty 0.97: the heads act jointly, so single-node effects do not add up. At every
k, AtP's order does as well as exact patching's own, and far better than random (twenty random head nodes:
0.13 to 0.30). The workflow, then: one backward pass to rank all nodes, then a few exact patches of the top of
that ranking — instead of one forward per node for the ranking alone. On Qwen2.5-Omni-3B (36 layers × 16
heads, thousands of positions) the ranking still costs two forwards and one backward.
"""),
    md("""
## Queries and keys: AtP*

A head's queries and keys act through its softmax, and a gradient at a sharp softmax is near zero even when
patching moves the pattern a lot. AtP* (Kramár et al. 2024) computes the pattern the patch would give exactly —
the set's clean queries (or keys) against the corrupted keys (or queries) — and linearises only from the
pattern on: `recompute_qk=True`. Key (and value) nodes are per key-value head: this organism's 4 query heads
share 2.
"""),
    code("""
SETS = ("audio", "video", "text")
plain = attribution_patch(model, clean, corrupted, metric, components=("q", "k"), sets=SETS)
star = attribution_patch(model, clean, corrupted, metric, components=("q", "k"), sets=SETS, recompute_qk=True)
exact_qk = patch_by_modality(model, clean, corrupted, metric, components=("q", "k"), sets=SETS, progress=False)
print(f"{'nodes':>6} {'rho AtP':>8} {'rho AtP*':>9} {'top-10 AtP':>11} {'top-10 AtP*':>12}")
for c in ("q", "k"):
    true = exact_qk[c] - exact_qk.corrupted
    print(f"{c} {true.numel():4d} {spearman(plain.effect(c), true):8.2f} {spearman(star.effect(c), true):9.2f} "
          f"{len(top(plain.effect(c)) & top(true)):11d} {len(top(star.effect(c)) & top(true)):12d}")
true_k = exact_qk["k"] - exact_qk.corrupted
print("layer 0, key-value head 1, video keys: exact", f"{float(true_k[0, 1, 1]):.2f},",
      f"AtP {float(plain.effect('k')[0, 1, 1]):.2f}, AtP* {float(star.effect('k')[0, 1, 1]):.2f}")
"""),
    md("""
With the patterns recomputed the ranking of query and key nodes matches exact patching (ρ 1.00 for both,
against 0.80 and 0.94 for plain AtP; 9 and 10 of the top 10). The largest node shows why: patching the video
*keys* of layer 0's second key-value head restores +1.23 of the logit difference, and plain AtP puts it at 0.07
— the softmax it differentiates is saturated. AtP* puts it at 0.49: the right node, ranked first, but still an
underestimate, because everything after the pattern is still linearised. So: AtP* to rank, exact patching for
the number. `grad_drop=True` (GradDrop) adds magnitudes that survive cancelling paths, at one more backward per
layer; `edge_attribution(..., ig_path="edge")` checks a few edge estimates against their converging limit
(docs/analysis.md has both, with tables over six pairs).
"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": NB01,
    "02_where_does_the_audio_go.ipynb": NB02,
    "03_knockout_recovers_audio.ipynb": NB03,
    "04_patching_and_ablation.ipynb": NB04,
    "05_inherited_from_the_base.ipynb": NB05,
    "06_your_own_hook.ipynb": NB06,
    "07_steering_and_representations.ipynb": NB07,
    "08_attribution_patching.ipynb": NB08,
}


def build(name: str, cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):  # stable ids, so that regenerating gives the same files
        cell.id = f"{name[:2]}-{i:02d}"
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def render(name: str, cells) -> str:
    """The notebook file's text without outputs (what :func:`execute` runs)."""
    nb = build(name, cells)
    nbformat.validate(nb)
    return _text(nb)


def _text(nb) -> str:
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


#: outputs that differ from run to run or from machine to machine, left out of the committed notebooks
_VOLATILE_MIME = ("application/vnd.jupyter.widget-view+json",)
#: larger HTML outputs (circuitsvis views with their bundled script) are replaced by a one-line note
_MAX_HTML = 200_000


def clean_outputs(nb) -> nbformat.NotebookNode:
    """Make an executed notebook deterministic: keep stdout, results and displays; drop stderr (warnings, progress
    bars), widget outputs, timing metadata; number the code cells 1, 2, ... in order."""
    nb.metadata["language_info"] = {"name": "python"}  # not the kernel's version details
    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        n += 1
        cell.execution_count = n
        cell.metadata = {}
        kept = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stderr":
                continue
            if out.output_type in ("display_data", "execute_result"):
                if any(m in out.get("data", {}) for m in _VOLATILE_MIME):
                    continue
                out.metadata = {}
                html = out.get("data", {}).get("text/html", "")
                if len("".join(html)) > _MAX_HTML:  # a circuitsvis view carries its whole script bundle
                    out.data = {"text/plain": "[interactive circuitsvis view: run the cell to see it (its "
                                              f"{len(''.join(html)) / 1e6:.1f} MB script is not committed)]"}
                if out.output_type == "execute_result":
                    out.execution_count = n
            if out.output_type == "stream" and kept and kept[-1].output_type == "stream" and kept[-1].name == out.name:
                kept[-1].text += out.text  # how the text was split into messages depends on timing
                continue
            kept.append(out)
        cell.outputs = kept
    return nb


def execute(name: str, cells, timeout: int = 120) -> str:
    """Run the notebook in a fresh python3 kernel from tutorials/, offline, on one thread; its cleaned text."""
    import os

    import nbclient

    nb = build(name, cells)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    nb = clean_outputs(nb)
    nbformat.validate(nb)
    return _text(nb)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the tutorial notebooks, executed (outputs included).")
    ap.add_argument("--no-execute", action="store_true", help="write them without outputs (fast)")
    ap.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    args = ap.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        if args.names and name not in args.names:
            continue
        text = render(name, cells) if args.no_execute else execute(name, cells)
        (HERE / name).write_text(text, encoding="utf-8")
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
