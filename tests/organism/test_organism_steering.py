"""On the organism: steering (sound A - sound B) at the audio positions makes it hear A; a random direction of
the same norm does not."""

from av_lens import HookedAVTransformer
from av_lens.organism.steering import format_steering, steering_study


def test_mean_difference_steering_flips_hearing_and_random_does_not():
    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    res = steering_study(model, n_clips=8, seed=11, pairs=[(0, 1), (3, 2)], coeffs=(1.0, 4.0))
    flip = [v for row in res["flip"] for v in row]
    rnd = [v for row in res["random_flip"] for v in row]
    best = max(range(len(flip)), key=flip.__getitem__)
    assert res["unsteered_hears_B"] >= 0.75
    assert flip[best] >= 0.5, format_steering(res)
    # the control at the same cell, and on average over the cells (a 4x random push can land on A by chance)
    assert rnd[best] <= 0.2 and sum(rnd) / len(rnd) <= 0.15, format_steering(res)
