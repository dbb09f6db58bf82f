"""PMC JATS parsing: the real Open Access articles in the shared data, and small hand-written articles for
the structures those six do not have (fig-group, nested and multi-figure xrefs, OAI-PMH wrappers, broken XML).
Expected values were read off the XML by hand (and figure counts by a plain-text count of ``<fig`` tags)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from llavamed_fast.data import pmc, selection


@pytest.fixture(scope="module")
def articles(data_dir):
    return data_dir / "pmc-oa-xml"


@pytest.fixture(scope="module")
def by_pair(articles):
    records, errors = pmc.parse_files([articles])
    assert errors == []
    return {r.pair_id: r for r in records}


def test_every_figure_of_the_real_articles_is_found(articles, by_pair):
    for path in sorted(articles.glob("*.nxml")):
        figures = len(re.findall(r"<fig[\s>]", path.read_text(encoding="utf-8")))
        assert sum(r.source == path.name for r in by_pair.values()) == figures, path.name
    assert len(by_pair) == 17


def test_real_ids_labels_captions_and_graphics(by_pair):
    figure = by_pair["21810267_F1"]
    assert (figure.pmcid, figure.label, figure.graphic) == ("PMC3166277", "Figure 1", "1471-2180-11-174-1")
    assert figure.caption_title is None  # this publisher puts the title in bold inside the first paragraph
    assert figure.caption.startswith("Schematic presentation of two models of holin hole formation. Holin")
    pntd = by_pair["23469300_pntd-0002065-g001"]
    assert pntd.caption_title == "Location of the study areas."
    assert pntd.caption.startswith("Location of the study areas. Figure 1 shows the map of the Zambézia")
    mds = by_pair["23149571_MDS526F2"]
    assert mds.label == "Figure 2." and mds.graphic == "mds52602"
    assert mds.caption.startswith("Age inequalities in advanced stage diagnosis in patients ≥65 by cancer")
    for record in by_pair.values():
        assert record.caption and record.graphic and record.pmcid.startswith("PMC")
        assert record.pair_id == f"{record.pmid}_{record.figure_id}"  # LLaVA-Med's pair ids


def test_real_mentions_are_the_citing_sentences(by_pair):
    assert by_pair["23469300_pntd-0002065-g001"].mentions == [
        "In September 2010 samples were collected only in Mopeia and Nicoadala districts (Fig. 1)."
    ]
    assert by_pair["19079722_f2-ehp-116-1694"].mentions == [
        "At the lower exposure dose, PBDE-47 elevated gene transcripts for TSHβ in the pituitary gland "
        "(Figure 2; p = 0.0043)."
    ]
    # Four sentences cite figure 4 of the phage article, one of them with "(see Figure 4B)".
    f4 = by_pair["21810267_F4"].mentions
    assert (
        len(f4) == 4
        and f4[0] == "Figure 4A shows a significant negative relationship between tL - tKCN and tKCN."
    )
    # A mention is one sentence: never two, never cut at "Fig." or "M. tuberculosis".
    for record in by_pair.values():
        for sentence in record.mentions:
            assert len(pmc.sentence_spans(sentence)) == 1, sentence
    assert (
        by_pair["23029536_pone-0046493-g004"]
        .mentions[0]
        .startswith(
            "As shown in Figure 4, MmPPOX was also found to inhibit the growth of M. tuberculosis and M. bovis BCG"
        )
    )


def test_real_selection_fields(by_pair):
    # Panel markers "(A) ... (B)" and "A, ... B," make a compound figure; none of these six articles is
    # imaging (they are plots, maps and chemistry), so no modality is flagged.
    assert by_pair["19079722_f1-ehp-116-1694"].compound and by_pair["23029536_pone-0046493-g001"].compound
    assert not by_pair["23149571_MDS526F1"].compound
    assert all(not any(r.domain.values()) for r in by_pair.values())
    assert set(by_pair["21810267_F1"].domain) == set(selection.DOMAINS)


def test_real_licences(by_pair):
    def licence(pair_id):
        found = by_pair[pair_id].licence
        return found.code, found.commercial_use

    assert licence("21810267_F1") == ("CC BY", True)  # creativecommons.org/licenses/by/2.0
    assert licence("19079722_f1-ehp-116-1694") == ("public-domain", True)
    assert licence("23149571_MDS526F1") == ("CC BY-NC", False)
    assert licence("23469300_pntd-0002065-g001") == ("CC BY", True)  # from the licence text only
    assert licence("17299597_pone-0000217-g001") == ("CC BY", True)  # a copyright statement, no <license>


ARTICLE = """<?xml version="1.0"?>
<article xmlns:xlink="http://www.w3.org/1999/xlink">
<front><article-meta>
  <article-id pub-id-type="pmid">111</article-id><article-id pub-id-type="pmcid">PMC222</article-id>
  <permissions><license xlink:href="https://creativecommons.org/licenses/by-nc-sa/4.0/">
    <license-p>Non-commercial use.</license-p></license></permissions>
</article-meta></front>
<body><sec>
  <p>Chest films were taken (<bold>see <xref ref-type="fig" rid="g1">Fig. 1a</xref></bold>). Both panels
  of <xref ref-type="fig" rid="f2 f3">Figs. 2 and 3</xref> show CT slices, as in Smith et al. 2010. The
  group is in <xref ref-type="fig" rid="g1">Fig. 1</xref>.
  <fig id="inline"><caption><p>An inline figure whose caption cites
  <xref ref-type="fig" rid="f2">Fig. 2</xref>.</p></caption></fig>
  Nothing else here.</p>
  <fig-group id="g1"><caption><p>Group caption.</p></caption>
    <fig id="f1a"><label>Figure 1a</label><caption><title>Left lung.</title><p>Opacity (arrow).</p></caption>
      <graphic xlink:href="img-1a"/></fig>
    <fig id="f1b"><label>Figure 1b</label><alternatives><graphic xlink:href="img-1b"/></alternatives></fig>
  </fig-group>
  <fig id="f2"><label>Figure 2</label><caption><p>Axial CT.</p></caption></fig>
  <fig id="f3"><caption><p>Coronal CT.</p></caption><graphic xlink:href="img-3"/></fig>
</sec></body></article>
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_fig_groups_nested_and_multi_figure_xrefs(tmp_path):
    records = {r.figure_id: r for r in pmc.parse_article(_write(tmp_path, "a.nxml", ARTICLE))}
    assert list(records) == ["inline", "f1a", "f1b", "f2", "f3"]
    f1a, f1b, f2, f3 = records["f1a"], records["f1b"], records["f2"], records["f3"]
    assert (f1a.pmcid, f1a.pmid, f1a.pair_id) == ("PMC222", "111", "111_f1a")
    assert (f1a.caption, f1a.caption_title, f1a.graphic) == (
        "Group caption. Left lung. Opacity (arrow).",
        "Left lung.",
        "img-1a",
    )
    assert (f1b.caption, f1b.graphic, f1b.fig_group) == ("Group caption.", "img-1b", "g1")
    assert f2.graphic is None and records["inline"].graphic is None and f3.label is None
    group_mentions = ["Chest films were taken (see Fig. 1a).", "The group is in Fig. 1."]
    assert f1a.mentions == f1b.mentions == group_mentions
    # One xref naming two figures; the sentence does not end at "et al." and the inline figure's caption
    # is not part of the paragraph (its own xref to f2 is not a mention).
    both = "Both panels of Figs. 2 and 3 show CT slices, as in Smith et al. 2010."
    assert f2.mentions == f3.mentions == [both]
    assert (f1a.licence.code, f1a.licence.commercial_use) == ("CC BY-NC-SA", False)


GROUPS = """<?xml version="1.0"?>
<article><front><article-meta><article-id pub-id-type="pmid">444</article-id></article-meta></front>
<body><sec>
  <p>The whole set is in <xref ref-type="fig" rid="g1">Figure 1</xref>. Panel
  <xref ref-type="fig" rid="f1b">1B</xref> shows the consolidation. Lesions shrank in all patients
  (<xref ref-type="fig" rid="g1">Figure 1</xref>). Both scans are in
  <xref ref-type="fig" rid="f1b">Fig. 1B</xref> and <xref ref-type="fig" rid="g1">Figure 1</xref>.</p>
  <p>Follow-up is in <xref ref-type="fig" rid="f2a">Figure 2A</xref>.</p>
  <fig-group id="g1"><label>Figure 1</label>
    <caption><title>Chest CT of patient 3.</title><p>Before and after treatment.</p></caption>
    <fig id="f1a"><label>A</label><caption><p>(A) Before treatment.</p></caption><graphic xlink:href="a"
      xmlns:xlink="http://www.w3.org/1999/xlink"/></fig>
    <fig id="f1b"><label>B</label><caption><title>After.</title><p>(B) Six weeks later.</p></caption></fig>
  </fig-group>
  <fig-group id="g2">
    <fig id="f2a"><caption><p>(A) Follow-up radiograph.</p></caption></fig>
  </fig-group>
</sec></body></article>
"""


def test_a_fig_group_caption_leads_its_members_captions(tmp_path):
    records = {r.figure_id: r for r in pmc.parse_article(_write(tmp_path, "g.nxml", GROUPS))}
    f1a, f1b, f2a = records["f1a"], records["f1b"], records["f2a"]
    # The group's title and paragraphs come first (built as a figure's caption is: no label), then the
    # member's own; the title field stays the member's own.
    assert f1a.caption == "Chest CT of patient 3. Before and after treatment. (A) Before treatment."
    assert f1b.caption == "Chest CT of patient 3. Before and after treatment. After. (B) Six weeks later."
    assert (f1a.caption_title, f1b.caption_title) == (None, "After.")
    # A group without a caption leaves the member's caption alone.
    assert (f2a.caption, f2a.fig_group) == ("(A) Follow-up radiograph.", "g2")


def test_group_mentions_keep_document_order(tmp_path):
    records = {r.figure_id: r for r in pmc.parse_article(_write(tmp_path, "g.nxml", GROUPS))}
    whole = "The whole set is in Figure 1."
    shrank = "Lesions shrank in all patients (Figure 1)."
    both = "Both scans are in Fig. 1B and Figure 1."
    assert records["f1a"].mentions == [whole, shrank, both]
    # The member's own sentences sit between the group's, each sentence once.
    assert records["f1b"].mentions == [whole, "Panel 1B shows the consolidation.", shrank, both]
    assert records["f2a"].mentions == ["Follow-up is in Figure 2A."]


def test_peer_review_sub_articles_are_not_mentions(tmp_path, articles, by_pair):
    # The real PLoS NTD article with its peer review appended as JATS 1.3 / eLife mark it: reviewers and
    # authors discussing figure 1 are not the article's description of it.
    review = """
    <sub-article article-type="{kind}" id="sa-{n}"><front-stub><title-group><article-title>Review
    </article-title></title-group></front-stub><body><p>The map in
    <xref ref-type="fig" rid="pntd-0002065-g001">Fig. 1</xref> lacks a scale bar ({n}).</p></body>
    </sub-article>"""
    peer = "".join(
        review.format(kind=kind, n=n) for n, kind in enumerate(["reviewer-report", "decision-letter"])
    )
    peer += review.replace('article-type="{kind}"', 'specific-use="Author-Comment"').format(n=2)
    # Nested: an aggregated review document holding an untyped sub-article.
    peer += (
        '<sub-article article-type="aggregated-review-documents" id="agg"><front-stub/>'
        + review.replace(' article-type="{kind}"', "").format(n=3)
        + "</sub-article>"
    )
    # Any other sub-article (a translation, say) is the authors' own text about their figure: kept.
    peer += """<sub-article article-type="translation" id="tr"><front-stub/><body><p>El mapa está en la
    <xref ref-type="fig" rid="pntd-0002065-g001">Fig. 1</xref>.</p></body></sub-article>"""
    path = tmp_path / "pntd.0002065.nxml"
    path.write_text(
        (articles / "pntd.0002065.nxml")
        .read_text(encoding="utf-8")
        .replace("</back></article>", f"</back>{peer}</article>"),
        encoding="utf-8",
    )
    records = {r.figure_id: r for r in pmc.parse_article(path)}
    own = by_pair["23469300_pntd-0002065-g001"].mentions
    assert len(own) == 1
    assert records["pntd-0002065-g001"].mentions == [*own, "El mapa está en la Fig. 1."]


def test_oai_pmh_wrapper_with_a_default_namespace(tmp_path):
    inner = ARTICLE.split("\n", 1)[1].replace(
        "<article xmlns:xlink", '<article xmlns="https://jats.nlm.nih.gov/ns/archiving/1.3/" xmlns:xlink'
    )
    wrapped = (
        '<?xml version="1.0"?><OAI-PMH xmlns="http://www.openarchives.org/OAI/2.0/"><ListRecords>'
        f"<record><metadata>{inner}</metadata></record>"
        f"<record><metadata>{inner.replace('PMC222', 'PMC333')}</metadata></record>"
        "</ListRecords></OAI-PMH>"
    )
    records = pmc.parse_article(_write(tmp_path, "oai.xml", wrapped))
    assert [r.pair_id for r in records[:2]] == ["111_inline", "111_f1a"]
    assert len(records) == 10 and records[5].pmcid == "PMC333"
    direct = {r.figure_id: r for r in pmc.parse_article(_write(tmp_path, "a.nxml", ARTICLE))}
    assert records[1].mentions == direct["f1a"].mentions and records[4].graphic == "img-3"


def test_broken_files_are_named_and_the_batch_goes_on(tmp_path, articles):
    _write(tmp_path, "good.nxml", ARTICLE)
    _write(tmp_path, "broken.nxml", "<article>\n<body><p>unclosed\n</article>")
    _write(tmp_path, "notjats.xml", "<html><body/></html>")
    records, errors = pmc.parse_files([tmp_path, tmp_path / "missing.nxml"])
    assert len(records) == 5 and {r.source for r in records} == {"good.nxml"}
    assert len(errors) == 3
    assert re.search(r"broken\.nxml: line \d+: not well-formed XML", errors[0])
    assert "notjats.xml: no <article> element (root is <html>)" in errors[1]
    assert "missing.nxml: cannot read" in errors[2]


def test_sentence_splitting():
    text = "See Fig. 2 and e.g. panel B. Cells (M. tuberculosis) grew 2.5 fold! Why? 3 mice died. End"
    sentences = [text[a:b] for a, b in pmc.sentence_spans(text)]
    assert sentences == [
        "See Fig. 2 and e.g. panel B.",
        "Cells (M. tuberculosis) grew 2.5 fold!",
        "Why?",
        "3 mice died.",
        "End",
    ]


def test_an_xref_without_text_around_it_is_no_mention(tmp_path):
    empty = ARTICLE.replace(
        "Nothing else here.</p>", 'Nothing else here.</p><p><xref ref-type="fig" rid="f3"/></p>'
    )
    records = {r.figure_id: r for r in pmc.parse_article(_write(tmp_path, "e.nxml", empty))}
    assert records["f3"].mentions == ["Both panels of Figs. 2 and 3 show CT slices, as in Smith et al. 2010."]


def test_a_figure_with_its_own_permissions_keeps_them(tmp_path):
    own = ARTICLE.replace(
        '<fig id="f2"><label>Figure 2</label>',
        '<fig id="f2"><label>Figure 2</label><permissions><copyright-statement>Reprinted with permission, '
        "all rights reserved.</copyright-statement></permissions>",
    )
    records = {r.figure_id: r for r in pmc.parse_article(_write(tmp_path, "p.nxml", own))}
    assert records["f2"].licence.code == "unknown" and records["f3"].licence.code == "CC BY-NC-SA"


def test_licence_rules():
    rules = pmc.classify_licence
    assert rules("http://creativecommons.org/licenses/by-nd/4.0/", None, None).code == "CC BY-ND"
    assert rules(None, "Released under CC0.", None).code == "CC0"
    assert rules("https://creativecommons.org/publicdomain/zero/1.0/", None, None).commercial_use is True
    licence = rules(None, "Creative Commons Attribution-NonCommercial License", "open-access")
    assert (licence.code, licence.commercial_use) == ("CC BY-NC", False)
    assert rules(None, "All rights reserved.", None).commercial_use is None
    spaced = rules(None, "Creative Commons Attribution Non Commercial (CC BY-NC 4.0)", None)
    assert (spaced.code, spaced.commercial_use) == ("CC BY-NC", False)
    assert rules(None, "Creative Commons Attribution-NoDerivatives 4.0", None).code == "CC BY-ND"
    # "30 min." ends a sentence; "Fig." does not.
    text = "Cells were incubated for 30 min. Figure 2 shows the result."
    assert len(pmc.sentence_spans(text)) == 2


def test_cli_writes_jsonl_without_torch(tmp_path, articles):
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in", "broken.nxml", "<article><p></article>")
    out = tmp_path / "figures.jsonl"
    script = (
        "import sys; from llavamed_fast.cli import main; code = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'curation imported torch'; sys.exit(code)"
    )
    args = ["curate", "pmc", "--input", str(articles), str(tmp_path / "in"), "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one unreadable file: reported, the others written
    assert "broken.nxml: line" in done.stderr and "17 figures from 6 articles" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 17 and rows[0]["licence"]["code"] == "CC BY"
    assert set(rows[0]) >= {
        "pair_id",
        "pmcid",
        "pmid",
        "figure_id",
        "label",
        "caption",
        "graphic",
        "mentions",
    }


def test_overlapping_inputs_and_copied_articles_give_each_pair_id_once(tmp_path, capsys):
    from llavamed_fast.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    first = _write(folder, "a.nxml", ARTICLE)
    ids = [f"111_{figure}" for figure in ("inline", "f1a", "f1b", "f2", "f3")]
    out = tmp_path / "figures.jsonl"
    # The folder, a file in it, the same file spelled otherwise: it is read once, and that is no warning.
    inputs = [str(folder), str(first), str(folder / ".." / "in" / "a.nxml")]
    assert main(["curate", "pmc", "--input", *inputs, "--out", str(out)]) == 0
    assert [json.loads(line)["pair_id"] for line in out.read_text().splitlines()] == ids
    assert capsys.readouterr().err == ""
    # The same article copied under another name: its figures are left out, named with both files.
    copy = _write(folder, "b.nxml", ARTICLE.replace("Axial CT.", "Axial CT, copied."))
    assert main(["curate", "pmc", "--input", str(folder), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == ids and rows[3]["caption"] == "Axial CT."
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"curate pmc: {copy}: pair_id {pair_id!r} repeats the one from {first}; left out" for pair_id in ids
    ]
    assert captured.out == f"5 figures from 1 articles -> {out}; 5 repeated pair ids left out\n"
    # Used as a library, the repeats are warnings.
    with pytest.warns(UserWarning) as caught:
        records, errors = pmc.parse_files([folder])
    assert [str(w.message) for w in caught] == [
        line.removeprefix("curate pmc: ") for line in captured.err.splitlines()
    ]
    assert [r.pair_id for r in records] == ids and errors == []
