"""Model FLOPs of a training micro-batch (for MFU) and the dense peak of known accelerators.

MFU counts *model* FLOPs: the matmuls the model needs for forward and backward, whatever the hardware
actually executes. Recomputation under gradient checkpointing therefore earns no credit (that would be
HFU, hardware FLOPs utilisation), and neither do padding tokens. Elementwise work (norms, activations,
softmax, rotary embeddings, the loss itself) is left out, as in the usual ``6·N`` accounting.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from torch import nn

from llavamed_fast.data.batch import PackedBatch
from llavamed_fast.data.templates import IGNORE_INDEX
from llavamed_fast.model.llava_med import LlavaMed


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP count needs to know about a model; read once from its modules."""

    llm_matmul_params: int  # decoder Linear weights; the LM head and the embeddings are not in it
    head_params: int  # LM head weight, V·H (the padded vocabulary: that is what the GEMM runs over)
    llm_layers: int
    llm_attention_width: int  # query heads · head dim
    projector_in_params: int  # linear_1 weight
    projector_out_params: int  # linear_2 weight (0 for the linear v0 projector)
    tokens_per_image: int  # projected image tokens in the LLM (CLS dropped)
    vision_matmul_params: int  # vision tower Linear weights, run on every vision token
    vision_patch_params: int  # patch-embedding convolution, a matmul over the patches only
    vision_layers: int
    vision_width: int
    vision_tokens: int  # patches + CLS per image


_SHAPE_ATTRIBUTE = "_llavamed_flop_shape"


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flop_shape(model: LlavaMed) -> FlopShape:
    """The model's :class:`FlopShape`, cached on the model (shapes do not change during training).

    Parameters are counted from the modules, so tiny presets, hub checkpoints and ``meta``-device models
    all work, and any LLM family whose matmuls are ``nn.Linear`` is counted right without a table.
    """
    cached = vars(model).get(_SHAPE_ATTRIBUTE)
    if cached is not None:
        return cached
    text = model.language_model.config
    vision = model.vision_tower.config
    projector = model.multi_modal_projector
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    shape = FlopShape(
        llm_matmul_params=_linear_params(model.decoder),
        head_params=model.language_model.get_output_embeddings().weight.numel(),
        llm_layers=text.num_hidden_layers,
        llm_attention_width=heads * head_dim,
        projector_in_params=projector.linear_1.weight.numel(),
        projector_out_params=0 if projector.linear_2 is None else projector.linear_2.weight.numel(),
        tokens_per_image=model.tokens_per_image,
        vision_matmul_params=_linear_params(model.vision_tower),
        vision_patch_params=model.vision_tower.get_input_embeddings().weight.numel(),
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        vision_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
    )
    # A plain attribute, not a buffer: it never reaches state_dict or checkpoints.
    vars(model)[_SHAPE_ATTRIBUTE] = shape
    return shape


def batch_flops(
    model: LlavaMed,
    batch: PackedBatch,
    *,
    llm_trainable: bool,
    projector_trainable: bool = True,
    vision_trainable: bool = False,
    recompute: bool = False,
) -> float:
    """Model FLOPs of forward + backward of one packed row.

    Conventions (a matmul of ``[m, k] @ [k, n]`` is ``2·m·k·n``; only weights of matmuls count, so biases,
    norms and embedding lookups count 0):

    - LLM, per real token: ``2·N`` forward (``N``: the decoder's Linear weights), ``2·N`` backward for the
      activation gradients, which always flow (even a frozen LLM backpropagates to the projector or the
      image-token embeddings), and ``2·N`` more for weight gradients when ``llm_trainable``: ``4·N`` in
      stage 1, ``6·N`` in stage 2. With LoRA pass ``llm_trainable=False``: the frozen base weights get no
      gradient and the adapters are negligible.
    - LM head, per *supervised* token only (``V·H`` weights, ×2 forward, ×2 activation grad, ×2 more when
      the LLM trains): ``ops.linear_cross_entropy`` runs the head only where there is a target.
    - LLM attention (``QKᵀ`` and ``PV``), per sample of length ``L`` and layer: ``2·L·(L+1)·H·D`` forward
      (the causal half of the square, ``H·D`` = query heads × head dim), twice that backward (activation
      gradients only: there are no weights), so 3× forward whatever trains.
    - Projector, per image token: ``2·P`` forward; when it trains, ``2·P`` for weight gradients plus
      ``2·P₂`` for the activation gradient between ``linear_2`` and ``linear_1`` (mlp2x_gelu); the
      gradient of its input (``2·P₁``) only when the vision tower trains.
    - Vision tower, per image, unless the batch brings cached ``image_features`` (then 0): ``2·N_vision``
      on every one of its ``(image_size/patch)² + 1`` tokens (CLS included), the patch-embedding
      convolution on the patches, and full (non-causal) attention ``4·T²·D`` per layer. Forward only when
      frozen; ×3 when ``vision_trainable``. All layers count although only the penultimate is used: the
      tower runs them all.
    - Padding (a trailing segment of ``cu_seqlens`` beyond ``batch.num_samples``) earns nothing.
    - ``recompute`` (gradient checkpointing) adds nothing: MFU credits model FLOPs, not the extra
      forward the hardware runs.

    ``cu_seqlens`` and ``labels`` are read on the host: call this on the CPU batch from the collator,
    before it moves to the GPU (on CUDA tensors it still works, at the cost of a device sync).
    """
    del recompute  # accepted so callers can pass their setting; it changes hardware FLOPs, not model FLOPs
    shape = flop_shape(model)
    bounds = batch.cu_seqlens.tolist()[: batch.num_samples + 1]
    lengths = [end - start for start, end in itertools.pairwise(bounds)]
    tokens = sum(lengths)
    supervised = int((LlavaMed.shifted_labels(batch)[:tokens] != IGNORE_INDEX).sum()) if tokens else 0

    llm_passes = 3 if llm_trainable else 2  # forward, activation grads, weight grads
    flops = 2 * llm_passes * (shape.llm_matmul_params * tokens + shape.head_params * supervised)
    causal_pairs = sum(length * (length + 1) // 2 for length in lengths)
    flops += 3 * 4 * causal_pairs * shape.llm_attention_width * shape.llm_layers

    images = _real_images(batch, bounds[-1] if bounds else 0)
    projector = shape.projector_in_params + shape.projector_out_params
    projector_flops = 2 * projector
    if projector_trainable:
        projector_flops += 2 * projector
    if projector_trainable or vision_trainable:
        projector_flops += 2 * shape.projector_out_params
    if vision_trainable:
        projector_flops += 2 * shape.projector_in_params
    flops += projector_flops * images * shape.tokens_per_image

    if batch.image_features is None and images:
        tokens_v = shape.vision_tokens
        vision = 2 * shape.vision_matmul_params * tokens_v + 2 * shape.vision_patch_params * (tokens_v - 1)
        vision += 4 * tokens_v * tokens_v * shape.vision_width * shape.vision_layers
        flops += (3 if vision_trainable else 1) * vision * images
    return float(flops)


def _real_images(batch: PackedBatch, real_tokens: int) -> int:
    """Images inside the real samples; the collator never puts one in the padding, but a count by offset
    keeps that true by construction."""
    if batch.num_images == 0:
        return 0
    return int((batch.image_offsets < real_tokens).sum())


# Dense (no structured sparsity) BF16/FP16 tensor-core peaks in TFLOP/s per device, from the vendors'
# datasheets, whose tables print the sparse figure with a "*"; we take the other one. Patterns run in
# order against the upper-cased device name, so specific ones (PCIe, NVL) come before the family.
#   H100 SXM / H200 / GH200: NVIDIA H100 and H200 datasheets, "BFLOAT16 Tensor Core 1,979*" -> 989.4.
#   H100 PCIe 1,513* -> 756; H100 NVL and H200 NVL 1,671* -> 835.5 (same datasheets).
#   A100 (SXM and PCIe): NVIDIA A100 datasheet, BF16 312 (624*).
#   A10 datasheet: BF16 125 (250*). NVIDIA publishes no A10G datasheet; the A10's figure is used.
#   L4 datasheet: BF16 242* -> 121. L40S datasheet: 362.05 (733*). L40 datasheet: 181.05 (362.1*).
#   AMD Instinct MI300X datasheet: BF16 1307.4 dense (2614.9 with sparsity).
_DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.4),
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bH200\b", 989.4),
    (r"\bH100\b.*\bPCIE\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH100\b", 989.4),
    (r"\bA100\b", 312.0),
    (r"\bA10G?\b", 125.0),
    (r"\bL40S\b", 362.05),
    (r"\bL40\b", 181.05),
    (r"\bL4\b", 121.0),
    (r"\bMI300X\b", 1307.4),
)


def peak_tflops_for_name(name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak TFLOP/s of a device called ``name`` (as ``torch.cuda.get_device_name`` spells it) for
    ``dtype``; None when the device or dtype is not in the table."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None  # fp32 runs at TF32 or plain FP32 rates depending on flags: not guessed
    upper = name.upper()
    for pattern, tflops in _DENSE_BF16_TFLOPS:
        if re.search(pattern, upper):
            return tflops
    return None


def peak_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak TFLOP/s of ``device`` for ``dtype``; None for CPUs and unknown devices, so that MFU is
    then not reported rather than invented."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device), dtype)


__all__ = ["FlopShape", "batch_flops", "flop_shape", "peak_tflops", "peak_tflops_for_name"]
