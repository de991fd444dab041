"""Every table of results in the README is rendered from a committed bench/results file, and agrees with it."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import readme_tables  # noqa: E402


def test_readme_tables_match_their_results_files() -> None:
    readme = readme_tables.README.read_text(encoding="utf-8")
    assert readme_tables.BLOCK.search(readme), "the README has no generated results table"
    assert readme_tables.render(readme) == readme, "run: python bench/readme_tables.py --write"


def test_a_changed_number_is_caught(tmp_path: Path) -> None:
    readme = readme_tables.README.read_text(encoding="utf-8")
    match = readme_tables.BLOCK.search(readme)
    assert match is not None
    tampered = readme.replace(match.group("body"), match.group("body").replace("|", "| 9", 1), 1)
    assert readme_tables.render(tampered) != tampered
