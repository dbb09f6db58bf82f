"""Argparse types shared by the command lines (curation, evaluation)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(kind: type, minimum: float, *, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` at least ``minimum`` (above it when not ``inclusive``), so a
    value that cannot work ("--concurrency 0", "--batch-size 0") is a usage error before anything runs."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not (value >= minimum if inclusive else value > minimum):  # also refuses nan
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'more than'} {minimum:g}, got {text}"
            )
        return value

    return parse
