"""The README's support table is the one the adapters' registry prints."""

from __future__ import annotations

from pathlib import Path

from tome.runtime.support import support_table


def test_readme_support_table_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_table() in readme, "regenerate it: python -m tome.runtime.support"
