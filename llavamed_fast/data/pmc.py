"""PubMed Central JATS articles -> figure records (caption, graphic, inline mentions, licence).

Pure Python (lxml), no torch. One record per ``<fig>``:

``{"pair_id", "pmcid", "pmid", "figure_id", "label", "caption", "caption_title", "graphic", "fig_group",
"mentions", "licence": {"code", "commercial_use", "url", "text"}, "domain", "compound", "source"}``

``pair_id`` is LLaVA-Med's ``{pmid}_{figure id}`` (the PMC id, then the file name, where there is no
PMID); ``domain`` and ``compound`` are :mod:`selection`'s modality flags and compound-figure test.

- The article is the root element, or any ``<article>`` below a wrapper (OAI-PMH ``GetRecord`` /
  ``ListRecords`` responses hold one or several); namespaces on element names are ignored, so a default
  JATS namespace parses the same as none.
- ``caption`` is the caption's title and paragraphs as plain text, after those of the enclosing
  ``<fig-group>``'s caption where it has one; ``caption_title`` the figure's own title; ``graphic`` the
  ``xlink:href`` of the figure's own ``<graphic>`` (None without one); ``fig_group`` the id of an enclosing
  ``<fig-group>``.
- ``mentions`` are the sentences of the body's paragraphs that hold an ``<xref ref-type="fig">`` whose
  ``rid`` names the figure (or its group), however deeply the xref is nested in other markup and however
  many figures it names; in document order, each sentence once. Figures, tables and boxes inside a
  paragraph are not part of its text, and neither are peer-review ``<sub-article>`` elements (reviewer
  reports, decision letters, author responses).
- Each input file is read once however often the inputs name it, and a ``pair_id`` is written once: a
  repeat (a copied article) is left out with a warning naming both files.
- A file that is not well-formed XML raises :class:`PmcError` naming the file and line; batch parsing
  (:func:`parse_files`) reports it and goes on with the other files.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lxml import etree

from llavamed_fast.data import selection
from llavamed_fast.data.durable import write_atomic

XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
# Elements whose text is not part of the paragraph around them.
_NOT_PARAGRAPH_TEXT = {
    "fig",
    "fig-group",
    "table-wrap",
    "table-wrap-group",
    "boxed-text",
    "p",
    "supplementary-material",
}
# <sub-article> types (``article-type`` or ``specific-use``) of published peer review: JATS 1.3 / JATS4R
# ("reviewer-report", "editor-report", "author-comment", "community-comment",
# "aggregated-review-documents"), eLife ("decision-letter", "referee-report", "reply" for the author
# response) and F1000 ("ref-report"). Reviewers and authors there discuss the figures, often critically
# ("Figure 2 does not show ..."): not the article's description of them.
_PEER_REVIEW = {
    "reviewer-report",
    "referee-report",
    "ref-report",
    "editor-report",
    "decision-letter",
    "author-comment",
    "community-comment",
    "aggregated-review-documents",
    "reply",
}


class PmcError(ValueError):
    """An article that cannot be read; the message names the file (and line, for XML errors)."""


@dataclass
class Licence:
    code: str  # "CC0", "public-domain", "CC BY", "CC BY-NC-SA", ..., or "unknown"
    commercial_use: bool | None  # None when the licence could not be classified
    url: str | None = None
    text: str | None = None


@dataclass
class FigureRecord:
    pair_id: str
    pmcid: str | None
    pmid: str | None
    figure_id: str
    label: str | None
    caption: str
    caption_title: str | None
    graphic: str | None
    fig_group: str | None
    mentions: list[str] = field(default_factory=list)
    licence: Licence | None = None
    domain: dict[str, bool] = field(default_factory=dict)
    compound: bool = False
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------
# Text helpers


def _local(tag: object) -> str:
    # Comments and processing instructions have a function as their tag.
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _children(element: etree._Element, name: str) -> list[etree._Element]:
    return [child for child in element if _local(child.tag) == name]


def _descendants(element: etree._Element, name: str) -> Iterator[etree._Element]:
    return (node for node in element.iter() if _local(node.tag) == name)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _text(element: etree._Element | None) -> str:
    return "" if element is None else _clean("".join(element.itertext()))


# Abbreviations after which a period does not end a sentence (lower-cased, without the period). Units
# and words that often end a sentence ("30 min.", "no.") are left out: a missed split is a longer
# mention, a wrong one would cut a citing sentence in two.
_ABBREVIATIONS = {
    "fig", "figs", "e.g", "i.e", "et al", "al", "vs", "ref", "refs", "nos", "approx", "ca", "cf", "resp",
    "eq", "eqs", "dr", "mr", "mrs", "prof", "sp", "spp", "var", "inc", "ltd", "vol", "pp", "suppl", "wt",
    "conc", "dept", "univ", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
    "dec", "tab",
}  # fmt: skip
_BOUNDARY = re.compile(r"[.!?](?:[\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``: split after ``.``, ``!`` or ``?`` followed by space and
    a capital letter or digit, except after abbreviations (``Fig.``, ``et al.``, ``e.g.``). A genus initial
    (``M. tuberculosis``) is followed by a lower-case word, so it never ends a sentence; a capital letter
    before a period does ("... in panel B. Cells ...")."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(text):
        stop = match.start() + 1
        word = re.search(r"(\S+)$", text[start : match.start()])
        token = word.group(1).lower() if word else ""
        bare = token.lstrip("(\"'[")
        if (
            text[match.start()] == "."
            and (
                bare in _ABBREVIATIONS
                or bare.rstrip(".") in _ABBREVIATIONS
                or re.fullmatch(r"(?:[a-z]\.)+[a-z]", bare)  # "e.g", "i.e", "u.s"
                or text[max(start, match.start() - 6) : match.start()].lower().endswith("et al")
            )
        ):
            continue
        spans.append((start, stop))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


# ---------------------------------------------------------------------------------------------------------
# Article parts


def _article_ids(article: etree._Element) -> tuple[str | None, str | None]:
    pmcid = pmid = None
    meta = next(_descendants(article, "article-meta"), None)
    for node in _children(meta, "article-id") if meta is not None else []:
        kind, value = node.get("pub-id-type", ""), _text(node)
        if kind == "pmid" and value:
            pmid = value
        elif kind in ("pmc", "pmcid") and value:
            pmcid = value if value.upper().startswith("PMC") else f"PMC{value}"
    return pmcid, pmid


def classify_licence(url: str | None, text: str | None, licence_type: str | None) -> Licence:
    """The licence's short code and whether it allows commercial use, from its URL, text and type."""
    haystack = " ".join(x for x in (url, text, licence_type) if x).lower()
    found = re.search(r"creativecommons\.org/licenses/([a-z-]+)", haystack)
    if found:
        code = "CC " + found.group(1).upper()
    elif "publicdomain/zero" in haystack or re.search(r"\bcc0\b", haystack):
        code = "CC0"
    elif "publicdomain" in haystack or "public domain" in haystack or "public-domain" in haystack:
        code = "public-domain"
    elif re.search(r"non[-\s]?commercial", haystack) and "attribution" in haystack:
        code = "CC BY-NC" + ("-ND" if re.search(r"no[-\s]?deriv", haystack) else "")
        code += (
            "-SA" if "sharealike" in haystack.replace("-", "").replace(" ", "") and "-ND" not in code else ""
        )
    elif "creative commons attribution" in haystack and re.search(r"no[-\s]?deriv", haystack):
        code = "CC BY-ND"
    elif "creative commons attribution" in haystack or licence_type in ("cc-by", "CC BY"):
        code = "CC BY"
    else:
        return Licence("unknown", None, url, text)
    return Licence(code, "-NC" not in code, url, text)


def _licence(article: etree._Element) -> Licence:
    meta = next(_descendants(article, "article-meta"), None)
    permissions = next(_descendants(meta, "permissions"), None) if meta is not None else None
    scope = permissions if permissions is not None else meta
    return Licence("unknown", None) if scope is None else _licence_in(scope)


def _licence_in(scope: etree._Element) -> Licence:
    """The licence stated in a ``<permissions>`` (or article-meta) element."""
    licence = next(_descendants(scope, "license"), None)
    url = licence_type = None
    text = ""
    if licence is not None:
        url = licence.get(XLINK_HREF)
        licence_type = licence.get("license-type")
        # JATS 1.2+: <ali:license_ref>URL</ali:license_ref>
        ref = next(_descendants(licence, "license_ref"), None)
        url = url or (_text(ref) or None)
        text = _text(licence)
    if not text:
        text = _text(next(_descendants(scope, "copyright-statement"), None))
    return classify_licence(url, text or None, licence_type)


def _own_graphic(fig: etree._Element) -> str | None:
    # The figure's image: a <graphic> of the figure itself (also inside <alternatives>), not one inside its
    # caption or a nested figure.
    stack = list(fig)
    while stack:
        node = stack.pop(0)
        name = _local(node.tag)
        if name == "graphic" and node.get(XLINK_HREF):
            return node.get(XLINK_HREF)
        if name not in ("caption", "fig"):
            stack.extend(node)
    return None


def _paragraph_text(paragraph: etree._Element) -> tuple[str, list[tuple[int, int, list[str]]]]:
    """The paragraph's text and, for each figure xref in it, ``(start, end, rids)`` in that text."""
    pieces: list[str] = []
    xrefs: list[tuple[int, int, list[str]]] = []
    length = 0

    def add(text: str | None) -> None:
        nonlocal length
        if text:
            pieces.append(text)
            length += len(text)

    def walk(node: etree._Element) -> None:
        add(node.text)
        for child in node:
            name = _local(child.tag)
            if name in _NOT_PARAGRAPH_TEXT:
                add(" ")
            else:
                begin = length
                walk(child)
                if name == "xref" and child.get("ref-type") == "fig":
                    xrefs.append((begin, length, child.get("rid", "").split()))
            add(child.tail)

    walk(paragraph)
    return "".join(pieces), xrefs


def _is_peer_review(node: etree._Element) -> bool:
    if _local(node.tag) != "sub-article":
        return False
    kinds = (node.get("article-type") or "", node.get("specific-use") or "")
    return any(kind.strip().lower() in _PEER_REVIEW for kind in kinds)


def _mentions(article: etree._Element, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Figure (or group) id -> the body sentences that refer to it, in document order, each once.

    ``groups`` maps a fig-group id to its member figures' ids: a sentence citing the group is also filed
    under each member as it is met, so a member's list stays in document order."""
    found: dict[str, list[str]] = {}
    for body in _descendants(article, "body"):
        for paragraph in _descendants(body, "p"):
            ancestors = list(paragraph.iterancestors())
            if any(_local(a.tag) in ("fig", "table-wrap", "caption") for a in ancestors):
                continue  # a caption's paragraph, not the article's text
            if any(_is_peer_review(a) for a in ancestors):
                continue
            text, xrefs = _paragraph_text(paragraph)
            if not xrefs:
                continue
            spans = sentence_spans(text)
            if not spans:  # an xref with no text around it: no sentence to cite
                continue
            for begin, _end, rids in xrefs:
                # The sentence the xref starts in: the last one starting at or before it.
                start, stop = max((span for span in spans if span[0] <= begin), default=spans[0])
                sentence = _clean(text[start:stop])
                for rid in rids:
                    for target in (rid, *groups.get(rid, ())):
                        sentences = found.setdefault(target, [])
                        if sentence not in sentences:
                            sentences.append(sentence)
    return found


def _caption_parts(element: etree._Element) -> tuple[str, list[str]]:
    """The title and paragraph texts of the ``<caption>`` of a figure or fig-group ("" and [] without one)."""
    caption = next(iter(_children(element, "caption")), None)
    if caption is None:
        return "", []
    return _text(next(iter(_children(caption, "title")), None)), [_text(p) for p in _children(caption, "p")]


def _articles(root: etree._Element) -> list[etree._Element]:
    if _local(root.tag) == "article":
        return [root]
    return [node for node in root.iter() if _local(node.tag) == "article"]


def parse_article(path: str | os.PathLike[str]) -> list[FigureRecord]:
    """Every figure of the article(s) in one JATS file (``.nxml``/``.xml``, or an OAI-PMH response)."""
    path = Path(path)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)
    try:
        root = etree.parse(str(path), parser).getroot()
    except etree.XMLSyntaxError as error:
        raise PmcError(f"{path}: line {error.lineno}: not well-formed XML: {error.msg}") from None
    except OSError as error:
        raise PmcError(f"{path}: cannot read: {error}") from None
    articles = _articles(root)
    if not articles:
        raise PmcError(f"{path}: no <article> element (root is <{_local(root.tag)}>)")
    records = []
    for article in articles:
        pmcid, pmid = _article_ids(article)
        licence = _licence(article)
        figures = []
        groups: dict[str, list[str]] = {}
        for number, fig in enumerate(_descendants(article, "fig"), start=1):
            figure_id = fig.get("id") or f"fig-{number}"
            parent = fig.getparent()
            in_group = parent is not None and _local(parent.tag) == "fig-group"
            figures.append((fig, figure_id, parent if in_group else None))
            if in_group and parent.get("id"):
                groups.setdefault(parent.get("id"), []).append(figure_id)
        mentions = _mentions(article, groups)
        for fig, figure_id, group_element in figures:
            group = group_element.get("id") if group_element is not None else None
            title, paragraphs = _caption_parts(fig)
            # A group's caption describes the whole figure; members' captions are often only panel-level
            # ("(A) ..."), so each member's caption starts with the group's.
            group_title, group_paragraphs = (
                ("", []) if group_element is None else _caption_parts(group_element)
            )
            # A figure reprinted from elsewhere carries its own permissions, which win over the article's.
            own = next(iter(_children(fig, "permissions")), None)
            sentences = list(mentions.get(figure_id, []))
            text = _clean(" ".join(x for x in (group_title, *group_paragraphs, title, *paragraphs) if x))
            records.append(
                FigureRecord(
                    pair_id=f"{pmid or pmcid or path.stem}_{figure_id}",
                    pmcid=pmcid,
                    pmid=pmid,
                    figure_id=figure_id,
                    label=_text(next(iter(_children(fig, "label")), None)) or None,
                    caption=text,
                    caption_title=title or None,
                    graphic=_own_graphic(fig),
                    fig_group=group,
                    mentions=sentences,
                    licence=_licence_in(own) if own is not None else licence,
                    domain=selection.modalities(text, sentences),
                    compound=selection.is_compound(text),
                    source=path.name,
                )
            )
    return records


def article_files(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files named, and the ``.nxml``/``.xml`` files below the folders named, sorted per folder; each
    file once, at its first place, however often the inputs name it (``DIR DIR/x.nxml``, a link to it)."""
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in (".nxml", ".xml") and p.is_file()
            )
        else:
            found = [path]
        for file in found:
            resolved = file.resolve()  # one key for "a/x.nxml", "./a/x.nxml" and a link to it
            if resolved not in seen:
                seen.add(resolved)
                files.append(file)
    return files


def parse_files(
    inputs: Iterable[str | os.PathLike[str]],
    *,
    repeat: Callable[[str], None] | None = None,
) -> tuple[list[FigureRecord], list[str]]:
    """Figure records of every readable article, and one error message per file that could not be read.

    A ``pair_id`` already given by an earlier figure (the same article copied under another name, an
    article in two folders, two figures with one id) is left out: the first one stays, and ``repeat``
    gets a message naming both files (default: a :class:`UserWarning`)."""
    records: list[FigureRecord] = []
    errors: list[str] = []
    first: dict[str, Path] = {}  # pair id -> the file it came from first
    for path in article_files(inputs):
        try:
            found = parse_article(path)
        except PmcError as error:
            errors.append(str(error))
            continue
        except Exception as error:  # an article shape we do not handle: report it, keep the batch going
            errors.append(f"{path}: could not be parsed: {type(error).__name__}: {error}")
            continue
        for record in found:
            if record.pair_id in first:
                message = f"{path}: pair_id {record.pair_id!r} repeats the one from {first[record.pair_id]}; left out"
                if repeat is None:
                    warnings.warn(message, stacklevel=2)
                else:
                    repeat(message)
                continue
            first[record.pair_id] = path
            records.append(record)
    return records, errors


def write_jsonl(records: Iterable[FigureRecord], out: str | os.PathLike[str]) -> int:
    """Write records as JSONL atomically (a temporary file, fsync, rename); returns the count."""
    lines = [record.to_json() + "\n" for record in records]
    write_atomic(out, "".join(lines))
    return len(lines)
