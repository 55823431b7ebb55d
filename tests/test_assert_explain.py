"""A failed comparison of big values is explained in a few lines, quickly (no difflib over notebooks)."""

from __future__ import annotations

import time

from _pytest.assertion import util
from conftest import pytest_assertrepr_compare


def test_big_equal_explained_fast_with_first_difference():
    left, right = "a\n" * 60_000, "a\n" * 30_000 + "b\n" * 30_000
    t0 = time.perf_counter()
    lines = pytest_assertrepr_compare("==", left, right)
    assert time.perf_counter() - t0 < 1.0
    assert lines is not None and len(lines) == 3 and "index 60000" in lines[0], lines


def test_big_not_in_points_at_the_match():
    text = "x" * 50_000 + "SECRET" + "y" * 50_000
    lines = pytest_assertrepr_compare("not in", "SECRET", text)
    assert lines is not None and "found at index 50000" in lines[0], lines


def test_small_values_keep_pytests_explanation():
    assert pytest_assertrepr_compare("==", "abc", "abd") is None
    # and pytest's own explanation steps aside only for big values
    assert util.assertrepr_compare.__name__ == "assertrepr_compare"
    assert getattr(util.assertrepr_compare, "_course_wrapped", False), "conftest did not wrap pytest's explanation"
