"""The curriculum loop in one process: both stages, exact resume after SIGKILL, stage freezing, the loss
normalisation, the non-finite-step guard and LoRA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import default_sigint
from safetensors.torch import load_file

from llavamed_fast.data.packing import collate
from llavamed_fast.model import build, load_pretrained
from llavamed_fast.train.batches import plan_stage
from llavamed_fast.train.config import apply_overrides
from llavamed_fast.train.data import stage_dataset
from llavamed_fast.train.dist import Dist
from llavamed_fast.train.loop import count_targets
from llavamed_fast.train.recipes import get_recipe

SHORT = ["stages.alignment.max_steps=8", "stages.instruct.max_steps=6", "checkpoint_every=4", "plots=false"]


def command(out: Path, *overrides: str, recipe: str = "tiny", resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "llavamed_fast.train", "--recipe", recipe, "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    return args + (["--resume"] if resume else [])


def environment() -> dict[str, str]:
    # One thread: CPU matmuls are then bitwise repeatable from run to run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def run(
    out: Path, *overrides: str, recipe: str = "tiny", resume: bool = False, umask: int = -1
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(out, *overrides, recipe=recipe, resume=resume),
        capture_output=True,
        text=True,
        env=environment(),
        check=False,
        cwd=out.parent,
        umask=umask,
    )


def start(out: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """The run in the background (stderr to ``log``), from outside the source tree like ``run``."""
    with log.open("w") as stderr:
        return subprocess.Popen(
            command(out, *overrides),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=out.parent,
            preexec_fn=default_sigint,  # the SIGINT test's signal must reach Python
        )


def wait_for_step(process: subprocess.Popen, out: Path, step: int, log: Path) -> None:
    """Until ``step`` is in the metrics file; fails if the run ends first."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            return
        if process.poll() is not None:
            pytest.fail(
                f"the run ended (exit {process.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    pytest.fail(f"no step {step} within 300 s")


def events(out: Path, kind: str) -> list[dict]:
    return [r for r in records(out) if r.get("event") == kind]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], r["stage"], r["loss"]) for r in records(out) if "event" not in r]


def test_tiny_recipe_runs_the_curriculum(tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    result = run(out)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    steps = step_losses(out)
    assert len(steps) >= 40, f"{len(steps)} optimizer steps"
    assert [s for s, _, _ in steps] == list(range(1, len(steps) + 1))
    stages = [stage for _, stage, _ in steps]
    assert stages[0] == "alignment" and stages[-1] == "instruct" and stages == sorted(stages)  # in order
    saved = [r["step"] for r in records(out) if r.get("event") == "checkpoint"]
    assert saved and all(b - a <= 10 for a, b in zip([0, *saved], saved, strict=False))
    assert all(torch.isfinite(torch.tensor(loss)) for _, _, loss in steps)
    first, last = steps[0][2], steps[-1][2]
    assert last < first, (first, last)  # it learns something
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "tiny" and len(config["stages"]) == 2
    for stage in ("alignment", "instruct"):
        assert (out / "stages" / stage / "config.json").exists()
        assert (out / "plots" / f"{stage}.png").exists()
    model, _ = load_pretrained(out / "model")
    assert model.config.name == "tiny-v1.5"
    print(f"tiny recipe: {len(steps)} steps in {seconds:.1f} s")


def test_resume_after_sigkill_gives_the_same_losses(tmp_path):
    overrides = [*SHORT, "checkpoint_every=3", "tensorboard=false"]
    whole = tmp_path / "whole"
    assert run(whole, *overrides).returncode == 0
    expected = step_losses(whole)

    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        # From outside the source tree, like run(): the installed package, not the checkout's folder.
        process = subprocess.Popen(
            command(killed, *overrides),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
        )
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    # Kill it somewhere in stage 1 after a checkpoint but between two of them: after step 7 (checkpoints
    # at 3 and 6), so the resumed run must recompute step 7 and rewrite its line.
    while time.monotonic() < deadline:
        if metrics.exists() and sum('"step": 7,' in line for line in metrics.read_text().splitlines()):
            break
        if process.poll() is not None:
            pytest.fail(
                f"the run ended (exit {process.returncode}) before step 7:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = step_losses(killed)
    assert 7 <= len(before) < len(expected)

    resumed = run(killed, *overrides, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(killed) == expected  # exactly: same floats, same steps, no duplicated lines


def test_rerun_without_resume_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    assert run(out, "stages.alignment.max_steps=1", "stages.instruct.max_steps=1").returncode == 0
    again = run(out, "stages.alignment.max_steps=1", "stages.instruct.max_steps=1")
    assert again.returncode != 0 and "pass --resume" in again.stderr
    changed = run(out, "stages.alignment.max_steps=2", "stages.instruct.max_steps=1", resume=True)
    assert changed.returncode != 0 and "differs from this run's config" in changed.stderr


def test_stages_train_only_what_they_name(tmp_path):
    out = tmp_path / "v0"
    result = run(out, *SHORT, recipe="tiny-v0")
    assert result.returncode == 0, result.stderr[-3000:]
    initial = build("tiny-v0", seed=0)[0].state_dict()
    after_1 = load_file(out / "checkpoints" / "stage-0-alignment" / "model.safetensors")
    after_2 = load_file(out / "checkpoints" / "stage-1-instruct" / "model.safetensors")
    _, processor = build("tiny-v0", seed=0)
    image_rows = processor.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])

    def changed(a, b, name):
        return not torch.equal(a[name], b[name])

    embed = "language_model.model.embed_tokens.weight"
    for name in initial:
        if name.startswith("vision_tower."):
            assert not changed(initial, after_1, name) and not changed(after_1, after_2, name), name
        elif name.startswith("multi_modal_projector."):
            assert changed(initial, after_1, name) and changed(after_1, after_2, name), name
        elif name == embed:
            rows = torch.zeros(initial[name].shape[0], dtype=torch.bool)
            rows[image_rows] = True
            delta = (after_1[name] - initial[name]).abs().sum(1)
            assert (delta[rows] > 0).all() and (
                delta[~rows] == 0
            ).all()  # only <im_start>/<im_end> in stage 1
        elif name.startswith("language_model."):
            assert not changed(initial, after_1, name), name  # the LLM is frozen in stage 1
    llm = [n for n in initial if n.startswith("language_model.") and n != embed]
    assert all(changed(after_1, after_2, n) for n in llm if "norm" not in n)  # and trains in stage 2


def test_loss_is_the_mean_over_the_global_batch(tmp_path):
    """The first logged loss equals the token-weighted mean over every row of the first step, computed
    here independently from the initial model and the plan."""
    out = tmp_path / "run"
    assert run(out, "stages.alignment.max_steps=1", "stages.instruct.max_steps=1").returncode == 0
    logged = step_losses(out)[0][2]
    config = apply_overrides(get_recipe("tiny"), [])
    stage = config.stages[0]
    model, processor = build("tiny-v1.5", seed=0)
    dataset = stage_dataset(stage.data, processor, out, Dist(0, 1, 0, torch.device("cpu")))
    plan = plan_stage(
        dataset.lengths,
        budget=stage.micro_batch_tokens,
        global_batch_size=stage.global_batch_size,
        rows_multiple=1,
        seed=config.seed,
        epochs=stage.epochs,
    )
    rows = [collate([dataset[i] for i in row]) for row in plan[0].rows]
    assert len(rows) > 1  # several micro-batches, so the normalisation matters
    with torch.no_grad():
        total = sum(model(b, reduction="sum").loss.double() for b in rows)
    expected = float(total / sum(count_targets(b) for b in rows))
    assert logged == pytest.approx(expected, rel=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    out = tmp_path / "one"
    result = run(out, *SHORT, "inject_nan_at=[3]")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in records(out) if "event" not in r]
    assert [r["skipped"] for r in steps[:4]] == [False, False, True, False]
    assert [r["step"] for r in records(out) if r.get("event") == "skipped_step"] == [3]

    stopped = tmp_path / "stopped"
    result = run(stopped, *SHORT, "inject_nan_at=[2,3,4]", "nan_limit=3")
    assert result.returncode == 3 and "3 consecutive steps with a non-finite loss" in result.stderr
    assert (stopped / "checkpoints" / "step-00000004" / "COMPLETE").exists()  # a checkpoint first
    assert [r for r in records(stopped) if r.get("event") == "run_stopped"]
    # The parameters did not move in the skipped steps.
    before = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in before.values())


def test_lora_stage_merges_adapters_on_export(tmp_path):
    out = tmp_path / "lora"
    result = run(out, *SHORT, "stages.instruct.lora.r=4")
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(out / "checkpoints" / "stage-0-alignment" / "model.safetensors")
    after = load_file(out / "checkpoints" / "stage-1-instruct" / "model.safetensors")
    assert not any("lora" in n for n in after)  # merged: plain weights only
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])  # the adapters moved the targeted weights
    norm = "language_model.model.layers.0.input_layernorm.weight"
    assert torch.equal(before[norm], after[norm])  # and nothing outside them
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(out / "model")


def test_feature_cache_gives_the_same_losses(tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    overrides = [
        "stages.alignment.max_steps=5",
        "stages.instruct.max_steps=3",
        "plots=false",
        "tensorboard=false",
    ]
    assert run(plain, *overrides).returncode == 0
    result = run(cached, *overrides, "feature_cache=true")
    assert result.returncode == 0, result.stderr[-3000:]
    # Exactly: the cache holds the very tensors the frozen tower returns (on the CPU, in float32).
    assert step_losses(cached) == step_losses(plain)
    caches = sorted((cached / "features").glob("*/COMPLETE"))
    assert len(caches) == 2  # one per stage's image set
    rows = json.loads((caches[0].parent / "rows.json").read_text())
    assert rows and all(r >= 0 for r in rows.values())


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    overrides = [
        "stages.alignment.max_steps=2",
        "stages.instruct.max_steps=4",
        "plots=false",
        "tensorboard=false",
    ]
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert run(plain, *overrides).returncode == 0
    result = run(recomputed, *overrides, "stages.instruct.gradient_checkpointing=true")
    assert result.returncode == 0, result.stderr[-3000:]
    for (s1, _, a), (s2, _, b) in zip(step_losses(plain), step_losses(recomputed), strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6)


def test_a_run_can_start_at_a_later_stage_from_an_exported_model(tmp_path):
    overrides = [
        "stages.alignment.max_steps=3",
        "stages.instruct.max_steps=3",
        "plots=false",
        "tensorboard=false",
    ]
    whole = tmp_path / "whole"
    assert run(whole, *overrides).returncode == 0
    later = tmp_path / "later"
    result = subprocess.run(
        [*command(later, *overrides, f"model={whole / 'stages' / 'alignment'}"), "--start-stage", "instruct"],
        capture_output=True,
        text=True,
        env=environment(),
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [(stage, loss) for _, stage, loss in step_losses(whole) if stage == "instruct"]
    assert [(stage, loss) for _, stage, loss in step_losses(later)] == expected


def test_lora_run_resumes_inside_the_lora_stage(tmp_path):
    """A run stopped by SIGTERM inside a LoRA stage resumes with its adapters trainable and ends with
    exactly the losses of an uninterrupted run (the adapters' dropout draws from the restored RNG)."""
    overrides = ["stages.instruct.lora.r=4", "stages.alignment.max_steps=3", "stages.instruct.max_steps=8"]
    overrides += ["checkpoint_every=3", "plots=false", "tensorboard=false"]
    whole = tmp_path / "whole"
    result = run(whole, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    process = start(killed, *overrides, log=log)
    # Steps 4-11 are the LoRA stage, with checkpoints after steps 6 and 9: stopped after step 7, the run
    # resumes from step 6, three steps into the stage.
    wait_for_step(process, killed, 7, log)
    process.send_signal(signal.SIGTERM)
    process.wait()
    assert step_losses(killed)[-1][0] < 11
    resumed = run(killed, *overrides, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(killed) == step_losses(whole)


def test_a_failed_stage_export_is_done_again_on_resume(tmp_path):
    """The stage's export comes before the checkpoint that marks the stage done, so a run that fails (or
    is killed) in between resumes into the export instead of skipping the stage without it. Here a file
    where ``stages/`` should be makes the first export fail."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "stages").write_text("in the way")
    failed = run(out, *SHORT)
    assert failed.returncode != 0 and f"File exists: '{out / 'stages'}'" in failed.stderr
    (out / "stages").unlink()
    resumed = run(out, *SHORT, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("alignment", "instruct"):
        load_pretrained(out / "stages" / stage)
    assert [e["stage"] for e in events(out, "stage_end")] == ["alignment", "instruct"]
    assert [s for s, _, _ in step_losses(out)] == list(range(1, 15))


def test_a_non_finite_stop_resumes_with_a_lower_learning_rate(tmp_path):
    """The non-finite guard's advice works: --resume accepts a new peak lr (and refuses a change to the
    data plan), and the schedule continues from the same position at the new peak."""
    overrides = [*SHORT, "inject_nan_at=[2,3,4]", "tensorboard=false"]
    whole = tmp_path / "whole"
    assert run(whole, *overrides, "nan_limit=4").returncode == 0  # the same steps, without the stop
    stopped = tmp_path / "stopped"
    result = run(stopped, *overrides, "nan_limit=3")
    assert (
        result.returncode == 3
        and "--resume accepts a new one (--set stages.alignment.lr=...)" in result.stderr
    )

    refused = run(stopped, *overrides, "nan_limit=3", "stages.alignment.max_steps=9", resume=True)
    assert refused.returncode == 1 and "differs from this run's config in stages.alignment.max_steps" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr

    resumed = run(stopped, *overrides, "nan_limit=3", "stages.alignment.lr=0.0002", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "note: resuming with stages.alignment.lr changed from 0.001 to 0.0002" in resumed.stderr
    assert json.loads((stopped / "config.json").read_text())["stages"][0]["lr"] == 0.0002
    assert [e["changes"] for e in events(stopped, "config_changed")] == [
        {"stages.alignment.lr": [0.001, 0.0002]}
    ]
    new, old = (
        [r for r in records(stopped) if "event" not in r],
        [r for r in records(whole) if "event" not in r],
    )
    for a, b in zip(new, old, strict=True):
        ratio = 0.2 if a["stage"] == "alignment" and a["step"] > 4 else 1.0
        assert a["lr"] == pytest.approx(b["lr"] * ratio, rel=1e-5), a["step"]
    # Steps 2-4 were skipped, so step 5 starts from the same weights; its update at the new rate moves
    # them less than the old rate does.
    assert new[4]["loss"] == old[4]["loss"] and new[5]["loss"] != old[5]["loss"]


# One step per stage and no plots or event files: runs that test what happens around the steps.
SHORT_RUN = [
    "stages.alignment.max_steps=1",
    "stages.instruct.max_steps=1",
    "plots=false",
    "tensorboard=false",
]


def test_bad_input_is_a_one_line_error_and_the_fixed_command_starts_afresh(tmp_path):
    """A bad data path, a malformed record, a missing image: ``error: <message>`` naming the file or
    record, no traceback. Until the run writes a checkpoint, the folder it leaves takes a new start, with or
    without --resume; once it has one, a start without --resume is refused."""
    out = tmp_path / "run"

    def data(path: Path) -> list[str]:
        return [*SHORT_RUN, "stages.*.data.kind=llava_json", f"stages.*.data.path={path}"]

    missing = run(out, *data(tmp_path / "nope.json"))
    assert missing.returncode == 1
    assert missing.stderr.endswith(
        f"error: [Errno 2] No such file or directory: '{tmp_path / 'nope.json'}' (in stage 'alignment')\n"
    )

    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps([{"id": "a", "conversations": []}]))
    result = run(out, *data(malformed))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {malformed} record 0 (id a): 'conversations' must be a non-empty list" in result.stderr

    no_image = tmp_path / "no_image.json"
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A scan."}]
    no_image.write_text(json.dumps([{"id": "r1", "image": "gone.png", "conversations": turns}]))
    result = run(out, *data(no_image), resume=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.endswith(
        f"error: 1 image(s) that {no_image} names are not in {tmp_path} (record r1: gone.png); provide them, "
        "or set this stage's data.bad_images=skip to train without those samples (in stage 'alignment')\n"
    )

    fixed = run(out, *SHORT_RUN)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "holds a run that never wrote a checkpoint; starting it afresh" in fixed.stderr
    assert [s for s, _, _ in step_losses(out)] == [1, 2]  # nothing left from the failed starts
    assert len(events(out, "stage_start")) == 2
    again = run(out, *SHORT_RUN)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert f"error: {out} already holds a run; pass --resume to continue it" in again.stderr
    # A finished run whose checkpoints were deleted keeps its models: no fresh start over them.
    shutil.rmtree(out / "checkpoints")
    kept = run(out, *SHORT_RUN)
    assert kept.returncode == 1 and "holds exported models (model, stages/alignment, stages/instruct)" in (
        kept.stderr
    )


def write_images(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), (40 * i % 256, 80, 120)).save(folder / name)


def test_skipped_samples_are_reported_per_stage_and_across_a_resume(tmp_path):
    """A bad image under bad_images=skip is listed once in each stage's end event, whatever the epochs
    and stages before, and still after a resume at the stage's last step."""
    write_images(tmp_path / "images", [f"{i}.png" for i in range(8)])
    (tmp_path / "images" / "broken.png").write_bytes((tmp_path / "images" / "0.png").read_bytes()[:60])
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A scan."}]
    data = [{"id": f"r{i}", "image": f"{i}.png", "conversations": turns} for i in range(8)]
    data.append({"id": "bad", "image": "broken.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(data))
    overrides = ["stages.*.data.kind=llava_json", f"stages.*.data.path={tmp_path / 'data.json'}"]
    overrides += [f"stages.*.data.image_folder={tmp_path / 'images'}", "stages.*.data.bad_images=skip"]
    overrides += ["stages.*.epochs=2", "stages.*.global_batch_size=4", "plots=false", "tensorboard=false"]
    expected = f"1 sample(s) skipped for bad images:\n  bad: {tmp_path / 'images' / 'broken.png'}:"

    whole = tmp_path / "whole"
    result = run(whole, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ends = events(whole, "stage_end")
    assert [e["stage"] for e in ends] == ["alignment", "instruct"]
    assert all(e["skipped"].startswith(expected) and e["skipped"].count("\n") == 1 for e in ends), ends
    assert f"stage alignment: {expected}" in result.stderr and f"stage instruct: {expected}" in result.stderr

    # Stopped by the non-finite guard at the very last step (checkpoint written), then resumed: the
    # stage's end comes straight after loading, with no step left to meet the bad sample again.
    last = step_losses(whole)[-1][0]
    stopped = tmp_path / "stopped"
    assert run(stopped, *overrides, f"inject_nan_at=[{last}]", "nan_limit=1").returncode == 3
    resumed = run(stopped, *overrides, f"inject_nan_at=[{last}]", "nan_limit=1", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["skipped"] for e in events(stopped, "stage_end")] == [e["skipped"] for e in ends]


def test_exports_get_the_usual_permissions_and_a_finished_run_stays_finished(tmp_path):
    """Exported models and checkpoints get the permissions of any new directory and file (0777 / 0666 less
    the umask), and --resume on a finished run neither exports again nor logs a second run_end."""
    out = tmp_path / "run"
    assert run(out, *SHORT_RUN, umask=0o022).returncode == 0
    checkpoint = out / "checkpoints" / "stage-0-alignment"
    for folder in (out / "model", out / "stages" / "alignment", out / "stages" / "instruct", checkpoint):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in folder.iterdir()}
        assert set(modes.values()) == {"0o644"}, (folder, modes)  # safetensors alone would write 0600
    written = {f.name: f.stat().st_mtime_ns for f in (out / "model").iterdir()}

    again = run(out, *SHORT_RUN, resume=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"note: {out} is already finished; nothing to do" in again.stderr
    assert len(events(out, "run_end")) == 1
    assert {f.name: f.stat().st_mtime_ns for f in (out / "model").iterdir()} == written


def test_sigint_stops_with_one_line_and_the_run_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    overrides = [*SHORT, "tensorboard=false"]
    process = start(out, *overrides, log=log)
    wait_for_step(process, out, 5, log)
    process.send_signal(signal.SIGINT)
    assert process.wait() == 130
    stderr = log.read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.endswith(f"interrupted; continue from the last checkpoint with --resume --out {out}\n")
    resumed = run(out, *overrides, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for s, _, _ in step_losses(out)] == list(range(1, 15))


def test_a_checkpoint_inside_a_stage_of_another_step_plan_is_not_resumed(tmp_path):
    """A checkpoint counts steps into the plan that wrote it; one from a plan this version does not make
    (a checkpoint from before plan_version existed) would resume into other samples: refused, saying so."""
    out = tmp_path / "run"
    assert run(out, *SHORT, "inject_nan_at=[2]", "nan_limit=1").returncode == 3
    state_file = out / "checkpoints" / "step-00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["plan_version"] == 2 and state["stage_step"] == 2
    del state["plan_version"]
    state_file.write_text(json.dumps(state))
    refused = run(out, *SHORT, "inject_nan_at=[2]", "nan_limit=1", resume=True)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "is 2 steps into stage 'alignment' of a step plan this version does not make (plan 1, now 2)" in (
        refused.stderr
    )
