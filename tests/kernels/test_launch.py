"""The host-side launch arithmetic the kernels' grids and key splits are sized with, against math's."""

import math

import pytest

triton = pytest.importorskip("triton")

from mmattn.kernels.triton.launch import ceil_div, next_power_of_2  # noqa: E402


def test_ceil_div_is_the_ceiling_of_the_quotient():
    for d in (1, 2, 3, 16, 32, 127):
        for n in range(0, 300):
            assert ceil_div(n, d) == math.ceil(n / d), (n, d)


def test_next_power_of_2_is_the_smallest_power_at_least_n_and_the_floor():
    for n in range(0, 1100):
        for floor in (1, 2, 16):
            power = next_power_of_2(n, floor)
            assert power >= max(n, floor) and power & (power - 1) == 0, (n, floor)
            assert power == floor or power // 2 < n, (n, floor)
