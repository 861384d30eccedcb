"""Repair LaTeX whose backslash escapes were decoded as control characters (the AIME25 copy: "\\frac" became
form-feed + "rac", "\\triangle" became TAB + "riangle")."""
from __future__ import annotations

import re

_CONTROL_TO_ESCAPE = {"\x0c": "\\f", "\x08": "\\b", "\x07": "\\a", "\x0b": "\\v"}
# TAB / CR are real whitespace elsewhere; only directly before a letter are they a lost "\t" / "\r" ("\triangle").
_TAB_OR_CR_BEFORE_LETTER = re.compile(r"[\t\r](?=[A-Za-z])")
_REMAINING_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def repair_decoded_escapes(text: str) -> str:
    for ch, escape in _CONTROL_TO_ESCAPE.items():
        text = text.replace(ch, escape)
    return _TAB_OR_CR_BEFORE_LETTER.sub(lambda m: "\\t" if m.group(0) == "\t" else "\\r", text)


def has_control_characters(text: str) -> bool:
    """Control characters other than newline; a TAB or CR before a letter counts too."""
    return bool(_REMAINING_CONTROL.search(text) or _TAB_OR_CR_BEFORE_LETTER.search(text))
