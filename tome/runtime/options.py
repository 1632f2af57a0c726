"""Family options, each declared once: name, default, check, one-line doc and CLI flag.

A family's handle class declares its options as class attributes::

    class TextHandle(ToMeHandle):
        min_tokens = Option(24, at_least(0), "a text is never merged below this many tokens",
                            flag="--min-tokens")

and from that one line come: the ``tome.patch`` keyword (``tome.patch(model, min_tokens=8)``,
checked before the model changes), the checked, settable handle attribute
(``model.tome.min_tokens = 8``), the entry of ``model.tome.patch_options()``, the error that
names the families taking an option given to another one, and the command-line flag.

>>> class Demo:
...     window = Option("span", one_of("span", "position"), "how the local window is measured")
>>> d = Demo(); d.window = "position"; d.window
'position'
>>> d.window = "far"
Traceback (most recent call last):
ValueError: window: expected one of span, position, got 'far'
>>> sorted(declared_options(Demo))
['window']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = [
    "Option",
    "at_least",
    "declared_options",
    "flag",
    "number_in",
    "one_of",
]

Check = Callable[[str, object], object]


class Option:
    """One declared option of a family (see the module docstring).

    Args:
        default: its value when ``tome.patch`` is not given it.
        check: ``check(name, value) -> value`` raises ``TypeError`` / ``ValueError`` naming the
            option, what was expected and what was seen; returns the value to store.
        doc: one line: what it does (shown by ``tome COMMAND --help`` for options with a flag).
        flag: the command-line flag of the tools, or ``None`` when the tools do not expose it.
    """

    def __init__(self, default: object, check: Check, doc: str, *, flag: str | None = None) -> None:
        self.default = default
        self.check = check
        self.doc = doc
        self.flag = flag
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        try:
            return obj.__dict__["_" + self.name]
        except KeyError:
            return self.default

    def __set__(self, obj, value) -> None:
        obj.__dict__["_" + self.name] = self.check(self.name, value)

    def __repr__(self) -> str:
        return f"Option({self.name}={self.default!r})"


def declared_options(cls: type) -> dict[str, Option]:
    """The options ``cls`` (a handle class) declares, its bases' included, in declaration order."""
    found: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Option):
                found[name] = value
    return found


# -- checks -------------------------------------------------------------------------------------


def flag(name: str, value: object) -> bool:
    """``True`` or ``False`` only: ``bool("no")`` is True, so anything else is an error."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def at_least(low: int, meaning: str = "") -> Check:
    """An int ``>= low`` (bools refused); ``meaning`` is said in the error."""
    said = f" ({meaning})" if meaning else ""

    def check(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}{said}, got {value!r}")
        return value

    return check


def any_int(name: str, value: object) -> int:
    """Any int (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    return value


def number_in(low: float, high: float) -> Check:
    """A number in ``[low, high]``, stored as a float."""

    def check(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
        return float(value)

    return check


def one_of(*choices: object, described: str = "") -> Check:
    """One of ``choices``; ``described`` replaces the list of choices in the error."""
    expected = described or ", ".join(str(c) for c in choices)

    def check(name: str, value: object) -> object:
        if (
            isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)
        ) or value not in choices:
            raise ValueError(f"{name}: expected one of {expected}, got {value!r}")
        return value

    return check


def set_options(obj: object, options: Iterable[Option], given: dict) -> None:
    """Give ``obj`` every option's value: ``given[name]`` where given, else the default
    (checked either way)."""
    for option in options:
        setattr(obj, option.name, given.get(option.name, option.default))
