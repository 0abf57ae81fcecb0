"""Position maps between two layouts, for patching between inputs that are not position-aligned.

Patching copies a clean activation into a corrupted run *at the same position*. Audio+video vs audio only,
clips of different length, or one vs two media items break that: position 300 is a video token in one and an
audio token in the other. The layout knows what each position *is* — modality, media item, time stamp, rank
within its time step — so a map can pair positions by meaning:

    pm = position_map(clean, corrupted)                         # exact keys; unmatched -> error
    pm = position_map(clean, corrupted, media="nearest", unmatched="skip")
    patch_by_modality(model, clean, corrupted, metric, sets=("audio",), position_map=pm)

Rules, per corrupted position j (the run being patched):

* **media** positions (audio / image / video) are keyed by (modality, the item's rank among that modality's
  items in the sample, time stamp, rank among the positions with that time stamp). ``media="exact"`` pairs
  equal keys; ``"nearest"`` takes, within the same modality and item rank, the clean position with the same
  rank at the nearest time stamp (the last rank if the clean step has fewer); ``"pool"`` takes the mean of all
  clean positions of that modality and item rank at the nearest time stamp.
* **text and special** positions are paired by aligning the two token-id sequences of non-media positions
  (longest matching blocks, as difflib does); equal tokens in matched blocks pair up.
* a position with no partner is refused (``unmatched="error"``, the default, names how many and which kind)
  or left corrupted (``unmatched="skip"``: patching does not touch it).

A map is ``src[b, j, :]``: the clean positions whose mean replaces corrupted position j (−1 padding), with
``n_src[b, j]`` of them (0 = unmapped). The identity map of aligned inputs has one source each, so patching
through it equals aligned patching bit for bit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor

from av_lens.errors import InputError
from av_lens.layout import Modality, ModalityLayout

MEDIA = (int(Modality.AUDIO), int(Modality.IMAGE), int(Modality.VIDEO))
RULES = ("exact", "nearest", "pool")


@dataclass
class PositionMap:
    """For each corrupted position, the clean positions it is patched from (their mean)."""

    src: Tensor      # [batch, corrupted_pos, k] clean positions, -1 = none
    n_src: Tensor    # [batch, corrupted_pos]
    clean_len: int
    rule: str

    @property
    def mapped(self) -> Tensor:
        return self.n_src > 0

    def gather(self, clean_act: Tensor) -> Tensor:
        """Clean activations moved onto the corrupted positions: [batch, corrupted_pos, ...] (zeros where
        unmapped). ``clean_act`` is [batch, clean_pos, ...]."""
        if clean_act.shape[1] != self.clean_len:
            raise InputError(f"the clean activation has {clean_act.shape[1]} positions but the map was built for "
                             f"{self.clean_len}", "build the map from the same clean input")
        B, T, K = self.src.shape
        idx = self.src.clamp_min(0).to(clean_act.device)
        g = clean_act[torch.arange(B, device=clean_act.device)[:, None, None], idx]    # [B, T, K, ...]
        if K == 1:
            out = g[:, :, 0].clone()
        else:
            w = (self.src >= 0).to(clean_act.device, clean_act.dtype)
            w = w.reshape(B, T, K, *([1] * (g.ndim - 3)))
            out = (g * w).sum(2) / self.n_src.clamp_min(1).to(clean_act.device, clean_act.dtype).reshape(
                B, T, *([1] * (g.ndim - 3)))
        out[~self.mapped.to(clean_act.device)] = 0
        return out

    @staticmethod
    def identity(layout: ModalityLayout) -> "PositionMap":
        B, T = layout.shape
        src = torch.arange(T)[None, :, None].expand(B, T, 1).clone()
        real = layout.attention_mask.bool()
        src[~real] = -1
        return PositionMap(src, real.long(), T, "identity")


def _media_keys(layout: ModalityLayout, b: int) -> dict[int, tuple[int, int, float, int]]:
    """position -> (modality, item rank within modality, time, rank within that time step)."""
    mod, item, time = layout.modality[b].tolist(), layout.item[b].tolist(), layout.time[b].tolist()
    item_rank: dict[tuple[int, int], int] = {}
    per_mod: dict[int, int] = {}
    seen: dict[tuple[int, int, float], int] = {}
    keys = {}
    for p, (m, it, t) in enumerate(zip(mod, item, time)):
        if m not in MEDIA or not layout.attention_mask[b, p]:
            continue
        if (m, it) not in item_rank:
            item_rank[(m, it)] = per_mod.get(m, 0)
            per_mod[m] = per_mod.get(m, 0) + 1
        r = item_rank[(m, it)]
        t = round(float(t), 4)
        k = seen.get((m, r, t), 0)
        seen[(m, r, t)] = k + 1
        keys[p] = (m, r, t, k)
    return keys


def position_map(clean, corrupted, *, media: str = "exact", unmatched: str = "error") -> PositionMap:
    """Map every corrupted position to clean positions by layout (see the module docstring for the rules)."""
    if media not in RULES:
        raise InputError(f"unknown media rule {media!r}", f"use one of {RULES}")
    if unmatched not in ("error", "skip"):
        raise InputError(f"unknown unmatched rule {unmatched!r}", "use 'error' or 'skip'")
    a = getattr(clean, "layout", clean)
    c = getattr(corrupted, "layout", corrupted)
    if a.batch_size != c.batch_size:
        raise InputError(f"the clean input has {a.batch_size} samples and the corrupted {c.batch_size}",
                         "map batches of the same size (sample i to sample i)")
    B, T = c.shape
    rows: list[list[list[int]]] = []
    missing: dict[str, int] = {}
    for b in range(B):
        ka, kc = _media_keys(a, b), _media_keys(c, b)
        by_key = {v: p for p, v in ka.items()}
        by_group: dict[tuple[int, int], dict[float, list[int]]] = {}
        for p, (m, r, t, _k) in ka.items():
            by_group.setdefault((m, r), {}).setdefault(t, []).append(p)
        row: list[list[int]] = [[] for _ in range(T)]
        for p, key in kc.items():
            if key in by_key:
                row[p] = [by_key[key]]
                continue
            if media == "exact":
                continue
            steps = by_group.get(key[:2])
            if not steps:
                continue
            t = min(steps, key=lambda s: (abs(s - key[2]), s))
            row[p] = list(steps[t]) if media == "pool" else [steps[t][min(key[3], len(steps[t]) - 1)]]
        # text / special: align the non-media token sequences
        pa = [p for p in range(a.shape[1]) if a.attention_mask[b, p] and int(a.modality[b, p]) not in MEDIA]
        pc = [p for p in range(T) if c.attention_mask[b, p] and int(c.modality[b, p]) not in MEDIA]
        ta, tc = a.token_ids[b, pa].tolist(), c.token_ids[b, pc].tolist()
        for blk in difflib.SequenceMatcher(a=ta, b=tc, autojunk=False).get_matching_blocks():
            for i in range(blk.size):
                row[pc[blk.b + i]] = [pa[blk.a + i]]
        for p in range(T):
            if c.attention_mask[b, p] and not row[p]:
                kind = Modality(int(c.modality[b, p])).name.lower()
                missing[kind] = missing.get(kind, 0) + 1
        rows.append(row)
    if missing and unmatched == "error":
        raise InputError(f"{sum(missing.values())} corrupted positions have no clean counterpart under the "
                         f"'{media}' media rule ({missing})",
                         "pass unmatched='skip' to leave them unpatched, or media='nearest' / 'pool' to pair media "
                         "positions by the nearest time stamp")
    K = max([len(s) for row in rows for s in row] + [1])
    src = torch.full((B, T, K), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        for p, s in enumerate(row):
            if s:
                src[b, p, :len(s)] = torch.tensor(s)
    return PositionMap(src, (src >= 0).sum(-1), a.shape[1], media)
