"""Progress bars for the tools: tqdm on stderr when it can show, else nothing."""

from __future__ import annotations

import os
import sys

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str, *, unit: str = "run", initial: int = 0):
    """A tqdm bar of ``total`` steps on stderr (``initial`` of them already done; tqdm shows
    ``unit``/s and the ETA), or a bar that does nothing (``enabled`` False, no tqdm, or stderr
    not a TTY)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # A terminal that reports a size of 0 (e.g. a pty opened without one) would hide the bar.
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        blank = size.columns == 0 or size.lines == 0
    except (OSError, ValueError, AttributeError):
        blank = False
    fallback = {"ncols": 80, "nrows": 24} if blank else {}
    # disable=None: no bar when stderr is not a TTY
    return tqdm(total=total, desc=desc, leave=False, unit=unit, initial=initial, disable=None, **fallback)
