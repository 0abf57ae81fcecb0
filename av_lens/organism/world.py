"""The organism's synthetic audio-visual world.

Eight kinds of sound source. Each has a *look* — a coloured shape with a texture and a way of moving,
drawn into short 112x112 clips — and a *sound* — a 16 kHz waveform built from harmonic tones, noise bands,
chirps and rhythms. Every clip draws fresh nuisance variation (position, size, speed, colour and background
jitter; pitch, tempo, loudness and noise), so a model has to learn the class, not memorise a clip.

A *factual* clip pairs a look with its own sound; a *counterfactual* clip keeps the look and swaps in another
class's sound, the manipulation of the study (arXiv 2604.02605). Captions use a closed vocabulary:

    what do you see ?           ->  dog
    what do you hear ?          ->  bark
    describe what you see and hear .  ->  dog and bark

Everything here is seeded numpy: the same seed gives the same clips on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from av_lens.errors import InputError

SAMPLE_RATE = 16000
SIDE = 112          # frame side in pixels (the processor sees 8x8 patches -> 4x4 merged tokens per frame pair)


@dataclass(frozen=True)
class Geometry:
    """How long a clip is and how fast things move in it (one per organism design, see ``build.DESIGNS``)."""

    n_frames: int
    fps: float
    speed: tuple[float, float]   # motion speed range, pixels per frame (doubled for "fast-right")

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps


#: design v2 (the shipped organism): 12 frames at 2 fps, a 6 s clip (three 2-second TMRoPE chunks) with a 6 s
#: soundtrack
V2 = Geometry(12, 2.0, (1.5, 2.5))
#: design v1 (the retired first organism): 4 frames at 4 fps, a 1 s clip with a 1 s soundtrack
V1 = Geometry(4, 4.0, (4.0, 7.0))
GEOMETRIES = {"v1": V1, "v2": V2}
#: the shipped organism's clip geometry (``build.DEFAULT_DESIGN``'s)
DEFAULT = V2
N_FRAMES = DEFAULT.n_frames
FPS = DEFAULT.fps
SECONDS = DEFAULT.seconds


@dataclass(frozen=True)
class SourceClass:
    """One kind of sound source: what it is called, how it looks, how it sounds."""

    name: str        # the object word ("what do you see")
    sound: str       # the sound word ("what do you hear")
    colour: tuple[int, int, int]
    shape: str       # circle | square | triangle | ring
    texture: str     # solid | stripes | checker | dots
    motion: str      # right | left | up | still | pulse | fast-right | down | jitter
    recipe: str      # how the waveform is made (see _sound)


CLASSES: tuple[SourceClass, ...] = (
    SourceClass("dog", "bark", (140, 70, 20), "circle", "solid", "right", "noise bursts, 3 per second"),
    SourceClass("bell", "ring", (250, 230, 0), "triangle", "solid", "pulse", "inharmonic partials, decaying"),
    SourceClass("car", "engine", (240, 0, 0), "square", "solid", "left", "80 Hz buzz with harmonics and rumble"),
    SourceClass("bird", "chirp", (0, 200, 255), "circle", "dots", "up", "rising chirps 2-4 kHz, 5 per second"),
    SourceClass("drum", "beat", (170, 0, 255), "ring", "solid", "pulse", "decaying 60 Hz thumps, 4 per second"),
    SourceClass("phone", "buzz", (0, 230, 0), "square", "stripes", "jitter", "400 Hz square wave gated at 12 Hz"),
    SourceClass("horse", "neigh", (255, 0, 160), "triangle", "stripes", "fast-right", "falling chirp with vibrato"),
    SourceClass("piano", "chord", (255, 255, 255), "square", "checker", "still", "major triad, decaying"),
)
OBJECTS = tuple(c.name for c in CLASSES)
SOUNDS = tuple(c.sound for c in CLASSES)
N_CLASSES = len(CLASSES)

QUESTIONS = {
    "see": "what do you see ?",
    "hear": "what do you hear ?",
    "describe": "describe what you see and hear .",
}


def answer(question: str, look: int, sound: int) -> str:
    """The caption for a question, given the class of what is seen and of what is heard."""
    if question == "see":
        return OBJECTS[look]
    if question == "hear":
        return SOUNDS[sound]
    if question == "describe":
        return f"{OBJECTS[look]} and {SOUNDS[sound]}"
    raise InputError(f"unknown question {question!r}", f"use one of {sorted(QUESTIONS)}")


# ----------------------------------------------------------------------------------------------- pictures
def _shape_mask(shape: str, yy, xx, cy: float, cx: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    if shape == "ring":
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d2 < r ** 2) & (d2 > (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(yy - cy) < 0.85 * r) & (np.abs(xx - cx) < 0.85 * r)
    if shape == "triangle":
        top = cy - r
        return (yy > top) & (yy < cy + r) & (np.abs(xx - cx) < (yy - top) * 0.6)
    raise ValueError(shape)


def _texture(texture: str, yy, xx, phase: int) -> np.ndarray:
    if texture == "stripes":
        return ((xx + phase) // 4) % 2 == 0
    if texture == "checker":
        return ((yy // 6) + (xx // 6)) % 2 == 0
    if texture == "dots":
        return ((yy % 7) < 3) & (((xx + phase) % 7) < 3)
    return np.ones_like(yy, dtype=bool)


def frames(look: int, rng: np.random.Generator, n_frames: int = N_FRAMES, side: int = SIDE,
           speed: tuple[float, float] = DEFAULT.speed) -> np.ndarray:
    """A (n_frames, side, side, 3) uint8 clip of class ``look`` with fresh nuisance variation."""
    c = CLASSES[look]
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    bg = rng.uniform(0, 40, size=3)
    colour = np.clip(np.array(c.colour) * rng.uniform(0.85, 1.0) + rng.normal(0, 8, 3), 0, 255)
    r0 = side * rng.uniform(0.24, 0.3)
    cy0, cx0 = side / 2 + rng.uniform(-8, 8), side / 2 + rng.uniform(-8, 8)
    speed = rng.uniform(*speed) * (2.0 if c.motion == "fast-right" else 1.0)  # px per frame
    out = np.empty((n_frames, side, side, 3), np.float32)
    for t in range(n_frames):
        k = t - (n_frames - 1) / 2
        cy, cx, r = cy0, cx0, r0
        if c.motion in ("right", "fast-right"):
            cx = cx0 + speed * k
        elif c.motion == "left":
            cx = cx0 - speed * k
        elif c.motion == "up":
            cy = cy0 - speed * k
        elif c.motion == "down":
            cy = cy0 + speed * k
        elif c.motion == "pulse":
            r = r0 * (1.0 + 0.25 * (-1) ** t)
        elif c.motion == "jitter":
            cy, cx = cy0 + rng.uniform(-3, 3), cx0 + rng.uniform(-3, 3)
        m = _shape_mask(c.shape, yy, xx, cy, cx, r) & _texture(c.texture, yy, xx, 2 * t)
        f = np.broadcast_to(bg, (side, side, 3)).copy()
        f[m] = colour
        out[t] = f
    out += rng.normal(0, 6, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- sounds
def _sound(recipe_index: int, rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    j = rng.uniform(0.94, 1.06)  # pitch / tempo jitter
    ph = rng.uniform(0, 1)
    k = recipe_index
    if k == 0:  # bark: band noise bursts
        noise = rng.standard_normal(len(t))
        band = np.convolve(noise, np.hanning(9) * np.cos(2 * np.pi * 900 * j * np.arange(9) / sr), "same")
        env = (((t * 3 * j + ph) % 1.0) < 0.25).astype(float)
        w = 2.5 * band * env
    elif k == 1:  # ring: inharmonic partials, decaying every 0.5 s
        env = np.exp(-((t + ph) % 0.5) * 6)
        w = sum(a * np.sin(2 * np.pi * f * 1200 * j * t) for a, f in [(1, 1), (0.6, 2.76), (0.4, 5.4)]) * env
    elif k == 2:  # engine: low buzz with harmonics and rumble
        f0 = 80 * j
        w = sum(np.sin(2 * np.pi * h * f0 * t + h * ph) / h for h in range(1, 9)) * 0.6
        w = w + 0.3 * np.convolve(rng.standard_normal(len(t)), np.ones(40) / 40, "same") * 6
    elif k == 3:  # chirp: rising sweeps 2 -> 4 kHz, 5 per second
        u = (t * 5 * j + ph) % 1.0
        f = 2000 + 2000 * u
        phase = 2 * np.pi * np.cumsum(f) / sr
        w = np.sin(phase) * (u < 0.6)
    elif k == 4:  # beat: decaying low thumps
        u = (t * 4 * j + ph) % 1.0
        w = np.sin(2 * np.pi * 60 * j * t) * np.exp(-u * 12) * 1.5
    elif k == 5:  # buzz: square wave gated at 12 Hz
        w = np.sign(np.sin(2 * np.pi * 400 * j * t)) * 0.5 * (np.sin(2 * np.pi * 12 * t + 6 * ph) > 0)
    elif k == 6:  # neigh: falling chirp with vibrato
        f = 900 * j - 500 * ((t + ph * 0.3) % 1.0) + 40 * np.sin(2 * np.pi * 7 * t)
        w = np.sin(2 * np.pi * np.cumsum(f) / sr)
    elif k == 7:  # chord: major triad, decaying
        f0 = 262 * j
        env = np.exp(-((t + ph * 0.5) % 1.0) * 3)
        w = sum(np.sin(2 * np.pi * f0 * r * t) for r in (1.0, 1.26, 1.5)) / 3 * env
    else:
        raise ValueError(recipe_index)
    w = w / (np.abs(w).max() + 1e-6)
    return w


def sound(cls: int, rng: np.random.Generator, seconds: float = SECONDS, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A mono float32 waveform of class ``cls`` with fresh nuisance variation (pitch, tempo, loudness, noise)."""
    w = _sound(cls, rng, seconds, sr) * rng.uniform(0.2, 0.4)
    w = w + rng.uniform(0.005, 0.03) * rng.standard_normal(len(w))
    return w.astype(np.float32)


# -------------------------------------------------------------------------------------------------- clips
@dataclass(frozen=True)
class Clip:
    """A clip of the world: the look's class, the sound's class, the frames and the soundtrack."""

    look: int
    sound: int
    frames: np.ndarray   # (n_frames, SIDE, SIDE, 3) uint8
    audio: np.ndarray    # (SAMPLE_RATE * seconds,) float32
    fps: float = FPS     # the frame rate the frames were drawn for

    @property
    def factual(self) -> bool:
        return self.look == self.sound

    @property
    def names(self) -> tuple[str, str]:
        return OBJECTS[self.look], SOUNDS[self.sound]


def _draw(look: int, rng: np.random.Generator, g: Geometry) -> np.ndarray:
    return frames(look, rng, g.n_frames, SIDE, g.speed)


def make_clip(look: int, sound_cls: int, rng: np.random.Generator, geometry: Geometry = DEFAULT) -> Clip:
    return Clip(look, sound_cls, _draw(look, rng, geometry), sound(sound_cls, rng, geometry.seconds), geometry.fps)


def clip_pairs(n: int, seed: int, geometry: Geometry = DEFAULT) -> list[tuple[Clip, Clip]]:
    """``n`` (factual, counterfactual) pairs: the same frames, the soundtrack swapped for another class's.

    The counterfactual's sound class is drawn uniformly from the other seven classes; its waveform is
    drawn fresh, and both soundtracks have the same length, so both inputs have the same token count."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        look = int(rng.integers(N_CLASSES))
        other = int((look + rng.integers(1, N_CLASSES)) % N_CLASSES)
        f = _draw(look, rng, geometry)
        fact = Clip(look, look, f, sound(look, rng, geometry.seconds), geometry.fps)
        cf = Clip(look, other, f, sound(other, rng, geometry.seconds), geometry.fps)
        pairs.append((fact, cf))
    return pairs


#: seed of the held-out evaluation set (training uses seeds below 1000)
EVAL_SEED = 12345


def eval_pairs(n: int = 96, geometry: Geometry = DEFAULT) -> list[tuple[Clip, Clip]]:
    """The held-out evaluation set: ``n`` factual/counterfactual pairs from a seed training never uses."""
    return clip_pairs(n, EVAL_SEED, geometry)
