"""Synthetic "scans" with known findings: offline, learnable image-text data for demos and tests.

A scan is a noisy, textured grey body (an ellipse) on a dark background with 0 to 3 round lesions. Its
findings are what the text talks about: whether there is a lesion, its side (the left or right half of the
image as displayed; all lesions of a scan lie in one half), its size (large or small; the radius ranges
are far apart), how many there are, and whether they are bright or dark against the body. Position, body
shape, grey levels, texture and noise are random, so the text can only be predicted from the lesions.

- :func:`make_dataset` writes LLaVA JSON: stage-1 ``captions`` (a concise-description instruction and a
  caption stating the findings), stage-2 ``conversations`` (2-4 question-answer turns) or
  ``side_questions`` (one question on the lesions' side per record, every scan with lesions: the focused
  stage of the demo's curriculum).
- :func:`make_eval_set` writes held-out single questions in the VQA form (JSONL, ``answer_type``
  ``CLOSED``/``OPEN``), each on its own scan, with the answers of each closed question balanced.
- :func:`noise_like` gives a noise image for checking that answers depend on the image.

Everything is a pure function of ``(namespace, seed, index)``: item ``i`` of a set is the same whatever
``count`` is (a small set is a prefix of a larger one), train and eval sets draw from separate namespaces,
and image ids carry the namespace, seed and image size, so sets never share or overwrite an image.
Classes are balanced in blocks (:data:`PLAN_BLOCK` items for datasets), so any prefix is balanced to within
one block. Pure Python, numpy and Pillow; no torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR_VERSION = 1
"""Written into every manifest; bump it when drawing or text changes, so cached sets are rebuilt."""

TASKS = ("captions", "conversations", "side_questions")
EVAL_NAMESPACE = "eval"
SIDES = ("left", "right")
SIZES = ("large", "small")
BRIGHTNESS = ("bright", "dark")
COUNT_WORDS = ("none", "one", "two", "three")
MAX_LESIONS = 3

# Radii as fractions of the image side. The largest small lesion is 0.05 and the smallest large one 0.085
# (at 64 px: 2.2-3.2 px against 5.4-6.7 px radius, areas ~15-32 px against ~90-140 px), so size is never
# ambiguous, while three large lesions still fit in one half of the smallest, most off-centre body (worst
# case: about two layouts in five need a second try, one in forty a sixth; see _place).
SMALL_RADIUS = (0.035, 0.05)
LARGE_RADIUS = (0.085, 0.105)
# Lesion contrast against the body (grey levels), well above the texture (+-4..12) and noise (sigma 3..8)
# so that a small lesion stays visible, and low enough that bright/dark lesions never saturate.
CONTRAST = (45.0, 70.0)
BODY_LEVEL = (110.0, 150.0)
BACKGROUND_LEVEL = (5.0, 30.0)
BODY_AXES = (0.42, 0.48)  # semi-axes of the body ellipse, fractions of the image side
BODY_SHIFT = 0.02  # largest shift of the body centre from the image centre (0.48 + 0.02: never cut off)
TEXTURE = (4.0, 12.0)
NOISE = (3.0, 8.0)
# Lesions keep MARGIN (fraction of the side; ~1 px at 64) from the midline and the body's edge, so side is
# never in doubt, and GAP (~2.6 px) from each other, so that every lesion is a separate blob that can be
# counted even after a 3x3 blur.
MARGIN = 0.015
GAP = 0.04

CAPTION_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the image's key features.",
    "Write a terse but informative summary of the picture.",
)

# The question text never depends on the image (one phrasing per kind, the same for one lesion or three),
# so only the choice of kinds says anything about a scan: side, size and brightness are asked only when a
# lesion exists, as they presuppose one.
QUESTIONS = {
    "presence": "Is there a lesion?",
    "side_yes_no": "Is the lesion on the {side} side?",
    "side": "Which side is the lesion on?",
    "size": "Is the lesion large or small?",
    "brightness": "Is the lesion bright or dark?",
    "count": "How many lesions are there?",
    "describe": "Describe the findings.",
}
LESION_KINDS = ("side_yes_no", "side", "size", "brightness", "count", "describe")
NO_LESION_KINDS = ("count", "describe")

PLAN_BLOCK = 2 * len(SIDES) * len(SIZES) * len(BRIGHTNESS) * MAX_LESIONS
"""Dataset findings come in shuffled blocks of 48: every lesion combination once, and as many scans without."""

# Each eval block asks every closed question once per answer and the count question once per count.
_EVAL_BLOCK = (
    [("presence", "yes"), ("presence", "no"), ("side_yes_no", "yes"), ("side_yes_no", "no")]
    + [("side", s) for s in SIDES]
    + [("size", s) for s in SIZES]
    + [("brightness", b) for b in BRIGHTNESS]
    + [("count", w) for w in COUNT_WORDS]
)

# Independent random streams per item, so that e.g. the text of a record does not change with image size.
_PLAN, _DRAW, _TEXT = 1, 2, 3


@dataclass(frozen=True)
class Findings:
    """What a scan shows. ``side``, ``size`` and ``brightness`` are None exactly when ``count`` is 0."""

    count: int
    side: str | None = None
    size: str | None = None
    brightness: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.count <= MAX_LESIONS:
            raise ValueError(f"lesion count must be 0..{MAX_LESIONS}, got {self.count}")
        attributes = (self.side, self.size, self.brightness)
        if self.count == 0 and any(a is not None for a in attributes):
            raise ValueError(f"a scan without lesions has no side, size or brightness: {self}")
        if self.count and (
            self.side not in SIDES or self.size not in SIZES or self.brightness not in BRIGHTNESS
        ):
            raise ValueError(f"a scan with lesions needs side {SIDES}, size {SIZES}, brightness {BRIGHTNESS}")

    @property
    def present(self) -> bool:
        return self.count > 0


@dataclass(frozen=True)
class Lesion:
    """A drawn lesion, in pixels (x to the right, y down) and grey levels (signed, against the body)."""

    x: float
    y: float
    radius: float
    contrast: float


@dataclass(frozen=True)
class Scan:
    """A drawn scan: the RGB image, its findings and how they were drawn."""

    image: Image.Image
    findings: Findings
    lesions: tuple[Lesion, ...]
    body: tuple[float, float, float, float]  # centre x, centre y, semi-axis x, semi-axis y (pixels)
    body_level: float


@dataclass(frozen=True)
class EvalQuestion:
    question_id: str
    image: str
    question: str
    answer: str
    answer_type: str  # "CLOSED" | "OPEN"


# ---------------------------------------------------------------------------------------------------------------
# Findings, drawing and text.


def _rng(namespace: str, seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(namespace.encode()), seed, stream, index])


def _random_findings(rng: np.random.Generator, **fixed) -> Findings:
    values = {
        "count": int(rng.integers(1, MAX_LESIONS + 1)),
        "side": SIDES[rng.integers(2)],
        "size": SIZES[rng.integers(2)],
        "brightness": BRIGHTNESS[rng.integers(2)],
    }
    return Findings(**{**values, **fixed})


def _lesion_findings(combo: int) -> Findings:
    """Lesion combination ``combo`` (0 .. PLAN_BLOCK / 2 - 1): count, side, size and brightness."""
    combo, count = divmod(combo, MAX_LESIONS)
    combo, side = divmod(combo, len(SIDES))
    brightness, size = divmod(combo, len(SIZES))
    return Findings(count + 1, SIDES[side], SIZES[size], BRIGHTNESS[brightness])


def planned_findings(namespace: str, seed: int, index: int) -> Findings:
    """The findings of dataset item ``index``: half without lesions, every lesion combination equally often."""
    block, position = divmod(index, PLAN_BLOCK)
    order = int(_rng(namespace, seed, _PLAN, block).permutation(PLAN_BLOCK)[position])
    return Findings(0) if order % 2 == 0 else _lesion_findings(order // 2)


def planned_lesion_findings(namespace: str, seed: int, index: int) -> Findings:
    """Like :func:`planned_findings` without the scans that have no lesion: every combination equally often."""
    block, position = divmod(index, PLAN_BLOCK // 2)
    return _lesion_findings(int(_rng(namespace, seed, _PLAN, block).permutation(PLAN_BLOCK // 2)[position]))


def _place(findings: Findings, rng: np.random.Generator, size: int, body) -> list[tuple[float, float, float]]:
    cx, cy, ax, ay = body
    low, high = LARGE_RADIUS if findings.size == "large" else SMALL_RADIUS
    margin, gap, middle = MARGIN * size, GAP * size, size / 2
    for _ in range(100):  # a layout that does not fit is started afresh (rarely more than a few times)
        placed: list[tuple[float, float, float]] = []
        for r in rng.uniform(low, high, findings.count) * size:
            inner_x, inner_y = ax - r - margin, ay - r - margin
            if findings.side == "left":
                x_low, x_high = cx - inner_x, min(middle - r - margin, cx + inner_x)
            else:
                x_low, x_high = max(middle + r + margin, cx - inner_x), cx + inner_x
            # Candidate centres, all at once: the first inside the shrunk body and clear of the others wins.
            x = rng.uniform(x_low, x_high, 64)
            y = rng.uniform(cy - inner_y, cy + inner_y, 64)
            fits = ((x - cx) / inner_x) ** 2 + ((y - cy) / inner_y) ** 2 <= 1
            for px, py, pr in placed:
                fits &= np.hypot(x - px, y - py) >= r + pr + gap
            if not fits.any():
                break
            i = int(np.argmax(fits))
            placed.append((float(x[i]), float(y[i]), float(r)))
        if len(placed) == findings.count:
            return placed
    raise RuntimeError(f"could not place {findings} in a {size}-pixel scan; the size constants disagree")


def draw_scan(findings: Findings, rng: np.random.Generator, image_size: int = 64) -> Scan:
    """Draw a scan with ``findings``, all randomness from ``rng``."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels for small lesions to show, got {image_size}")
    s = float(image_size)
    body = (
        s / 2 + rng.uniform(-BODY_SHIFT, BODY_SHIFT) * s,
        s / 2 + rng.uniform(-BODY_SHIFT, BODY_SHIFT) * s,
        rng.uniform(*BODY_AXES) * s,
        rng.uniform(*BODY_AXES) * s,
    )
    body_level = rng.uniform(*BODY_LEVEL)
    background = rng.uniform(*BACKGROUND_LEVEL)
    grid = int(rng.integers(3, 8))
    coarse = Image.fromarray(rng.standard_normal((grid, grid)).astype(np.float32))
    texture = np.asarray(coarse.resize((image_size, image_size), Image.Resampling.BICUBIC))
    texture = texture / max(float(np.abs(texture).max()), 1e-6) * rng.uniform(*TEXTURE)

    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5  # pixel centres
    cx, cy, ax, ay = body
    # Distance to the ellipse edge in pixels (approximately), for an anti-aliased outline.
    radius = np.hypot((xs - cx) / ax, (ys - cy) / ay)
    inside = np.clip((1 - radius) * min(ax, ay) + 0.5, 0, 1)
    pixels = background + inside * (body_level - background + texture)

    sign = 1.0 if findings.brightness == "bright" else -1.0
    contrast = sign * rng.uniform(*CONTRAST)
    lesions = []
    for x, y, r in _place(findings, rng, image_size, body) if findings.present else []:
        c = contrast * rng.uniform(0.9, 1.1)
        x0, x1 = max(int(x - r) - 1, 0), min(int(x + r) + 2, image_size)
        y0, y1 = max(int(y - r) - 1, 0), min(int(y + r) + 2, image_size)
        d = np.hypot(xs[y0:y1, x0:x1] - x, ys[y0:y1, x0:x1] - y)
        pixels[y0:y1, x0:x1] += c * np.clip(r + 0.5 - d, 0, 1)
        lesions.append(Lesion(float(x), float(y), float(r), float(c)))
    pixels += rng.normal(0, rng.uniform(*NOISE), pixels.shape)
    grey = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    return Scan(image, findings, tuple(lesions), tuple(float(v) for v in body), float(body_level))


def caption(findings: Findings) -> str:
    """One sentence stating every finding, e.g. "A scan with two large bright lesions on the left side."."""
    if not findings.present:
        return "A scan with no lesion."
    noun = "lesion" if findings.count == 1 else "lesions"
    words = f"{COUNT_WORDS[findings.count]} {findings.size} {findings.brightness} {noun}"
    return f"A scan with {words} on the {findings.side} side."


def _closed(word: str) -> str:
    return word.capitalize() + "."


def question_answer(kind: str, findings: Findings, asked_side: str = "left") -> tuple[str, str]:
    """The question of ``kind`` and its training answer ("Yes.", "Left.", "Two.", a caption, ...).

    ``asked_side`` is the side named by ``side_yes_no``. Questions that presuppose a lesion are refused
    for a scan without one.
    """
    if kind not in QUESTIONS:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(QUESTIONS)}")
    if kind in ("side_yes_no", "side", "size", "brightness") and not findings.present:
        raise ValueError(f"question {kind!r} presupposes a lesion, but the scan has none")
    question = QUESTIONS[kind].format(side=asked_side)
    if kind == "presence":
        answer = _closed("yes" if findings.present else "no")
    elif kind == "side_yes_no":
        answer = _closed("yes" if findings.side == asked_side else "no")
    elif kind == "side":
        answer = _closed(findings.side)
    elif kind == "size":
        answer = _closed(findings.size)
    elif kind == "brightness":
        answer = _closed(findings.brightness)
    elif kind == "count":
        answer = _closed(COUNT_WORDS[findings.count])
    else:
        answer = caption(findings)
    return question, answer


def canonical_answer(answer: str) -> str:
    """The VQA form of a training answer: lower case, without the final period ("Yes." -> "yes")."""
    return answer.strip().rstrip(".").lower()


def reply_answer(reply: str) -> str:
    """The answer a model's reply gives, in canonical form: its first word ("Left." -> "left"). Every
    held-out answer is one word, so a reply that runs on past it ("Dark yes yes", which a model fed noise
    for an image can produce) is judged by what it answered, not by how it went on."""
    match = re.match(r"\s*([A-Za-z]+)", reply)
    return match.group(1).lower() if match else ""


# ---------------------------------------------------------------------------------------------------------------
# Records.


def _check(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def image_id(namespace: str, seed: int, index: int, image_size: int) -> str:
    return f"{namespace}-s{seed}-{image_size}px-{index:06d}"


def dataset_scan(task: str, seed: int, index: int, image_size: int = 64) -> Scan:
    """The scan of item ``index`` of every ``make_dataset(task=task, seed=seed, image_size=image_size)``."""
    plan = planned_lesion_findings if task == "side_questions" else planned_findings
    return draw_scan(plan(task, seed, index), _rng(task, seed, _DRAW, index), image_size)


def _record(task: str, seed: int, index: int, findings: Findings, image: str) -> dict:
    rng = _rng(task, seed, _TEXT, index)
    if task == "captions":
        instruction = CAPTION_INSTRUCTIONS[rng.integers(len(CAPTION_INSTRUCTIONS))]
        turns = [(instruction, caption(findings))]
    elif task == "side_questions":
        # Both forms equally often; the yes/no form names either side, so its answers are balanced too.
        kind = ("side", "side_yes_no")[index % 2]
        turns = [question_answer(kind, findings, SIDES[rng.integers(2)])]
    else:
        # Presence is asked in every record, so its yes/no answers are as balanced as the scans; 1-3 more
        # questions (1-2 without a lesion: fewer kinds apply) follow, all in random order.
        pool = LESION_KINDS if findings.present else NO_LESION_KINDS
        extra = int(rng.integers(1, min(3, len(pool)) + 1))
        kinds = ["presence", *(pool[i] for i in rng.choice(len(pool), extra, replace=False))]
        turns = [
            question_answer(kind, findings, SIDES[rng.integers(2)])
            for kind in (kinds[i] for i in rng.permutation(len(kinds)))
        ]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": Path(image).stem, "image": image, "conversations": conversations}


def eval_item(seed: int, index: int, image_size: int = 64) -> tuple[Scan, EvalQuestion]:
    """Item ``index`` of every ``make_eval_set(seed=seed, image_size=image_size)``: its scan and question."""
    block, position = divmod(index, len(_EVAL_BLOCK))
    kind, answer = _EVAL_BLOCK[
        _rng(EVAL_NAMESPACE, seed, _PLAN, block).permutation(len(_EVAL_BLOCK))[position]
    ]
    rng = _rng(EVAL_NAMESPACE, seed, _TEXT, index)
    # Both sides are named in every block (one with "yes", one with "no"), swapping from block to block, so
    # the side a question names says nothing about its answer.
    asked_side = SIDES[(block + (answer == "yes")) % 2]
    if kind == "presence":
        findings = _random_findings(rng) if answer == "yes" else Findings(0)
    elif kind == "side_yes_no":
        other = SIDES[1 - SIDES.index(asked_side)]
        findings = _random_findings(rng, side=asked_side if answer == "yes" else other)
    elif kind == "count":
        count = COUNT_WORDS.index(answer)
        findings = _random_findings(rng, count=count) if count else Findings(0)
    else:
        findings = _random_findings(rng, **{kind: answer})
    scan = draw_scan(findings, _rng(EVAL_NAMESPACE, seed, _DRAW, index), image_size)
    question, training_answer = question_answer(kind, findings, asked_side)
    name = image_id(EVAL_NAMESPACE, seed, index, image_size)
    assert canonical_answer(training_answer) == answer == reply_answer(training_answer), (kind, findings)
    item = EvalQuestion(
        question_id=name,
        image=f"{name}.png",
        question=question,
        answer=answer,
        answer_type="OPEN" if kind == "count" else "CLOSED",
    )
    return scan, item


# ---------------------------------------------------------------------------------------------------------------
# Files.


def _write_atomic(path: Path, data: bytes) -> None:
    # A reader (another rank, a data-loader worker) never sees a half-written file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _save_png(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Noise hardly compresses: level 1 is faster than the default 6 and no larger (64 px: 5.1 KB vs 5.6 KB).
    image.save(temporary, format="PNG", compress_level=1)
    os.replace(temporary, path)


def _manifest_path(data_path: Path) -> Path:
    return data_path.with_name(data_path.name + ".manifest.json")


def _cached(data_path: Path, manifest: dict, images: Iterable[Path]) -> bool:
    manifest_path = _manifest_path(data_path)
    if not (data_path.is_file() and manifest_path.is_file()):
        return False
    try:
        stored = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    digest = hashlib.sha256(data_path.read_bytes()).hexdigest()
    return stored == {**manifest, "sha256": digest} and all(p.is_file() for p in images)


def _finish(data_path: Path, text: str, manifest: dict) -> Path:
    data = text.encode()
    _write_atomic(data_path, data)
    # The manifest goes last: it vouches for the data file and images written before it.
    manifest = {**manifest, "sha256": hashlib.sha256(data).hexdigest()}
    _write_atomic(_manifest_path(data_path), (json.dumps(manifest, indent=2) + "\n").encode())
    return data_path


def make_dataset(
    out_dir: str | os.PathLike, *, task: str, count: int, seed: int, image_size: int = 64
) -> Path:
    """Write ``count`` LLaVA-JSON records of ``task`` (``"captions"`` or ``"conversations"``) and their images.

    Images go to ``out_dir/images/<id>.png`` and the records to ``out_dir/<task>_<count>_<seed>.json``
    (returned), with ``<image>`` leading the first human turn. A file whose manifest matches (same
    generator version, arguments and content, images present) is reused without drawing anything.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")

    def draw(index: int, name: str) -> tuple[Image.Image, str]:
        scan = dataset_scan(task, seed, index, image_size)
        return scan.image, json.dumps(_record(task, seed, index, scan.findings, name))

    # One record per line: compact, yet readable and diffable.
    return _write_set(
        out_dir,
        task,
        "json",
        count,
        seed,
        image_size,
        draw,
        lambda lines: "[\n" + ",\n".join(lines) + "\n]\n",
    )


def make_eval_set(out_dir: str | os.PathLike, *, count: int, seed: int, image_size: int = 64) -> Path:
    """Write ``count`` held-out questions, one scan each, as JSONL ``out_dir/eval_<count>_<seed>.jsonl``.

    Lines are ``{"question_id", "image", "question", "answer", "answer_type"}``; answers are in the VQA
    form (``"yes"``, ``"left"``, ``"two"``: :func:`canonical_answer` of the training answers). Closed
    questions (yes/no, left/right, large/small, bright/dark) are balanced between their answers; the open
    one asks the count (none to three, equally often). Reused like :func:`make_dataset`.
    """

    def draw(index: int, name: str) -> tuple[Image.Image, str]:
        scan, item = eval_item(seed, index, image_size)
        return scan.image, json.dumps(item.__dict__)

    return _write_set(
        out_dir, EVAL_NAMESPACE, "jsonl", count, seed, image_size, draw, lambda lines: "\n".join(lines) + "\n"
    )


def _write_set(
    out_dir: str | os.PathLike,
    namespace: str,
    extension: str,
    count: int,
    seed: int,
    image_size: int,
    draw: Callable[[int, str], tuple[Image.Image, str]],
    render: Callable[[list[str]], str],
) -> Path:
    """Item ``i`` of a set is ``draw(i, its image file name)`` -> (image, text line); ``render`` joins the
    lines into ``out_dir/<namespace>_<count>_<seed>.<extension>``, reused when its manifest matches."""
    count = _check("count", count, minimum=1)
    seed = _check("seed", seed, minimum=0)
    image_size = _check("image_size", image_size, minimum=32)
    out_dir = Path(out_dir)
    folder = out_dir / "images"
    data_path = out_dir / f"{namespace}_{count}_{seed}.{extension}"
    names = [f"{image_id(namespace, seed, i, image_size)}.png" for i in range(count)]
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "task": namespace,
        "count": count,
        "seed": seed,
        "image_size": image_size,
    }
    if _cached(data_path, manifest, (folder / n for n in names)):
        return data_path
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, name in enumerate(names):
        image, line = draw(index, name)
        _save_png(image, folder / name)
        lines.append(line)
    return _finish(data_path, render(lines), manifest)


def noise_like(image: Image.Image, seed: int) -> Image.Image:
    """Grey noise of ``image``'s size and mode, for the image-reliance check.

    Uniform over 0..255 and independent of the image's pixels (not even its mean), so it carries nothing
    about the findings. Deliberately not a lesion-free scan: that would itself answer presence and count.
    Such noise is far from the training images, so a model may give malformed or off-type replies to it
    and score below chance, not only at chance.
    """
    seed = _check("seed", seed, minimum=0)
    width, height = image.size
    grey = _rng("noise", seed, _DRAW, 0).integers(0, 256, (height, width), dtype=np.uint8)
    return Image.fromarray(grey).convert(image.mode)
