"""numpy is imported once, when the parent collects; every forked slice starts with it."""
import numpy as np
import pytest


@pytest.mark.parametrize("n", [1, 10, 100, 1000])
def test_sum_of_a_range(n):
    assert np.arange(n).sum() == n * (n - 1) // 2


def test_matrix_inverse_round_trips():
    m = np.array([[4.0, 7.0], [2.0, 6.0]])
    assert np.allclose(m @ np.linalg.inv(m), np.eye(2))


def test_sorting_is_stable_for_equal_keys():
    keys = np.array([2, 1, 2, 1])
    assert np.argsort(keys, kind="stable").tolist() == [1, 3, 0, 2]
