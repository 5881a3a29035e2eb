"""The documentation's links: every relative link in README.md and docs/*.md, and every
``docs/...`` path the source code cites, exists inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of ``md``."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def broken_links(md: Path) -> list[str]:
    bad = []
    for target in relative_links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or ROOT not in [dest, *dest.parents]:
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    return bad


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_relative_links_exist_inside_the_repository(md: Path) -> None:
    assert relative_links(md) or md.name != "README.md"  # the README links to docs/
    assert broken_links(md) == []


def test_the_link_check_catches_a_broken_link(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("# Top\n[ok](x.md#top) [gone](nothing.md) [anchor](x.md#nope) "
                   "[outside](../../etc/passwd) [web](https://example.com)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken_links(doc) == ["nothing.md", "x.md#nope", "../../etc/passwd"]
    finally:
        ROOT = saved


def test_docs_paths_cited_in_the_source_exist() -> None:
    cited = set()
    for py in (ROOT / "src").rglob("*.py"):
        cited |= set(re.findall(r"\bdocs/[\w./-]*\w", py.read_text(encoding="utf-8")))
    assert "docs/distributed.md" in cited
    assert sorted(c for c in cited if not (ROOT / c).exists()) == []


def test_readme_does_not_point_outside_the_repository() -> None:
    assert "../shared" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_distributed_guide_lists_every_option_the_runtime_reads() -> None:
    """docs/distributed.md's options table names every ``RELAXSGD_*`` variable that
    distributed/options.py and distributed/auth.py read (the README only points to the guide), so a
    variable added to the code without a row fails here."""
    read = set()
    for name in ("options.py", "auth.py"):
        text = (ROOT / "src" / "relaxsgd" / "distributed" / name).read_text(encoding="utf-8")
        read |= set(re.findall(r'"(RELAXSGD_[A-Z_]+)"', text))
    assert {"RELAXSGD_TIMEOUT", "RELAXSGD_SECRET", "RELAXSGD_TLS_CERT"} <= read
    guide = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    rows = [ln for ln in guide.splitlines() if ln.startswith("| `RELAXSGD_")]
    named = set()
    for row in rows:
        cell = row.split("|")[1]
        for var in re.findall(r"`([A-Z_]+)`", cell):  # `RELAXSGD_TLS_CERT`, `_KEY`, `_CA`
            named.add(var if var.startswith("RELAXSGD_") else "RELAXSGD_TLS" + var)
    assert sorted(read - named) == []
