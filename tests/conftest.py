"""Test settings that must exist before anything defines a Triton kernel."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which must be chosen before the
# first @triton.jit function is created (later it fails with "0 active drivers"); importing torch creates
# none. With a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny-model steps get 20-50x slower when parallel test workers each use every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The real datasets: ``$LLAVAMED_SHARED_DATA``, default ``../shared/data`` next to the checkout."""
    return Path(os.environ.get("LLAVAMED_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT. A child of a background job inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt; Ctrl-C at a terminal does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def force_token(model, token_id: int, instead_of: int) -> None:
    """Make a random model emit ``token_id`` wherever it would emit ``instead_of`` with a positive logit: its
    output row becomes ``instead_of``'s, scaled by 1.01 (a margin far above any two engines' rounding). The
    decoding tests use it to make replies stop (EOS, "###") at chosen places."""
    weight = model.language_model.get_output_embeddings().weight
    weight.data[token_id] = 1.01 * weight.data[instead_of]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data()
    if not (path / "vqa-rad").is_dir():
        pytest.fail(f"real data not found at {path}; set LLAVAMED_SHARED_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def vqa_rad_images(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "vqa-rad" / "images").glob("*.jpg"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
