"""The one exception type that means "the user's input is wrong".

Raise :class:`UserError` where input is checked (a missing folder, a bad flag value, an unknown dataset), with a
message that is complete advice. The CLIs print it as one ``error: ...`` line and exit with code 2. Any other
exception is a bug: the CLIs print its traceback and a one-line summary and exit with code 1.

May be imported by every module of the project; imports nothing of it.
"""
from __future__ import annotations


class UserError(RuntimeError):
    """An error whose message is complete advice for the user (exit code 2, no traceback)."""


def one_line(exc: BaseException, limit: int = 160) -> str:
    """Collapse an exception (SimpleITK's are multi-line) into ``"Type: message"`` on one short line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"
