"""``llavamed-fast chat`` in a subprocess fed by a pipe, and DICOM windowing against the standard's formula."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llavamed_fast.data.dicom import is_dicom, load_dicom
from llavamed_fast.data.images import ImageError
from llavamed_fast.data.templates import Message
from llavamed_fast.model import load_pretrained
from llavamed_fast.model.generate import greedy_generate

# PatientSex is malformed on purpose (CS allows no "^"): pydicom warns about it quoting the value.
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-12345",
    "PatientBirthDate": "19700101",
    "PatientSex": "Doe^Secret",
}


def write_dicom(
    path, stored: np.ndarray, *, window=(40.0, 400.0), photometric="MONOCHROME2", intercept=-1024.0
):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def ct_like(vqa_rad_images, index=30) -> np.ndarray:
    """A real image's grey levels spread over 12-bit stored values (-1024..2071 HU after the rescale)."""
    grey = np.asarray(Image.open(vqa_rad_images[index]).convert("L").resize((96, 80)), dtype=np.float64)
    return np.round(grey / 255 * 3095).astype(np.uint16)


def windowed(stored: np.ndarray, centre: float, width: float, intercept: float = -1024.0) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (linear VOI), written out here as the reference, to 0..255."""
    x = stored.astype(np.float64) + intercept
    y = (x - (centre - 0.5)) / (width - 1) + 0.5
    y = np.where(
        x <= centre - 0.5 - (width - 1) / 2, 0.0, np.where(x > centre - 0.5 + (width - 1) / 2, 1.0, y)
    )
    return np.round(np.clip(y, 0, 1) * 255)


def test_dicom_windowing_follows_the_standard(tmp_path, vqa_rad_images):
    stored = ct_like(vqa_rad_images)
    write_dicom(tmp_path / "ct.dcm", stored)
    image, info = load_dicom(tmp_path / "ct.dcm")
    got = np.asarray(image.convert("L"), dtype=np.float64)
    assert np.abs(got - windowed(stored, 40.0, 400.0)).max() <= 1
    assert (info.modality, info.width, info.height, info.window) == ("CT", 96, 80, (40.0, 400.0))
    assert "Doe" not in info.describe() and "12345" not in info.describe()
    # MONOCHROME1: low values are bright.
    write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")
    inverted = np.asarray(load_dicom(tmp_path / "m1.dcm")[0].convert("L"), dtype=np.float64)
    assert np.abs(inverted - (255 - windowed(stored, 40.0, 400.0))).max() <= 1
    # No window in the file: the full range of the rescaled values.
    write_dicom(tmp_path / "raw.dcm", stored, window=None)
    full = np.asarray(load_dicom(tmp_path / "raw.dcm")[0].convert("L"), dtype=np.float64)
    hu = stored.astype(np.float64) - 1024
    assert np.abs(full - np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255)).max() <= 1
    # Recognised by the DICM marker, whatever the name; a broken file is a clear error naming it.
    (tmp_path / "scan.bin").write_bytes((tmp_path / "ct.dcm").read_bytes())
    assert is_dicom(tmp_path / "scan.bin") and not is_dicom(vqa_rad_images[0])
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    with pytest.raises(ImageError, match=r"bad.dcm.*not a readable DICOM image"):
        load_dicom(tmp_path / "bad.dcm")


def test_terminal_chat(tmp_path, vqa_rad_images):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "llavamed_fast.cli",
            "init",
            "--preset",
            "tiny-v1.5",
            "--out",
            tmp_path / "ckpt",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    stored = ct_like(vqa_rad_images)
    write_dicom(tmp_path / "scan.dcm", stored)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    script = "\n".join(
        [
            "/image missing.png",
            "/image scan.dcm",
            "What is shown?",
            "Anything else?",
            "/clear",
            "What is shown?",
            "/image corrupt.jpg",
            "/bogus",
            "/quit",
        ]
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llavamed_fast.cli",
            "chat",
            "--model",
            str(tmp_path / "ckpt"),
            "--max-tokens",
            "8",
        ],
        input=script + "\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    assert "Research use only" in out.splitlines()[0]
    assert "missing.png: file not found" in err
    assert "[loaded scan.dcm: DICOM CT, 96x80, window 40/400; new conversation]" in out
    assert "corrupt.jpg" in err and "unknown command '/bogus'" in err
    for secret in ("Doe", "Jane", "MRN-12345", "19700101", "Secret"):
        assert secret not in out + err

    model, processor = load_pretrained(tmp_path / "ckpt")
    image = load_dicom(tmp_path / "scan.dcm")[0]
    first = greedy_generate(
        model, processor, [Message("user", "<image>\nWhat is shown?")], [image], max_new_tokens=8
    )
    follow = greedy_generate(
        model,
        processor,
        [
            Message("user", "<image>\nWhat is shown?"),
            Message("assistant", first.text),
            Message("user", "Anything else?"),
        ],
        [image],
        max_new_tokens=8,
    )
    # The replies in order: the first answer, the follow-up, and after /clear the first answer again.
    assert first.text and follow.text
    at = out.index(first.text)
    at = out.index(follow.text, at + len(first.text))
    at = out.index("[conversation cleared]", at)
    assert out.index(first.text, at) > at


def test_a_checkpoint_that_cannot_load_is_a_one_line_error(tmp_path):
    """``serve``/``chat`` with no checkpoint there, or a plain transformers one without ``--template``:
    exit 2 and a line that says what to pass; with ``--template`` the plain checkpoint serves."""
    from llavamed_fast._argtypes import TEMPLATE_HELP
    from llavamed_fast.data.templates import TEMPLATES

    assert all(name in TEMPLATE_HELP for name in TEMPLATES)  # the help lists every template

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "llavamed_fast.cli", *args]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=tmp_path, timeout=300)

    assert cli("init", "--preset", "tiny-v1.5", "--out", "ckpt").returncode == 0
    shutil.copytree(tmp_path / "ckpt", tmp_path / "plain")
    (tmp_path / "plain" / "llavamed_fast.json").unlink()
    missing = cli("serve", "--model", "nowhere")
    assert (missing.returncode, missing.stderr) == (
        2,
        "serve: nowhere has no config.json: not a checkpoint directory\n",
    )
    plain = cli("chat", "--model", "plain")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith(
        "chat: plain has no llavamed_fast.json (a plain transformers checkpoint): "
    )
    assert "--template" in plain.stderr and "mistral_instruct" in plain.stderr
    named = cli("chat", "--model", "plain", "--template", "mistral_instruct", stdin="/quit\n")
    assert named.returncode == 0, named.stderr
