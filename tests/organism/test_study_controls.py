"""The study's controls: the uninvolved-word comparator, caption well-formedness, gained/lost counts, seeds."""

import math

import pytest
import torch

from av_lens.organism import world
from av_lens.organism.study import _mean_sd, _scored, caption_stats, uninvolved, well_formed


def test_uninvolved_sound_is_neither_seen_nor_heard():
    seen = set()
    for look in range(world.N_CLASSES):
        for snd in range(world.N_CLASSES):
            c = world.Clip(look, snd, None, None)
            u = uninvolved(c)
            assert u not in (look, snd) and 0 <= u < world.N_CLASSES
            seen.add(u)
    assert seen == set(range(world.N_CLASSES))  # every class serves as a comparator somewhere


def test_well_formed_caption_is_object_and_sound_only():
    assert well_formed("dog and bark")
    assert well_formed("piano and ring")  # well formed need not be true
    for bad in ("dog", "dog and", "dog and bark and", "bark and dog", "dog or bark", ""):
        assert not well_formed(bad), bad


def test_caption_stats_and_gained_lost_counts():
    clips = [world.Clip(0, 1, None, None), world.Clip(2, 3, None, None), world.Clip(4, 5, None, None)]
    s, o = world.SOUNDS, world.OBJECTS
    base = caption_stats([f"{o[0]} and {s[0]}", f"{o[2]} and {s[3]}", f"{o[4]} and {s[5]}"], clips)
    assert base.tolist() == [[0, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    knocked = caption_stats([f"{o[0]} and {s[1]}", f"{o[2]}", f"{o[4]} and {s[5]}"], clips)
    r = _scored(knocked, base)
    assert r["gained"] == 1 and r["lost"] == 1
    for key, want in (("audio_fidelity", 2 / 3), ("well_formed", 2 / 3), ("audio_fidelity_well_formed", 2 / 3),
                      ("names_object", 1.0)):
        assert math.isclose(r[key], want, rel_tol=1e-6), key


def test_mean_sd_over_seeds_is_the_sample_statistics():
    vals = [[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]]
    r = _mean_sd(vals)
    assert r["n"] == 3 and r["mean"] == [3.0, 2.0]
    assert torch.allclose(torch.tensor(r["sd"], dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert _mean_sd([[1.0]])["sd"] == [0.0]


@pytest.mark.slow
def test_study_over_seeds_averages_runs_and_caches_them(tmp_path):
    """Two 'seeds' that are the same checkpoint: the mean is the run's figure, the sd zero; a rerun reads the
    per-run cache instead of recomputing."""
    from av_lens.organism import checkpoint_root
    from av_lens.organism.study import format_over_seeds, study_over_seeds

    for run in ("seed0", "seed1"):
        (tmp_path / run).mkdir()
        for sub in ("organism", "organism-base"):
            (tmp_path / run / sub).symlink_to(checkpoint_root() / sub)
    (tmp_path / "control0").mkdir()
    (tmp_path / "control0" / "organism-control").symlink_to(checkpoint_root() / "organism")
    out = study_over_seeds(tmp_path, [0, 1], [0], n_pairs=4, log=lambda *_: None)
    one = out["runs"]["seed0"]
    assert out["runs"]["seed1"]["flow_by_layer"] == one["flow_by_layer"]
    agg = out["organism"]
    assert agg["flow_by_layer"]["n"] == 2 and max(max(r) for r in agg["flow_by_layer"]["sd"]) == 0.0
    assert torch.allclose(torch.tensor(agg["flow_by_layer"]["mean"], dtype=torch.float64),
                          torch.tensor(one["flow_by_layer"], dtype=torch.float64))
    assert "token_shift_unrelated_fractions" in one and "token_shift_fractions" not in out["runs"]["control0"]
    assert out["control"]["cf_answer_names_sound"]["n"] == 1
    caches = sorted(p.name for p in tmp_path.glob("*/study-*.json"))
    assert caches == ["study-organism-control.json", "study-organism.json", "study-organism.json"]
    stamp = (tmp_path / "seed0" / "study-organism.json").stat().st_mtime_ns
    again = study_over_seeds(tmp_path, [0, 1], [0], n_pairs=4, log=lambda *_: None)
    assert (tmp_path / "seed0" / "study-organism.json").stat().st_mtime_ns == stamp
    assert again["organism"] == agg
    assert "study over training seeds" in format_over_seeds(out)
