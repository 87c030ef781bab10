"""Answer extraction and matching: the last ``\\boxed{...}`` (or number) of a solution, normalised."""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["extract_answer", "normalize_answer", "is_match"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the generation was cut off inside the box


def extract_answer(text: str) -> Optional[str]:
    """The answer of a solution: the last ``\\boxed{...}``, else the last number, else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def normalize_answer(ans: Optional[str]) -> Optional[str]:
    if ans is None:
        return None
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|mathrm|mbox)\{([^}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?[\d,]*\.?\d+", s):
        try:
            v = float(s.replace(",", ""))
        except ValueError:
            return s
        return str(int(v)) if v == int(v) else repr(v)
    return s


def is_match(prediction: Optional[str], reference: str) -> bool:
    p = normalize_answer(prediction)
    return p is not None and p == normalize_answer(reference)
