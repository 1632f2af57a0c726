"""Shared check for the CLI's error reporting: one ``tome: error:`` line, no traceback."""

from __future__ import annotations


def one_error_line(capsys) -> str:
    """The single ``tome: error:`` line on stderr (asserts there is exactly one, no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("tome: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]
