"""The training config's checks: every ``--set`` value is type- and range-checked on construction, and the
error names the field by the path the user typed; and which fields a resumed run may change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llavamed_fast.train.__main__ import main as train_main
from llavamed_fast.train.config import apply_overrides, config_changes, resumable
from llavamed_fast.train.recipes import get_recipe


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.instruct.lr=abc", "stages.instruct.lr: expected a number, got 'abc'"),
        ("stages.instruct.lr=true", "stages.instruct.lr: expected a number, got True"),
        ("stages.instruct.lr=Infinity", "stages.instruct.lr: expected a finite number, got inf"),
        ("stages.instruct.lr=NaN", "stages.instruct.lr: expected a finite number, got nan"),
        ("stages.1.lr=-1", "stages.instruct.lr: must be a positive number, got -1.0"),
        ("stages.instruct.lora.dropout=abc", "stages.instruct.lora.dropout: expected a number, got 'abc'"),
        ("stages.instruct.lora.dropout=1", "stages.instruct.lora.dropout: must be in [0, 1), got 1.0"),
        ("stages.instruct.lora.r=0", "stages.instruct.lora.r: must be a positive integer, got 0"),
        ("inject_nan_at=12,13", "inject_nan_at: expected a list (on the command line JSON: [12, 13]"),
        (
            "stages.1.data.path=a.json",
            "stages.instruct.data.path: is set, but kind is 'synthetic' (generated",
        ),
        (
            "stages.0.data.image_folder=i",
            "stages.alignment.data.image_folder: is set, but kind is 'synthetic'",
        ),
        ("stages.instruct.max_grad_norm=-1", "stages.instruct.max_grad_norm: must be a positive number"),
        ("stages.instruct.data.max_samples=-5", "stages.instruct.data.max_samples: must be >= 0 (0: all)"),
        ("stages.alignment.epochs=0", "stages.alignment.epochs: must be a positive number, got 0.0"),
        ("stages.alignment.adam_betas=[0.9,1.5]", "stages.alignment.adam_betas: must be in [0, 1)"),
        ("stages.alignment.lora.r=4", "stages.alignment.lora: LoRA adapts the LLM"),
        ("peak_tflops=-3", "peak_tflops: must be >= 0 (0: looked up), got -3.0"),
        ("num_workers=-1", "num_workers: must be >= 0"),
        ("seed=-1", "seed: must be >= 0, got -1"),
        ("inject_nan_at=[0]", "inject_nan_at: must be steps >= 1"),
    ],
)
def test_bad_values_name_their_field(override: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        apply_overrides(get_recipe("tiny"), [override])
    assert message in str(error.value)


def test_documented_zero_values_stay_accepted() -> None:
    """0 means "off" or "automatic" for these fields (see their comments in config.py)."""
    zeros = ["peak_tflops=0", "num_workers=0", "rows_multiple=0", "stages.*.max_steps=0"]
    zeros += ["stages.*.data.max_samples=0", "stages.*.weight_decay=0", "stages.instruct.lora.dropout=0"]
    config = apply_overrides(get_recipe("tiny"), zeros)
    assert config.peak_tflops == 0.0 and config.stages[1].lora.dropout == 0.0


def test_the_command_line_prints_the_error_without_a_traceback(tmp_path) -> None:
    command = [sys.executable, "-m", "llavamed_fast.train", "--recipe", "tiny", "--out", str(tmp_path / "x")]
    result = subprocess.run(
        [*command, "--set", "stages.instruct.lr=abc", "--print-config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == "error: stages.instruct.lr: expected a number, got 'abc'\n"


def test_traceback_shows_where_a_run_error_was_raised(tmp_path, capsys) -> None:
    """A run's error is one line by default; ``--traceback`` lets it propagate, for a bug report."""
    missing = tmp_path / "nope.json"
    argv = ["--recipe", "tiny", "--out", str(tmp_path / "run"), "--set", "plots=false"]
    argv += ["--set", "tensorboard=false", "--set", "stages.*.data.kind=llava_json"]
    argv += ["--set", f"stages.*.data.path={missing}"]
    assert train_main(argv) == 1
    assert (
        capsys.readouterr().err
        == f"error: [Errno 2] No such file or directory: '{missing}' (in stage 'alignment')\n"
    )
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        train_main([*argv, "--traceback"])


def test_a_later_start_stage_needs_a_trained_model(tmp_path, capsys) -> None:
    """--start-stage past the first stage with the recipe's random-init preset as the model would train
    that stage on an untrained projector: refused, saying what to pass."""
    argv = ["--recipe", "tiny", "--out", str(tmp_path / "run"), "--start-stage", "instruct"]
    assert train_main(argv) == 1
    assert capsys.readouterr().err == (
        "error: --start-stage instruct continues from the model stage 'alignment' exported, but model is the "
        "preset 'tiny-v1.5' (random init); pass --set model=<that export, e.g. RUN/stages/alignment>\n"
    )


def test_a_sample_longer_than_the_token_budget_names_the_record_and_the_setting(tmp_path, capsys) -> None:
    argv = [
        "--recipe",
        "tiny",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "stages.alignment.micro_batch_tokens=64",
    ]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "sample(s) of 256 are longer than micro_batch_tokens (64), the first record" in err
    )
    assert err.endswith("raise it (--set stages.alignment.micro_batch_tokens=N) (in stage 'alignment')\n")


def test_a_resumed_run_may_change_only_what_keeps_the_plan() -> None:
    saved = get_recipe("tiny").to_dict()
    changed = apply_overrides(
        get_recipe("tiny"), ["stages.instruct.lr=1e-4", "nan_limit=9", "stages.alignment.max_steps=3"]
    )
    changes = config_changes(saved, changed)
    assert changes == [
        ("nan_limit", 5, 9),
        ("stages.alignment.max_steps", 0, 3),
        ("stages.instruct.lr", 0.0005, 0.0001),
    ]
    assert [path for path, _, _ in changes if not resumable(path)] == ["stages.alignment.max_steps"]
    lora = apply_overrides(get_recipe("tiny"), ["stages.instruct.lora.r=4"])
    assert [resumable(path) for path, _, _ in config_changes(saved, lora)] == [False]
    # The skip policy acts after the plan (a stopped run may switch to it); the data itself may not change.
    data = ["stages.*.data.bad_images=skip", "stages.instruct.data.synthetic_count=9"]
    changes = config_changes(saved, apply_overrides(get_recipe("tiny"), data))
    assert [(path, resumable(path)) for path, _, _ in changes] == [
        ("stages.alignment.data.bad_images", True),
        ("stages.instruct.data.bad_images", True),
        ("stages.instruct.data.synthetic_count", False),
    ]
