"""arrays.unique is np.unique: same values, order and dtype, empty and one-element arrays included."""

from __future__ import annotations

import numpy as np
import pytest

from hm_recsys.arrays import unique


@pytest.mark.parametrize("values", [
    np.zeros(0, np.int64),
    np.array([7], np.int32),
    np.array([3, 3, 3], np.int64),
    np.random.default_rng(0).integers(-50, 50, 1000),
    np.random.default_rng(1).integers(0, 2048, 5000) * 105_542 + np.random.default_rng(2).integers(0, 105_542, 5000),
])
def test_unique_is_numpys(values):
    got, want = unique(values), np.unique(values)
    assert got.dtype == want.dtype and np.array_equal(got, want)
