"""Schedules as the command line writes them: ``--r`` and ``--ratio`` parsing, table labels,
file labels.

A *setting* is what one row of a table (one picture of ``tome viz``) runs: an ``r`` schedule
(int, per-layer list or ``(r, inflection)``), a :class:`Ratio` (``tome.patch(model,
ratio=...)``), or ``0`` / ``None`` for the unmerged model.
"""

from __future__ import annotations

from dataclasses import dataclass

from tome.core.schedule import check_ratio, check_schedule
from tome.tools.errors import UserError

__all__ = ["Ratio", "file_label", "parse_r", "parse_ratio", "r_label", "setting_label"]


@dataclass(frozen=True)
class Ratio:
    """A ``ratio`` schedule: every block removes this fraction of each row's mergeable tokens
    (``tome.patch(model, ratio=value)``).

    >>> Ratio(0.2)
    Ratio(value=0.2)
    """

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_ratio(self.value))


def _split_r(text: str) -> list[str]:
    """Split ``--r`` at the commas outside ``[...]``."""
    items, depth, current = [], 0, []
    for char in str(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"--r: unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise UserError(f"--r: unbalanced '[' in {text!r}")
    items.append("".join(current))
    return items


def parse_r(text: str) -> list[int | tuple[int, float] | list[int]]:
    """Parse ``--r``: ``"16"``, ``"0,8,13,16"``, ``"16:-1.0"`` (an ``(r, inflection)`` ramp) or
    ``"[32,30,...]"`` (one per-layer schedule, as ``tome tune`` prints it).

    >>> parse_r("0,8,16:-1.0,[4,2,0]")
    [0, 8, (16, -1.0), [4, 2, 0]]
    """
    values: list[int | tuple[int, float] | list[int]] = []
    for item in _split_r(text):
        item = item.strip()
        if not item:
            raise UserError(f"--r: empty value in {text!r}; expected e.g. 16, 0,8,16, 16:-1.0 or [8,8,4]")
        try:
            if item.startswith("[") and item.endswith("]"):
                value: int | tuple[int, float] | list[int] = [
                    int(v) for v in item[1:-1].split(",") if v.strip()
                ]
                if not value:
                    raise ValueError
            elif ":" in item:
                r_text, inflection_text = item.split(":", 1)
                value = (int(r_text), float(inflection_text))
            else:
                value = int(item)
        except ValueError:
            raise UserError(
                f"--r: cannot read {item!r}; expected an int (16), a list (0,8,16), r:inflection (16:-1.0) "
                "or a per-layer schedule ([8,8,4])"
            ) from None
        try:
            check_schedule(value)  # the same rules as tome.patch
        except (TypeError, ValueError) as error:
            raise UserError(f"--r: {error}") from None
        values.append(value)
    return values


def parse_ratio(text: str) -> list[Ratio | int]:
    """Parse ``--ratio``: one fraction ``"0.2"`` or several ``"0.1,0.2,0.3"``, each in
    ``[0, 1)``; ``0`` is the unmerged model (as ``--r 0``).

    >>> parse_ratio("0,0.1,0.25")
    [0, Ratio(value=0.1), Ratio(value=0.25)]
    """
    values: list[Ratio | int] = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise UserError(
                f"--ratio: cannot read {item!r}; expected a fraction of the tokens in [0, 1), e.g. 0.2 or 0.1,0.2"
            ) from None
        try:
            values.append(0 if value == 0 else Ratio(value))
        except (TypeError, ValueError) as error:
            raise UserError(f"--{error}") from None  # "ratio: expected a number with 0 <= ratio < 1, ..."
    return values


def r_label(r: int | tuple[int, float] | list[int] | Ratio | None) -> str:
    """How a setting is written in tables: ``0``, ``16``, ``16:-1.0``, ``[8,8,4]``, and
    ``ratio=0.2`` for a :class:`Ratio`.

    >>> [r_label(r) for r in (None, 16, (16, -1.0), [8, 8, 4], Ratio(0.2))]
    ['0', '16', '16:-1.0', '[8,8,4]', 'ratio=0.2']
    """
    if r is None:
        return "0"
    if isinstance(r, Ratio):
        return f"ratio={r.value:g}"
    if isinstance(r, tuple):
        return f"{r[0]}:{r[1]:g}" if r[1] != int(r[1]) else f"{r[0]}:{r[1]:.1f}"
    if isinstance(r, list):
        return "[" + ",".join(str(v) for v in r) + "]"
    return str(r)


def setting_label(r: int | tuple[int, float] | list[int] | Ratio | None) -> str:
    """A setting named in a sentence or caption: ``r=16``, ``r=16:-1.0``, ``ratio=0.2``.

    >>> setting_label(16), setting_label(Ratio(0.2))
    ('r=16', 'ratio=0.2')
    """
    return r_label(r) if isinstance(r, Ratio) else f"r={r_label(r)}"


def file_label(r: int | tuple[int, float] | list[int] | Ratio | None) -> str:
    """How a schedule is written in file names: shell-safe (letters, digits, ``._-`` only):
    ``16``, ``16_-1.0``, ``8-8-4`` for the per-layer ``[8,8,4]``, ``ratio0.2`` for a
    :class:`Ratio`.

    >>> [file_label(r) for r in (16, (16, -1.0), [8, 8, 4], None, Ratio(0.2))]
    ['16', '16_-1.0', '8-8-4', '0', 'ratio0.2']
    """
    if isinstance(r, Ratio):
        return f"ratio{r.value:g}"
    if isinstance(r, list):
        return "-".join(str(v) for v in r) or "none"
    return r_label(r).replace(":", "_")
