"""Views: what a researcher looks at — modality strips, attention heads, logit-lens grids and plots.

Every function returns a :class:`View` (shows itself in Jupyter, offline) and a :class:`Page` gathers views
into one self-contained HTML file (circuitsvis's bundle embedded once, no network request):

    from av_lens import views
    views.token_strip(inputs.layout, model.tokenizer)
    views.attention_by_layer(flow.result())
    page = views.Page("My clip"); page.add(views.attention_heads(model, inputs, layer=3)); page.save("out.html")
"""

from av_lens.views.attention import attention_heads
from av_lens.views.html import COLOURS, Page, View
from av_lens.views.plots import attention_by_layer, heatmap, knockout_curves, line_plot, patching_heatmap, probe_accuracy
from av_lens.views.tokens import logit_lens_grid, token_shift, token_strip

__all__ = ["COLOURS", "Page", "View", "attention_by_layer", "attention_heads", "heatmap", "knockout_curves",
           "line_plot", "logit_lens_grid", "patching_heatmap", "probe_accuracy", "token_shift", "token_strip"]
