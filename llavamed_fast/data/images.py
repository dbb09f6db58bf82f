"""Loading images for training, evaluation and serving, with errors that name the record and the file.

:func:`load_image` returns a fully decoded RGB image whose file is already closed, or raises
:class:`ImageError` saying which record and which file is unusable and why: missing, a directory, not an
image, truncated or corrupt, or with more pixels than ``max_pixels`` (decided from the header, before any
pixel is decoded). :func:`load_image_bytes` does the same for uploaded bytes, and :func:`check_image` is the
header-only check a dataset can run over all its records up front.

Conversion to RGB is made for figures and scans, not photographs alone:

- EXIF orientation is applied, so that phone photos of specimens and gross pathology come out upright, as
  every viewer shows them (the stored pixels of such a photo are often sideways).
- Transparency is composited over white. PMC figures are often PNGs drawn on a transparent background; a
  viewer shows them on white, while a plain ``convert("RGB")`` drops alpha and turns the background black
  (and the black text and axes on it invisible).
- 16-bit and 32-bit integer and float grayscale (``I;16*``, ``I``, ``F``: common in medical PNG and TIFF)
  are stretched from their own minimum to maximum onto 0..255. Pillow's own conversion clips them, so a
  12-bit CT slice stored in 16 bits comes out almost all white.
- Multi-frame files (GIF, APNG, multi-page TIFF, MPO from phones) give their first frame.

Pure Python, Pillow and numpy; no torch import. Relies on Pillow's default
``ImageFile.LOAD_TRUNCATED_IMAGES = False``: with that global set, Pillow pads truncated files with grey
instead of raising, and nothing here can tell.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

# 100 million pixels is 10,000 x 10,000: above the largest PMC figures (a few reach 8,000 x 8,000 = 64M),
# yet one decoded RGB image is only 300 MB, so a few data-loader workers each holding one stay within
# host memory. Everything is resized to the vision tower's few hundred pixels anyway, so a larger image
# adds nothing but risk; whole-slide images are tiled elsewhere, never loaded whole. Pillow warns
# (DecompressionBombWarning) above its own 89.5M and refuses above 179M; the refusal is reported here as
# too many pixels, so a max_pixels above 2 * Image.MAX_IMAGE_PIXELS cannot take effect.
DEFAULT_MAX_PIXELS = 100_000_000

# Raster formats that medical figures, scans and photos come in. Restricting Image.open to these keeps
# uploads away from Pillow's rarer parsers and from EPS, whose decoding runs Ghostscript. MPO (multi-picture
# JPEG from phones) is opened through "JPEG".
FORMATS = ("JPEG", "PNG", "TIFF", "GIF", "BMP", "WEBP", "JPEG2000", "PPM")

# What Pillow's parsers and decoders raise on malformed input. Image.open turns SyntaxError, IndexError,
# TypeError and struct.error into "cannot identify" while probing formats; decoding and EXIF parsing
# let any of these through.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)

_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # EXIF tag
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 degrees


class ImageError(ValueError):
    """An image that cannot be used; the message names the record and the file.

    ``path`` is the file (or, for bytes, the ``source`` given by the caller), ``record`` the dataset
    record or request that refers to it (``None`` when unknown), ``reason`` what is wrong with it.
    """

    def __init__(self, path: str, reason: str, *, record: str | None = None) -> None:
        where = f"image {path}" if record is None else f"record {record}: image {path}"
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.record = record
        self.reason = reason

    def __reduce__(self):
        # Data-loader workers send exceptions to the main process by pickling them, and the default
        # reduction would call __init__ with the message alone.
        return _rebuild_image_error, (self.path, self.reason, self.record)


def _rebuild_image_error(path: str, reason: str, record: str | None) -> ImageError:
    return ImageError(path, reason, record=record)


def load_image(
    path: str | os.PathLike[str], *, record: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Read, fully decode and close the image file at ``path``, as RGB (see the module docstring).

    ``record`` names the dataset record or request in error messages. Raises :class:`ImageError` when
    the file is missing, a directory, empty, not an image in one of :data:`FORMATS`, truncated or
    corrupt, or has more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    _check_max_pixels(max_pixels)
    name = os.fspath(path)
    with _open_file(name, record) as fp:
        return _load(fp, name, record, max_pixels)


def load_image_bytes(
    data: bytes, *, source: str, record: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """:func:`load_image` for an image held in memory (an upload, decoded base64).

    ``source`` stands in for the file name in error messages (e.g. ``"request 7f3a, image 0"``).
    """
    _check_max_pixels(max_pixels)
    if not data:
        raise ImageError(source, "no data (0 bytes)", record=record)
    return _load(io.BytesIO(data), source, record, max_pixels)


def check_image(
    path: str | os.PathLike[str], *, record: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """Return the ``(width, height)`` that :func:`load_image` would give, reading only the file's header.

    Raises :class:`ImageError` for everything the header shows: a missing, empty or unrecognised file, a
    directory, or too many pixels. A file truncated or corrupt after its header passes; only decoding
    (:func:`load_image`) finds that. The size accounts for EXIF orientation; for PNG, only an orientation
    stored before the pixel data is seen, since looking further means decoding the image.
    """
    _check_max_pixels(max_pixels)
    name = os.fspath(path)
    with _open_file(name, record) as fp, _open_header(fp, name, record, max_pixels) as image:
        width, height = image.size
        try:
            # PngImageFile.getexif decodes the whole image to look for an eXIf chunk after the pixel
            # data; the base method reads only what the header parse already collected.
            exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
            orientation = exif.get(_ORIENTATION, 1)
        except _PILLOW_ERRORS as error:
            reason = f"cannot read its EXIF orientation ({_describe(error)})"
            raise ImageError(name, reason, record=record) from error
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _check_max_pixels(max_pixels: int) -> None:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels}")


def _open_file(name: str, record: str | None) -> BinaryIO:
    try:
        fp = open(name, "rb")
    except FileNotFoundError as error:
        raise ImageError(name, "file not found", record=record) from error
    except IsADirectoryError as error:
        raise ImageError(name, "is a directory, not an image file", record=record) from error
    except PermissionError as error:
        raise ImageError(name, "permission denied", record=record) from error
    except OSError as error:
        raise ImageError(name, f"cannot open the file ({_describe(error)})", record=record) from error
    try:
        empty = os.fstat(fp.fileno()).st_size == 0
    except OSError as error:
        fp.close()
        raise ImageError(name, f"cannot stat the file ({_describe(error)})", record=record) from error
    if empty:
        fp.close()
        raise ImageError(name, "file is empty (0 bytes)", record=record)
    return fp


@functools.cache
def _open_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format that this Pillow build never registered (WebP without
    # libwebp in old releases).
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _open_header(fp: BinaryIO, name: str, record: str | None, max_pixels: int) -> ImageFile.ImageFile:
    """Parse the header (no pixel data) and check the declared size against ``max_pixels``."""
    try:
        image = Image.open(fp, formats=_open_formats())
    except Image.DecompressionBombError as error:
        raise ImageError(name, f"too many pixels: {error}", record=record) from error
    except Image.UnidentifiedImageError as error:
        reason = f"not a recognised image file (accepted formats: {', '.join(_open_formats())})"
        raise ImageError(name, reason, record=record) from error
    except _PILLOW_ERRORS as error:
        raise ImageError(name, f"cannot read the image header ({_describe(error)})", record=record) from error
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageError(name, f"zero width or height ({width}x{height})", record=record)
    if width * height > max_pixels:
        image.close()
        reason = (
            f"too many pixels: {width}x{height} = {width * height:,} is more than max_pixels = "
            f"{max_pixels:,} (a decompression bomb, or an image to shrink before use)"
        )
        raise ImageError(name, reason, record=record)
    return image


def _load(fp: BinaryIO, name: str, record: str | None, max_pixels: int) -> Image.Image:
    with _open_header(fp, name, record, max_pixels) as image:
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise ImageError(name, f"too many pixels: {error}", record=record) from error
        except _PILLOW_ERRORS as error:
            reason = f"cannot decode the image data, the file is truncated or corrupt ({_describe(error)})"
            raise ImageError(name, reason, record=record) from error
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except _PILLOW_ERRORS as error:
            reason = f"cannot apply its EXIF orientation ({_describe(error)})"
            raise ImageError(name, reason, record=record) from error
        # Every branch of _to_rgb builds a new image, so the result outlives the file-backed one that
        # the with-statement closes.
        return _to_rgb(image, name, record)


def _to_rgb(image: Image.Image, name: str, record: str | None) -> Image.Image:
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        return _stretch_to_rgb(image, name, record)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            rgb = Image.new("RGB", image.size, _WHITE)
            rgb.paste(rgba, mask=rgba.getchannel("A"))
            return rgb
        # CMYK goes through Pillow's uncalibrated formula rather than the embedded ICC profile: close
        # enough for figures, and colour management would need LittleCMS.
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(name, f"cannot convert mode {mode} to RGB ({error})", record=record) from error


def _stretch_to_rgb(image: Image.Image, name: str, record: str | None) -> Image.Image:
    # float32 is exact for 16-bit values and, for 32-bit integers, errs far below one of the 256 output
    # levels, at half the memory of float64.
    values = np.asarray(image).astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageError(name, f"no finite pixel values in a mode {image.mode} image", record=record)
    low = float(values[finite].min())
    high = float(values[finite].max())
    if high > low:
        scaled = (values - low) * np.float32(255.0 / (high - low))
    else:
        # A constant image has no range to stretch: keep its value where 8 bits can hold it.
        scaled = np.full_like(values, min(max(low, 0.0), 255.0))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    gray = np.rint(scaled).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        # A PNG tRNS chunk on 16-bit gray marks one sample value as transparent: white, as for alpha.
        gray[values == transparent] = 255
    return Image.fromarray(gray).convert("RGB")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
