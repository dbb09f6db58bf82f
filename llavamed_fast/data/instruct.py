"""Self-instruct conversations: the teacher's prompt, the parsing of its reply, the filters, the records.

LLaVA-Med's recipe: a language-only teacher reads a figure's caption (and, optionally, the article
sentences that cite the figure) and writes a multi-turn conversation about the image as if both people in
it could see the image. This module holds everything except the sending (the teacher client):

- :func:`build_messages`: a system prompt and eight worked examples, written for this project, then the
  figure ("Figure Caption" and, when ``use_context``, "Figure Context");
- :func:`parse_conversation`: the reply -> alternating user/assistant turns (tolerating the usual
  variations of the role labels); a reply with no usable exchange is a :class:`ReplyError`;
- :func:`clean_conversation`: drops exchanges whose answer refuses ("As an AI, I cannot see ...") or
  still talks about the caption/context after the leading phrases that do ("According to the caption,")
  are stripped; counts what each filter did;
- :func:`conversation_record`: the LLaVA JSON record, ``<image>`` before or after the first question
  (seeded per figure), with ``domain`` flags and provenance (teacher model, prompt version).

Pure Python, no torch.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llavamed_fast.data.alignment import domain_flags, image_name_of

PROMPT_VERSION = "llavamed-fast/instruct-v1"

SYSTEM_PROMPT = """\
You are an AI assistant specialised in biomedicine. You will receive the caption of a figure from a \
biomedical research article and, sometimes, sentences from the article that refer to the figure. You \
cannot see the figure, but you must write a conversation between a User and an Assistant who both look \
at it, as if the Assistant were seeing the image itself.

Write 2 to 5 exchanges. The User asks about what is visible: the kind of image (modality, stain, view), \
the organ or tissue, the findings, where they are, how they compare, what they might indicate. The \
Assistant answers from the visual content described to you, in a confident, clear and helpful way.

Rules:
- Never mention the caption, the context, the article or any text given to you: speak only about the image.
- Ask only questions that the information given to you answers; do not invent findings, numbers or labels.
- Where the information leaves room for doubt, say so ("this may be", "it appears to be").
- Do not give medical advice, diagnoses for the User's own health, or treatment instructions.
- Format: every turn starts on a new line with "User:" or "Assistant:". Nothing else before or after."""

FEW_SHOT: tuple[tuple[str, str, str], ...] = (
    (
        "Chest radiograph (posteroanterior view) on admission shows a large right-sided pleural effusion "
        "with mediastinal shift to the left.",
        "On admission, the chest radiograph revealed a large right pleural effusion (Figure 1).",
        "User: What kind of image is this?\n"
        "Assistant: This is a chest X-ray taken in the posteroanterior (PA) view, with the X-ray beam "
        "passing from the back of the chest to the front.\n"
        "User: What is the main abnormality?\n"
        "Assistant: There is a large collection of fluid in the right pleural space, a pleural effusion, "
        "which makes much of the right side of the chest appear white and hides the lung there.\n"
        "User: Is anything else affected?\n"
        "Assistant: Yes. The mediastinum, the central part of the chest containing the heart and great "
        "vessels, is pushed towards the left. This shift suggests the effusion is large enough to exert "
        "pressure on the surrounding structures.",
    ),
    (
        "Axial contrast-enhanced CT of the abdomen demonstrating a 4 cm hypodense lesion in segment VII of "
        "the liver (arrow).",
        "",
        "User: Which imaging technique was used here?\n"
        "Assistant: This is an axial slice from a computed tomography (CT) scan of the abdomen, taken "
        "after an intravenous contrast agent was given.\n"
        "User: What does the arrow point to?\n"
        "Assistant: The arrow marks a lesion of about 4 cm in the liver. It is hypodense, meaning it "
        "appears darker than the surrounding liver tissue.\n"
        "User: Where in the liver is it?\n"
        "Assistant: It lies in segment VII, in the posterior part of the right lobe of the liver.",
    ),
    (
        "Sagittal T2-weighted MRI of the lumbar spine: L4-L5 disc herniation compressing the thecal sac.",
        "MRI confirmed a disc herniation at L4-L5 (Fig. 2), consistent with the patient's radicular pain.",
        "User: What does this image show?\n"
        "Assistant: It is a sagittal, T2-weighted magnetic resonance image of the lower (lumbar) spine, "
        "seen from the side.\n"
        "User: Is there an abnormality?\n"
        "Assistant: Yes. The intervertebral disc between the L4 and L5 vertebrae bulges backwards, a disc "
        "herniation, and presses on the thecal sac that contains the nerve roots.\n"
        "User: Could that explain symptoms?\n"
        "Assistant: Compression of this kind can irritate the nerve roots, which may cause pain radiating "
        "into the leg. How much it matters for a given person is a question for their clinician.",
    ),
    (
        "Photomicrograph of the resected tumour showing sheets of atypical epithelioid cells with "
        "prominent nucleoli and frequent mitoses (H&E, original magnification ×400).",
        "Histology showed a poorly differentiated carcinoma (Fig. 3).",
        "User: What kind of image is this?\n"
        "Assistant: This is a microscopic image of tissue stained with haematoxylin and eosin (H&E), seen "
        "at high magnification.\n"
        "User: What do the cells look like?\n"
        "Assistant: The tissue is made of sheets of abnormal-looking epithelioid cells. Their nuclei have "
        "prominent nucleoli, and many cells are in the middle of dividing, seen as mitotic figures.\n"
        "User: What might these features suggest?\n"
        "Assistant: Atypical cells, conspicuous nucleoli and frequent mitoses point to an aggressive, "
        "poorly differentiated malignant tumour, such as a carcinoma.",
    ),
    (
        "Gross specimen of the resected kidney: a well-circumscribed golden-yellow mass with areas of "
        "haemorrhage in the upper pole.",
        "",
        "User: What are we looking at?\n"
        "Assistant: This is a photograph of a surgically removed kidney, cut open to show its inside.\n"
        "User: Describe the mass.\n"
        "Assistant: In the upper pole there is a well-defined mass with a golden-yellow colour, with "
        "darker red-brown areas that look like bleeding within it.\n"
        "User: Does the mass look invasive?\n"
        "Assistant: Its borders appear well circumscribed, so from this view it seems to be sharply "
        "separated from the surrounding kidney, although only microscopy can settle whether it has spread.",
    ),
    (
        "(A) Axial CT and (B) corresponding FDG PET/CT fusion image showing an avid mass in the left upper "
        "lobe (arrowheads).",
        "PET/CT showed intense FDG uptake in the left upper lobe lesion (Figure 4A, B).",
        "User: How many images are in this figure?\n"
        "Assistant: There are two panels. Panel A is an axial CT slice of the chest, and panel B is the "
        "same level shown as a PET/CT fusion image.\n"
        "User: What do the arrowheads show?\n"
        "Assistant: They point to a mass in the upper lobe of the left lung. In panel B the mass is bright, "
        "which means it takes up a lot of the FDG tracer.\n"
        "User: What does high tracer uptake mean?\n"
        "Assistant: High FDG uptake shows increased glucose use by the tissue. It is common in malignant "
        "tumours but can also occur with inflammation or infection, so it is not specific on its own.",
    ),
    (
        "Transabdominal ultrasound of the gallbladder showing multiple echogenic foci with posterior "
        "acoustic shadowing.",
        "Ultrasonography revealed cholelithiasis (Figure 1).",
        "User: Which organ is shown?\n"
        "Assistant: This ultrasound image shows the gallbladder, seen through the abdominal wall.\n"
        "User: What are the bright spots inside it?\n"
        "Assistant: There are several bright (echogenic) spots inside the gallbladder, and each casts a "
        "dark acoustic shadow behind it. This pattern is typical of gallstones.",
    ),
    (
        "Fundus photograph of the right eye demonstrating optic disc swelling with blurred margins and "
        "peripapillary haemorrhages.",
        "Fundoscopy (Figure 2) revealed bilateral papilloedema.",
        "User: What type of picture is this?\n"
        "Assistant: It is a fundus photograph, a picture of the back of the inside of the right eye.\n"
        "User: Does the optic disc look normal?\n"
        "Assistant: No. The optic disc appears swollen, and its edges are blurred instead of sharp.\n"
        "User: Is there anything around the disc?\n"
        "Assistant: Yes, there are small haemorrhages next to the disc. Together with the swelling, this "
        "appearance may reflect raised pressure around the optic nerve, which would need urgent "
        "medical evaluation.",
    ),
)


def figure_prompt(caption: str, mentions: Sequence[str] = (), *, use_context: bool = True) -> str:
    """The user message for one figure: its caption and, when asked and available, its context."""
    text = f"Figure Caption:\n{caption.strip()}"
    if isinstance(mentions, str):  # one sentence given as a string, not a list of them
        mentions = [mentions]
    context = [m.strip() for m in mentions if isinstance(m, str) and m.strip()] if use_context else []
    if context:
        text += "\n\nFigure Context:\n" + "\n".join(f"- {m}" for m in context)
    return text


def build_messages(
    figure: Mapping[str, Any], *, use_context: bool = True, few_shot: int = len(FEW_SHOT)
) -> list[dict[str, str]]:
    """Chat messages for the teacher: system prompt, ``few_shot`` worked examples, then the figure."""
    caption = (figure.get("caption") or "").strip()
    if not caption:
        raise ValueError(f"figure {figure.get('pair_id')} has no caption to write a conversation from")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example_caption, example_context, conversation in FEW_SHOT[:few_shot]:
        mentions = [example_context] if example_context else []
        messages.append(
            {"role": "user", "content": figure_prompt(example_caption, mentions, use_context=use_context)}
        )
        messages.append({"role": "assistant", "content": conversation})
    mentions = figure.get("mentions") or []
    messages.append({"role": "user", "content": figure_prompt(caption, mentions, use_context=use_context)})
    return messages


class ReplyError(ValueError):
    """A teacher reply that holds no usable conversation."""


_ROLE = re.compile(
    r"^\s*(?:[-*#>]+\s*|\d+[.)]\s*)?(?:\*\*|__)?\s*(user|human|question|q|assistant|ai|gpt|answer|a)\s*"
    r"(?:\*\*|__)?\s*[:：]\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
_USER_LABELS = {"user", "human", "question", "q"}
# "A:" also starts panel descriptions ("A: the CT shows ...") in answers about multi-panel figures, so the
# bare letters are role labels only in a reply written in that style: its first question labelled "Q:".
_BARE_LABELS = {"q", "a"}


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str


def parse_conversation(reply: str) -> list[Turn]:
    """The reply's turns, each a labelled line and the unlabelled lines after it; consecutive turns of one
    role are merged; text before the first label and a trailing unanswered question are dropped. Bare
    ``Q:``/``A:`` are labels only when the reply's first question is labelled ``Q:``; otherwise such
    lines are text (panel labels)."""
    lines = [(line, _ROLE.match(line)) for line in reply.splitlines()]
    labels = (match.group(1).lower() for _, match in lines if match)
    bare_style = next((label for label in labels if label in _USER_LABELS), None) == "q"
    labelled: list[Turn] = []
    for line, match in lines:
        if match and match.group(1).lower() in _BARE_LABELS and not bare_style:
            match = None
        if match:
            role = "user" if match.group(1).lower() in _USER_LABELS else "assistant"
            labelled.append(Turn(role, line[match.end() :].strip()))
        elif labelled and line.strip():
            labelled[-1].text = f"{labelled[-1].text}\n{line.strip()}".strip()
    # Empty turns go first, then neighbours of one role merge ("User: \nAssistant: ..." is one answer).
    turns: list[Turn] = []
    for turn in (t for t in labelled if t.text):
        if turns and turns[-1].role == turn.role:
            turns[-1].text = f"{turns[-1].text}\n{turn.text}"
        else:
            turns.append(turn)
    while turns and turns[0].role != "user":
        turns.pop(0)
    if turns and turns[-1].role == "user":
        turns.pop()
    turns = [t for t in turns if t.text]
    exchanges = list(zip(turns[::2], turns[1::2], strict=False))
    if not exchanges or any(u.role != "user" or a.role != "assistant" for u, a in exchanges):
        raise ReplyError(f"no User/Assistant exchange in the reply: {reply[:200]!r}")
    return turns


_REFUSAL = re.compile(
    r"\b(?:as an ai\b|i(?:'m| am) (?:sorry|unable|not able)|i (?:cannot|can't|can not) (?:see|view|access|"
    r"look at|provide)|unable to (?:see|view) (?:the|this) (?:image|figure))",
    re.IGNORECASE,
)
_LEAK_LEAD_IN = re.compile(
    r"^(?:(?:according|as (?:described|stated|mentioned|noted)) (?:to |in )?(?:the )?(?:figure )?"
    r"(?:caption|context|description|text|legend|article)|based on (?:the )?(?:figure )?"
    r"(?:caption|context|description|text|legend))[^,.:]*[,:]\s*",
    re.IGNORECASE,
)
_LEAK = re.compile(
    r"\b(?:the|this|figure) (?:caption|legend|figure context|context provided|provided context|"
    r"given (?:text|context|description))\b|\b(?:caption|context) (?:says|states|mentions|describes|"
    r"indicates)\b",
    re.IGNORECASE,
)


def clean_conversation(turns: Sequence[Turn], counts: Counter[str] | None = None) -> list[Turn]:
    """The exchanges that pass the filters: an answer that refuses drops its exchange; a leading "According
    to the caption," is stripped; a turn that still speaks of the caption or context drops its exchange.
    ``counts`` (if given) adds up ``refusal``, ``lead_in_stripped`` and ``caption_leak``."""
    counts = counts if counts is not None else Counter()
    kept: list[Turn] = []
    for user, assistant in zip(turns[::2], turns[1::2], strict=False):
        if _REFUSAL.search(assistant.text):
            counts["refusal"] += 1
            continue
        texts = []
        for turn in (user, assistant):
            stripped = _LEAK_LEAD_IN.sub("", turn.text)
            if stripped != turn.text:
                counts["lead_in_stripped"] += 1
                stripped = stripped[:1].upper() + stripped[1:]
            texts.append(stripped)
        if any(_LEAK.search(text) for text in texts) or not all(texts):
            counts["caption_leak"] += 1
            continue
        kept += [Turn("user", texts[0]), Turn("assistant", texts[1])]
    return kept


def conversation_record(
    figure: Mapping[str, Any],
    turns: Sequence[Turn],
    *,
    teacher: str,
    use_context: bool = True,
    seed: int = 0,
    image_name: str | None = None,
) -> dict[str, Any]:
    """The LLaVA JSON instruction record of one figure's cleaned conversation."""
    if not turns:
        raise ValueError(f"figure {figure.get('pair_id')}: no exchange left to write")
    pair_id = figure["pair_id"]
    rng = random.Random(f"{seed}:{pair_id}:image")
    first = turns[0].text
    first = f"<image>\n{first}" if rng.random() < 0.5 else f"{first}\n<image>"
    conversations = [{"from": "human", "value": first}] + [
        {"from": "human" if t.role == "user" else "gpt", "value": t.text} for t in turns[1:]
    ]
    return {
        "id": pair_id,
        "image": image_name_of(figure, image_name),
        "conversations": conversations,
        "domain": domain_flags(figure),
        "provenance": {"teacher": teacher, "prompt_version": PROMPT_VERSION, "context": use_context},
    }
