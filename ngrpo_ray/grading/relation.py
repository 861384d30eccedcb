"""A boxed relation is an answer only when its left side is a bare variable.

math-verify grades an equation by its right side, so against gold 42 ``\\boxed{43 = 42}`` and
``\\boxed{x^{x^{x}} = 42}`` would score 1, and a policy can learn that. Rule: split the boxed content at top-level
commas / semicolons; in every part that holds a top-level relation (=, <, >, \\le, \\ge, \\ne, \\approx, \\in, ...),
every operand before the last must be a bare variable (one Latin or Greek letter, optionally with a subscript and
primes, or a parenthesised tuple of them: ``x = 42``, ``a_1 = 42``, ``\\theta \\approx 0.5``, ``(x, y) = (1, 2)``,
``x = y = 42``). Anything else (``43 = 42``, ``x = 43 = 42``, ``f(x) = 42``, ``2x + 3 = 7``, ``0 < x < 1``) is a
"relation": it scores 0 and is counted. The exception is a gold answer that is itself such a relation (MATH-500's
plane ``5x - 7y + 11z + 4 = 0``): then math-verify compares the two relations as before.
"""
from __future__ import annotations

import re

_RELATION_COMMANDS = frozenset({
    "le", "leq", "leqslant", "ge", "geq", "geqslant", "lt", "gt", "ne", "neq", "approx", "equiv", "sim", "simeq",
    "cong", "in", "notin", "ni", "subset", "subseteq", "supset", "supseteq", "ll", "gg", "propto",
})
_RELATION_CHARS = frozenset("=<>≤≥≠≈∈")
_OPEN, _CLOSE = "([{", ")]}"
_GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|pi|varpi|rho|"
          "varrho|sigma|varsigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Pi|Sigma|Upsilon|"
          "Phi|Psi|Omega")
_VARIABLE = re.compile(
    r"(?:[A-Za-z]|\\(?:" + _GREEK + r"))"  # one letter
    r"(?:_(?:[A-Za-z0-9]|\{[A-Za-z0-9]+\}))?"  # optional subscript: x_1, a_{n}
    r"(?:'|\^\{?\\prime\}?)*"  # optional primes
)
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~|\s+")


def _split_top_level(text: str) -> list[list[str]]:
    """Parts at top-level , or ; -> each part's operands around top-level relation symbols."""
    parts: list[list[str]] = []
    operands: list[str] = []
    current: list[str] = []
    depth, i = 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            m = re.match(r"\\([A-Za-z]+)", text[i:])
            if m is None:  # \{ \} \, ...: escaped characters; \{ and \} still nest
                pair = text[i : i + 2]
                depth += 1 if pair == "\\{" else -1 if pair == "\\}" else 0
                current.append(pair)
                i += 2
                continue
            name = m.group(1)
            if depth == 0 and name in _RELATION_COMMANDS:
                operands.append("".join(current))
                current = []
            elif name in ("left", "right"):  # \left( ... \right]: the bracket after it nests as usual
                pass
            else:
                current.append(m.group(0))
            i += len(m.group(0))
            continue
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        if depth == 0 and ch in _RELATION_CHARS:
            operands.append("".join(current))
            current = []
        elif depth == 0 and ch in ",;":
            operands.append("".join(current))
            parts.append(operands)
            operands, current = [], []
        else:
            current.append(ch)
        i += 1
    operands.append("".join(current))
    parts.append(operands)
    return parts


def _bare(operand: str) -> bool:
    s = _SPACING.sub("", operand)
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    if _VARIABLE.fullmatch(s):
        return True
    if len(s) >= 2 and s[0] == "(" and s[-1] == ")":  # a tuple of variables: (x, y) = (1, 2)
        names = s[1:-1].split(",")
        return len(names) > 1 and all(_VARIABLE.fullmatch(n) for n in names)
    return False


def is_unanswered_relation(content: str) -> bool:
    """True when the boxed content holds a relation whose left side is not a bare variable (see the module doc)."""
    for operands in _split_top_level(content):
        if len(operands) > 1 and not all(_bare(op) for op in operands[:-1]):
            return True
    return False


def relation_refused(boxed: str, gold: str) -> bool:
    """The grading rule: the boxed answer is a non-answer relation, and the gold is not one itself."""
    return is_unanswered_relation(boxed) and not is_unanswered_relation(gold)
