"""The support table: which model classes ``tome.patch`` takes, what it merges, how it is tested.

Every row comes from an adapter's registration (:mod:`tome.runtime.registry`, the same registry
the error of :func:`tome.patch` lists), so the table cannot go stale. Print it with::

    python -m tome.runtime.support            # the markdown table of the README
"""

from __future__ import annotations

from tome.runtime.registry import adapters

__all__ = ["support_rows", "support_table"]


def support_rows() -> list[tuple[str, str, str, str, str]]:
    """``(library, classes, kind, what is merged, tested on)`` per adapter, from the registry."""
    return [
        (a.library, ", ".join(f"`{c}`" for c in a.classes), a.kind, a.merged, a.tested_on) for a in adapters()
    ]


def support_table() -> str:
    """The support table as markdown.

    >>> support_table().splitlines()[0]
    '| library | model classes | adapter | what is merged | tested on |'
    """
    lines = ["| library | model classes | adapter | what is merged | tested on |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in support_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table())
