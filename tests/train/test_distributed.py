"""Multi-process training on the CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 against one process.

Every run is the tiny recipe cut to 4 + 4 optimizer steps through the real command line, with the same step
composition in every run (``rows_multiple=2``: one process runs the rows that two would share), a checkpoint
every 3 steps and a NaN loss injected at step 6, so each run also saves mid-stage, skips a step and must
keep its schedule through the skip. In fp32 on the CPU the engines differ only in the order of
floating-point sums (gradient reductions over ranks, flattened ZeRO partitions, DeepSpeed's fp64 norm),
which moves the losses of these 8 steps by up to 5e-8 relative; ``LOSS_RTOL`` leaves a margin of 20x over
that, while gradients scaled by 2 move them by 1e-5 to 3e-4. Gradient norms are logged to 6 significant
digits and DeepSpeed sums them in fp64, the plain engine in fp32: ``GRAD_NORM_RTOL``. Runs are shared
between tests (module-scoped). On two idle cores the file takes about 3 minutes: each two-process run ~20-30
s (mostly importing torch, transformers and DeepSpeed in both processes), the one-process run ~10 s, each
resume test a stopped run plus its resumption (~35 s), the bf16 engine check ~25 s.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llavamed_fast.model import build, load_pretrained

REPO = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-4  # observed: 3e-6
# Adam's normalised update turns summation-order noise in tiny gradients into weight differences of up to
# 2.6e-6 after these 8 steps (DDP: 5e-7), against updates of up to lr = 1e-3 per step.
WEIGHT_ATOL = 1e-5
NAN_STEP = 6  # global step 6 = the second step of the instruct stage
SETTINGS = (
    "stages.alignment.max_steps=4",
    "stages.instruct.max_steps=4",
    "rows_multiple=2",
    "checkpoint_every=3",
    f"inject_nan_at=[{NAN_STEP}]",
    "tensorboard=false",
    "plots=false",
)

pytestmark = pytest.mark.slow


def train(
    out: Path, *extra: str, processes: int, resume: bool = False, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the tiny recipe with ``SETTINGS`` and ``extra`` overrides, in one process or under torchrun.

    ``--standalone`` lets torchrun pick a free port itself, so parallel test workers never collide. The
    runs are kept on the CPU (gloo, fp32) even where a GPU exists, so that every engine is comparable.
    """
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    overrides = [arg for setting in (*SETTINGS, *extra) for arg in ("--set", setting)]
    command = [*launcher, "-m", "llavamed_fast.train", "--recipe", "tiny", "--out", str(out), *overrides]
    if resume:
        command.append("--resume")
    return launch(command, check=check)


def launch(command: list[str], *, check: bool) -> subprocess.CompletedProcess:
    """Run ``command`` on the CPU with one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # From an empty folder: the installed package must run, not the source tree beside the tests.
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-6000:]}"
        )
    return result


def step_records(run: Path) -> list[dict]:
    """The per-step lines of ``metrics.jsonl`` (lines without an ``event`` key)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "event" not in record]


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == kind]


def assert_losses_match(actual: Path, expected: Path) -> None:
    got, want = step_records(actual), step_records(expected)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 9))
    for a, b in zip(got, want, strict=True):
        assert a["skipped"] == b["skipped"], f"step {a['step']}: skipped {a['skipped']} vs {b['skipped']}"
        assert math.isclose(a["lr"], b["lr"], rel_tol=1e-12), f"step {a['step']}: lr {a['lr']} vs {b['lr']}"
        if a["skipped"]:
            continue
        error = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        assert error <= LOSS_RTOL, (
            f"step {a['step']}: loss {a['loss']!r} vs {b['loss']!r} (relative error {error:.2e} > {LOSS_RTOL:.0e})"
        )
        norm_error = abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"]
        assert norm_error <= GRAD_NORM_RTOL, (
            f"step {a['step']}: gradient norm {a['grad_norm']} vs {b['grad_norm']} "
            f"(relative error {norm_error:.2e} > {GRAD_NORM_RTOL:.0e})"
        )


def assert_weights_match(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str
) -> None:
    assert actual.keys() == expected.keys(), (
        f"{where}: names differ: {sorted(actual.keys() ^ expected.keys())}"
    )
    errors = {name: float((actual[name].double() - expected[name].double()).abs().max()) for name in expected}
    name = max(errors, key=errors.__getitem__)
    mean = sum(errors.values()) / len(errors)
    assert errors[name] <= WEIGHT_ATOL, (
        f"{where}: max |difference| {errors[name]:.2e} in {name} (mean of per-tensor maxima {mean:.2e})"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs made on first use and shared by the tests: ``one`` (one process, plain), ``ddp`` (two
    processes, plain), ``zero2``, ``zero3`` (two processes, every stage on DeepSpeed)."""
    root = tmp_path_factory.mktemp("distributed")
    options = {
        "one": ((), 1),
        "ddp": ((), 2),
        "zero2": (("stages.*.zero_stage=2",), 2),
        "zero3": (("stages.*.zero_stage=3",), 2),
    }

    class Runs(dict):
        def __missing__(self, name: str) -> Path:
            extra, processes = options[name]
            train(root / name, *extra, processes=processes)
            self[name] = root / name
            return self[name]

    return Runs()


def needs_deepspeed() -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")


def test_ddp_matches_one_process(runs: dict[str, Path]) -> None:
    assert_losses_match(runs["ddp"], runs["one"])


def test_zero2_matches_one_process(runs: dict[str, Path]) -> None:
    needs_deepspeed()
    assert_losses_match(runs["zero2"], runs["one"])
    assert [e["step"] for e in events(runs["zero2"], "skipped_step")] == [NAN_STEP]


def test_zero3_matches_one_process(runs: dict[str, Path]) -> None:
    needs_deepspeed()
    assert_losses_match(runs["zero3"], runs["one"])
    assert [e["step"] for e in events(runs["zero3"], "skipped_step")] == [NAN_STEP]


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_weights_match_one_process(runs: dict[str, Path], engine: str) -> None:
    """The exported model loads and equals the one-process model, and so do the weights of the
    mid-stage checkpoint (ZeRO-3 gathers them from the partitions while training goes on)."""
    needs_deepspeed()
    expected, _ = load_pretrained(runs["one"] / "model", dtype=torch.float32)
    actual, _ = load_pretrained(runs[engine] / "model", dtype=torch.float32)
    assert_weights_match(actual.state_dict(), expected.state_dict(), f"{engine}/model")
    checkpoint = f"checkpoints/step-{NAN_STEP:08d}/model.safetensors"
    assert_weights_match(
        load_file(runs[engine] / checkpoint), load_file(runs["one"] / checkpoint), f"{engine}/{checkpoint}"
    )


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_resume_matches_uninterrupted(runs: dict[str, Path], tmp_path: Path, engine: str) -> None:
    """A run that stops cleanly after the checkpoint of step 6 (``nan_limit=1`` stops it at the injected
    NaN, writing the checkpoint first) and is resumed ends with exactly the losses of the run that went
    through: DeepSpeed's optimizer partitions, the schedule and the RNG all come back."""
    needs_deepspeed()
    run = tmp_path / "stopped"
    settings = (f"stages.*.zero_stage={engine[-1]}", "nan_limit=1")
    assert train(run, *settings, processes=2, check=False).returncode != 0
    assert len(events(run, "run_stopped")) == 1
    assert step_records(run)[-1]["step"] == NAN_STEP
    assert (run / "checkpoints" / f"step-{NAN_STEP:08d}" / "deepspeed").is_dir()
    assert not (run / "model").exists()
    train(run, *settings, processes=2, resume=True)
    got, want = step_records(run), step_records(runs[engine])
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, want, strict=True):
        assert repr(a["loss"]) == repr(b["loss"]), f"step {a['step']}: loss {a['loss']!r} vs {b['loss']!r}"
        assert a["lr"] == b["lr"], f"step {a['step']}: lr {a['lr']} vs {b['lr']}"
        assert repr(a["grad_norm"]) == repr(b["grad_norm"]), f"step {a['step']}: gradient norm"


def test_zero2_resume_with_a_lower_learning_rate(runs: dict[str, Path], tmp_path: Path) -> None:
    """--resume with a new ``stages.instruct.lr`` under ZeRO-2: loading DeepSpeed's optimizer state brings
    back the old peak in its parameter groups, which must not win. The run stopped at step 6 (the instruct
    stage's second step, skipped) continues its schedule at a fifth of the uninterrupted run's lr, and the
    optimizer uses it: step 7's loss (weights of step 5) is the uninterrupted run's, step 8's is not."""
    needs_deepspeed()
    run = tmp_path / "stopped"
    settings = ("stages.*.zero_stage=2", "nan_limit=1")
    assert train(run, *settings, processes=2, check=False).returncode != 0
    assert step_records(run)[-1]["step"] == NAN_STEP
    resumed = train(run, *settings, "stages.instruct.lr=0.0001", processes=2, resume=True)
    assert "note: resuming with stages.instruct.lr changed from 0.0005 to 0.0001" in resumed.stderr
    assert [e["changes"] for e in events(run, "config_changed")] == [{"stages.instruct.lr": [0.0005, 0.0001]}]
    got, want = step_records(run), step_records(runs["zero2"])
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, want, strict=True):
        ratio = 0.2 if a["step"] > NAN_STEP else 1.0
        assert math.isclose(a["lr"], b["lr"] * ratio, rel_tol=1e-12), f"step {a['step']}: lr {a['lr']}"
        if a["step"] <= NAN_STEP + 1:
            assert repr(a["loss"]) == repr(b["loss"]), (
                f"step {a['step']}: loss {a['loss']!r} vs {b['loss']!r}"
            )
    assert got[-1]["loss"] != want[-1]["loss"], "step 8: the optimizer kept the old learning rate"


def test_zero_bf16_master_weights(tmp_path: Path) -> None:
    """bf16 is what GPUs run; DeepSpeed runs it on the CPU too, so the engine is checked here directly
    (the training command uses fp32 on the CPU): ZeRO-2 then ZeRO-3 on one model, as the LLaVA-Med
    recipes do. This file is the worker (see the end)."""
    needs_deepspeed()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launch([*launcher, __file__, str(tmp_path)], check=True)


def bf16_worker(data_dir: Path) -> None:
    """Each stage: the fp32 master weights start from the model's fp32 values (not from the bf16 cast),
    a skipped step leaves them alone but advances the schedule, ``model_state_dict`` and ``close``
    return the masters in fp32, frozen weights come back as their bf16 rounding, and a frozen vision
    tower (kept outside DeepSpeed) exactly as it was."""
    from deepspeed.utils import safe_get_full_fp32_param

    from llavamed_fast.data.packing import collate
    from llavamed_fast.train import dist as dist_mod
    from llavamed_fast.train.config import apply_overrides
    from llavamed_fast.train.data import stage_dataset
    from llavamed_fast.train.deepspeed_engine import DeepSpeedEngine
    from llavamed_fast.train.recipes import get_recipe
    from llavamed_fast.train.trainable import StageParameters

    dist = dist_mod.init()
    model, processor = build("tiny-v1.5", seed=0)
    config = apply_overrides(
        get_recipe("tiny"), ["stages.alignment.zero_stage=2", "stages.instruct.zero_stage=3"]
    )
    for stage in config.stages:
        dataset = stage_dataset(stage.data, processor, data_dir, dist)
        first = 6 * dist.rank
        rows = [collate([dataset[i] for i in range(first + 3 * k, first + 3 * k + 3)]) for k in range(2)]
        params = StageParameters(model, stage, processor)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        names = {id(p): name for name, p in model.named_parameters()}
        engine = DeepSpeedEngine(model, params.parameters(), stage, 10, dist, dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters()), "DeepSpeed did not cast to bf16"
        for p in params.parameters():
            assert torch.equal(safe_get_full_fp32_param(p), before[names[id(p)]]), f"{names[id(p)]}: master"
        model.train()
        for step in range(3):
            for i, row in enumerate(rows):
                with engine.micro_batch(last=i == len(rows) - 1):
                    engine.backward(engine.forward(row, reduction="sum").loss / 100)
            masters = {id(p): safe_get_full_fp32_param(p) for p in params.parameters()}
            if step == 1:
                engine.skip()
                for p in params.parameters():
                    assert torch.equal(safe_get_full_fp32_param(p), masters[id(p)]), (
                        f"skip moved {names[id(p)]}"
                    )
            else:
                assert engine.step().stepped, f"stage {stage.name}: step {step} was skipped"
        steps = engine.scheduler.last_epoch
        assert steps == 3, f"stage {stage.name}: the schedule advanced {steps} times in 3 steps"
        masters = {names[id(p)]: safe_get_full_fp32_param(p).cpu() for p in params.parameters()}
        # A frozen vision tower stays outside DeepSpeed in fp32: it comes back untouched.
        kept = (
            {f"vision_tower.{name}" for name, _ in engine.vision.named_parameters()}
            if engine.vision is not None
            else set()
        )
        state = engine.model_state_dict()
        engine.close()
        params.close()
        after = dict(model.named_parameters())
        for name, value in after.items():
            assert value.dtype == torch.float32, f"{name}: {value.dtype} after close"
            if name in masters:
                expected = masters[name]
            elif name in kept:
                expected = before[name]
            else:
                expected = before[name].bfloat16().float()
            assert torch.equal(value.detach().cpu(), expected), f"stage {stage.name}: {name} after close"
            if state is not None:
                assert torch.equal(state[name], expected), f"stage {stage.name}: {name} in model_state_dict"
    dist_mod.shutdown()


if __name__ == "__main__":
    bf16_worker(Path(sys.argv[1]))


def test_rows_without_images_or_samples_keep_ranks_in_step(tmp_path, vqa_rad_images):
    """Text-only rows (no projector input) and rows whose every sample was skipped (bad image) must not
    desynchronise the ranks' gradient reductions: the run completes in both engines."""
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    for path in vqa_rad_images[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(vqa_rad_images[0].read_bytes()[:2000])
    names = sorted(p.name for p in folder.iterdir() if p.name != "broken.jpg")

    def record(i, image=None):
        turns = [{"from": "human", "value": ("<image>\n" if image else "") + f"Question {i}?"}]
        turns.append({"from": "gpt", "value": f"Answer {i}."})
        return {"id": f"r{i}", "conversations": turns, **({"image": image} if image else {})}

    records = [record(i, names[i % 3] if i % 3 else None) for i in range(12)] + [record(99, "broken.jpg")]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = ["stages.*.data.kind=llava_json", f"stages.*.data.path={tmp_path / 'data.json'}"]
    data += [f"stages.*.data.image_folder={folder}", "stages.*.data.bad_images=skip"]
    # One sample per row, two rows per step: some steps give a rank only a text-only or an empty row.
    shape = ["stages.*.micro_batch_tokens=40", "stages.*.global_batch_size=2", "rows_multiple=2"]
    for zero in (0, 3):
        overrides = [*data, *shape, f"stages.*.zero_stage={zero}", "stages.*.max_steps=4", "plots=false"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        command += ["-m", "llavamed_fast.train", "--recipe", "tiny", "--out", str(tmp_path / f"zero{zero}")]
        command += [arg for setting in overrides for arg in ("--set", setting)]
        launch(command, check=True)
        ends = events(tmp_path / f"zero{zero}", "stage_end")
        assert any("broken.jpg" in str(e) for e in ends)  # the skipped sample is reported


def test_resume_refuses_another_number_of_processes(tmp_path: Path) -> None:
    """Each rank's RNG state (and ZeRO partition) is saved per rank and, with rows_multiple=0, the rows a
    step is packed into follow the number of processes: a checkpoint resumes only with the number that
    wrote it. The refusal says so and leaves the run as it was."""
    settings = ("nan_limit=1",)  # stops cleanly at the injected NaN of step 6, after its checkpoint
    for written, resumed in ((2, 1), (1, 2)):
        run = tmp_path / f"from{written}"
        assert train(run, *settings, processes=written, check=False).returncode != 0
        assert len(events(run, "run_stopped")) == 1
        before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
        result = train(run, *settings, processes=resumed, resume=True, check=False)
        assert result.returncode != 0
        expected = (
            f"checkpoints/step-{NAN_STEP:08d} was written by {written} process(es) and this run has "
            f"{resumed}: resume it with {written} (torchrun --nproc_per_node {written})"
        )
        assert expected in result.stderr, result.stderr[-3000:]
        assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
