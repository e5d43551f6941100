"""Progress on the long waits (building a tiny checkpoint, reading shards, dummy weights, the probes, doctor's
checks, quantize, cut): a tqdm bar on stderr, shown only when stderr is a terminal, so logs, CI and the
pytest suites (whose stderr is captured) stay clean, and stdout stays the command's output alone."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.std import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None,
             unit: str = "step") -> tqdm:
    """A bar over ``iterable``, or over ``total`` steps advanced with ``.update()`` (as a context manager; name
    the step under way with ``.set_postfix_str``). It disappears when done (``leave=False``)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, disable=None,
                dynamic_ncols=True)

