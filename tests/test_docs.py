"""The README and docs/: every relative link resolves, the README's result tables are their reports' numbers, and CI
runs the README's install and test lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
QUALITY_START, QUALITY_END = "<!-- quality table: from bench/results/quality.md -->", "<!-- end quality table -->"


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where a markdown link is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        ids.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
    return ids


def code_blocks(text: str, section: str) -> list[str]:
    """The lines of the fenced blocks under the README's ``## <section>`` heading, comments and blanks dropped."""
    body = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert body, f"README.md has no '## {section}' section"
    lines = [ln.split("#")[0].strip() for block in FENCE.findall(body.group(1)) for ln in block.splitlines()[1:-1]]
    return [ln for ln in lines if ln]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_readme_quality_table_is_the_reports_first_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert QUALITY_START in readme and QUALITY_END in readme, "README.md lost its quality-table markers"
    block = readme.split(QUALITY_START, 1)[1].split(QUALITY_END, 1)[0].strip()
    report = (REPO / "bench/results/quality.md").read_text()
    head = "\n\n".join(report.split("\n\n")[:2]).strip()  # bench/quality.py's markdown: the FP line, the first table
    assert block == head, "README's quality table differs from bench/results/quality.md: copy the report's first table"


def table(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header row starts with ``header_start``: (headers, rows of cells)."""
    lines = text[text.index(header_start) :].splitlines()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("|")]
    end = next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))
    return rows[0], rows[2:end]


def test_readme_safety_rows_are_the_reports_cells() -> None:
    headers, rows = table((REPO / "README.md").read_text(), "| method [arm] |")
    full_headers, full_rows = table((REPO / "bench/results/smol_safety_v2.md").read_text(), "| method [arm] |")
    report = {r[0]: dict(zip(full_headers, r)) for r in full_rows}
    assert rows, "README.md has no safety table"
    for row in rows:
        assert row[0] in report, f"README safety row {row[0]!r} is not in bench/results/smol_safety_v2.md"
        for header, cell in zip(headers, row):
            assert report[row[0]][header] == cell, f"{row[0]} / {header}: README {cell}, report {report[row[0]][header]}"


def test_ci_runs_the_readme_install_and_test_lines() -> None:
    readme = (REPO / "README.md").read_text()
    ci = [ln.split("#")[0].strip() for ln in (REPO / ".ci/run").read_text().splitlines()]
    install, tests = code_blocks(readme, "Install"), code_blocks(readme, "Tests")
    assert install and tests == ["python -m pytest -q"], tests
    positions = [ci.index(cmd) if cmd in ci else -1 for cmd in install + tests]
    assert -1 not in positions, f".ci/run does not run {[c for c, p in zip(install + tests, positions) if p < 0]}"
    assert positions == sorted(positions), ".ci/run runs the README's lines in another order"
