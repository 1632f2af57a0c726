"""Tests for merge schedules: :func:`tome.core.schedule.resolve_schedule` and ``check_schedule``."""

from __future__ import annotations

import itertools
import math

import pytest

import tome
from tome.core.schedule import check_schedule, resolve_schedule


def test_public_name():
    assert tome.resolve_schedule is resolve_schedule


# -- ints and lists -----------------------------------------------------------------------------


@pytest.mark.parametrize(("r", "layers"), [(0, 12), (8, 12), (16, 1), (5, 24), (3, 0)])
def test_int(r, layers):
    assert resolve_schedule(r, layers) == [r] * layers


def test_list_padded_with_zeros():
    assert resolve_schedule([4, 2], 4) == [4, 2, 0, 0]
    assert resolve_schedule([], 3) == [0, 0, 0]
    assert resolve_schedule([1, 2, 3], 3) == [1, 2, 3]


def test_list_and_other_sequences_are_copied():
    r = [3, 1]
    out = resolve_schedule(r, 4)
    out[0] = 99
    assert r == [3, 1]
    assert resolve_schedule(range(3), 3) == [0, 1, 2]


def test_list_too_long():
    with pytest.raises(ValueError, match=r"^r: the list has 4 entries but the model has 3 layers"):
        resolve_schedule([1, 2, 3, 4], 3)


@pytest.mark.parametrize("bad", [[1, -1], [1, 2.0], [True], [1, "2"], [None]])
def test_list_bad_entries(bad):
    with pytest.raises(ValueError, match=r"^r: layer \d of the list must be an int >= 0"):
        resolve_schedule(bad, 4)
    with pytest.raises(ValueError, match=r"^r: "):
        check_schedule(bad)


# -- (r, inflection) tuples: ToMe's schedules ---------------------------------------------------


def test_inflection_minus_one_over_12_layers():
    # ToMe's "(16, -1.0)" schedule: 32 tokens in the first layer, decreasing linearly to 0
    schedule = resolve_schedule((16, -1.0), 12)
    assert schedule == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert schedule[0] == 32 and schedule[-1] == 0


def test_inflection_plus_one():
    assert resolve_schedule((8, 1.0), 5) == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("layers", [1, 2, 5, 12, 24])
@pytest.mark.parametrize("r", [0, 4, 13, 16])
def test_zero_inflection_is_constant(r, layers):
    assert resolve_schedule((r, 0.0), layers) == [r] * layers
    assert resolve_schedule((r, 0), layers) == resolve_schedule(r, layers)


def tome_parse_r(num_layers: int, r: int, inflect: float) -> list[int]:
    """ToMe's own ``parse_r`` (facebookresearch/ToMe, tome/utils.py) for a tuple schedule."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


@pytest.mark.parametrize("layers", [2, 3, 12, 24])
@pytest.mark.parametrize("inflection", [-1.0, -0.5, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("r", [0, 2, 8, 16, 20])
def test_matches_tome_where_endpoints_are_integers(r, inflection, layers):
    # with r * (1 -/+ inflection) integral, ToMe's parse_r and ours describe the same line
    # (ours adds an epsilon against float truncation, e.g. ToMe's int(29.999999) at the end)
    ours = resolve_schedule((r, inflection), layers)
    theirs = tome_parse_r(layers, r, inflection)
    assert ours == theirs or (ours[:-1] == theirs[:-1] and ours[-1] == theirs[-1] + 1)


@pytest.mark.parametrize("layers", [2, 3, 7, 12, 24, 40])
@pytest.mark.parametrize("inflection", [-1.0, -0.6, -0.25, 0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("r", [0, 1, 5, 8, 13, 16, 12.5])
def test_inflection_is_a_linear_ramp(r, inflection, layers):
    schedule = resolve_schedule((r, inflection), layers)
    assert len(schedule) == layers
    assert all(isinstance(v, int) and v >= 0 for v in schedule)
    first, last = r * (1 - inflection), r * (1 + inflection)
    # endpoints: from r * (1 - inflection) to r * (1 + inflection), rounded down
    assert schedule[0] == math.floor(first + 1e-9)
    assert schedule[-1] == math.floor(last + 1e-9)
    # every layer within 1 (rounding down) of the exact line
    for i, value in enumerate(schedule):
        exact = first + (last - first) * i / (layers - 1)
        assert exact - 1 < value <= exact + 1e-6
    # monotone in the direction of the inflection
    diffs = [b - a for a, b in itertools.pairwise(schedule)]
    if inflection > 0:
        assert all(d >= 0 for d in diffs)
    elif inflection < 0:
        assert all(d <= 0 for d in diffs)
    # mean r (within the rounding)
    assert r - 1 < sum(schedule) / layers <= r + 1e-6


def test_inflection_single_layer():
    assert resolve_schedule((16, -1.0), 1) == [16]
    assert resolve_schedule((16, 0.5), 1) == [16]


def test_inflection_zero_layers():
    assert resolve_schedule((16, -1.0), 0) == []
    assert resolve_schedule(16, 0) == []
    assert resolve_schedule([], 0) == []


# -- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [-1, -16])
def test_negative_int(r):
    with pytest.raises(ValueError, match=r"^r: expected r >= 0"):
        check_schedule(r)
    with pytest.raises(ValueError, match=r"^r: expected r >= 0"):
        resolve_schedule(r, 12)


@pytest.mark.parametrize(
    "r",
    [(-1, 0.0), (16, 1.5), (16, -1.01), (16, "a"), ("16", 0.0), (True, 0.0), (16, True), (None, 0.0)],
)
def test_bad_tuple(r):
    with pytest.raises(ValueError, match=r"^r: in an \(r, inflection\) schedule"):
        check_schedule(r)
    with pytest.raises(ValueError, match=r"^r: "):
        resolve_schedule(r, 12)


@pytest.mark.parametrize("r", [16.0, "16", None, True, False, {"r": 16}, b"ab"])
def test_wrong_type(r):
    with pytest.raises((TypeError, ValueError), match=r"^r: "):
        check_schedule(r)
    with pytest.raises((TypeError, ValueError), match=r"^r: "):
        resolve_schedule(r, 12)


def test_wrong_type_is_type_error():
    with pytest.raises(
        TypeError, match=r"^r: expected an int, a list of ints .* or an \(r, inflection\) tuple"
    ):
        check_schedule(16.0)


@pytest.mark.parametrize("r", [0, 16, [1, 2], [], (16, -1.0), (8, 0.5), (0, 1.0), (12.5, 0.0)])
def test_valid_schedules_pass(r):
    assert check_schedule(r) is None
