"""DICOM images as the model sees images: the stored pixels through the modality LUT (rescale slope and
intercept) and the file's own window (VOI LUT / window centre and width, as pydicom applies them), then
scaled to 8 bits; MONOCHROME1 is inverted so that bright means dense as in MONOCHROME2.

Nothing of the header reaches messages or logs except the modality, the size and the window:
patient-identifying fields (name, id, birth date, ...) are never read out here, and errors say only what
kind of failure it was and which file.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llavamed_fast.data.images import ImageError

DICOM_MAGIC_OFFSET = 128


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """A ``.dcm`` name, or the ``DICM`` marker after the 128-byte preamble."""
    if str(path).lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomInfo:
    """What may be shown about a DICOM image: no patient data."""

    modality: str
    width: int
    height: int
    window: tuple[float, float] | None  # (centre, width) when the file has one

    def describe(self) -> str:
        window = (
            f", window {self.window[0]:g}/{self.window[1]:g}" if self.window else ", no window (full range)"
        )
        return f"DICOM {self.modality or 'image'}, {self.width}x{self.height}{window}"


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def load_dicom(path: str | os.PathLike[str]) -> tuple[Image.Image, DicomInfo]:
    """The first frame of a DICOM file as an RGB image, windowed (see the module docstring)."""
    import pydicom

    name = os.fspath(path)
    # pydicom warns (and logs) about malformed elements quoting their values, patient fields included:
    # silence both while reading, so that no header value reaches the terminal or a log.
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(name)
            pixels = ds.pixel_array
            return _to_image(ds, pixels)
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except Exception as error:  # pydicom's many failure types; their messages may quote header values
        raise ImageError(name, f"not a readable DICOM image ({type(error).__name__})") from None
    finally:
        logger.setLevel(level)


def _to_image(ds, pixels: np.ndarray) -> tuple[Image.Image, DicomInfo]:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour (RGB, YBR converted by pydicom)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return image, DicomInfo(str(ds.get("Modality", "")), image.width, image.height, None)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        # The window's output range is whatever pydicom maps the extremes to (it depends on the rescale,
        # the stored bits and any modality LUT): ask it rather than restate its rules.
        low, high = (float(v) for v in apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0))
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    grey = np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    image = Image.fromarray(grey, "L").convert("RGB")
    return image, DicomInfo(str(ds.get("Modality", "")), image.width, image.height, window)
