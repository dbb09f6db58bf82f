"""Train the byte-level BPE tokenizer of the tiny presets and write llavamed_fast/model/tiny_tokenizer.json.

The tiny presets must build offline, so their tokenizer ships with the package. It is trained on a small
corpus written for the purpose (chat-template markup and common radiology/pathology wording); byte-level
BPE covers any text whatever the corpus. Run from the repository root: python scripts/make_tiny_tokenizer.py
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<im_start>", "<im_end>"]
VOCAB_SIZE = 1024

MARKUP = [
    "### Human: ",
    "### Assistant: ",
    "USER: ",
    "ASSISTANT: ",
    "[INST] ",
    " [/INST]",
    "<|start_header_id|>user<|end_header_id|>\n\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>",
    "A chat between a curious human and an artificial intelligence assistant. ",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
]

SUBJECTS = [
    "chest X-ray",
    "CT scan",
    "MRI",
    "histology slide",
    "gross specimen",
    "ultrasound image",
    "radiograph",
]
FINDINGS = [
    "a round lesion in the left upper lobe",
    "a small nodule in the right lower lobe",
    "pleural effusion on the left side",
    "no acute abnormality",
    "a large mass with irregular margins",
    "enlarged lymph nodes",
    "hemorrhage in the frontal lobe",
    "inflammatory cells infiltrating the tissue",
    "necrosis at the centre of the tumour",
    "two bright spots near the centre",
    "a dark region along the border",
    "normal heart size and clear lungs",
]
QUESTIONS = [
    "What does the image show?",
    "Is there a lesion?",
    "Which side is affected?",
    "How many lesions are visible?",
    "Is the finding large or small?",
    "What modality is this?",
    "Describe the image concisely.",
    "Is this normal?",
    "Where is the abnormality located?",
    "Are the lungs clear?",
]
ANSWERS = ["Yes.", "No.", "Left.", "Right.", "One.", "Two.", "Three.", "Large.", "Small.", "Bright.", "Dark."]


def corpus() -> list[str]:
    lines = list(MARKUP)
    for subject, finding in itertools.product(SUBJECTS, FINDINGS):
        lines.append(f"The {subject} shows {finding}.")
        lines.append(f"In this {subject}, there is {finding}, which suggests further evaluation.")
    for question, answer in itertools.product(QUESTIONS, ANSWERS):
        lines.append(f"### Human: {question}\n### Assistant: {answer}\n")
        lines.append(f"[INST] <image>\n{question} [/INST] {answer} </s>")
    lines.extend(str(n) for n in range(200))
    return lines


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    # Like LLaMA/Mistral tokenizers: BOS when special tokens are asked for. Chat rendering carries BOS in
    # its text and tokenizes without special tokens, so both paths give the same ids.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
            ),
        ]
    )
    return tokenizer


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "llavamed_fast" / "model" / "tiny_tokenizer.json"
    build().save(str(out))
    print(f"wrote {out}")
