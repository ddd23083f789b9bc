"""Progress bars on stderr (tqdm), silenced by --quiet."""

from __future__ import annotations

import sys
from typing import Callable, Iterable


def make_progress(quiet: bool) -> Callable[..., Iterable] | None:
    if quiet:
        return None
    from tqdm import tqdm

    def progress(iterable: Iterable, desc: str = "", unit: str = "it", total: int | None = None) -> Iterable:
        return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

    return progress


def wrap(progress: Callable | None, iterable: Iterable, **kw) -> Iterable:
    return iterable if progress is None else progress(iterable, **kw)
