"""`av-lens report`: the HTML report renders in a real headless browser, offline, without console errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

#: injected first into a copy of the report: records page errors, console errors and every resource fetched
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + e.message));
window.addEventListener('unhandledrejection', e => window.__errors.push('rejection: ' + e.reason));
const _ce = console.error; console.error = (...a) => { window.__errors.push('console: ' + a.join(' ')); _ce(...a); };
window.addEventListener('load', () => setTimeout(() => {
  document.body.setAttribute('data-errors', JSON.stringify(window.__errors));
  document.body.setAttribute('data-resources', JSON.stringify(performance.getEntriesByType('resource').map(r => r.name)));
  const cv = [...document.querySelectorAll('.avl-cv')];
  document.body.setAttribute('data-cv-rendered', JSON.stringify(cv.map(d => d.querySelectorAll('*').length)));
  document.body.setAttribute('data-svg-marks', String(document.querySelectorAll('svg.avl-plot circle, svg.avl-plot rect').length));
}, 500));
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe is not None, ("Debian's chromium is needed for the browser test: apt-get install chromium "
                             "(the README's test command and .ci/run install it)")
    return exe


def run_chromium(args, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    from av_lens.sae import DictionaryConfig, SparseDictionary

    sae = SparseDictionary(DictionaryConfig(d_in=64, d_sae=32, hook_name="blocks.3.hook_resid_post",
                                            metadata={"selector": "audio|video"})).save(out.parent / "sae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "report", "--out", str(out), "--quiet", "--sae", str(sae)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {out}" in r.stdout
    assert "no --video given: running on the built-in pair" in r.stdout  # says what it runs
    return out


@pytest.mark.slow
def test_report_renders_offline_in_headless_chromium(report_file, tmp_path):
    html = report_file.read_text()
    assert html.count("CircuitsVis.render(") >= 1 and html.count("var CircuitsVis") <= 1
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    r = run_chromium(["--dump-dom", probed.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", r.stdout).group(1)
    attr = lambda name: json.loads(re.search(name + r"=\"([^\"]*)\"", body).group(1).replace("&quot;", '"'))  # noqa: E731
    assert attr("data-errors") == []
    assert attr("data-resources") == []          # nothing fetched: no script, style, image or XHR request
    rendered = attr("data-cv-rendered")
    assert rendered and all(n > 10 for n in rendered)  # every circuitsvis view built its DOM
    assert attr("data-svg-marks") > 20            # plots have their points and cells
    for heading in ("Answers", "Where do generated tokens look?", "Logit lens at the audio positions",
                    "Attention knockout", "Linear probes", "Inherited from the base?",
                    "Dictionary features at blocks.3.hook_resid_post"):
        assert heading in r.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    r = run_chromium(["--window-size=1200,5200", f"--screenshot={shot}", report_file.as_uri()], tmp_path)
    assert r.returncode == 0 and shot.stat().st_size > 50_000


def test_report_bad_inputs_give_clear_errors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "report", "--audio", "x.wav", "--out", str(tmp_path / "r.html")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "need a --video" in r.stderr and "Fix:" in r.stderr
    bad = tmp_path / "notavideo.mp4"
    bad.write_text("hello")
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "report", "--video", str(bad), "--out", str(tmp_path / "r.html")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "notavideo.mp4" in r.stderr and "Fix:" in r.stderr
    r = subprocess.run([sys.executable, "-m", "av_lens.cli", "demo", "--sae", str(tmp_path / "no_sae"), "--out",
                        str(tmp_path / "r.html")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "--sae" in r.stderr and "no such folder" in r.stderr and "Fix:" in r.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_with_a_dictionary_shows_its_features_with_their_media(tmp_path):
    """build_report(sae=...) adds the dictionary's features most active on the clip, each top position with
    its frame or waveform and its clip's name; a dictionary for another model is refused before any stage."""
    from av_lens import HookedAVTransformer, InputError
    from av_lens.report import _inputs, _prompts, build_report, builtin_pair
    from av_lens.sae import DictionaryConfig, SparseDictionary, feature_activations

    model = HookedAVTransformer.from_pretrained("av-lens/organism")
    fact, cf = builtin_pair()
    sae = SparseDictionary(DictionaryConfig(d_in=64, d_sae=32, hook_name="blocks.3.hook_resid_post"), seed=1)
    out = tmp_path / "r.html"
    summary = build_report(model, fact, cf, out=out, probe_clips=0, progress=False, sae=sae, sae_features=3)
    html = out.read_text()
    assert "Dictionary features at blocks.3.hook_resid_post" in html
    # the three features named are the three most active on the counterfactual (main) clip's media positions
    hear = [model.encode(_inputs(model, c, _prompts(model)["hear"])) for c in (fact, cf)]
    fa = feature_activations(model, sae, hear, at="audio|video")
    expect = fa.acts[fa.batch == 1].max(0).values.argsort(descending=True)[:3].tolist()
    named = summary.answers["dictionary features (most active on the clip)"]
    assert [int(x.split(" ")[0]) for x in named.split(", ")] == expect
    for f in expect:
        assert f"<h4>feature {f}</h4>" in html
    n_rows = sum(len(fa.top(f, 8)) for f in expect)
    assert n_rows > 0 and html.count('class="avl-thumb"') + html.count('class="avl-wave"') == n_rows  # one each
    assert "counterfactual, sample 0" in html
    for bad, why in ((DictionaryConfig(d_in=32, d_sae=8, hook_name="blocks.3.hook_resid_post"), "d_in is 32"),
                     (DictionaryConfig(d_in=64, d_sae=8, hook_name="blocks.30.hook_resid_post"), "not a hook point"),
                     (DictionaryConfig(d_in=16, d_sae=8, hook_name="blocks.3.attn.hook_z"), "shape"),
                     (DictionaryConfig(d_in=64, d_sae=8, hook_name="blocks.3.hook_resid_post",
                                       metadata={"selector": "image"}), "has none of them")):
        with pytest.raises(InputError, match=why):
            build_report(model, fact, cf, out=tmp_path / "bad.html", probe_clips=0, progress=False,
                         sae=SparseDictionary(bad))
        assert not (tmp_path / "bad.html").exists()
