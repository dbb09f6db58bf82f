"""Argparse pieces shared by the command lines (curation, evaluation): checked number types and the
OpenAI-compatible client's options."""

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


# The template flag's help: the names are checked where the checkpoint is loaded (an unknown one is an error
# listing them), so that parsing the command line imports nothing.
TEMPLATE_HELP = (
    "chat template, only for plain transformers checkpoints: v0, vicuna_v1, mistral_instruct, llama3"
)

COUNT = number(int, 1)  # a count of at least one
NOT_NEGATIVE_INT = number(int, 0)  # a retry count, or a limit where 0 means all
ABOVE_ZERO = number(float, 0, inclusive=False)
NOT_NEGATIVE = number(float, 0)


def client_options(parser: argparse.ArgumentParser, *, temperature: float, max_tokens: int) -> None:
    """The options of an OpenAI-compatible client (the curation teacher, the evaluation judge), read back by
    :func:`llavamed_fast.data.teacher.config_from_args`; the sampling defaults are the command's."""
    parser.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI, or OPENAI_BASE_URL)",
    )
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    parser.add_argument("--azure-api-version", help="use Azure OpenAI with this API version")
    parser.add_argument("--concurrency", type=COUNT, default=8, help="requests in flight at most")
    parser.add_argument("--rpm", type=number(float, 1), help="requests per minute at most")
    parser.add_argument("--tpm", type=ABOVE_ZERO, help="tokens per minute at most (estimated)")
    parser.add_argument("--max-retries", type=NOT_NEGATIVE_INT, default=6)
    parser.add_argument("--timeout", type=ABOVE_ZERO, default=120.0, help="seconds per request")
    parser.add_argument("--temperature", type=NOT_NEGATIVE, default=temperature)
    parser.add_argument("--max-tokens", type=COUNT, default=max_tokens)
