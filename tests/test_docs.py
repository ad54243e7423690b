"""README and docs/ point at files and sections that exist, and say what the code says where a table comes from it."""
import re

import pytest

from runs import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page) -> set:
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_slug_follows_github():
    assert slug(" Plan a TPU run: will it fit?") == "plan-a-tpu-run-will-it-fit"
    assert slug("`ijbc:DIR` and IJB-B") == "ijbcdir-and-ijb-b"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no file {where}")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no section #{anchor} in {where.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_stays_short_and_every_docs_page_is_linked_from_it():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 280
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"docs/{page.name} is not linked from the README"


def test_the_data_kinds_table_is_the_registry():
    from facekd_jax.data import specs

    assert specs.kinds_table() in (REPO / "docs" / "data.md").read_text(), \
        "docs/data.md's spec table differs from data.specs.kinds_table(): paste the function's output there"
