"""Progress bars that stay out of the way: off with --quiet and when stderr is not a terminal."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
QUIET = False


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    disabled = QUIET or not sys.stderr.isatty()
    return tqdm(items, desc=desc, total=total, disable=disabled, leave=False, dynamic_ncols=True)
