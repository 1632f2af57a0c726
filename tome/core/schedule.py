"""Merge schedules: how many tokens each layer removes.

A schedule is given as
- an ``int`` r: every layer removes r tokens;
- a ``list`` of ints: layer i removes ``r[i]`` (missing layers remove 0);
- a 2-``tuple`` ``(r, inflection)`` (always read this way, as in ToMe): a linear ramp with mean r, as in ToMe's schedules
  (Bolya et al. 2023): from ``r * (1 - inflection)`` at the first layer to ``r * (1 + inflection)``
  at the last. ``(16, -1.0)`` removes 32 tokens in the first layer down to 0 in the last;
  ``(16, 0.0)`` is the same as ``16``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Schedule", "check_ratio", "check_schedule", "resolve_schedule"]

Schedule = int | Sequence[int] | tuple[int | float, float]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(r: object) -> None:
    """Raise a clear error if ``r`` is not a valid schedule.

    >>> check_schedule((16, -1.0))
    >>> check_schedule(-1)
    Traceback (most recent call last):
    ...
    ValueError: r: expected r >= 0, got -1
    """
    if _is_int(r):
        if r < 0:
            raise ValueError(f"r: expected r >= 0, got {r}")
        return
    if isinstance(r, tuple) and len(r) == 2:
        base, inflection = r
        if isinstance(base, bool) or not isinstance(base, int | float) or base < 0:
            raise ValueError(f"r: in an (r, inflection) schedule r must be a number >= 0, got {base!r}")
        if isinstance(inflection, bool) or not isinstance(inflection, int | float) or abs(inflection) > 1:
            raise ValueError(
                f"r: in an (r, inflection) schedule inflection must be in [-1, 1], got {inflection!r} "
                "(a 2-tuple is always (r, inflection); pass a list for one r per layer)"
            )
        return
    if isinstance(r, Sequence) and not isinstance(r, str | bytes):
        for i, value in enumerate(r):
            if not _is_int(value) or value < 0:
                raise ValueError(f"r: layer {i} of the list must be an int >= 0, got {value!r}")
        return
    raise TypeError(
        f"r: expected an int, a list of ints (one per layer) or an (r, inflection) tuple, got {r!r}"
    )


def resolve_schedule(r: Schedule, num_layers: int) -> list[int]:
    """Tokens to remove in each of ``num_layers`` layers.

    >>> resolve_schedule(8, 3)
    [8, 8, 8]
    >>> resolve_schedule([4, 2], 3)
    [4, 2, 0]
    >>> resolve_schedule((16, -1.0), 5)
    [32, 24, 16, 8, 0]
    """
    check_schedule(r)
    if _is_int(r):
        return [r] * num_layers
    if isinstance(r, tuple) and len(r) == 2:
        base, inflection = r
        first, last = base * (1.0 - inflection), base * (1.0 + inflection)
        if num_layers == 1:
            return [int(base)]
        step = (last - first) / (num_layers - 1)
        return [max(int(first + step * i + 1e-9), 0) for i in range(num_layers)]
    values = list(r)
    if len(values) > num_layers:
        raise ValueError(f"r: the list has {len(values)} entries but the model has {num_layers} layers")
    return values + [0] * (num_layers - len(values))


def check_ratio(ratio: object) -> float:
    """Raise a clear error unless ``ratio`` is a number in ``[0, 1)``: the fraction of each
    row's mergeable tokens that every block removes (capped, as ``r``, at half of them).

    >>> check_ratio(0.2)
    0.2
    >>> check_ratio(1.5)
    Traceback (most recent call last):
    ...
    ValueError: ratio: expected a number with 0 <= ratio < 1, got 1.5
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise TypeError(f"ratio: expected a number with 0 <= ratio < 1, got {ratio!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio: expected a number with 0 <= ratio < 1, got {ratio!r}")
    return float(ratio)
