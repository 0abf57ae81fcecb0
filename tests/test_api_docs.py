"""The API reference (mkdocs + mkdocstrings, mkdocs.yml) builds strictly and offline from the docstrings:
a page naming an object that does not exist, or a broken link, fails the build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build(config: Path, out: Path) -> subprocess.CompletedProcess:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs and mkdocstrings[python] come with the test extra: pip install -e '.[test]'")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=config.parent)


def test_api_reference_builds_strictly(tmp_path):
    r = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    model = (tmp_path / "site" / "model.html").read_text()
    for name in ("HookedAVTransformer", "from_pretrained", "run_with_cache", "generate"):
        assert name in model, name
    analysis = (tmp_path / "site" / "analysis.html").read_text()
    assert "knockout_sweep" in analysis and "AttentionFlow" in analysis and "patch_by_modality" in analysis
    for page in (tmp_path / "site").glob("*.html"):  # offline: nothing loaded from another host
        html = page.read_text()
        assert 'src="http' not in html and "<link href=\"http" not in html, page.name


@pytest.mark.parametrize("bad", ["::: av_lens.model.NoSuchThing\n", "[a link](no_such_page.md)\n"])
def test_a_broken_reference_fails_the_build(tmp_path, bad):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs" / "api", tmp_path / "docs" / "api")
    (tmp_path / "av_lens").symlink_to(ROOT / "av_lens")
    with open(tmp_path / "docs" / "api" / "errors.md", "a") as f:
        f.write("\n" + bad)
    r = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0, r.stderr[-2000:]
