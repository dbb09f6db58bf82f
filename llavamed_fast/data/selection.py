"""Which figures to keep: imaging modality, compound figures and licence. Pure Python, no torch.

- **Modality** (:func:`modalities`): LLaVA-Med's five domains, named as its data files name them —
  ``chest_xray``, ``ct_scan``, ``mri``, ``histology``, ``gross`` — from rules over the caption (first) and
  the sentences that cite the figure. A figure may have several (a CT and its histology side by side) or
  none ("other"). The rules are word patterns; a learned classifier can take their place through
  :class:`ModalityTagger` (any callable from text to domain flags).
- **Compound figures** (:func:`is_compound`): panel markers in the caption, "(A) ... (B)", "A, ... B,",
  "(a-d)", "panels A and B", "left/right".
- **Licence** (:func:`licence_allows`): ``commercial`` keeps only licences that allow commercial use
  (CC BY, CC BY-SA, CC BY-ND, CC0, public domain); ``any`` keeps every classified licence; unknown
  licences are kept only under ``any-including-unknown``.
- **Policy** (:class:`FigurePolicy`): the three above and, optionally, the image manifest that
  ``curate images`` wrote (:class:`ImageManifest`), as one decision with a reason per left-out figure,
  shared by ``curate align`` and ``curate instruct`` so that both keep the same figures.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavamed_fast.data.alignment import json_objects
from llavamed_fast.data.durable import complete_lines

DOMAINS = ("chest_xray", "ct_scan", "mri", "histology", "gross")

ModalityTagger = Callable[[str], Mapping[str, bool]]

_FLAGS = re.IGNORECASE
_XRAY = r"(?:x-?\s?rays?|radiographs?|radiography|roentgenograms?|films?)"
_RULES: dict[str, list[re.Pattern[str]]] = {
    "chest_xray": [
        re.compile(rf"\bchest\s+{_XRAY}", _FLAGS),
        re.compile(r"\bcxrs?\b", _FLAGS),
        re.compile(rf"\b(?:thorax|thoracic|lung|pulmonary)\s+{_XRAY}", _FLAGS),
        re.compile(rf"\b(?:posteroanterior|anteroposterior|PA|AP)\s+(?:chest\s+)?(?:view|{_XRAY})", _FLAGS),
    ],
    "ct_scan": [
        re.compile(r"\bcomputed\s+(?:axial\s+)?tomograph", _FLAGS),
        re.compile(r"\b(?:HR|MD|CB|PET[-/ ]?|SPECT[-/ ]?)?CT\b(?:A\b)?"),  # CT, CTA, HRCT, PET-CT (case kept)
        re.compile(r"\bCAT scans?\b", _FLAGS),
    ],
    "mri": [
        re.compile(r"\b(?:f|DCE-|DW-?)?MRI?s?\b"),
        re.compile(r"\bmagnetic\s+resonance\b", _FLAGS),
        re.compile(r"\bT[12][- ]?(?:weighted|W)\b", _FLAGS),
        re.compile(r"\b(?:FLAIR|diffusion[- ]weighted|MR\s+(?:image|imaging|scan|angiograph)\w*)\b", _FLAGS),
    ],
    "histology": [
        re.compile(r"\bhisto(?:logy|logical|logic|patholog\w*|chemi\w*)", _FLAGS),
        re.compile(r"\b(?:H\s?&\s?E|HE)[- ]?(?:stain\w*)?\b"),
        re.compile(r"\b(?:ha?ematoxylin|eosin|immunohistochem\w*|IHC|immunostain\w*)\b", _FLAGS),
        re.compile(r"\b(?:micrograph\w*|photomicrograph\w*|cytolog\w*)\b", _FLAGS),
        # "original magnification", "×400", "x 200" (not "ΦX174" nor "2 x 3 cm")
        re.compile(r"magnification|(?<![\w\d])[×x]\s?\d{2,4}\b(?!\s*(?:mm|cm|µm|um|m)\b)", _FLAGS),
        re.compile(r"\b(?:PAS|Masson|trichrome|Giemsa|Alcian|reticulin|Congo red)\b[\w\s-]{0,20}stain", _FLAGS),
        re.compile(r"\b\w+-stained\s+(?:tissue\s+)?sections?\b", _FLAGS),
    ],
    "gross": [
        re.compile(r"\bgross(?:ly)?\s+(?:specimen|pathology|appearance|examination|image|photograph|view|section|finding)", _FLAGS),
        re.compile(r"\b(?:resected|surgical|excised|autopsy)\s+specimen", _FLAGS),
        re.compile(r"\bmacroscopic(?:al)?(?:ly)?\b", _FLAGS),
        re.compile(r"\bcut\s+surface\b", _FLAGS),
        re.compile(r"\bgross\s+specimen\b|\bgross\b(?=.*\bspecimen\b)", _FLAGS),
    ],
}  # fmt: skip


def rule_tagger(text: str) -> dict[str, bool]:
    """Domain flags of one text by the word rules."""
    return {domain: any(rule.search(text) for rule in rules) for domain, rules in _RULES.items()}


def modalities(
    caption: str, mentions: Iterable[str] = (), *, tagger: ModalityTagger = rule_tagger
) -> dict[str, bool]:
    """LLaVA-Med's domain flags for a figure. The caption decides when it names any modality; the citing
    sentences are consulted only when it names none (they often discuss other figures' modalities too)."""
    flags = {domain: bool(tagger(caption).get(domain)) for domain in DOMAINS}
    if not any(flags.values()):
        context = " ".join(mentions)
        flags = {domain: bool(tagger(context).get(domain)) for domain in DOMAINS} if context else flags
    return flags


# Panel markers: "(A)", "(a, b)", "A)", "A.", "A:" after a break, and "A," at a clause start ("A, THL").
_MARKER = re.compile(
    r"\(\s?([A-Ha-h])(?:\s?[,–—-]\s?[A-Ha-h])*\s?\)"
    r"|(?:^|(?<=[\s.;,]))([A-Ha-h])[).:]\s"
    r"|(?:^|(?<=[\s.;]))([A-H]),\s"
)
_PANEL_RANGE = re.compile(r"\(\s?[A-Ha-h]\s?[-–—]\s?[B-Hb-h]\s?\)|\bpanels?\s+[A-Ha-h]\b", re.IGNORECASE)
_SIDE_BY_SIDE = re.compile(r"\((?:left|right|top|bottom|upper|lower)(?: panel)?\)", re.IGNORECASE)


def is_compound(caption: str) -> bool:
    """Whether the caption describes several panels (a compound figure): markers for panels a and b, a
    panel range, "panel(s) X", or "(left)/(right)" parts."""
    letters = {letter.lower() for match in _MARKER.finditer(caption) for letter in match.groups() if letter}
    return {"a", "b"} <= letters or bool(_PANEL_RANGE.search(caption) or _SIDE_BY_SIDE.search(caption))


LICENCE_POLICIES = ("commercial", "any", "any-including-unknown")


def licence_allows(licence: Mapping[str, object] | None, policy: str) -> bool:
    """Whether a figure record's licence (``{"code", "commercial_use"}``) passes ``policy``."""
    if policy not in LICENCE_POLICIES:
        raise ValueError(f"licence policy must be one of {', '.join(LICENCE_POLICIES)}, got {policy!r}")
    if licence is not None and not isinstance(licence, Mapping):
        raise ValueError(
            f"licence must be an object with code and commercial_use, got {type(licence).__name__} {licence!r:.60}"
        )
    commercial = None if licence is None else licence.get("commercial_use")
    if policy == "commercial":
        return commercial is True
    if policy == "any":
        return commercial is not None
    return True


# ---------------------------------------------------------------------------------------------------------
# One policy for every step that writes training data ('curate align', 'curate instruct'), so a figure that
# one step leaves out is left out by the other with the same options, and counted under the same reason.

IMAGE_MANIFEST = "manifest.jsonl"


class ImageManifest:
    """What ``curate images`` decided per figure, read from ``FOLDER/manifest.jsonl`` (read only: the
    manifest is the images step's, so nothing here truncates or rewrites it).

    A figure is usable when its last manifest line says ``ok`` and that file is still in the folder with
    the size the line records. ``skipped`` is no manifest status: an item done by an earlier run keeps the
    ``ok`` line of that run. Every other outcome is a reason to leave the figure out: ``image_<status>``
    (``image_not_found``, ``image_corrupt``, ``image_error``, ``image_licence_excluded``), ``image_missing``
    for a figure the manifest does not name (never fetched), ``image_file_missing`` for an ``ok`` line whose
    file is gone or has another size.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / IMAGE_MANIFEST
        if not self.path.is_file():
            raise ValueError(
                f"{self.path}: no image manifest; run 'curate images --out {self.folder}' first, or give "
                "the folder it wrote"
            )
        self.entries: dict[str, dict[str, Any]] = {}
        # Complete lines only: a last line without its newline was cut when 'curate images' was killed,
        # decided nothing (that step drops it on its next run), so its figure counts as not fetched yet.
        lines, _ = complete_lines(self.path)
        for number, entry in json_objects(lines, self.path):
            for name in ("pair_id", "status"):
                if not isinstance(entry.get(name), str) or not entry[name]:
                    raise ValueError(
                        f"{self.path}: line {number}: {name!r} must be a non-empty string, "
                        f"got {entry.get(name)!r:.60}"
                    )
            if entry["status"] == "ok" and not isinstance(entry.get("file"), str):
                raise ValueError(f"{self.path}: line {number}: an 'ok' line without its 'file'")
            self.entries[entry["pair_id"]] = entry  # the last line of a pair id wins, as in 'curate images'

    def reason(self, pair_id: str) -> str | None:
        """Why the figure ``pair_id`` has no usable image, or None when it has one."""
        entry = self.entries.get(pair_id)
        if entry is None:
            return "image_missing"
        if entry["status"] != "ok":
            return f"image_{entry['status']}"
        path = self.folder / entry["file"]
        size = entry.get("bytes")
        if not path.is_file() or (isinstance(size, int) and path.stat().st_size != size):
            return "image_file_missing"
        return None


@dataclass(frozen=True)
class FigurePolicy:
    """Which figure records a training-data step keeps. The defaults are those of ``curate align``,
    ``curate instruct`` and ``curate images``: every figure, whatever its licence (as LLaVA-Med, whose
    URL list carries none), every modality, compound figures too, no image check."""

    licence: str = "any-including-unknown"
    domains: tuple[str, ...] = ()
    skip_compound: bool = False
    images: ImageManifest | None = None

    def __post_init__(self) -> None:
        licence_allows(None, self.licence)  # an unknown policy fails here, before any record is read
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown domain {', '.join(unknown)}; known: {', '.join(DOMAINS)}")

    def reason(self, figure: Mapping[str, Any]) -> str | None:
        """Why ``figure`` is left out (``licence``, ``domain``, ``compound`` or an image reason of
        :meth:`ImageManifest.reason`), or None to keep it. The image is checked last: a figure excluded by
        licence is counted as that, whatever happened to its image."""
        if not licence_allows(figure.get("licence"), self.licence):
            return "licence"
        if self.domains and not any((figure.get("domain") or {}).get(d) for d in self.domains):
            return "domain"
        if self.skip_compound and figure.get("compound"):
            return "compound"
        if self.images is not None:
            return self.images.reason(str(figure.get("pair_id") or ""))
        return None
