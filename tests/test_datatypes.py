"""`request_array` and `all_finite`: how both prediction protocols read and check inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from service.datatypes import all_finite, request_array
from tests.support import REPO_ROOT


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_values_pass_even_when_their_squares_overflow(dtype: type) -> None:
    largest = float(np.finfo(dtype).max)
    assert all_finite(np.array([[0.0, 1.5, -2.0]], dtype=dtype))
    # The sum of squares overflows; the element-wise check still finds every value finite.
    assert all_finite(np.array([[largest, -largest, 0.5]], dtype=dtype))
    assert all_finite(np.zeros((0, 3), dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_any_nan_or_infinity_fails(dtype: type, bad: float) -> None:
    values = np.ones((2, 4), dtype=dtype)
    values[1, 2] = bad
    assert not all_finite(values)
    # Beside values whose squares overflow, too.
    values[0, 0] = np.finfo(dtype).max
    assert not all_finite(values)


def test_opposite_infinities_fail() -> None:
    # inf^2 + inf^2 is inf, never a cancelling NaN-free sum; checked for the record.
    assert not all_finite(np.array([np.inf, -np.inf], dtype=np.float32))


def test_request_numbers_beyond_the_range_become_infinity() -> None:
    array = request_array([[1e39, -1e39, 2.5]], np.dtype(np.float32))
    assert array.dtype == np.float32
    assert array.tolist() == [[np.inf, -np.inf, 2.5]]
    assert not all_finite(array)
    with pytest.raises(ValueError):
        request_array([[1.0, 2.0], [3.0]], np.dtype(np.float32))
    with pytest.raises(ValueError):
        request_array([["one"]], np.dtype(np.float32))


def test_the_deliberate_overflows_warn_nothing() -> None:
    script = (
        "import numpy as np; from service.datatypes import all_finite, request_array; "
        "print(all_finite(np.array([3e38, 1.0], dtype=np.float32)), "
        "request_array([1e39], np.dtype(np.float32)).tolist())"
    )
    completed = subprocess.run(
        [sys.executable, "-W", "default", "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.strip() == "True [inf]"
    assert completed.stderr == ""
