"""The report's plots read well: round tick values, titles that fit, reference-line labels clear of the legend,
named axes, segment labels that survive circuitsvis's whitespace stripping."""

import re

import pytest

from av_lens.views import plots


@pytest.mark.parametrize("lo, hi", [(0, 0.74), (0.18, 0.37), (-0.3, 1.36), (0, 0.003), (0, 1)])
def test_ticks_are_round_and_cover_the_range(lo, hi):
    t = plots.nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 7
    step = t[1] - t[0]
    mantissa = step / 10 ** __import__("math").floor(__import__("math").log10(step))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5)), step
    labels = [plots._tick_label(v, t) for v in t]
    assert len(set(labels)) == len(labels)  # distinct at the printed precision


def test_line_plot_ticks_axis_and_reference_label():
    svg = plots.line_plot(["0", "1", "2"], {"audio": [0.18, 0.3, 0.37]}, title="t", y_label="p(ring)",
                          hlines={"no knockout": 0.25})
    ticks = re.findall(r'text-anchor="end">(-?[0-9.]+)</text>', svg)
    assert ticks and all(len(x.split(".")[-1]) <= 2 for x in ticks) and "0.37" not in ticks
    assert "p(ring)" in svg
    legend_x = float(re.search(r'<rect x="([0-9.]+)"[^>]*width="10"', svg).group(1))
    label_x = float(re.search(r'<text x="([0-9.]+)"[^>]*>no knockout</text>', svg).group(1))
    assert label_x < legend_x  # inside the plot, not over the legend


def test_heatmap_is_wide_enough_for_its_title():
    title = "Patching resid_pre: fraction recovered"
    svg = plots.heatmap([[0.5, 1.2]], ["layer 0"], ["audio", "video"], title=title)
    width = int(re.search(r'width="(\d+)"', svg).group(1))
    assert width >= 7 * len(title)


def test_knockout_curves_name_their_axis():
    import torch

    class S:
        baseline, windows, values = torch.tensor(0.5), [range(0, 4), range(1, 4)], torch.tensor([0.2, 0.3])

    v = plots.knockout_curves({"last prompt ↛ video": S}, y_label="p(ring) (probability)")
    assert "p(ring) (probability)" in v.html and ">metric<" not in v.html
