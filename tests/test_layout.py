"""The test tree itself: pytest imports test files by basename (no packages), so two files with the same
name in different folders make the second fail to collect."""

from __future__ import annotations

from collections import Counter

from conftest import REPO


def test_test_file_names_are_unique():
    names = Counter(path.name for path in (REPO / "tests").rglob("*.py") if path.name != "__init__.py")
    assert [name for name, count in names.items() if count > 1] == []
