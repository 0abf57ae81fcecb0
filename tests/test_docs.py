"""Every fenced ``python`` block of README.md and docs/*.md runs, so the documentation cannot rot.

The blocks of one file run in order in one namespace (a later block may use what an earlier one defined), in a
temporary working folder, offline, on the embedded model organism. A block preceded by a line
``<!-- not run: REASON -->`` (e.g. ``<!-- not run: needs a real checkpoint -->``) is compiled only, and every
name it imports from av_lens is checked to exist — a renamed function still breaks the test.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->\s*$")


def python_blocks(path: Path) -> list[dict]:
    """The ``python`` blocks of a Markdown file: source, first line number, and the not-run reason if marked."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in ("python", "py"):
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marked = NOT_RUN.search(before)
        indent = m.group("indent")
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in m.group("body").split("\n"))
        blocks.append({"source": body, "line": text.count("\n", 0, m.start()) + 2,
                       "not_run": marked.group("reason") if marked else None})
    return blocks


def av_lens_imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) for every ``from av_lens... import name`` and (module, None) for ``import av_lens...``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "av_lens":
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "av_lens"]
    return out


def check_names(tree: ast.AST, where: str) -> int:
    n = 0
    for module, name in av_lens_imports(tree):
        mod = importlib.import_module(module)
        if name is not None and name != "*":
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None, \
                f"{where}: `from {module} import {name}`: {module} has no {name}"
        n += 1
    return n


DOCS_WITH_CODE = [p for p in DOC_FILES if python_blocks(p)]


def test_the_docs_have_python_blocks():
    names = [p.name for p in DOCS_WITH_CODE]
    assert "README.md" in names and len(names) >= 3, names


def test_block_parser_reads_markers_and_indented_fences(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("a\n```python\nx = 1\n```\n<!-- not run: needs a real checkpoint -->\n```python\ny = 2\n```\n"
                  "1. step\n   ```python\n   z = 3\n   ```\n```bash\nls\n```\n")
    blocks = python_blocks(md)
    assert [b["source"].strip() for b in blocks] == ["x = 1", "y = 2", "z = 3"]
    assert [b["not_run"] for b in blocks] == [None, "needs a real checkpoint", None]
    assert blocks[0]["line"] == 3


def test_name_check_catches_a_missing_name():
    tree = ast.parse("from av_lens.analysis import no_such_tool_here")
    with pytest.raises(AssertionError, match="no_such_tool_here"):
        check_names(tree, "x")


@pytest.mark.parametrize("path", DOCS_WITH_CODE, ids=lambda p: p.name)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = checked = 0
    for block in python_blocks(path):
        where = f"{path.relative_to(ROOT)}:{block['line']}"
        try:
            tree = ast.parse(block["source"], filename=where)
        except SyntaxError as e:
            pytest.fail(f"{where}: the block does not parse: {e}", pytrace=False)
        checked += check_names(tree, where)
        if block["not_run"] is not None:
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(tree, where, "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - name the block, show its output
            pytest.fail(f"{where}: the block raised {type(e).__name__}: {e}\n--- its output:\n{out.getvalue()[-2000:]}",
                        pytrace=False)
        ran += 1
        namespace.setdefault("__outputs__", []).append(out.getvalue())
    assert ran + checked > 0
    if path.name == "README.md":
        quick = namespace["__outputs__"][0]
        # the Quickstart prints the layout and what the audio positions read as, naming the sound playing
        assert "audio" in quick and namespace["sound"] in quick, quick
