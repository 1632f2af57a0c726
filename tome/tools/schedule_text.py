"""Schedules as the command line writes them: ``--r`` parsing and table labels."""

from __future__ import annotations

from tome.schedule import check_schedule
from tome.tools.errors import UserError

__all__ = ["file_label", "parse_r", "r_label"]


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


def r_label(r: int | tuple[int, float] | list[int] | None) -> str:
    """How a schedule is written in tables: ``0``, ``16``, ``16:-1.0``, ``[8,8,4]``."""
    if r is None:
        return "0"
    if isinstance(r, tuple):
        return f"{r[0]}:{r[1]:g}" if r[1] != int(r[1]) else f"{r[0]}:{r[1]:.1f}"
    if isinstance(r, list):
        return "[" + ",".join(str(v) for v in r) + "]"
    return str(r)


def file_label(r: int | tuple[int, float] | list[int] | None) -> str:
    """How a schedule is written in file names: shell-safe (letters, digits, ``._-`` only):
    ``16``, ``16_-1.0``, ``8-8-4`` for the per-layer ``[8,8,4]``.

    >>> [file_label(r) for r in (16, (16, -1.0), [8, 8, 4], None)]
    ['16', '16_-1.0', '8-8-4', '0']
    """
    if isinstance(r, list):
        return "-".join(str(v) for v in r) or "none"
    return r_label(r).replace(":", "_")
