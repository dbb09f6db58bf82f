"""The LlavaMed module: frozen CLIP vision tower -> projector -> transformers causal LM, over PackedBatch.

Submodule names follow transformers' ``LlavaForConditionalGeneration`` (``vision_tower``,
``multi_modal_projector.linear_1/linear_2``, ``language_model``) so that checkpoints map one to one
(see ``checkpoint.py``). The LLM is any transformers causal LM, used as is; its attention runs through
``ops.varlen_attention`` (``attention.py``), the RMSNorms and gated-MLP activation of the families that
have them through ``ops.rms_norm`` and ``ops.swiglu`` (``fused.py``), the projector through ``ops.projector`` (written straight into
the packed embeddings) and the loss through ``ops.linear_cross_entropy`` (no full logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel

from llavamed_fast import ops
from llavamed_fast.data.batch import PackedBatch
from llavamed_fast.data.templates import IGNORE_INDEX
from llavamed_fast.model import attention, fused
from llavamed_fast.model.config import ModelConfig, ProjectorType


class Projector(nn.Module):
    """``linear`` (v0) or ``mlp2x_gelu`` (v1.5); computed by ``ops.projector``."""

    def __init__(self, kind: ProjectorType, vision_width: int, text_width: int) -> None:
        super().__init__()
        self.kind = ProjectorType(kind)
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.linear_2 = nn.Linear(text_width, text_width) if self.kind is ProjectorType.MLP2X_GELU else None

    def _weights(self) -> tuple[torch.Tensor | None, ...]:
        second = self.linear_2
        return (
            self.linear_1.weight,
            self.linear_1.bias,
            None if second is None else second.weight,
            None if second is None else second.bias,
        )

    def forward(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None = None,
        image_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features = features.to(self.linear_1.weight.dtype)
        return ops.projector(features, *self._weights(), embeds=embeds, image_offsets=image_offsets)


@dataclass
class LlavaMedOutput:
    loss: torch.Tensor
    """The loss over the row's supervised tokens (mean or sum, as asked)."""
    num_supervised: torch.Tensor
    """How many tokens were supervised (int64 scalar tensor: no host sync)."""


class LlavaMed(nn.Module):
    """A LLaVA-style model over packed rows. Build it with :func:`llavamed_fast.model.build`."""

    def __init__(
        self,
        config: ModelConfig,
        vision_tower: CLIPVisionModel,
        language_model: PreTrainedModel,
        *,
        image_token_id: int,
        tokens_per_image: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.vision_tower = vision_tower
        self.multi_modal_projector = Projector(
            config.projector, vision_tower.config.hidden_size, language_model.config.hidden_size
        )
        self.language_model = language_model
        self.language_model.set_attn_implementation(attention.register())
        fused.fuse(self.language_model)  # RMSNorm and the MLP activation through ops (fused.py)
        self.vision_frozen = False
        self.set_vision_trainable(not config.freeze_vision)

    def set_vision_trainable(self, trainable: bool) -> None:
        """Frozen (the default): no gradients, run without autograd and always in eval mode."""
        self.vision_frozen = not trainable
        self.vision_tower.requires_grad_(trainable)
        self.vision_tower.train(self.training and trainable)

    def train(self, mode: bool = True) -> LlavaMed:
        super().train(mode)
        if self.vision_frozen:
            self.vision_tower.eval()  # frozen means frozen: no dropout or other train-mode behaviour either
        return self

    @property
    def decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, P, C]``: the vision tower's ``vision_feature_layer`` hidden states without CLS."""
        dtype = next(self.vision_tower.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        return outputs.hidden_states[self.config.vision_feature_layer][:, 1:]

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, D]`` input embeddings with each image's projected tokens in its rows."""
        embeds = self.language_model.get_input_embeddings()(batch.input_ids)
        if batch.num_images == 0:
            if torch.is_grad_enabled() and any(
                p.requires_grad for p in self.multi_modal_projector.parameters()
            ):
                # A row without images still gives the projector a (zero) gradient, so that every
                # data-parallel rank reduces the same set of gradients.
                # Through the module (not its weights directly), so ZeRO-3 gathers them as for a real call.
                probe = embeds.new_zeros(1, 1, self.multi_modal_projector.linear_1.in_features)
                embeds = embeds + self.multi_modal_projector(probe).sum().to(embeds.dtype) * 0
            return embeds
        features = batch.image_features
        if features is None:
            if batch.pixel_values is None:
                raise ValueError(
                    f"the batch has {batch.num_images} image slots but no pixel values or features"
                )
            features = self.image_features(batch.pixel_values)
        if features.shape[:2] != (batch.num_images, self.tokens_per_image):
            raise ValueError(
                f"image features {tuple(features.shape)} do not fill {batch.num_images} images x "
                f"{self.tokens_per_image} tokens"
            )
        return self.multi_modal_projector(features, embeds, batch.image_offsets)

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, D]`` final hidden states of the packed row."""
        embeds = self.embed(batch)
        outputs = self.decoder(
            inputs_embeds=embeds.unsqueeze(0),
            position_ids=batch.position_ids.unsqueeze(0),
            use_cache=False,
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
        )
        return outputs.last_hidden_state.squeeze(0)

    @staticmethod
    def shifted_labels(batch: PackedBatch) -> torch.Tensor:
        """``[T]`` targets: position t predicts ``labels[t + 1]`` of the same sample, never the next sample's."""
        targets = batch.labels.roll(-1)
        targets[batch.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
        return targets

    def forward(self, batch: PackedBatch, *, reduction: str = "mean") -> LlavaMedOutput:
        """The loss over supervised tokens: ``mean`` over this row's, or ``sum`` (for global normalisation)."""
        hidden = self.hidden_states(batch)
        targets = self.shifted_labels(batch)
        loss = ops.linear_cross_entropy(
            hidden, self.language_model.get_output_embeddings().weight, targets, IGNORE_INDEX, reduction
        )
        return LlavaMedOutput(loss=loss, num_supervised=(targets != IGNORE_INDEX).sum())

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, V]`` logits of every position (inference and tests; training never builds them)."""
        return self.language_model.get_output_embeddings()(self.hidden_states(batch))
