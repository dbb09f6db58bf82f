"""Image loading on real radiology JPEGs and on every way a file can be broken."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data
from PIL import Image, ImageFile

from llavamed_fast.data.images import ImageError, check_image, load_image, load_image_bytes

RECORD = "32432162_F1"


def real_images(count: int) -> list[Path]:
    """``count`` VQA-RAD radiographs and SLAKE scans, spread over both sets."""
    data = shared_data()
    vqa_rad = sorted((data / "vqa-rad" / "images").glob("*.jpg"))
    slake = sorted((data / "slake" / "imgs").glob("*/source.jpg"))
    if not vqa_rad or not slake:
        pytest.fail(f"real images not found under {data} (set LLAVAMED_SHARED_DATA)")
    half = count // 2
    return vqa_rad[:: len(vqa_rad) // half][:half] + slake[:: len(slake) // (count - half)][: count - half]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def refuse(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"decoded the pixel data of a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


def png_declaring(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG whose header declares ``width`` x ``height``.

    Its pixel data is a stub: a 30000 x 30000 image would need 112 MB of raw rows to compress, and the
    point of the tests that use it is that nothing gets as far as decoding it.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    stub = zlib.compress(bytes(width // 8 + 2))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stub) + chunk(b"IEND", b"")


def random_rgb(rng: np.random.Generator, height: int = 48, width: int = 64) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def assert_names(error: pytest.ExceptionInfo[ImageError], path: Path | str, record: str | None) -> None:
    message = str(error.value)
    assert str(path) in message, message
    assert error.value.path == str(path)
    if record is not None:
        assert f"record {record}" in message, message
        assert error.value.record == record


# --- real images ---------------------------------------------------------------------------------------


def test_real_images_load_as_rgb_with_their_size_and_pixels() -> None:
    for path in real_images(8):
        with Image.open(path) as reference:
            size = reference.size
            pixels = np.asarray(reference.convert("RGB"))
        image = load_image(path, record=RECORD)
        assert image.mode == "RGB"
        assert image.size == size
        assert not isinstance(image, ImageFile.ImageFile)  # detached from the file
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_check_image_reads_only_the_header(no_decoding: None) -> None:
    for path in real_images(6):
        with Image.open(path) as reference:
            assert check_image(path, record=RECORD) == reference.size


def test_load_image_bytes_matches_load_image() -> None:
    path = real_images(2)[0]
    from_bytes = load_image_bytes(path.read_bytes(), source="upload 0", record=RECORD)
    assert from_bytes.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_files_are_closed(tmp_path: Path, rng: np.random.Generator) -> None:
    # Pillow keeps multi-frame files open after load(); a single-frame JPEG checks the ordinary path.
    gif = tmp_path / "frames.gif"
    frames = [Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    before = open_fds()
    load_image(gif)
    load_image(real_images(2)[0])
    check_image(gif)
    assert open_fds() == before


# --- broken files ----------------------------------------------------------------------------------------


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = real_images(2)[0].read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert check_image(path) > (0, 0)  # the header is intact; only decoding can tell
    with pytest.raises(ImageError, match="truncated") as error:
        load_image(path, record=RECORD)
    assert_names(error, path, RECORD)
    assert isinstance(error.value.__cause__, OSError)


def test_truncated_png(tmp_path: Path) -> None:
    whole = tmp_path / "whole.png"
    with Image.open(real_images(2)[-1]) as real:
        real.save(whole)
    data = whole.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as error:
        load_image(path, record=RECORD)
    assert_names(error, path, RECORD)
    assert isinstance(error.value.__cause__, OSError)


def write_random_bytes(path: Path, rng: np.random.Generator) -> None:
    path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())


def write_empty(path: Path, rng: np.random.Generator) -> None:
    path.write_bytes(b"")


def make_directory(path: Path, rng: np.random.Generator) -> None:
    path.mkdir()


def write_nothing(path: Path, rng: np.random.Generator) -> None:
    pass


def write_zero_width_png(path: Path, rng: np.random.Generator) -> None:
    path.write_bytes(png_declaring(0, 16))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (write_random_bytes, "not a recognised image"),
        (write_empty, "empty"),
        (make_directory, "directory"),
        (write_nothing, "file not found"),
        (write_zero_width_png, "not a recognised image"),  # Pillow rejects a zero size while parsing
    ],
)
@pytest.mark.parametrize("function", [load_image, check_image])
def test_unusable_files(
    tmp_path: Path,
    rng: np.random.Generator,
    make: Callable[[Path, np.random.Generator], None],
    reason: str,
    function: Callable[..., object],
) -> None:
    path = tmp_path / "figure.png"
    make(path, rng)
    with pytest.raises(ImageError, match=reason) as error:
        function(path, record=RECORD)
    assert_names(error, path, RECORD)
    if reason != "empty":  # the one case found without an exception to chain
        assert error.value.__cause__ is not None


def test_message_without_record(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert str(error.value) == f"image {path}: file not found"
    assert isinstance(error.value.__cause__, FileNotFoundError)


def test_load_image_bytes_names_the_source(rng: np.random.Generator) -> None:
    garbage = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a recognised image") as error:
        load_image_bytes(garbage, source="request 7f3a, image 0", record=RECORD)
    assert_names(error, "request 7f3a, image 0", RECORD)
    with pytest.raises(ImageError, match="no data"):
        load_image_bytes(b"", source="request 7f3a, image 1")


def test_error_survives_pickling() -> None:
    # Data-loader workers hand exceptions to the main process by pickling them.
    error = ImageError("/data/x.jpg", "file not found", record=RECORD)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.record, copy.reason) == (
        str(error),
        error.path,
        error.record,
        error.reason,
    )


# --- decompression bombs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (30_000, 30_000, 100_000_000),  # beyond Pillow's own refusal (2 x Image.MAX_IMAGE_PIXELS)
        (9_000, 9_000, 50_000_000),  # within Pillow's limits: only max_pixels stops it
    ],
)
def test_decompression_bomb_is_refused_from_the_header(
    tmp_path: Path, no_decoding: None, width: int, height: int, max_pixels: int
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(width, height))
    assert path.stat().st_size < 10_000
    for function in (load_image, check_image):
        with pytest.raises(ImageError, match="too many pixels") as error:
            function(path, record=RECORD, max_pixels=max_pixels)
        assert_names(error, path, RECORD)
    with pytest.raises(ImageError, match="too many pixels"):
        load_image_bytes(path.read_bytes(), source="upload", max_pixels=max_pixels)


def test_max_pixels_is_exact_on_a_real_image(monkeypatch: pytest.MonkeyPatch) -> None:
    path = real_images(2)[0]
    width, height = check_image(path)
    assert load_image(path, max_pixels=width * height).size == (width, height)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ImageError, match=f"{width}x{height}") as error:
        load_image(path, record=RECORD, max_pixels=width * height - 1)
    assert_names(error, path, RECORD)
    with pytest.raises(ImageError, match="max_pixels"):
        check_image(path, max_pixels=width * height - 1)


def test_max_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pixels") as error:
        load_image("unused.png", max_pixels=0)
    assert not isinstance(error.value, ImageError)


# --- conversion to RGB -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "extension", "low", "high"),
    [
        ("I;16", "png", 0, 4095),  # 12-bit data in a 16-bit PNG, as CT and MR exports are
        ("I;16", "tif", 100, 60_000),
        ("I", "tif", -1024, 3071),  # Hounsfield units in a 32-bit TIFF
        ("F", "tif", -0.5, 2.5),
    ],
)
def test_high_bit_depth_is_stretched_not_clipped(
    tmp_path: Path, rng: np.random.Generator, mode: str, extension: str, low: float, high: float
) -> None:
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    if mode == "F":
        values = rng.uniform(low, high, (40, 56)).astype(dtype)
    else:
        values = rng.integers(low, high, (40, 56), endpoint=True).astype(dtype)
    values[0, 0], values[-1, -1] = low, high
    path = tmp_path / f"scan.{extension}"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    image = load_image(path)
    assert image.mode == "RGB"
    pixels = np.asarray(image).astype(np.int32)
    assert (pixels == pixels[..., :1]).all()  # still gray
    expected = np.rint((values.astype(np.float64) - low) * 255 / (high - low))
    error = np.abs(pixels[..., 0] - expected)
    assert error.max() <= 1, f"max error {error.max()} at {np.unravel_index(error.argmax(), error.shape)}"
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.05  # a clipping conversion leaves most pixels at 255 or 0


def test_transparency_is_composited_over_white(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng)
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:, :20] = 0
    alpha[:, 20:30] = 128
    path = tmp_path / "figure.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    pixels = np.asarray(load_image(path)).astype(np.int32)
    assert (pixels[:, :20] == 255).all()
    np.testing.assert_array_equal(pixels[:, 30:], rgb[:, 30:])
    blended = (rgb[:, 20:30].astype(np.float64) * 128 + 255 * 127) / 255
    assert np.abs(pixels[:, 20:30] - blended).max() <= 1


def test_gray_with_alpha_over_white(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    alpha = np.where(np.arange(40) < 10, 0, 255).astype(np.uint8)[None, :].repeat(30, axis=0)
    path = tmp_path / "figure.png"
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(path)
    pixels = np.asarray(load_image(path))
    assert (pixels[:, :10] == 255).all()
    np.testing.assert_array_equal(pixels[:, 10:], np.repeat(gray[:, 10:, None], 3, axis=2))


@pytest.mark.parametrize("extension", ["png", "gif"])
def test_palette_transparency_over_white(tmp_path: Path, rng: np.random.Generator, extension: str) -> None:
    indices = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    indices[:, :10] = 7
    indices[:, 10:][indices[:, 10:] == 7] = 8
    palette = rng.integers(0, 256, 768, dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.tobytes())
    path = tmp_path / f"figure.{extension}"
    image.save(path, transparency=7)
    pixels = np.asarray(load_image(path))
    assert (pixels[:, :10] == 255).all()
    np.testing.assert_array_equal(pixels[:, 10:], palette.reshape(256, 3)[indices[:, 10:]])


@pytest.mark.parametrize(("mode", "extension"), [("1", "png"), ("L", "png"), ("P", "png"), ("CMYK", "jpg")])
def test_other_modes_convert_as_pillow_does(
    tmp_path: Path, rng: np.random.Generator, mode: str, extension: str
) -> None:
    path = tmp_path / f"figure.{extension}"
    Image.fromarray(random_rgb(rng)).convert(mode).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
        expected = np.asarray(stored.convert("RGB"))
    image = load_image(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_multi_frame_gives_the_first_frame(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "frames.gif"
    frames = [Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as stored:
        assert stored.n_frames == 3
        first = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(path)), first)


@pytest.mark.parametrize("extension", ["jpg", "png"])
def test_exif_orientation_is_applied(tmp_path: Path, rng: np.random.Generator, extension: str) -> None:
    path = tmp_path / f"specimen.{extension}"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; shown turned 90 degrees clockwise
    Image.fromarray(random_rgb(rng, height=48, width=64)).save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (64, 48)
        upright = np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    image = load_image(path)
    assert image.size == (48, 64)
    np.testing.assert_array_equal(np.asarray(image), upright)
    assert check_image(path) == (48, 64)
    assert load_image_bytes(path.read_bytes(), source="upload").size == (48, 64)
