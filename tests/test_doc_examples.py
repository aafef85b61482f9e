"""Every ```python block of README.md and docs/*.md runs as written (CPU, tiny sizes).

A file's blocks run in order in one namespace, in a temp cwd (``tempfile.mkdtemp()`` lands there too). A block
whose first line is ``# not run: <reason>`` (torchrun over several processes, a multi-GB checkpoint) is only
compiled. Files that import transformers are skipped when it is missing."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"# not run: \S")


def python_blocks(text: str) -> list[str]:
    """The source of every ```python block of a markdown text, in order."""
    return BLOCK.findall(text)


def run_blocks(blocks: list[str], label: str) -> list[int]:
    """Compile every block, exec the runnable ones in one shared namespace; returns the indices run.
    A block that raises propagates its exception (with ``label#i`` as its file name in the traceback)."""
    ns: dict = {"__name__": "__doc_example__"}
    ran = []
    for i, src in enumerate(blocks):
        code = compile(src, f"{label}#{i}", "exec")  # a not-run block must still be valid Python
        if NOT_RUN.match(src.lstrip()):
            continue
        exec(code, ns)
        ran.append(i)
    return ran


def test_run_blocks_fails_on_a_raising_block():
    with pytest.raises(ZeroDivisionError):
        run_blocks(["x = 1\n", "y = x / 0\n"], "t.md")
    with pytest.raises(SyntaxError):  # a not-run block is still compiled
        run_blocks(["# not run: needs torchrun\nimport (\n"], "t.md")
    with pytest.raises(NameError):  # one namespace, in order: a later name is not visible earlier
        run_blocks(["print(later)\n", "later = 1\n"], "t.md")
    assert run_blocks(["x = 1\n", "# not run: no GPU\nraise RuntimeError\n", "assert x == 1\n"], "t.md") == [0, 2]
    text = "a\n```python\nx = 1\n```\n```bash\nexit 1\n```\n```python\n# not run: y\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "# not run: y\ny = 2\n"]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_examples_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    if any(re.search(r"^\s*(?:from|import)\s+[\w.]*transformers\b", b, re.M) for b in blocks):
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        run_blocks(blocks, str(path.relative_to(ROOT)))
    finally:  # the examples' compiled graphs must not leak into later tests of this worker
        torch._dynamo.reset()
