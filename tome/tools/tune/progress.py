"""What :func:`tome.tune` says while it runs: the stage on its progress bar (a terminal), and a
line on stderr as each stage ends (always, unless ``progress=False``: logs and pipes get them too).

>>> import io
>>> stream = io.StringIO()
>>> says = Progress(None, True, stream)
>>> says.line("tune: ramps: done")
>>> stream.getvalue()
'tune: ramps: done\\n'
>>> Progress(None, False, stream).line("not shown")
>>> stream.getvalue()
'tune: ramps: done\\n'
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Stage names for ``bar`` (a tqdm bar, a no-op bar, or None) and lines on ``stream``
    (stderr by default), written through the bar when it shows, so that they do not break it."""

    def __init__(self, bar, enabled: bool, stream: TextIO | None = None) -> None:
        self.bar, self.enabled, self.stream = bar, enabled, stream
        self.started = time.perf_counter()
        self.mark = self.started

    def stage(self, text: str) -> None:
        """Name the stage on the bar (a no-op bar has no description)."""
        describe = getattr(self.bar, "set_description_str", None)
        if describe is not None:
            describe(text)

    def lap(self) -> float:
        """Seconds since the last lap (or the start)."""
        now = time.perf_counter()
        seconds, self.mark = now - self.mark, now
        return seconds

    def line(self, text: str) -> None:
        """Write ``text`` as a line on stderr (nothing when not enabled)."""
        if not self.enabled:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        showing = self.bar is not None and getattr(self.bar, "disable", True) is False
        if showing and hasattr(self.bar, "write"):
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)
