"""Distributed, resumable sweeps (av_lens.sweeps, ``av-lens sweep``) on CPU with the gloo backend.

* pieces without a model: sharding, torn-line repair of the row files, the gather's checks, the atomic table;
* in-process on the organism: encoders run once per sample, and two shards evaluated one after the other
  give the same table as one shard;
* the command line, as a cluster would run it: ``python -m torch.distributed.run --nproc_per_node 2 -m
  av_lens.cli sweep`` equals the single-process ``python -m av_lens.cli sweep``, and a 2-rank run that crashes
  mid-write on rank 1 and is then resumed gives the same table without recomputing finished rows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from av_lens import HookedAVTransformer
from av_lens import sweeps as S

ARGS = ["--pairs", "2", "--windows", "0:2,2:4"]
N_ITEMS = 2 * 2 * (1 + 2 * 2)  # pairs x conditions x (no knockout + 2 knockouts x 2 windows)


# ------------------------------------------------------------------------------------------------ pieces
def test_shards_are_whole_samples_disjoint_complete_and_stable():
    items = S.study_items(5, [range(0, 2), range(2, 4)])
    assert len(items) == 5 * 2 * 5 and len({it.key for it in items}) == len(items)
    for world in (1, 2, 3, 4):
        shards = [S.shard(items, r, world) for r in range(world)]
        keys = [it.key for sh in shards for it in sh]
        assert sorted(keys) == sorted(it.key for it in items)  # complete, and disjoint (no repeats)
        for r, sh in enumerate(shards):
            groups = {it.group for it in sh}
            assert all(it in sh for it in items if it.group in groups)  # whole groups: encoders once per sample
            assert sh == S.shard(list(items), r, world)
        sizes = [len({it.group for it in sh}) for sh in shards]
        assert max(sizes) - min(sizes) <= 1


def test_row_log_cuts_a_torn_last_line_and_refuses_damage_in_the_middle(tmp_path):
    log = S.RowLog(tmp_path / "rows-rank0.jsonl")
    rows = [{"key": f"k{i}", "v": i} for i in range(3)]
    for r in rows[:2]:
        log.append(r)
    log.append(rows[2], torn=True)
    assert not log.path.read_bytes().endswith(b"\n")
    assert log.read() == rows[:2]  # readers ignore the torn line ...
    size = log.path.stat().st_size
    assert log.path.stat().st_size == size  # ... without touching the file
    assert log.read(repair=True) == rows[:2]  # the owner cuts it off
    log.append(rows[2])
    assert log.read() == rows
    log.path.write_text(log.path.read_text().replace('"k1"', '"k1'))
    with pytest.raises(S.SweepError, match="unreadable line in the middle.*Fix: "):
        log.read()


def _write(out: Path, rank: int, keys):
    for k in keys:
        S.RowLog(out / f"rows-rank{rank}.jsonl").append({"key": k})


def test_gather_names_missing_duplicate_and_unexpected_keys(tmp_path):
    items = S.study_items(2, [range(0, 1)], conditions=("counterfactual",), knockouts=(("generated", "video"),))
    keys = [it.key for it in items]
    _write(tmp_path, 0, keys[:2])
    with pytest.raises(S.SweepError, match=re.escape(f"lacks rows for 2 of 4 items: {keys[2]!r}, {keys[3]!r}")
                       + ".*Fix: rerun the same sweep command"):
        S.gather(tmp_path, items)
    _write(tmp_path, 1, keys[1:])
    with pytest.raises(S.SweepError, match=re.escape(f"holds 1 keys more than once: '{keys[1]} (in rows-rank0.jsonl, "
                                                     "rows-rank1.jsonl)'")):
        S.gather(tmp_path, items)
    (tmp_path / "rows-rank1.jsonl").unlink()
    _write(tmp_path, 1, keys[2:] + ["9/factual/none"])
    with pytest.raises(S.SweepError, match="1 rows that are not items of this sweep: '9/factual/none'"):
        S.gather(tmp_path, items)
    assert not (tmp_path / S.TABLE).exists()  # nothing written by a failed gather
    (tmp_path / "rows-rank1.jsonl").unlink()
    _write(tmp_path, 1, reversed(keys[2:]))
    table = S.gather(tmp_path, items)
    assert [r["key"] for r in table] == keys  # item order, whatever the files' order
    assert [json.loads(l)["key"] for l in (tmp_path / S.TABLE).read_text().splitlines()] == keys


def test_table_write_is_atomic(tmp_path, monkeypatch):
    items = S.study_items(1, [range(0, 1)], conditions=("factual",), knockouts=())
    _write(tmp_path, 0, [it.key for it in items])
    (tmp_path / S.TABLE).write_text("previous table\n")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(S.os, "replace", refuse)
    with pytest.raises(OSError):
        S.gather(tmp_path, items)
    assert (tmp_path / S.TABLE).read_text() == "previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows-rank0.jsonl", S.TABLE]


def test_a_folder_holding_another_sweep_is_refused(tmp_path):
    S.check_spec(tmp_path, {"n_samples": 2, "windows": [[0, 1]]}, rank=0)
    S.check_spec(tmp_path, {"n_samples": 2, "windows": [[0, 1]]}, rank=1)
    with pytest.raises(S.SweepError, match="other arguments \\(n_samples: 2 there, 3 now\\).*Fix: rerun with the"):
        S.check_spec(tmp_path, {"n_samples": 3, "windows": [[0, 1]]}, rank=1)


# ------------------------------------------------------------------------------------------------ in process
@pytest.fixture(scope="module")
def organism():
    return HookedAVTransformer.from_pretrained("av-lens/organism")


def test_shards_in_process_encode_once_per_sample_and_equal_one_shard(organism, tmp_path, monkeypatch):
    model = organism
    calls = []
    for kind, fn in list(model.adapter.encode.items()):
        monkeypatch.setitem(model.adapter.encode, kind, lambda m, inp, fn=fn, kind=kind: calls.append(kind) or fn(m, inp))
    samples = S.organism_samples(model, 2, seed=1)
    items = S.study_items(2, [range(0, 2)])
    n = [S.run_shard(model, samples, items, tmp_path / "two", r, 2, log=lambda m: None) for r in (0, 1)]
    assert n == [len(S.shard(items, r, 2)) for r in (0, 1)]
    groups = {it.group for it in items}
    assert sorted(calls) == sorted(["audio", "video"] * len(groups))  # each tower once per sample and condition
    calls.clear()
    assert S.run_shard(model, samples, items, tmp_path / "two", 1, 2, log=lambda m: None) == 0  # all done
    assert calls == []
    S.run_shard(model, samples, items, tmp_path / "one", log=lambda m: None)
    two, one = S.gather(tmp_path / "two", items), S.gather(tmp_path / "one", items)
    assert two == one and len(one) == len(items)
    knocked = [r for r in one if r["window"] == [0, 2] and r["keys"] == "audio"]
    assert len(knocked) == 2 * 2
    assert knocked and all(0.0 <= r["audio_fidelity"] <= 1.0 for r in one)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


# ------------------------------------------------------------------------------------------------ command line
def _cli(out: Path, *extra: str, ranks: int = 1, env: dict | None = None) -> subprocess.Popen:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m"]
              if ranks > 1 else [sys.executable, "-m"])
    return subprocess.Popen([*launch, "av_lens.cli", "sweep", *ARGS, "--out", str(out), *extra], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def _finish(proc: subprocess.Popen, ok: bool = True) -> str:
    out, err = proc.communicate(timeout=300)
    assert (proc.returncode == 0) == ok, (proc.returncode, err[-3000:])
    return out + err


def _lines(path: Path) -> list[str]:
    return [l for l in path.read_text().split("\n")[:-1]] if path.exists() else []


@pytest.fixture(scope="module")
def single_and_two_ranks(tmp_path_factory):
    """The same sweep in one process (no torchrun) and on 2 gloo ranks, run side by side."""
    root = tmp_path_factory.mktemp("sweep")
    procs = [_cli(root / "one"), _cli(root / "two", ranks=2)]
    logs = [_finish(p) for p in procs]
    return root, logs


def test_two_ranks_give_the_single_process_table(single_and_two_ranks):
    root, logs = single_and_two_ranks
    one, two = (root / d / S.TABLE for d in ("one", "two"))
    assert one.read_text() == two.read_text()  # same keys, same values, same order
    rows = [json.loads(l) for l in one.read_text().splitlines()]
    assert len(rows) == N_ITEMS and len({r["key"] for r in rows}) == N_ITEMS
    assert sorted(p.name for p in (root / "two").glob("rows-*")) == ["rows-rank0.jsonl", "rows-rank1.jsonl"]
    assert [len(_lines(root / "two" / f"rows-rank{r}.jsonl")) for r in (0, 1)] == [N_ITEMS // 2] * 2
    assert "sweep rank 1/2: computed 10 rows" in logs[1] and "sweep rank 0/1: computed 20 rows" in logs[0]


@pytest.mark.slow  # ~25 s: two 2-rank launches
def test_a_crashed_two_rank_run_resumes_without_recomputing(single_and_two_ranks):
    root, _ = single_and_two_ranks
    out = root / "crash"
    crashed = _finish(_cli(out, ranks=2, env={"AV_LENS_SWEEP_FAIL_AFTER": "1:3"}), ok=False)
    assert "stops after 3 rows, mid-write" in crashed
    r1 = out / "rows-rank1.jsonl"
    assert not r1.read_bytes().endswith(b"\n")  # a torn last line
    before = {r: _lines(out / f"rows-rank{r}.jsonl") for r in (0, 1)}
    complete = {r: len(S.RowLog(out / f"rows-rank{r}.jsonl").read()) for r in (0, 1)}
    assert complete[1] == 3 and len(before[1]) == 3
    resumed = _finish(_cli(out, ranks=2))
    for r in (0, 1):  # each rank computes only what its shard lacks
        todo = N_ITEMS // 2 - complete[r]
        assert (f"sweep rank {r}/2: {N_ITEMS // 2} items in this shard, {complete[r]} already done, computing {todo}"
                in resumed)
        assert f"sweep rank {r}/2: computed {todo} rows" in resumed
    assert (out / S.TABLE).read_text() == (root / "one" / S.TABLE).read_text()
    for r in (0, 1):
        after = _lines(out / f"rows-rank{r}.jsonl")
        assert after[:len(before[r])] == before[r]  # finished rows kept as written, not recomputed
        assert len(after) == N_ITEMS // 2  # each of the shard's rows written once; the torn line rewritten


# ------------------------------------------------------------------------------------------------ real-clip manifest
def _write_clip(path: Path, frames, fps: float, wav=None, sr: int = 16000) -> Path:
    """An mp4 (mpeg4 video; an AAC soundtrack if ``wav``) or, without frames, a 16-bit mono wav of ``wav``."""
    from fractions import Fraction

    import av
    import numpy as np

    c = av.open(str(path), "w")
    vs = st = None
    if frames is not None:  # every stream is added before the first packet is written
        vs = c.add_stream("mpeg4", rate=int(fps), options={"qscale": "1"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    if wav is not None:
        st = c.add_stream("aac" if vs is not None else "pcm_s16le", rate=sr)
        st.layout = "mono"
    if vs is not None:
        for i, fr in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, int(fps))
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    if st is not None:
        fmt = "fltp" if vs is not None else "s16"
        samples = wav.astype(np.float32) if fmt == "fltp" else (np.clip(wav, -1, 1) * 32767).astype(np.int16)
        step = st.codec_context.frame_size or 1024
        for s in range(0, len(samples), step):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, s:s + step]), format=fmt, layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = sr, s, Fraction(1, sr)
            for p in st.encode(fr):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    c.close()
    return path


def test_manifest_of_real_clip_files_sweeps_like_in_memory_pairs(organism, tmp_path):
    """Organism clips written as mp4 + wav files and listed in a manifest: each decoded pair has exactly the
    token layout of the in-memory pair, and the sweep over them gathers a complete table."""
    from av_lens.organism import world

    model = organism
    lines = []
    pairs = world.clip_pairs(2, seed=7)
    for i, (fact, cf) in enumerate(pairs):
        # the soundtracks as 16-bit wav (an AAC track would come back padded to whole codec frames)
        _write_clip(tmp_path / f"clip{i}.mp4", fact.frames, world.FPS)
        _write_clip(tmp_path / f"sound{i}.wav", None, world.FPS, fact.audio)
        _write_clip(tmp_path / f"swap{i}.wav", None, world.FPS, cf.audio)
        lines.append(json.dumps({"video": f"clip{i}.mp4", "audio": f"sound{i}.wav",
                                 "counterfactual_audio": f"swap{i}.wav", "fps": world.FPS,
                                 "question": "Describe what you see and hear.", "sound": world.SOUNDS[fact.sound],
                                 "counterfactual_sound": world.SOUNDS[cf.sound]}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    samples = S.manifest_samples(model, tmp_path / "pairs.jsonl")
    assert len(samples) == 2
    from av_lens.analysis.pairs import counterfactual_pair

    for (fact, cf), decoded in zip(pairs, samples):
        direct = counterfactual_pair(model, fact.frames, fact.audio, cf.audio, "Describe what you see and hear.",
                                     fps=world.FPS)
        assert decoded.aligned
        assert torch.equal(decoded.factual.input_ids, direct.factual.input_ids)
        assert torch.equal(decoded.factual.layout.position_ids, direct.factual.layout.position_ids)
        # the frames survive the mp4 round trip closely (mpeg4 at the best quantiser, 4:2:0 chroma)
        err = (decoded.factual.pixel_values_videos - direct.factual.pixel_values_videos).abs().mean()
        assert float(err) < 0.15
    items = S.study_items(2, [range(0, 4)], knockouts=(("generated", "video"),))
    S.run_shard(model, samples, items, tmp_path / "out", log=lambda m: None)
    table = S.gather(tmp_path / "out", items)
    assert len(table) == len(items) and all(0.0 <= r["audio_fidelity"] <= 1.0 for r in table)
