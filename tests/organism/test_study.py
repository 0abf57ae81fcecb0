"""The study's experiments run end to end on the organism through the analysis tools."""

import pytest

from av_lens import HookedAVTransformer
from av_lens.organism.study import format_study, run_study


@pytest.mark.slow
def test_study_on_the_organism():
    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    base = HookedAVTransformer.from_pretrained("av-lens/organism-base")
    out = run_study(model, base, n_pairs=24)
    n = model.cfg.n_layers
    assert len(out["flow_by_layer"]) == n and all(abs(sum(r) - 1) < 1e-4 for r in out["flow_by_layer"])
    audio, video = out["flow_groups"].index("audio"), out["flow_groups"].index("video")
    # what the organism shows over its seeds (docs/organism.md): generated tokens attend mostly to video, in
    # every layer (not the study's audio-early shape)
    assert all(row[video] > row[audio] for row in out["flow_by_layer"])
    # blocking last-prompt -> video from layer 0 on makes the answer name the sound playing; blocking
    # last-prompt -> text (the control key group) does not; blocking generated -> audio loses the sound
    ko = out["knockout last_prompt-/->video from_layer (hear answer = sound)"]
    assert ko["follows_sound"][0] > ko["baseline"] + 0.3
    ctl = out["knockout last_prompt-/->text from_layer (hear answer = sound)"]
    assert abs(ctl["follows_sound"][0] - ctl["baseline"]) < 0.15
    ga = out["knockout G-/->A from_layer"]
    assert ga["audio_fidelity"][0] < ga["baseline"] and ga["well_formed"][0] >= 0.9
    # the lens reports its comparator beside the sound playing
    assert {"latent_hit_rate_any_layer", "latent_uninvolved_hit_rate_any_layer"} <= set(out)
    assert abs(sum(out["token_shift_fractions"].values()) - 1) < 1e-6
    assert "knockout" in format_study(out)
