"""C-STORE status codes (PS3.4 B.2.3, PS3.7 C): success, warning or failure,
and what each means."""
from __future__ import annotations

from typing import Literal

Verdict = Literal["success", "warning", "failure"]

MEANINGS = {
    0x0000: "success",
    0x0001: "requested optional attributes are not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0x0111: "duplicate SOP instance (the server already holds it)",
    0x0110: "processing failure",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0xFE00: "cancelled",
}
WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007, 0x0111}


def verdict(code: int) -> Verdict:
    if code == 0x0000:
        return "success"
    if code in WARNINGS or 0xB000 <= code <= 0xBFFF:
        return "warning"
    return "failure"


def meaning(code: int) -> str:
    if code in MEANINGS:
        return MEANINGS[code]
    if 0xA700 <= code <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "cannot understand"
    if 0xB000 <= code <= 0xBFFF:
        return "warning"
    return "unknown status"


def describe(code: int, comment: str = "") -> str:
    """``status 0xB000 (coercion of data elements): the server's comment``."""
    out = f"status 0x{code:04X} ({meaning(code)})"
    return f"{out}: {comment}" if comment else out
