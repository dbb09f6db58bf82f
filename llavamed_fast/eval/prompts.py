"""How a VQA question becomes the user's turn (pure Python: the CLI lists the styles without torch)."""

from __future__ import annotations

from collections.abc import Callable

from llavamed_fast.eval.datasets import VQARecord

YES_NO_OPTIONS = " Please choose from the following two options: [yes, no]"


def _llava_med(record: VQARecord) -> str:
    # LLaVA-Med's VQA answer files: the question, then the image; closed yes/no questions carry the options.
    yes_no = record.answer_type == "CLOSED" and record.answer.lower() in ("yes", "no")
    return f"{record.question}{YES_NO_OPTIONS if yes_no else ''}\n<image>"


PROMPT_STYLES: dict[str, Callable[[VQARecord], str]] = {
    "llava-med": _llava_med,
    "plain": lambda r: f"<image>\n{r.question}",
    "short": lambda r: f"<image>\n{r.question}\nAnswer the question using a single word or phrase.",
}
"""``llava-med``: LLaVA-Med's evaluation (the question, then ``<image>``; CLOSED questions whose reference
is yes/no get the two-option suffix). ``plain``: ``<image>`` then the question, as our training records
put it. ``short``: ``plain`` plus LLaVA-1.5's short-answer instruction."""
