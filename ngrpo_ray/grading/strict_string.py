"""The released code's MATH-500 grader: exact match after the Hendrycks MATH string normalisation
(verl `reward_score/math.py`: `strip_string` / `is_equiv`). Stricter than math-verify: "0.5" matches "\\frac{1}{2}"
only through an explicit rule, "x=3" matches "3", but "1/2" vs "0.50" does not."""
from __future__ import annotations

import re


def _fix_fracs(string: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}."""
    parts = string.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:
            return string
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}{" + b + "}" + rest if b != "{" else "{" + a + "}" + b + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    """"3/4" (two plain integers) -> \\frac{3}{4}."""
    m = re.fullmatch(r"(\d+)/(\d+)", string)
    return f"\\frac{{{int(m.group(1))}}}{{{int(m.group(2))}}}" if m else string


def _remove_right_units(string: str) -> str:
    parts = string.split("\\text{ ")
    return parts[0] if len(parts) == 2 else string


def _fix_sqrt(string: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    parts = string.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        out += "\\sqrt" + (part if not part or part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return out


def normalize_math_string(string: str) -> str:
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "").replace("%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # "k = 3" -> "3" when the left side is a short variable name.
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    # AIME-style "025" is the integer 25 (an addition to the released code, which never graded AIME this way).
    if re.fullmatch(r"-?\d+", string):
        string = str(int(string))
    return string


def strict_string_equal(pred: str, gold: str) -> bool:
    try:
        return normalize_math_string(pred) == normalize_math_string(gold)
    except Exception:  # noqa: BLE001 - normalisation failures fall back to the raw comparison
        return pred.strip() == gold.strip()
