"""benchmarks/bench_utils.py helpers that decide what a benchmark measures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_utils import largest_fitting  # noqa: E402


@pytest.mark.parametrize("limit", [0, 63, 64, 65, 100, 127, 128, 200, 1000, 4096, 5000])
def test_largest_fitting_finds_the_largest_multiple_of_step_below_the_limit(limit):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    got = largest_fitting(fits, start=64, cap=4096, step=16)
    if limit < 64:
        assert got == 0
    else:
        want = min(limit, 4096) // 16 * 16
        assert got == want, (limit, got, tried)
    assert all(b % 16 == 0 for b in tried) and len(tried) <= 16
