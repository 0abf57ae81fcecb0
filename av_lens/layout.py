"""The modality layout: what every token position of an audio-visual prompt *is*.

An AVLLM's residual stream mixes text tokens, audio frames (40 ms each), image patches and video patches
(one per merged 28x28 patch per temporal grid step), and the markers that bracket them. Interpretability
questions are about these groups — "how much do generated tokens attend to video in layer 20?" — so
every run and cache in av_lens carries a :class:`ModalityLayout` computed from the token ids and the
media metadata, with, per position:

* ``modality``   — :class:`Modality` (text, audio, image, video, special marker, pad);
* ``item``       — which media item of that modality it belongs to (0, 1, ... within the sample; -1 for text);
* ``time``       — seconds from the start of its clip for audio and video tokens (NaN otherwise);
* ``position_ids`` — the 3-D TMRoPE (time, height, width) position the backbone rotates it by.

The positions follow Qwen2.5-Omni's rules (the thinker's ``get_rope_index``; tests check equality):
text is 1-D and continues after the previous block's maximum; audio advances one unit per 40 ms token;
image and video patches share a start and spread over (t, h, w), video time in units of 1/25 s; with
``use_audio_in_video`` a video and its soundtrack start together and are interleaved in 2-second chunks.

Selectors (:class:`Sel`, or strings such as ``"audio"``, ``"audio|video"``, ``"all but video"``,
``"generated"``) turn a layout into boolean masks, index lists and contiguous spans.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from av_lens.errors import LayoutError


class Modality(enum.IntEnum):
    TEXT = 0
    AUDIO = 1
    IMAGE = 2
    VIDEO = 3
    SPECIAL = 4
    PAD = 5


@dataclass(frozen=True)
class TokenIds:
    """The token ids a layout needs. ``markers`` names any other special id (``<|im_start|>`` ...).
    A model without audio (a vision-language base) passes -1 for the audio ids."""

    audio: int
    image: int
    video: int
    audio_bos: int
    audio_eos: int
    vision_bos: int
    vision_eos: int
    markers: dict[int, str] = field(default_factory=dict)

    def special_names(self) -> dict[int, str]:
        names = dict(self.markers)
        names.update({self.audio_bos: "audio_bos", self.audio_eos: "audio_eos",
                      self.vision_bos: "vision_bos", self.vision_eos: "vision_eos"})
        return {k: v for k, v in names.items() if k >= 0}  # -1: a token the model does not have (no audio)


@dataclass(frozen=True)
class MediaSpec:
    """Per-item media metadata, in processor order across the whole batch (as transformers passes it)."""

    audio_lengths: tuple[int, ...] = ()  # mel frames per audio item (feature_attention_mask.sum(-1))
    image_grid_thw: tuple[tuple[int, int, int], ...] = ()
    video_grid_thw: tuple[tuple[int, int, int], ...] = ()
    video_second_per_grid: tuple[float, ...] = ()
    use_audio_in_video: bool = False
    spatial_merge_size: int = 2
    position_id_per_seconds: int = 25
    seconds_per_chunk: float = 2.0
    #: position rules: "qwen2_5_omni" (TMRoPE: text after a vision block resumes at the block's largest position
    #: + 1, time in units of 1/``position_id_per_seconds`` s) or "qwen2_5_vl" (M-RoPE of the base VLM: text
    #: resumes at the block's start + max(h, w) merged patches; video time in units of
    #: 1/``position_id_per_seconds`` = 1/tokens_per_second s; images at t = start) or "1d" (Phi-4-multimodal:
    #: every real token, text, image or audio, advances the one position axis by one; pads sit at 0) or
    #: "video_salmonn2" (video-SALMONN-2+: Qwen2.5-VL's M-RoPE with audio inside ``<|vision_start|>`` blocks, see
    #: :meth:`_SampleBuilder._salmonn_av_block`; audio items' token counts in ``audio_token_counts``) or
    #: "video_salmonn2_inference" (what its published inference script runs with, see
    #: :meth:`_SampleBuilder._salmonn_inference_video_block`)
    rope_rules: str = "qwen2_5_omni"

    #: > 0 (Qwen3-Omni): audio is encoded in chunks of 2 * audio_n_window mel frames, 13 tokens per full chunk
    audio_n_window: int = 0
    #: rope_rules "1d" (Phi-4-multimodal): media are runs of their placeholder token without start/end markers;
    #: each item's token count in processor order across the batch (adjacent items of a kind share one run)
    image_token_counts: tuple[int, ...] = ()
    audio_token_counts: tuple[int, ...] = ()
    #: rope_rules "1d": seconds per audio token (its time stamp is k * audio_token_seconds; 0: no times), or per
    #: step of ``audio_step_tokens`` tokens (token k at (k // audio_step_tokens) * audio_token_seconds: BEATs)
    audio_token_seconds: float = 0.0
    audio_step_tokens: int = 1
    #: rope_rules "1d" (VideoLLaMA2): each video's token count, tokens per temporal step of its grid, and (in
    #: ``video_second_per_grid``) seconds per step: token j has time stamp (j // step_tokens) * seconds
    video_token_counts: tuple[int, ...] = ()
    video_step_tokens: tuple[int, ...] = ()

    @staticmethod
    def audio_tokens(n_mel_frames: int, n_window: int = 0) -> int:
        """Audio tokens from mel frames. Qwen2.5-Omni: conv stride 2 then average-pool 2 (25 tokens per
        second). Qwen3-Omni (``n_window`` > 0): three stride-2 convolutions per chunk of 2 * n_window frames."""
        if n_window > 0:
            chunk = 2 * n_window
            rest = n_mel_frames % chunk
            feat = (rest - 1) // 2 + 1
            return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (n_mel_frames // chunk) * 13
        return ((n_mel_frames - 1) // 2 + 1 - 2) // 2 + 1

    @property
    def float_positions(self) -> bool:
        """Qwen3-Omni keeps fractional video time positions (float32), as its reference does."""
        return self.rope_rules == "qwen3_omni"


@dataclass(frozen=True)
class MediaItem:
    """One audio clip, image or video in a sample, and where its tokens sit."""

    modality: Modality
    sample: int
    index: int  # index among this modality's items in the sample
    global_index: int  # index in the batch-wide processor order
    n_tokens: int
    grid_thw: tuple[int, int, int] | None = None
    seconds_per_grid: float | None = None
    duration_s: float | None = None
    with_audio: bool = False  # a video whose soundtrack is interleaved with it (use_audio_in_video)


# --------------------------------------------------------------------------------------------- builder
def _chunk_bounds(t_rel: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """Split a non-decreasing sequence of time offsets into consecutive chunks of ``per_chunk`` units.

    A new chunk starts at the first element whose offset reaches ``k * per_chunk`` for the current chunk
    counter k; the counter advances by one per split (so, as in Qwen2.5-Omni, a jump of several chunk
    widths splits at consecutive elements).
    """
    bounds, start, k = [], 0, 1
    for i, t in enumerate(t_rel.tolist()):
        if t >= k * per_chunk:
            bounds.append((start, i))
            start, k = i, k + 1
    bounds.append((start, len(t_rel)))
    return bounds


class _SampleBuilder:
    """Walks one sample's real tokens left to right and assigns modality, item, time and 3-D positions."""

    def __init__(self, ids: np.ndarray, tokens: TokenIds, media: MediaSpec, counters: dict, sample: int):
        n = len(ids)
        self.ids, self.tok, self.media, self.c, self.sample = ids, tokens, media, counters, sample
        self.mod = np.full(n, int(Modality.TEXT), dtype=np.int64)
        self.item = np.full(n, -1, dtype=np.int64)
        self.time = np.full(n, np.nan, dtype=np.float64)
        self.pos = np.zeros((3, n), dtype=np.float64 if media.float_positions else np.int64)
        self.items: list[MediaItem] = []
        self.local = {Modality.AUDIO: 0, Modality.IMAGE: 0, Modality.VIDEO: 0}
        self.next_pos = 0
        self.special = set(tokens.special_names())

    # -- helpers -----------------------------------------------------------------------------
    def _expect_run(self, start: int, token: int, n: int, what: str, source: str) -> None:
        ids = self.ids
        run = 0
        while start + run < len(ids) and ids[start + run] == token:
            run += 1
        if run != n:
            raise LayoutError(
                f"sample {self.sample}: {what} has {run} placeholder tokens in the text but {source} gives {n}",
                "build inputs with `model.prepare(...)` (the processor expands each placeholder to the right "
                "count), or pass the media that the text was expanded for",
            )

    def _expect_token(self, i: int, token: int, name: str, after: str) -> None:
        if i >= len(self.ids) or self.ids[i] != token:
            found = "the end of the sequence" if i >= len(self.ids) else f"token id {int(self.ids[i])}"
            raise LayoutError(f"sample {self.sample}: expected {name} after {after}, found {found}",
                              f"close every media block with its end marker ({name})")

    def _take(self, key: str, seq: tuple, what: str):
        k = self.c[key]
        if k >= len(seq):
            raise LayoutError(
                f"sample {self.sample}: the text has more {what} blocks than {what} inputs ({len(seq)} given)",
                f"pass one {what} per placeholder block, in order",
            )
        self.c[key] = k + 1
        return k, seq[k]

    def _new_item(self, modality: Modality, gidx: int, n: int, **kw) -> int:
        local = self.local[modality]
        self.local[modality] += 1
        self.items.append(MediaItem(modality, self.sample, local, gidx, n, **kw))
        return local

    def _vision_positions(self, grid: tuple[int, int, int], t_index: np.ndarray, start: int) -> np.ndarray:
        m = self.media.spatial_merge_size
        gh, gw = grid[1] // m, grid[2] // m
        t = np.repeat(t_index, gh * gw)
        h = np.tile(np.repeat(np.arange(gh), gw), len(t_index))
        w = np.tile(np.arange(gw), len(t_index) * gh)
        return np.stack([t, h, w]) + start

    def _after_vision(self, block: np.ndarray, grid: tuple[int, int, int], start: int) -> int:
        """Position of the token after a vision block (its end marker)."""
        if self.media.rope_rules == "qwen2_5_vl":
            m = self.media.spatial_merge_size
            return start + max(grid[1] // m, grid[2] // m)
        if self.media.float_positions:  # Qwen3-Omni: text continues from a fractional last time, unrounded
            return block.max() + 1
        return int(block.max()) + 1

    def _marker(self, i: int, pos: int, item: int = -1) -> None:
        self.mod[i] = int(Modality.SPECIAL)
        self.pos[:, i] = pos
        self.item[i] = item

    # -- blocks -------------------------------------------------------------------------------
    def _audio_block(self, i: int) -> int:
        g, n_mel = self._take("audio", self.media.audio_lengths, "audio")
        n = MediaSpec.audio_tokens(int(n_mel), self.media.audio_n_window)
        if n <= 0:
            raise LayoutError(f"sample {self.sample}: audio item {g} has {n_mel} mel frames, too few for one token",
                              "pass at least 40 ms of audio")
        self._expect_run(i + 1, self.tok.audio, n, f"audio item {g}", f"its {n_mel} mel frames")
        self._expect_token(i + 1 + n, self.tok.audio_eos, "<|audio_eos|>", f"audio item {g}")
        local = self._new_item(Modality.AUDIO, g, n, duration_s=n / self.media.position_id_per_seconds)
        p = self.next_pos
        self._marker(i, p, local)
        sl = slice(i + 1, i + 1 + n)
        self.mod[sl] = int(Modality.AUDIO)
        self.item[sl] = local
        self.time[sl] = np.arange(n) / self.media.position_id_per_seconds
        self.pos[:, sl] = p + 1 + np.arange(n)
        self._marker(i + 1 + n, p + n + 1, local)
        self.next_pos = p + n + 2
        return i + n + 2

    def _image_block(self, i: int) -> int:
        g, grid = self._take("image", self.media.image_grid_thw, "image")
        m2 = self.media.spatial_merge_size ** 2
        n = int(np.prod(grid)) // m2
        self._expect_run(i + 1, self.tok.image, n, f"image item {g}", f"its grid {tuple(grid)}")
        self._expect_token(i + 1 + n, self.tok.vision_eos, "<|vision_eos|>", f"image item {g}")
        local = self._new_item(Modality.IMAGE, g, n, grid_thw=tuple(int(x) for x in grid))
        p = self.next_pos
        self._marker(i, p, local)
        scale = 1 if self.media.rope_rules == "qwen2_5_vl" else self.media.position_id_per_seconds
        t_index = np.arange(grid[0]) * scale
        block = self._vision_positions(grid, t_index, p + 1)
        sl = slice(i + 1, i + 1 + n)
        self.mod[sl] = int(Modality.IMAGE)
        self.item[sl] = local
        self.pos[:, sl] = block
        eos = self._after_vision(block, grid, p + 1)
        self._marker(i + 1 + n, eos, local)
        self.next_pos = eos + 1
        return i + n + 2

    def _video_meta(self):
        g, grid = self._take("video", self.media.video_grid_thw, "video")
        if g >= len(self.media.video_second_per_grid):
            raise LayoutError(f"video item {g} has no seconds-per-grid value",
                              "pass video_second_per_grid (the processor returns it)")
        spg = float(self.media.video_second_per_grid[g])
        m = self.media.spatial_merge_size
        per_t = (grid[1] // m) * (grid[2] // m)
        # torch float32 arithmetic then truncation, in the order the reference implementation multiplies
        spg32 = torch.tensor(spg, dtype=torch.float32)
        if self.media.rope_rules == "qwen2_5_vl":
            t_index = (torch.arange(grid[0]) * (self.media.position_id_per_seconds * spg32)).long().numpy()
        elif self.media.float_positions:  # Qwen3-Omni: no truncation
            t_index = (torch.arange(grid[0]) * spg32 * self.media.position_id_per_seconds).float().numpy()
        else:
            t_index = (torch.arange(grid[0]).float() * spg32 * self.media.position_id_per_seconds).long().numpy()
        return g, tuple(int(x) for x in grid), spg, per_t, t_index

    def _video_block(self, i: int) -> int:
        g, grid, spg, per_t, t_index = self._video_meta()
        n = grid[0] * per_t
        self._expect_run(i + 1, self.tok.video, n, f"video item {g}", f"its grid {grid}")
        self._expect_token(i + 1 + n, self.tok.vision_eos, "<|vision_eos|>", f"video item {g}")
        local = self._new_item(Modality.VIDEO, g, n, grid_thw=grid, seconds_per_grid=spg, duration_s=grid[0] * spg)
        p = self.next_pos
        self._marker(i, p, local)
        block = self._vision_positions(grid, t_index, p + 1)
        sl = slice(i + 1, i + 1 + n)
        self.mod[sl] = int(Modality.VIDEO)
        self.item[sl] = local
        self.time[sl] = np.repeat(np.arange(grid[0]) * spg, per_t)
        self.pos[:, sl] = block
        eos = self._after_vision(block, grid, p + 1)
        self._marker(i + 1 + n, eos, local)
        self.next_pos = eos + 1
        return i + n + 2

    def _audio_video_block(self, i: int) -> int:
        """<|vision_bos|><|audio_bos|> V0 A0 V1 A1 ... <|audio_eos|><|vision_eos|> with shared time axis."""
        g, grid, spg, per_t, t_index = self._video_meta()
        ga, n_mel = self._take("audio", self.media.audio_lengths, "audio")
        n_a = MediaSpec.audio_tokens(int(n_mel), self.media.audio_n_window)
        n_v = grid[0] * per_t
        p = self.next_pos
        start = p + 1
        v_block = self._vision_positions(grid, t_index, start)
        a_block = np.tile(start + np.arange(n_a), (3, 1))
        per_chunk = int(self.media.position_id_per_seconds * self.media.seconds_per_chunk)
        v_chunks = _chunk_bounds(v_block[0] - start, per_chunk)
        a_chunks = _chunk_bounds(a_block[0] - start, per_chunk)
        v_time = np.repeat(np.arange(grid[0]) * spg, per_t)
        a_time = np.arange(n_a) / self.media.position_id_per_seconds
        lv = self._new_item(Modality.VIDEO, g, n_v, grid_thw=grid, seconds_per_grid=spg,
                            duration_s=grid[0] * spg, with_audio=True)
        la = self._new_item(Modality.AUDIO, ga, n_a, duration_s=n_a / self.media.position_id_per_seconds)
        self._marker(i, p, lv)
        self._expect_token(i + 1, self.tok.audio_bos, "<|audio_bos|>", "<|vision_bos|> of a video with audio")
        self._marker(i + 1, p, la)
        j = i + 2
        last_max = p
        for c in range(max(len(v_chunks), len(a_chunks))):
            for chunks, token, block, times, mod, local, name in (
                (v_chunks, self.tok.video, v_block, v_time, Modality.VIDEO, lv, "video"),
                (a_chunks, self.tok.audio, a_block, a_time, Modality.AUDIO, la, "audio"),
            ):
                if c >= len(chunks):
                    continue
                a, b = chunks[c]
                seg = slice(j, j + b - a)
                got = self.ids[seg]
                if len(got) != b - a or not np.all(got == token):
                    raise LayoutError(
                        f"sample {self.sample}: video item {g} with audio item {ga}: chunk {c} should hold "
                        f"{b - a} {name} tokens at positions {j}..{j + b - a - 1} (2-second interleaving)",
                        "let the processor expand video-with-audio prompts (use_audio_in_video=True on both "
                        "the processor and the model), or pass use_audio_in_video=False",
                    )
                self.mod[seg] = int(mod)
                self.item[seg] = local
                self.time[seg] = times[a:b]
                self.pos[:, seg] = block[:, a:b]
                last_max = int(block[:, a:b].max())
                j += b - a
        self._expect_token(j, self.tok.audio_eos, "<|audio_eos|>", f"video item {g} with audio")
        self._expect_token(j + 1, self.tok.vision_eos, "<|vision_eos|>", f"video item {g} with audio")
        eos = last_max + 1
        self._marker(j, eos, la)
        self._marker(j + 1, eos, lv)
        self.next_pos = eos + 1
        return j + 2

    def _audio_video_block_by_time(self, i: int) -> int:
        """Qwen3-Omni's video with audio: <|vision_start|><|audio_start|> (two positions), then video and audio
        tokens merged by time position (a video token goes first when its time is not later than the audio
        token's), then <|audio_end|><|vision_end|> (two positions after the last token's)."""
        g, grid, spg, per_t, t_index = self._video_meta()
        ga, n_mel = self._take("audio", self.media.audio_lengths, "audio")
        n_a = MediaSpec.audio_tokens(int(n_mel), self.media.audio_n_window)
        n_v = grid[0] * per_t
        p = self.next_pos
        start = p + 2
        v_block = self._vision_positions(grid, t_index, start)
        a_block = np.tile(start + np.arange(n_a, dtype=self.pos.dtype), (3, 1))
        v_time = np.repeat(np.arange(grid[0]) * spg, per_t)
        a_time = np.arange(n_a) / self.media.position_id_per_seconds
        lv = self._new_item(Modality.VIDEO, g, n_v, grid_thw=grid, seconds_per_grid=spg,
                            duration_s=grid[0] * spg, with_audio=True)
        la = self._new_item(Modality.AUDIO, ga, n_a, duration_s=n_a / self.media.position_id_per_seconds)
        self._marker(i, p, lv)
        self._expect_token(i + 1, self.tok.audio_bos, "<|audio_start|>", "<|vision_start|> of a video with audio")
        self._marker(i + 1, p + 1, la)
        order, vi, ai = [], 0, 0  # (is_video, index) in token order
        while vi < n_v and ai < n_a:
            if v_block[0, vi] <= a_block[0, ai]:
                order.append((True, vi))
                vi += 1
            else:
                order.append((False, ai))
                ai += 1
        # the reference appends the leftover tokens of one kind as one piece; the end markers follow its maximum
        last_max = v_block[:, vi:].max() if vi < n_v else a_block[:, n_a - 1].max()
        order += [(True, k) for k in range(vi, n_v)] + [(False, k) for k in range(ai, n_a)]
        j = i + 2
        got = self.ids[j:j + len(order)]
        want = np.array([self.tok.video if is_v else self.tok.audio for is_v, _ in order])
        if len(got) != len(want) or not np.all(got == want):
            raise LayoutError(
                f"sample {self.sample}: video item {g} with audio item {ga} should hold {n_v} video and {n_a} audio "
                f"tokens merged by time from index {j}",
                "let the processor expand video-with-audio prompts (use_audio_in_video=True on both the processor "
                "and the model), or pass use_audio_in_video=False")
        for is_v, k in order:
            self.mod[j] = int(Modality.VIDEO if is_v else Modality.AUDIO)
            self.item[j] = lv if is_v else la
            self.time[j] = v_time[k] if is_v else a_time[k]
            self.pos[:, j] = v_block[:, k] if is_v else a_block[:, k]
            j += 1
        self._expect_token(j, self.tok.audio_eos, "<|audio_end|>", f"video item {g} with audio")
        self._expect_token(j + 1, self.tok.vision_eos, "<|vision_end|>", f"video item {g} with audio")
        self._marker(j, last_max + 1, la)
        self._marker(j + 1, last_max + 2, lv)
        self.next_pos = last_max + 3
        return j + 2

    def _salmonn_positions_after(self, block: np.ndarray, j: int, kind: int) -> int:
        """video-SALMONN-2+: text after an audio-carrying block resumes at the block's largest *time* position + 1
        when no other block of that kind (``kind``: the token after ``<|vision_start|>``) follows in the sample,
        else at its largest position on any axis + 1 (the published ``get_rope_index`` treats the last block and
        the ones before it differently)."""
        rest = self.ids[j:]
        more = bool(np.any((rest[:-1] == self.tok.vision_bos) & (rest[1:] == kind))) if len(rest) > 1 else False
        return int(block.max()) + 1 if more else int(block[0].max()) + 1

    def _salmonn_tag(self, i: int, g: int, ga: int | None, grid, spg: float, per_t: int, n_a: int):
        """Tag a video block of video-SALMONN-2+ opened at index i: its n_v video and n_a audio tokens, in any order,
        get their items and time stamps (``ga``: the soundtrack's audio item, None for a silent video). Returns
        (video item, audio item or None, video indices, audio indices)."""
        n_v = grid[0] * per_t
        lv = self._new_item(Modality.VIDEO, g, n_v, grid_thw=grid, seconds_per_grid=spg, duration_s=grid[0] * spg,
                            with_audio=ga is not None)
        seg = self.ids[i + 1:i + 1 + n_v + n_a]
        is_v, is_a = seg == self.tok.video, seg == self.tok.audio
        if len(seg) != n_v + n_a or int(is_v.sum()) != n_v or int(is_a.sum()) != n_a:
            raise LayoutError(
                f"sample {self.sample}: video item {g} should hold {n_v} video and {n_a} audio tokens after its "
                f"<|vision_start|> (index {i}), found {int(is_v.sum())} and {int(is_a.sum())}",
                "build video prompts with model.prepare(videos=[...], video_audio=[...]) (it interleaves each grid "
                "step's audio after its video tokens), or pass the media the text was expanded for")
        vi, ai = np.flatnonzero(is_v) + i + 1, np.flatnonzero(is_a) + i + 1
        self.mod[vi], self.item[vi] = int(Modality.VIDEO), lv
        self.time[vi] = np.repeat(np.arange(grid[0]) * spg, per_t)
        la = None
        if ga is not None:
            la = self._new_item(Modality.AUDIO, ga, n_a, duration_s=n_a * self.media.audio_token_seconds or None)
            self.mod[ai], self.item[ai] = int(Modality.AUDIO), la
            self.time[ai] = np.arange(n_a) * self.media.audio_token_seconds
        return lv, la, vi, ai

    def _salmonn_av_block(self, i: int) -> int:
        """video-SALMONN-2+'s video with its soundtrack: ``<|vision_start|>`` then, per temporal grid step, that
        step's video tokens followed by a run of audio tokens, then ``<|vision_end|>``. Video tokens take Qwen2.5-VL
        positions (t = floor(step * seconds_per_grid * 2), h, w); audio token k takes (k, 0, k); both offset by the
        position after ``<|vision_start|>``, assigned in token order within each kind (so the grouping of audio
        runs does not move any position, as in the published code)."""
        g, grid, spg, per_t, t_index = self._video_meta()
        ga, n_a = self._take("audio", self.media.audio_token_counts, "audio")
        p = self.next_pos
        start = p + 1
        v_block = self._vision_positions(grid, t_index, start)
        k = np.arange(n_a)
        a_block = np.stack([k, np.zeros_like(k), k]) + start
        lv, _, vi, ai = self._salmonn_tag(i, g, ga, grid, spg, per_t, n_a)
        self._marker(i, p, lv)
        sl = slice(i + 1, i + 1 + grid[0] * per_t + n_a)
        self.pos[:, vi], self.pos[:, ai] = v_block, a_block
        j = sl.stop
        self._expect_token(j, self.tok.vision_eos, "<|vision_end|>", f"video item {g} with audio")
        block = np.concatenate([v_block, a_block], axis=1)
        nxt = self._salmonn_positions_after(block, j + 1, self.tok.video)
        self._marker(j, nxt, lv)
        self.next_pos = nxt + 1
        return j + 1

    def _salmonn_audio_block(self, i: int) -> int:
        """video-SALMONN-2+'s standalone audio: ``<|vision_start|>`` + audio tokens + ``<|vision_end|>``; audio token
        k at (k, k, 0) after the start marker's position; text resumes at the block's largest position + 1. Under
        the published inference script's rules no audio_lengths reach the model, so the tokens are text to its
        ``get_rope_index``: (k, k, k)."""
        g, n = self._take("audio", self.media.audio_token_counts, "audio")
        self._expect_run(i + 1, self.tok.audio, n, f"audio item {g}", "its windows")
        self._expect_token(i + 1 + n, self.tok.vision_eos, "<|vision_end|>", f"audio item {g}")
        local = self._new_item(Modality.AUDIO, g, n, duration_s=n * self.media.audio_token_seconds or None)
        p = self.next_pos
        self._marker(i, p, local)
        sl = slice(i + 1, i + 1 + n)
        k = np.arange(n)
        self.mod[sl], self.item[sl] = int(Modality.AUDIO), local
        self.time[sl] = k * self.media.audio_token_seconds
        w = k if self.media.rope_rules == "video_salmonn2_inference" else np.zeros_like(k)
        self.pos[:, sl] = np.stack([k, k, w]) + p + 1
        self._marker(i + 1 + n, p + n + 1, local)
        self.next_pos = p + n + 2
        return i + n + 2

    def _salmonn_inference_video_block(self, i: int) -> int:
        """The positions video-SALMONN-2+'s published ``inference.py`` runs with: its ``generate`` drops the
        dataset's position ids and passes neither ``audio_lengths`` nor ``second_per_grid_ts``, so the model's
        vision-only branch places the first grid-size tokens after ``<|vision_start|>`` (whichever kind they are)
        on the video grid at 1 s per step (time = step x 2), and every later token of the block, its end marker
        and the text after it 1-D from the grid's largest position + 1. Tags and time stamps stay the tokens' own."""
        g, grid, spg, per_t, _ = self._video_meta()
        n_v = grid[0] * per_t
        has_audio = self._salmonn_video_has_audio(i)
        ga, n_a = self._take("audio", self.media.audio_token_counts, "audio") if has_audio else (None, 0)
        if has_audio and any(it.with_audio for it in self.items):
            raise LayoutError(f"sample {self.sample}: a second video with audio under rope_rules "
                              "'video_salmonn2_inference'; the published inference positions (its vision-only branch "
                              "over interleaved blocks) are defined for one such video per prompt",
                              "put one video with its soundtrack per prompt, or use rope_rules 'video_salmonn2' (the "
                              "trained rules)")
        t_index = (torch.arange(grid[0]) * torch.tensor(1.0, dtype=torch.float32) * 2).long().numpy()
        p = self.next_pos
        block = self._vision_positions(grid, t_index, p + 1)
        lv, _, _, _ = self._salmonn_tag(i, g, ga, grid, spg, per_t, n_a)
        self._marker(i, p, lv)
        self.pos[:, i + 1:i + 1 + n_v] = block
        q = int(block.max()) + 1
        rest = np.arange(i + 1 + n_v, i + 1 + n_v + n_a)
        self.pos[:, rest] = q + np.arange(n_a)
        j = i + 1 + n_v + n_a
        self._expect_token(j, self.tok.vision_eos, "<|vision_end|>", f"video item {g}")
        self._marker(j, q + n_a, lv)
        self.next_pos = q + n_a + 1
        return j + 1

    def _salmonn_video_has_audio(self, i: int) -> bool:
        """Whether the video block opened at index i holds audio tokens before its ``<|vision_end|>``."""
        rest = self.ids[i + 1:]
        end = np.flatnonzero(rest == self.tok.vision_eos)
        body = rest[:end[0]] if len(end) else rest
        return bool(np.any(body == self.tok.audio))

    def _run_1d(self, i: int) -> int:
        """A run of image, video or audio placeholder tokens (rope_rules "1d"): split into items by their token
        counts; positions simply continue."""
        t = int(self.ids[i])
        kind, modality = {self.tok.image: ("image", Modality.IMAGE), self.tok.video: ("video", Modality.VIDEO)}.get(
            t, ("audio", Modality.AUDIO))
        counts = {"image": self.media.image_token_counts, "video": self.media.video_token_counts,
                  "audio": self.media.audio_token_counts}[kind]
        run = 0
        while i + run < len(self.ids) and self.ids[i + run] == t:
            run += 1
        j = i
        while j < i + run:
            g, n = self._take(kind, counts, kind)
            if n <= 0 or j + n > i + run:
                raise LayoutError(f"sample {self.sample}: {kind} item {g} needs {n} placeholder tokens but the run at "
                                  f"index {i} has {i + run - j} left",
                                  "build inputs with `model.prepare(...)` (the processor expands each placeholder to "
                                  "the right count), or pass the media that the text was expanded for")
            sec = self.media.audio_token_seconds if kind == "audio" else 0.0
            step = self.media.audio_step_tokens
            times, kw = ((np.arange(n) // step) * sec, dict(duration_s=-(-n // step) * sec)) if sec else (None, {})
            if kind == "video" and g < len(self.media.video_second_per_grid):
                spg, step = float(self.media.video_second_per_grid[g]), int(self.media.video_step_tokens[g])
                times = (np.arange(n) // step) * spg
                kw = dict(seconds_per_grid=spg, duration_s=-(-n // step) * spg)
            local = self._new_item(modality, g, n, **kw)
            sl = slice(j, j + n)
            self.mod[sl] = int(modality)
            self.item[sl] = local
            if times is not None:
                self.time[sl] = times
            self.pos[:, sl] = self.next_pos + np.arange(n)
            self.next_pos += n
            j += n
        return j

    def run(self):
        ids, tok, i = self.ids, self.tok, 0
        while i < len(ids):
            t = int(ids[i])
            nxt = int(ids[i + 1]) if i + 1 < len(ids) else None
            if self.media.rope_rules == "1d" and t in (tok.image, tok.audio, tok.video) and t >= 0:
                i = self._run_1d(i)
            elif self.media.rope_rules.startswith("video_salmonn2") and t == tok.vision_bos and nxt == tok.audio:
                i = self._salmonn_audio_block(i)
            elif self.media.rope_rules == "video_salmonn2_inference" and t == tok.vision_bos and nxt == tok.video:
                i = self._salmonn_inference_video_block(i)
            elif (self.media.rope_rules == "video_salmonn2" and t == tok.vision_bos and nxt == tok.video
                  and self._salmonn_video_has_audio(i)):
                i = self._salmonn_av_block(i)
            elif t == tok.audio_bos and nxt == tok.audio:
                i = self._audio_block(i)
            elif t == tok.vision_bos and nxt == tok.image:
                i = self._image_block(i)
            elif t == tok.vision_bos and nxt == tok.audio_bos and self.media.use_audio_in_video:
                i = (self._audio_video_block_by_time(i) if self.media.rope_rules == "qwen3_omni"
                     else self._audio_video_block(i))
            elif t == tok.vision_bos and nxt == tok.video:
                if self.media.use_audio_in_video:
                    raise LayoutError(
                        f"sample {self.sample}: a video block without its audio while use_audio_in_video=True",
                        "pass each video's soundtrack (audio=[...]) or set use_audio_in_video=False",
                    )
                i = self._video_block(i)
            elif t in (tok.audio, tok.image, tok.video):
                name = {tok.audio: "<|AUDIO|>", tok.image: "<|IMAGE|>", tok.video: "<|VIDEO|>"}[t]
                raise LayoutError(f"sample {self.sample}: placeholder {name} at index {i} is not preceded by its "
                                  f"start marker", "wrap media placeholders as <|audio_bos|><|AUDIO|><|audio_eos|>, "
                                  "<|vision_bos|><|IMAGE|><|vision_eos|> or <|vision_bos|><|VIDEO|><|vision_eos|>")
            else:
                self.mod[i] = int(Modality.SPECIAL if t in self.special else Modality.TEXT)
                self.pos[:, i] = self.next_pos
                self.next_pos += 1
                i += 1
        return self


def build_layout(
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    tokens: TokenIds,
    media: MediaSpec,
) -> "ModalityLayout":
    """Compute the layout of a (possibly left-padded) batch. Raises :class:`LayoutError` on inconsistencies."""
    if input_ids.ndim != 2:
        raise LayoutError(f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}",
                          "add a batch dimension with input_ids[None]" if input_ids.ndim == 1 else
                          "pass integer token ids of shape [batch, pos] (not embeddings or one-hot vectors)")
    ids_np = input_ids.detach().cpu().numpy()
    B, T = ids_np.shape
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).detach().cpu().numpy().astype(bool)
    mod = np.full((B, T), int(Modality.PAD), dtype=np.int64)
    item = np.full((B, T), -1, dtype=np.int64)
    time = np.full((B, T), np.nan, dtype=np.float64)
    if media.float_positions:  # Qwen3-Omni: float positions, pads at 0
        pos, deltas = np.zeros((3, B, T), dtype=np.float64), np.zeros((B, 1), dtype=np.float64)
    elif media.rope_rules == "1d":  # pads at 0, as transformers' generate (attention_mask.cumsum - 1, pads 0)
        pos, deltas = np.zeros((3, B, T), dtype=np.int64), np.zeros((B, 1), dtype=np.int64)
    else:
        pos = np.ones((3, B, T), dtype=np.int64)  # pads keep position 1, as the reference does
        deltas = np.zeros((B, 1), dtype=np.int64)
    counters = {"audio": 0, "image": 0, "video": 0}
    items: list[MediaItem] = []
    for b in range(B):
        real = mask[b]
        sb = _SampleBuilder(ids_np[b][real], tokens, media, counters, b).run()
        mod[b, real], item[b, real], time[b, real] = sb.mod, sb.item, sb.time
        pos[:, b, real] = sb.pos
        n_real = int(real.sum())
        deltas[b, 0] = (sb.pos.max() + 1 - n_real) if n_real else 0
        items.extend(sb.items)
    one_d = media.rope_rules == "1d"
    if media.rope_rules == "video_salmonn2":
        _check_salmonn_batch(items)
    for key, seq in (("audio", media.audio_token_counts if one_d or media.rope_rules.startswith("video_salmonn2")
                      else media.audio_lengths),
                     ("image", media.image_token_counts if one_d else media.image_grid_thw),
                     ("video", media.video_token_counts if one_d else media.video_grid_thw)):
        if counters[key] != len(seq):
            raise LayoutError(f"{len(seq)} {key} input(s) given but the text has {counters[key]} {key} placeholder "
                              f"block(s)", f"add one placeholder block per {key} input, or drop the extra {key}")
    return ModalityLayout(
        modality=torch.from_numpy(mod), item=torch.from_numpy(item), time=torch.from_numpy(time).float(),
        position_ids=torch.from_numpy(pos).to(torch.float32 if media.float_positions else torch.int64),
        attention_mask=torch.from_numpy(mask.astype(np.int64)), token_ids=input_ids.detach().cpu().long(),
        rope_deltas=torch.from_numpy(deltas).to(torch.float32 if media.float_positions else torch.int64), prompt_len=T,
        items=tuple(items), special_names=tokens.special_names(), use_audio_in_video=media.use_audio_in_video,
    )


def _check_salmonn_batch(items: list[MediaItem]) -> None:
    """video-SALMONN-2+'s ``get_rope_index`` picks one branch per batch: videos with audio (every video must carry
    its soundtrack; images and standalone audio are not handled there), vision only, or audio only. A batch that
    mixes them would be given positions the model was never run with, so it is refused."""
    n_av = sum(it.with_audio for it in items)  # each carries one audio item (its soundtrack)
    av = n_av > 0
    has = {m: any(it.modality == m and not it.with_audio for it in items) for m in (Modality.IMAGE, Modality.VIDEO)}
    has[Modality.AUDIO] = sum(it.modality == Modality.AUDIO for it in items) > n_av
    if av and (has[Modality.AUDIO] or has[Modality.IMAGE] or has[Modality.VIDEO]):
        other = [n for m, n in ((Modality.AUDIO, "standalone audio"), (Modality.IMAGE, "images"),
                                (Modality.VIDEO, "videos without audio")) if has[m]]
        raise LayoutError(f"video-SALMONN-2+ input mixes videos with audio and {', '.join(other)}; the model's "
                          "position rules (get_rope_index) handle videos with audio only on their own",
                          "run videos with audio in a separate batch from images, standalone audio and silent videos")
    if has[Modality.AUDIO] and (has[Modality.IMAGE] or has[Modality.VIDEO]):
        raise LayoutError("video-SALMONN-2+ input mixes standalone audio with images or videos; the model's position "
                          "rules give audio positions only in audio-only batches or as a video's soundtrack",
                          "pass the audio as the video's soundtrack (video_audio=[...]) or run it in its own batch")


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ModalityLayout:
    """Per-position modality tags of a batch. All tensors live on the CPU; index with ``.to(device)`` masks."""

    modality: Int[Tensor, "batch pos"]
    item: Int[Tensor, "batch pos"]
    time: Float[Tensor, "batch pos"]
    position_ids: Int[Tensor, "3 batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    token_ids: Int[Tensor, "batch pos"]
    rope_deltas: Int[Tensor, "batch 1"]
    prompt_len: int
    items: tuple[MediaItem, ...] = ()
    special_names: dict[int, str] = field(default_factory=dict)
    use_audio_in_video: bool = False

    # -- shape ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.modality.shape)

    @property
    def batch_size(self) -> int:
        return self.modality.shape[0]

    def __len__(self) -> int:
        return self.modality.shape[1]

    @property
    def is_generated(self) -> Bool[Tensor, "batch pos"]:
        gen = torch.zeros(self.shape, dtype=torch.bool)
        gen[:, self.prompt_len:] = True
        return gen

    def _check_batch(self, batch: int) -> None:
        n = self.modality.shape[0]
        if not -n <= batch < n:
            raise LayoutError(f"sample {batch} is out of range: this layout holds {n} sample(s)",
                              f"pass batch= in 0..{n - 1}")

    # -- selection -----------------------------------------------------------------------------
    def mask(self, sel: "SelectorLike") -> Bool[Tensor, "batch pos"]:
        """Boolean [batch, pos] mask of the positions a selector picks (pads are never selected)."""
        m = as_selector(sel)(self)
        return m & (self.modality != int(Modality.PAD))

    def positions(self, sel: "SelectorLike", batch: int = 0) -> Int[Tensor, "n"]:
        """Indices (into the padded sequence) of the selected positions of one sample."""
        self._check_batch(batch)
        idx = self.mask(sel)[batch].nonzero().squeeze(-1)
        return idx

    def spans(self, sel: "SelectorLike", batch: int = 0) -> list[tuple[int, int]]:
        """Contiguous half-open ``(start, stop)`` runs of selected positions in one sample."""
        self._check_batch(batch)
        m = self.mask(sel)[batch].numpy().astype(np.int8)
        edges = np.diff(np.concatenate([[0], m, [0]]))
        return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))

    def count(self, sel: "SelectorLike", batch: int = 0) -> int:
        self._check_batch(batch)
        return int(self.mask(sel)[batch].sum())

    def counts(self, batch: int = 0) -> dict[str, int]:
        """Token counts per modality in one sample (generated tokens counted separately)."""
        self._check_batch(batch)
        out = {m.name.lower(): int(((self.modality[batch] == int(m)) & ~self.is_generated[batch]).sum())
               for m in Modality}
        out["generated"] = int((self.is_generated[batch] & (self.modality[batch] != int(Modality.PAD))).sum())
        return out

    def _kind(self, batch: int, p: int, with_time: bool) -> str:
        m = Modality(int(self.modality[batch, p]))
        if m is Modality.SPECIAL:
            return f"<{self.special_names.get(int(self.token_ids[batch, p]), 'special')}>"
        if m is Modality.PAD:
            return "pad"
        if p >= self.prompt_len:
            return "generated"
        if m is Modality.TEXT:
            return "text"
        label = f"{m.name.lower()} {int(self.item[batch, p])}"
        t = float(self.time[batch, p])
        return label + (f" @{t:.2f}s" if with_time and not math.isnan(t) else "")

    def labels(self, batch: int = 0) -> list[str]:
        """One short label per position ("text", "audio 0 @1.24s", "video 0 @2.00s", "<vision_bos>", ...)."""
        self._check_batch(batch)
        return [self._kind(batch, p, with_time=True) for p in range(len(self))]

    def summary(self, batch: int = 0) -> str:
        """A run-length table of the sample: kind, index range, count, first/last 3-D position, times."""
        self._check_batch(batch)
        kinds = [self._kind(batch, p, with_time=False) for p in range(len(self))]
        lines = [f"{'kind':16s} {'index':>11s} {'n':>5s}  {'pos (t,h,w) first .. last':32s} time"]
        s = 0
        for i in range(1, len(kinds) + 1):
            if i == len(kinds) or kinds[i] != kinds[s]:
                p0, p1 = self.position_ids[:, batch, s].tolist(), self.position_ids[:, batch, i - 1].tolist()
                t0, t1 = float(self.time[batch, s]), float(self.time[batch, i - 1])
                tstr = "" if math.isnan(t0) else f"{t0:.2f}-{t1:.2f}s"
                lines.append(f"{kinds[s]:16s} {s:5d}..{i - 1:<5d} {i - s:5d}  {str(p0) + ' .. ' + str(p1):32s} {tstr}")
                s = i
        return "\n".join(lines)

    # -- derivation ----------------------------------------------------------------------------
    def extend(self, n_new: int, token_ids: Tensor | None = None) -> "ModalityLayout":
        """The layout after appending ``n_new`` generated text positions to every sample."""
        B = self.batch_size
        if token_ids is None:
            token_ids = torch.full((B, n_new), -1, dtype=torch.long)
        if self.prompt_len == len(self):  # first generated token: one past the prompt's largest position
            start = self.rope_deltas[:, 0] + self.attention_mask.sum(-1)
        else:  # later ones: one past the previous generated token
            start = self.position_ids[0, :, -1] + 1
        new_pos = (start[:, None] + torch.arange(n_new)[None]).unsqueeze(0).expand(3, -1, -1)
        return replace(
            self,
            modality=torch.cat([self.modality, torch.full((B, n_new), int(Modality.TEXT))], 1),
            item=torch.cat([self.item, torch.full((B, n_new), -1)], 1),
            time=torch.cat([self.time, torch.full((B, n_new), float("nan"))], 1),
            position_ids=torch.cat([self.position_ids, new_pos], 2),
            attention_mask=torch.cat([self.attention_mask, torch.ones(B, n_new, dtype=torch.long)], 1),
            token_ids=torch.cat([self.token_ids, token_ids.cpu().long()], 1),
        )

    def select_batch(self, index: int | list[int] | slice) -> "ModalityLayout":
        """The layout of a sub-batch (items are kept for the chosen samples only)."""
        if isinstance(index, int):
            index = [index]
        rows = list(range(self.batch_size))[index] if isinstance(index, slice) else list(index)
        keep = [it for it in self.items if it.sample in rows]
        remap = {b: i for i, b in enumerate(rows)}
        return replace(
            self, modality=self.modality[rows], item=self.item[rows], time=self.time[rows],
            position_ids=self.position_ids[:, rows], attention_mask=self.attention_mask[rows],
            token_ids=self.token_ids[rows], rope_deltas=self.rope_deltas[rows],
            items=tuple(replace(it, sample=remap[it.sample]) for it in keep),
        )


# --------------------------------------------------------------------------------------------- selectors
class Sel:
    """A position selector: a function from a layout to a [batch, pos] boolean mask, with set algebra.

    ``S.audio | S.video``, ``S.all - S.video`` (or ``~S.video``), ``S.audio & S.item(0)``,
    ``S.video.between(0.0, 2.0)``, ``S.generated``. Strings parse to the same: ``"audio|video"``,
    ``"all but video"``, ``"~video"``, ``"text&prompt"``.
    """

    def __init__(self, fn: Callable[[ModalityLayout], Tensor], name: str):
        self._fn, self.name = fn, name

    def __call__(self, layout: ModalityLayout) -> Tensor:
        return self._fn(layout)

    def __repr__(self) -> str:
        return f"Sel({self.name})"

    def __or__(self, other: "SelectorLike") -> "Sel":
        o = as_selector(other)
        return Sel(lambda L: self(L) | o(L), f"{self.name}|{o.name}")

    def __and__(self, other: "SelectorLike") -> "Sel":
        o = as_selector(other)
        return Sel(lambda L: self(L) & o(L), f"{self.name}&{o.name}")

    def __sub__(self, other: "SelectorLike") -> "Sel":
        o = as_selector(other)
        return Sel(lambda L: self(L) & ~o(L), f"{self.name}-{o.name}")

    def __invert__(self) -> "Sel":
        return Sel(lambda L: ~self(L), f"~{self.name}")

    def item(self, k: int) -> "Sel":
        """Only positions of media item ``k`` (within each sample)."""
        return Sel(lambda L: self(L) & (L.item == k), f"{self.name}.item({k})")

    def between(self, t0: float, t1: float) -> "Sel":
        """Only timed positions with ``t0 <= time < t1`` seconds."""
        return Sel(lambda L: self(L) & (L.time >= t0) & (L.time < t1), f"{self.name}.between({t0},{t1})")


def _modality(m: Modality) -> Sel:
    return Sel(lambda L: L.modality == int(m), m.name.lower())


def _marker(name: str) -> Sel:
    def fn(L: ModalityLayout) -> Tensor:
        ids = [i for i, n in L.special_names.items() if n == name]
        return torch.isin(L.token_ids, torch.tensor(ids, dtype=torch.long)) & (L.modality == int(Modality.SPECIAL))
    return Sel(fn, name)


class _Selectors:
    """Namespace of atomic selectors: ``S.text``, ``S.audio``, ``S.image``, ``S.video``, ``S.special``,
    ``S.pad``, ``S.media`` (audio|image|video), ``S.generated``, ``S.prompt``, ``S.all``, ``S.last_prompt``
    (the last prompt position of each sample), and marker names (``S.marker("audio_bos")``)."""

    text = _modality(Modality.TEXT)
    audio = _modality(Modality.AUDIO)
    image = _modality(Modality.IMAGE)
    video = _modality(Modality.VIDEO)
    special = _modality(Modality.SPECIAL)
    pad = _modality(Modality.PAD)
    all = Sel(lambda L: torch.ones(L.shape, dtype=torch.bool), "all")
    generated = Sel(lambda L: L.is_generated, "generated")
    prompt = Sel(lambda L: ~L.is_generated, "prompt")
    last_prompt = Sel(lambda L: torch.arange(len(L))[None].expand(L.batch_size, -1) == L.prompt_len - 1,
                      "last_prompt")

    @property
    def media(self) -> Sel:
        return Sel(lambda L: (self.audio | self.image | self.video)(L), "media")

    @staticmethod
    def marker(name: str) -> Sel:
        return _marker(name)

    @staticmethod
    def index(idx) -> Sel:
        """Explicit positions (same for every sample)."""
        def fn(L: ModalityLayout) -> Tensor:
            m = torch.zeros(L.shape, dtype=torch.bool)
            m[:, torch.as_tensor(idx, dtype=torch.long)] = True
            return m
        return Sel(fn, f"index({idx})")


S = _Selectors()
SelectorLike = Union[Sel, str, Modality]
_ATOMS = {"text", "audio", "image", "video", "special", "pad", "all", "generated", "prompt", "media", "last_prompt"}
_MARKERS = {"audio_bos", "audio_eos", "vision_bos", "vision_eos", "im_start", "im_end", "endoftext"}


def as_selector(sel: SelectorLike) -> Sel:
    """Turn a selector, a :class:`Modality` or a selector string into a :class:`Sel`."""
    if isinstance(sel, Sel):
        return sel
    if isinstance(sel, Modality):
        return _modality(sel)
    if not isinstance(sel, str):
        raise LayoutError(f"cannot use {type(sel).__name__} {sel!r} as a position selector",
                          "pass a string such as 'audio' or 'all but video', a Modality, or an av_lens.S selector")
    return _parse(sel)


def _parse(text: str) -> Sel:
    s = text.strip().lower()
    if not s:
        raise LayoutError("empty selector string", f"use one of {sorted(_ATOMS)} combined with | & - ~ or 'but'")
    if " but " in s:
        a, b = s.split(" but ", 1)
        return _parse(a) - _parse(b)
    for op in ("|", "&", "-"):
        depth_split = s.rsplit(op, 1)
        if len(depth_split) == 2 and depth_split[0].strip():
            left, right = _parse(depth_split[0]), _parse(depth_split[1])
            return {"|": left.__or__, "&": left.__and__, "-": left.__sub__}[op](right)
    if s.startswith("~") or s.startswith("not "):
        return ~_parse(s[1:] if s.startswith("~") else s[4:])
    if s in _ATOMS:
        return getattr(S, s)
    if s in _MARKERS:
        return _marker(s)
    raise LayoutError(f"unknown selector {text!r}",
                      f"use one of {sorted(_ATOMS | _MARKERS)}, combined with | & - ~ or 'but' "
                      "(e.g. 'audio|video', 'all but video')")
