"""Self-instruct prompt, reply parsing, filters and records (no teacher involved: replies are written here)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llavamed_fast.data import instruct
from llavamed_fast.data.dataset import read_records
from llavamed_fast.data.instruct import Turn

FIGURE = {
    "pair_id": "123_F2",
    "caption": "Axial CT showing a cavitating lesion in the right upper lobe.",
    "mentions": ["CT revealed a cavity (Figure 2).", "  "],
    "domain": {"ct_scan": True},
}


def test_messages_hold_the_prompt_the_examples_and_the_figure():
    messages = instruct.build_messages(FIGURE)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 8 + ["user"]
    assert messages[-1]["content"] == (
        "Figure Caption:\nAxial CT showing a cavitating lesion in the right upper lobe.\n\n"
        "Figure Context:\n- CT revealed a cavity (Figure 2)."
    )
    without = instruct.build_messages(FIGURE, use_context=False, few_shot=2)
    assert len(without) == 6 and "Figure Context" not in "".join(m["content"] for m in without)
    system = messages[0]["content"]
    for rule in ("Never mention the caption", "medical advice", "User:", "Assistant:"):
        assert rule in system
    with pytest.raises(ValueError, match="figure 9_F1 has no caption"):
        instruct.build_messages({"pair_id": "9_F1", "caption": ""})


def test_the_worked_examples_parse_and_pass_the_filters():
    # Our own examples must be what we ask for: every one parses, and no filter touches it.
    for caption, _context, conversation in instruct.FEW_SHOT:
        turns = instruct.parse_conversation(conversation)
        counts: Counter[str] = Counter()
        assert instruct.clean_conversation(turns, counts) == turns and not counts, caption
        assert len(turns) >= 4 and len(turns) % 2 == 0


def test_parsing_tolerates_label_variants():
    reply = (
        "Sure! Here is the conversation:\n\n"
        "**User:** What is shown?\n"
        "**Assistant:** A chest CT.\nIt is an axial slice.\n"
        "Human: Where is the lesion?\n"
        "- GPT: In the right upper lobe.\n"
        "1. Question: Any cavity?\n"
        "2. Answer: Yes, a thick-walled one.\n"
        "User: And the left lung?"
    )
    turns = instruct.parse_conversation(reply)
    assert [(t.role, t.text) for t in turns] == [
        ("user", "What is shown?"),
        ("assistant", "A chest CT.\nIt is an axial slice."),
        ("user", "Where is the lesion?"),
        ("assistant", "In the right upper lobe."),
        ("user", "Any cavity?"),
        ("assistant", "Yes, a thick-walled one."),
    ]


def test_an_empty_turn_does_not_discard_the_reply():
    turns = instruct.parse_conversation(
        "User: \nUser: What is it?\nAssistant: A CT.\nUser: Where?\nAssistant: \nAssistant: Left."
    )
    assert [(t.role, t.text) for t in turns] == [
        ("user", "What is it?"), ("assistant", "A CT."), ("user", "Where?"), ("assistant", "Left."),
    ]  # fmt: skip
    single = instruct.figure_prompt("A CT.", "The CT was normal (Fig. 1).")  # one mention as a string
    assert single.endswith("Figure Context:\n- The CT was normal (Fig. 1).")


@pytest.mark.parametrize(
    "reply",
    ["", "I cannot help with that.", "Assistant: Hello.\nAssistant: Anything?", "User: Only a question?"],
)
def test_replies_without_an_exchange_are_errors(reply):
    with pytest.raises(instruct.ReplyError, match="no User/Assistant exchange"):
        instruct.parse_conversation(reply)


def test_filters_drop_refusals_and_leaks_and_strip_lead_ins():
    turns = [
        Turn("user", "What is this?"),
        Turn("assistant", "As an AI, I cannot see images, but the text suggests a CT."),
        Turn("user", "Where is the lesion?"),
        Turn("assistant", "According to the caption, it is in the right upper lobe."),
        Turn("user", "What does the caption say about its wall?"),
        Turn("assistant", "It is thick."),
        Turn("user", "Is it a cavity?"),
        Turn("assistant", "Based on the figure context provided, yes: the lesion is cavitating."),
    ]
    counts: Counter[str] = Counter()
    kept = instruct.clean_conversation(turns, counts)
    assert [(t.role, t.text) for t in kept] == [
        ("user", "Where is the lesion?"),
        ("assistant", "It is in the right upper lobe."),
        ("user", "Is it a cavity?"),
        ("assistant", "Yes: the lesion is cavitating."),
    ]
    assert counts == Counter(refusal=1, lead_in_stripped=2, caption_leak=1)


def test_records_are_llava_json_with_domain_and_provenance(tmp_path):
    turns = instruct.parse_conversation(
        "User: What is shown?\nAssistant: A CT.\nUser: Lesion?\nAssistant: Yes."
    )
    record = instruct.conversation_record(FIGURE, turns, teacher="gpt-4o", seed=1)
    assert record["id"] == "123_F2" and record["image"] == "123_F2.jpg"
    first = record["conversations"][0]
    assert first["from"] == "human" and first["value"] in (
        "<image>\nWhat is shown?",
        "What is shown?\n<image>",
    )
    assert [c["from"] for c in record["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert record["domain"] == {
        "chest_xray": False,
        "mri": False,
        "ct_scan": True,
        "histology": False,
        "gross": False,
    }
    assert record["provenance"] == {
        "teacher": "gpt-4o",
        "prompt_version": instruct.PROMPT_VERSION,
        "context": True,
    }
    # The placement of <image> is fixed per figure and seed, and both placements occur.
    placements = {
        instruct.conversation_record({**FIGURE, "pair_id": f"1_F{i}"}, turns, teacher="t")["conversations"][
            0
        ]["value"].startswith("<image>")
        for i in range(40)
    }
    assert placements == {True, False}
    assert instruct.conversation_record(FIGURE, turns, teacher="gpt-4o", seed=1) == record
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([record]))
    assert read_records(path)[0].id == "123_F2"  # the training data reader takes it
    with pytest.raises(ValueError, match="123_F2: no exchange left"):
        instruct.conversation_record(FIGURE, [], teacher="t")


def test_panel_labels_in_an_answer_stay_answer_text():
    # PMC multi-panel figures: answers describe panels as "A: ...", "B: ...". In a reply whose turns are
    # "User:"/"Assistant:", as the prompt asks, a bare "A:" is part of the answer, not a new turn.
    reply = (
        "User: What do the two panels show?\n"
        "Assistant: The figure has two panels.\n"
        "A: the CT shows a mass in the left upper lobe.\n"
        "B: the PET/CT shows intense tracer uptake in it.\n"
        "Q: a question-like label inside the answer.\n"
        "User: Is the uptake specific?\n"
        "Assistant: Not on its own."
    )
    assert [(t.role, t.text) for t in instruct.parse_conversation(reply)] == [
        ("user", "What do the two panels show?"),
        ("assistant", "The figure has two panels.\nA: the CT shows a mass in the left upper lobe.\n"
                      "B: the PET/CT shows intense tracer uptake in it.\nQ: a question-like label inside the answer."),
        ("user", "Is the uptake specific?"),
        ("assistant", "Not on its own."),
    ]  # fmt: skip
    # A reply written in the bare style (its first label "Q:") keeps them as role labels.
    bare = "Here you go.\nA: not yet a turn\nQ: What is shown?\nA: A CT.\nQ: Where?\nA: Left."
    assert [(t.role, t.text) for t in instruct.parse_conversation(bare)] == [
        ("user", "What is shown?"), ("assistant", "A CT."), ("user", "Where?"), ("assistant", "Left."),
    ]  # fmt: skip
