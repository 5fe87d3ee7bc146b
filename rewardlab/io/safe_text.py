"""Text from untrusted inputs made safe to show: terminal control characters escaped, CSV formulas neutralised."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def for_terminal(text: object) -> str:
    """``text`` with control characters (escape sequences, carriage returns, bidi overrides) shown as
    ``\\xNN`` / ``\\uNNNN``, so a file name cannot move the cursor or rewrite the screen."""

    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(escape, str(text).replace("\n", "\\n"))


def csv_cell(value: object) -> object:
    """A CSV cell that spreadsheets will not evaluate: text starting with = + - @ (or tab/CR) gets a
    leading apostrophe. Numbers are returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
