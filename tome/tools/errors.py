"""The one exception the tools raise for problems the user can fix."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with what the user asked for (bad spec, missing file, ...): reported in one
    line by the command, without a traceback."""
