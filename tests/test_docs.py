"""The documentation builds without a warning and stands alone.

Oracle: ``mkdocs build --strict`` (every docstring parsed by mkdocstrings, every link
and anchor checked), and a scan for references to files outside the repository.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings-python are not installed (pip install -e '.[docs]')",
)
def test_docs_build_strictly(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env["NO_MKDOCS_2_WARNING"] = "1"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
        ]
        + ["--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "complexity" / "index.html").is_file()
    assert (
        "supervision_complexity"
        in (tmp_path / "site" / "api" / "complexity" / "index.html").read_text()
    )


def test_docs_and_docstrings_cite_only_the_repository():
    """The project's docs must stand alone: no references to files outside it."""
    pattern = re.compile(r"shared/|SPEC §")
    files = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "ntkd").rglob("*.py")]
    hits = [
        f"{path.relative_to(REPO)}:{i}: {line.strip()}"
        for path in files
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_cited_definition_anchors_exist():
    """Every ``docs/definitions.md#anchor`` cited in a docstring is a heading of that page."""
    markdown = pytest.importorskip("markdown", reason="markdown comes with mkdocs (the docs extra)")

    md = markdown.Markdown(extensions=["toc"])
    md.convert((REPO / "docs" / "definitions.md").read_text())
    anchors = set()

    def walk(tokens):
        for t in tokens:
            anchors.add(t["id"])
            walk(t["children"])

    walk(md.toc_tokens)
    cited = {
        (path.relative_to(REPO), anchor)
        for path in (REPO / "ntkd").rglob("*.py")
        for anchor in re.findall(r"docs/definitions\.md#([\w-]+)", path.read_text())
    }
    assert cited, "no docstring cites docs/definitions.md"
    missing = sorted(f"{p}: #{a}" for p, a in cited if a not in anchors)
    assert not missing, missing


def test_the_facade_page_lists_every_export():
    import ntkd

    page = (REPO / "docs" / "api" / "ntkd.md").read_text()
    missing = [n for n in ntkd.__all__ if n != "__version__" and f"`ntkd.{n}`" not in page]
    assert not missing, f"add these to docs/api/ntkd.md: {missing}"
