"""What a stage trains: requires_grad per parameter group, the image-token embedding rows, LoRA.

Everything is frozen first, then each group the stage names is unfrozen:

- ``projector``: the multi-modal projector;
- ``image_tokens``: the embedding rows of ``<im_start>``/``<im_end>`` (v0) and nothing else of the LLM.
  The embedding matrix becomes trainable with a gradient hook that zeroes every other row, so the other
  rows never move (AdamW's update of a parameter whose gradients are all zero is zero; the engines keep
  the matrix out of weight decay, which would shrink them). The optimizer holds state for the whole
  matrix, as LLaVA does. A stage that trains the whole LLM needs no hook; one that trains LoRA adapters
  does, as they do not reach the embedding;
- ``llm``: the language model, or only LoRA adapters when the stage has a LoRA config;
- ``vision``: the vision tower (then also run with gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.model.processor import IMAGE_END, IMAGE_START
from llavamed_fast.train.config import LoraConfig, StageConfig, Trainable

LORA_PREFIX = "lora_"  # peft's LoRA parameter names: ...q_proj.lora_A.default.weight


class StageParameters:
    """Applies a stage's trainable set to the model and undoes its hooks when the stage ends."""

    def __init__(self, model: LlavaMed, stage: StageConfig, processor) -> None:
        self.model = model
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        model.requires_grad_(False)
        trains = set(stage.trainable)
        if Trainable.PROJECTOR in trains:
            model.multi_modal_projector.requires_grad_(True)
        if Trainable.LLM in trains:
            if stage.lora is not None:
                apply_lora(model, stage.lora)
                # Unfrozen here, not by peft: a resumed run wrapped the LLM before loading the checkpoint,
                # so its adapters already exist and were frozen just above with everything else.
                for name, parameter in model.language_model.named_parameters():
                    if LORA_PREFIX in name:
                        parameter.requires_grad_(True)
            else:
                model.language_model.requires_grad_(True)
        if stage.trains_image_rows:  # also beside LoRA adapters, which leave the embedding frozen
            self._train_rows(image_token_ids(processor))
        model.set_vision_trainable(Trainable.VISION in trains)

    def _train_rows(self, ids: Sequence[int]) -> None:
        if not ids:
            raise ValueError("this model has no <im_start>/<im_end> tokens: 'image_tokens' trains nothing")
        weight = self.model.language_model.get_input_embeddings().weight
        weight.requires_grad_(True)
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[list(ids)] = 1
        self._hooks.append(weight.register_hook(lambda grad: grad * keep.to(grad.dtype)))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def image_token_ids(processor) -> list[int]:
    vocab = processor.tokenizer.get_vocab()
    return [vocab[t] for t in (IMAGE_START, IMAGE_END) if t in vocab]


def apply_lora(model: LlavaMed, config: LoraConfig) -> None:
    """Wrap the LLM with LoRA adapters (peft), unless it is wrapped already."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if is_lora(model):
        return
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )
    model.language_model = get_peft_model(model.language_model, peft_config)


def is_lora(model: LlavaMed) -> bool:
    return hasattr(model.language_model, "merge_and_unload")


def merge_lora(model: LlavaMed) -> None:
    """Fold the adapters into the LLM's weights (for export and for the next stage)."""
    if is_lora(model):
        model.language_model = model.language_model.merge_and_unload()
