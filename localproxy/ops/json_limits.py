"""JSON from outside (settings files, notifications, control API bodies), parsed with bounds.

``json.loads`` recurses once per nesting level: 100,000 ``[`` raise
``RecursionError`` (a traceback where a clear error was due), and a number of
more than 4,300 digits raises a plain ``ValueError``. :func:`loads_bounded`
measures the nesting first (one regex pass, stopping at the bound) and turns
both into :class:`JsonRefused`, a ``ValueError`` whose message never quotes
the input.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["JsonRefused", "json_depth_exceeds", "loads_bounded"]

# Strings are skipped whole (a "[" inside one does not nest); brackets counted.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JsonRefused(ValueError):
    """Well-formed enough to parse, but beyond a bound (depth, digits); ``str()`` says which."""


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """True if arrays/objects in ``text`` nest deeper than ``max_depth`` (stops at the first excess)."""
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def loads_bounded(text: str | bytes, max_depth: int) -> Any:
    """``json.loads`` that raises :class:`JsonRefused` past ``max_depth`` levels or for huge numbers.

    Malformed JSON still raises ``json.JSONDecodeError`` (its ``msg`` quotes nothing);
    undecodable bytes raise ``UnicodeDecodeError``.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    if json_depth_exceeds(text, max_depth):
        raise JsonRefused(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:  # cannot happen under the depth check; kept as the last guard
        raise JsonRefused("nested too deeply") from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise JsonRefused("a number has too many digits") from None
