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
