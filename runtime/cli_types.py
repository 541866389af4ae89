"""argparse ``type=`` helpers that check a numeric flag against a declared :class:`~runtime.config_loader.Range`.

argparse prints the message with the flag's name and exits with code 2, e.g.
``eval.py knn: error: argument --k: must be >= 1, got 0``::

    p.add_argument("--k", type=positive_int, nargs="+", default=[20])
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from runtime.config_loader import Range


def ranged(kind: type, **limits) -> Callable[[str], int | float]:
    """A ``type=`` callable: parse the text as ``kind`` (int or float) and check it against ``Range(**limits)``."""
    rng = Range(**limits)
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not rng.allows(value):
            raise argparse.ArgumentTypeError(f"must be {rng.describe()}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {rng.describe()}"
    return parse


positive_int = ranged(int, ge=1)
nonneg_int = ranged(int, ge=0)
positive_float = ranged(float, gt=0)
seed_int = ranged(int, ge=0, le=2**32 - 1)
