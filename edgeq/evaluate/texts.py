"""Calibration and evaluation text that ships with Python itself (pydoc_data).

No dataset can be downloaded here, and evaluating on calibration text would
flatter every calibrated method, so the two are disjoint by construction:
pydoc's help topics, sorted by key, alternate between the two sets.
"""

from __future__ import annotations


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def calibration_text() -> str:
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % 2 == 0)


def evaluation_text() -> str:
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % 2 == 1)


CALIBRATION_TEXT_NAME = "pydoc_data.topics (even-indexed topics, disjoint from the evaluation text)"
EVALUATION_TEXT_NAME = "pydoc_data.topics (odd-indexed topics, held out from calibration)"


def _sentences(text: str) -> list[str]:
    """Prose sentences of pydoc's topics: split on blank lines and full stops; code and tables left out."""
    import re

    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(l.startswith((" ", "\t", ">>>", "|", "+", "=", "-", "*")) for l in lines):
            continue
        flat = " ".join(l.strip() for l in lines)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            s = s.strip()
            if 30 <= len(s) <= 300 and sum(c.isalpha() for c in s) > 0.7 * len(s.replace(" ", "")):
                out.append(s)
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def calibration_sentences(n: int = 256) -> list[str]:
    """Sentences from the calibration half only (for encoders' activation ranges)."""
    return _sentences(calibration_text())[:n]


def evaluation_sentences(n: int = 256) -> list[str]:
    """Sentences from the held-out half only (what `edgeq eval` scores encoders on); none also in the other half."""
    seen = set(_sentences(calibration_text()))
    return [s for s in _sentences(evaluation_text()) if s not in seen][:n]


EVALUATION_SENTENCES_NAME = "pydoc_data.topics sentences (odd-indexed topics, held out from calibration)"
