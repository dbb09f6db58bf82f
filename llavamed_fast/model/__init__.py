"""The LlavaMed model: presets, building, the module over PackedBatch, and HF-layout checkpoints."""

from llavamed_fast.model.build import build
from llavamed_fast.model.checkpoint import load_pretrained, save_pretrained
from llavamed_fast.model.config import PRESETS, ImageResize, ModelConfig, ProjectorType, get_preset
from llavamed_fast.model.llava_med import LlavaMed, LlavaMedOutput
from llavamed_fast.model.processor import LlavaMedProcessor

__all__ = [
    "PRESETS",
    "ImageResize",
    "LlavaMed",
    "LlavaMedOutput",
    "LlavaMedProcessor",
    "ModelConfig",
    "ProjectorType",
    "build",
    "get_preset",
    "load_pretrained",
    "save_pretrained",
]
