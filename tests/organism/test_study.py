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
    # the study's pattern: audio leads in the first layer, video in the later ones
    assert out["flow_by_layer"][0][audio] > out["flow_by_layer"][0][video]
    assert out["flow_by_layer"][1][video] > out["flow_by_layer"][1][audio]
    # latent audio understanding exceeds what the answer shows
    assert out["latent_hit_rate_any_layer"] > out["cf_answer_names_sound"] + 0.3
    ko = out["knockout last_prompt-/->video from_layer (hear answer = sound)"]
    assert ko["follows_sound"][0] > ko["baseline"] + 0.3
    assert abs(sum(out["token_shift_fractions"].values()) - 1) < 1e-6
    assert "knockout" in format_study(out)
