"""Find the final \\boxed{...} (or \\fbox{...}) answer in a response, with balanced braces."""
from __future__ import annotations

import re

_BOX_START = re.compile(r"\\(?:boxed|fbox)")
# "\boxed 5" (no braces): the answer runs to the next whitespace or "$"; trailing sentence punctuation is dropped.
_BARE_ARGUMENT = re.compile(r"[ \t]+([^\s$]+)")


def _braced_content(text: str, open_pos: int) -> tuple[str, int] | None:
    """Content of the group whose "{" is at open_pos and the index after its "}", or None if it never closes."""
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip escaped characters such as \{ and \}
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i], i + 1
        i += 1
    return None


def find_boxed_answers(text: str) -> list[str]:
    """All complete outermost boxes, in order. Unclosed boxes (a truncated response) are ignored."""
    answers: list[str] = []
    pos = 0
    while True:
        m = _BOX_START.search(text, pos)
        if m is None:
            return answers
        after = m.end()
        # "\boxedx" is some other macro, not a box.
        if after < len(text) and text[after].isalpha():
            pos = after
            continue
        brace = after
        while brace < len(text) and text[brace] in " \t":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            found = _braced_content(text, brace)
            if found is None:
                pos = after
                continue
            content, end = found
            answers.append(content.strip())
            pos = end
            continue
        bare = _BARE_ARGUMENT.match(text, after)
        if bare is not None:
            answers.append(bare.group(1).rstrip(".,;:"))
            pos = bare.end()
        else:
            pos = after


def extract_last_boxed(text: str) -> str | None:
    """Content of the last complete box; None when there is none or it is empty."""
    answers = find_boxed_answers(text)
    if not answers or not answers[-1]:
        return None
    return answers[-1]
