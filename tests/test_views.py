"""Views: offline HTML (circuitsvis bundle once, no network probe), correct numbers in the plots, atomic pages."""

import re

import pytest
import torch

from av_lens import views
from av_lens.analysis import AttentionFlow, attention_flow, logit_lens
from av_lens.views.attention import segments
from conftest import cases


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """circuitsvis's own RenderedHTML probes google.com; our views must never call out."""
    import socket
    import urllib.request

    def refuse(*a, **k):
        raise AssertionError("a view tried to open a network connection")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_token_strip_colours_every_kind_and_collapses_media(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    v = views.token_strip(inp.layout, model.tokenizer, collapse_over=4)
    kinds = re.findall(r'data-kind="(\w+)"', v.html)
    assert {"video", "audio", "text", "special"} <= set(kinds)
    # collapsed chips name their token counts; uncollapsed view has one chip per position
    assert "tokens" in v.html
    full = views.token_strip(inp.layout, model.tokenizer, collapse_over=10 ** 6)
    assert len(re.findall(r'class="avl-tok"', full.html)) == inp.shape[1]
    assert "<script" not in v._repr_html_()


def test_attention_heads_pooled_rows_sum_to_one(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    seg, labels = segments(inp.layout, model.tokenizer)
    assert int(seg.max()) + 1 == len(labels) < inp.shape[1]  # media runs pooled
    v = views.attention_heads(model, inp, 1)
    assert v.needs_circuitsvis and "CircuitsVis.AttentionHeads" in v.html
    m = re.search(r'"attention": (\[.*?\]\]\]),', v.html)
    A = torch.tensor(eval(m.group(1)))
    assert A.shape == (model.cfg.n_heads, len(labels), len(labels))
    torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:2]), atol=1e-5, rtol=0)
    # brute force: the pooled value of one (query segment, key segment) from the full pattern
    _, cache = model.run_with_cache(inp, names_filter="blocks.1.attn.hook_pattern")
    P = cache["blocks.1.attn.hook_pattern"][0]
    qs, ks = int(seg.max()), int(seg[inp.layout.positions("video")[0]])
    want = P[:, seg == qs][:, :, seg == ks].sum(-1).mean(-1)
    torch.testing.assert_close(A[:, qs, ks], want, atol=1e-5, rtol=0)
    cropped = views.attention_heads(model, inp, 0, crop=(0, 10))
    assert '"tokens": [' in cropped.html


def test_plots_carry_the_numbers(model, media):
    inp = model.prepare(**cases(media)["video_with_audio"])
    res = attention_flow(model, inp, "last_prompt")
    v = views.attention_by_layer(res)
    m = res.by_layer()
    audio = res.groups.index("audio")
    for l in range(model.cfg.n_layers):
        assert f"audio @ {l}: {float(m[l, audio]):.4f}" in v.html
    lens = logit_lens(model, inp, "audio", k=3, targets=[5])
    grid = views.logit_lens_grid(lens, inp.layout, max_columns=4)
    assert grid.html.count("<tr>") == model.cfg.n_layers + 1 and "4 of" in grid.html
    hm = views.heatmap([[0.5, -1.0], [float("nan"), 0.0]], ["a", "b"], ["x", "y"], title="t")
    assert hm.count('class="avl-cell"') == 4 and "a, y: -1.0000" in hm


def test_page_embeds_circuitsvis_once_and_saves_atomically(model, media, tmp_path, monkeypatch):
    inp = model.prepare(**cases(media)["video_with_audio"])
    page = views.Page("t")
    page.add(views.attention_heads(model, inp, 0), "a").add(views.attention_heads(model, inp, 1), "b")
    page.add(views.token_strip(inp.layout, model.tokenizer), "c")
    html = page.html()
    assert html.count("CircuitsVis.render(") == 2
    assert len(html) < len(views.html.circuitsvis_bundle()) + 200_000  # the ~1.3 MB bundle once, not twice
    assert "unpkg.com" not in html and "https://" not in html.split("<script>")[0]
    out = page.save(tmp_path / "r.html")
    assert out.read_text() == html
    # a failure while writing leaves neither a partial file nor a temporary one
    monkeypatch.setattr(views.Page, "html", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        page.save(tmp_path / "s.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
