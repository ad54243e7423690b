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


def test_the_reliability_page_shows_each_fuzz_run_and_says_which_are_smaller_or_unfinished(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("reliability", REPO / "benchmarks" / "reliability.py")
    reliability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability)

    def run(path, per_reader, complete, seeds):
        readers = [{"seed": s, "reader": s, "inputs": per_reader, "right": 1, "clear_errors": per_reader - 1,
                    "failures": 0, "known_failures": 0, "slowest_s": 0.5, "largest_peak_bytes": 2**20,
                    "known": []} for s in seeds]
        path.write_text(json.dumps({"command": f"fuzz --per-reader {per_reader}", "per_reader": per_reader,
                                    "seed": 0, "wall_s": 600, "cpus": 2, "python": "3.11", "complete": complete,
                                    "readers": readers}))
        return str(path)

    big = run(tmp_path / "big.json", 10_000, True, ["bin", "pth"])
    small = run(tmp_path / "small.json", 300, False, ["tfrecord"])
    page = reliability.fuzz_table([big, small, str(tmp_path / "absent.json")])
    first, second = page.split("\n\n`")
    assert "| bin | bin | 10,000 |" in first and "| pth |" in first and "tfrecord" not in first
    assert "smaller run" not in first and "stopped before the end" not in first
    assert "| tfrecord | tfrecord | 300 |" in second and "smaller run" in second and "stopped before the end" in second
    assert "No large fuzz run" in reliability.fuzz_table([str(tmp_path / "absent.json")])
