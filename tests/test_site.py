"""The static site, checked as a reader would (lamostcannon.site): a tiny notebook is executed
once, then the site is built from it (and from a stored notebook that must not run again), and
every page is parsed and every image, link and anchor resolved."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest

from lamostcannon import nbtools, site

ROOT = Path(__file__).resolve().parent.parent

_TINY = [
    ("markdown", "# 02 · A tiny notebook\n\nInline math $T_{\\rm eff} < 7000$ K, a sum "
                 "$d = \\sqrt{\\sum_i (\\Delta[X_i/{\\rm Fe}]/\\sigma_i)^2}$, code `a $b$ c`, "
                 "and display math:\n\n$$J_z < 30\\,{\\rm kpc\\,km/s}$$"),
    ("code", "from lamostcannon import claims, plotting\nprint(plotting.setup())"),
    ("code", "from tqdm.auto import tqdm\nfor i in tqdm(range(3), desc='ingest', unit='file'):\n"
             "    pass"),
    ("code", "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2], [2, 1])\n"
             "plotting.savefig(fig, 'kiel_diagram_reference_set')"),
    ("code", "rec = claims.Recorder('02_cleaning')\nrec.record('giant_fraction', 0.556, "
             "reason='a test')"),
]


def _notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(s) if k == "markdown" else nbformat.v4.new_code_cell(s)
                for k, s in cells]
    return nb


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("site")
    executed = tmp / "notebooks"
    executed.mkdir()
    claims_dir = tmp / "build" / "claims"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMOSTCANNON_FIGURES", str(tmp / "figures"))
        mp.setenv("LAMOSTCANNON_TEST_CLAIMS", str(claims_dir))
        cells = list(_TINY)
        cells[4] = ("code", "import os\n" + cells[4][1].replace(
            "Recorder('02_cleaning')",
            "Recorder('02_cleaning', directory=os.environ['LAMOSTCANNON_TEST_CLAIMS'])"))
        nb = _notebook(cells)
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp)}}).execute()
        nbformat.write(nbtools.tidy_executed(nb), executed / "02_cleaning.ipynb")
        # a stored notebook whose code would fail if it were executed again
        stored = _notebook([("markdown", "# 03 · Stored outputs"),
                            ("code", "raise RuntimeError('executed again')")])
        stored.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                          text="from the stored run\n")]
        nbformat.write(stored, executed / "03_training.ipynb")
        report = site.build_site(executed, tmp / "site", claims_dir=claims_dir,
                                 readme=ROOT / "README.md", source_notebooks=ROOT / "notebooks")
    return report


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs, self.links, self.ids, self.scripts, self.text = [], [], set(), [], []
        self.stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.scripts.append(a.get("src") or a.get("href"))
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_data(self, data):
        if not (self.stack and self.stack[-1] in ("style", "script")):
            self.text.append(data)


def _parse(path):
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def test_every_notebook_has_a_page_and_nothing_ran_again(built):
    assert set(built.pages) == {"02_cleaning", "03_training"}
    assert all(p.is_file() for p in built.pages.values()) and built.index.is_file()
    stored = _parse(built.pages["03_training"])
    assert "from the stored run" in "".join(stored.text)
    assert "Traceback" not in "".join(stored.text)
    # the repository's other notebooks are named as not executed, and not linked
    assert "01_download_data" in built.not_executed and "02_cleaning" not in built.not_executed


def test_every_page_parses_and_every_image_and_link_resolves(built):
    pages = {p.name: _parse(p) for p in [built.index, *built.pages.values()]}
    for name, page in pages.items():
        assert not page.scripts, (name, page.scripts)   # nothing loaded from the network
        for src in page.imgs:
            if src.startswith("data:"):
                header, payload = src.split(",", 1)
                assert ";base64" in header and base64.b64decode(payload, validate=True), name
            else:
                assert not urlparse(src).scheme, (name, src)
                assert (built.out_dir / unquote(src)).is_file(), (name, src)
        for href in page.links:
            url = urlparse(href)
            if url.scheme in ("http", "https", "mailto"):
                continue
            target = url.path or name
            assert (built.out_dir / unquote(target)).is_file(), (name, href)
            if url.fragment and target.endswith(".html"):  # HTML: the raw, then the decoded id
                ids = pages[target].ids
                assert url.fragment in ids or unquote(url.fragment) in ids, (name, href)


def test_figures_are_anchored_and_captioned_with_the_paper_figure(built):
    page = built.pages["02_cleaning"]
    parsed = _parse(page)
    assert "fig-kiel_diagram_reference_set" in parsed.ids
    html = page.read_text()
    caption = html.split('id="fig-kiel_diagram_reference_set"', 1)[1].split("</figure>", 1)[0]
    assert "<figcaption><b>Paper Fig. 3</b>" in caption
    assert "figures/kiel_diagram_reference_set.png" in caption
    assert built.figures["kiel_diagram_reference_set"] == \
        "02_cleaning.html#fig-kiel_diagram_reference_set"
    img = [s for s in parsed.imgs if s.startswith("02_cleaning_files/")]
    assert len(img) == 1                       # the figure once, as a file beside the page
    # named once, in the caption: savefig's return value echoes nothing after the figure
    assert "".join(parsed.text).count("figures/kiel_diagram_reference_set.png") == 1
    index = built.index.read_text()
    assert 'href="02_cleaning.html#fig-kiel_diagram_reference_set"' in index
    assert "PosixPath" not in html and "/tmp/" not in "".join(parsed.text)


def test_static_copy_reads_finished_and_math_is_rendered(built):
    parsed = _parse(built.pages["02_cleaning"])
    text = "".join(parsed.text)
    assert "ingest: 100%|##########| 3/3" in text
    assert " 0%|" not in text
    html = built.pages["02_cleaning"].read_text()
    assert html.count('class="lc-math"') == 3
    assert "<code>a $b$ c</code>" in html       # code is left alone
    assert "$T_{\\rm eff}" not in text           # the TeX survives only in alt text


def test_index_is_the_readme_maps_with_links_and_the_claims(built):
    parsed = _parse(built.index)
    assert "02_cleaning.html" in parsed.links
    text = "".join(parsed.text)
    assert "giant fraction of the reference set" in text and "a test" in text
    assert {"notebooks", "figures", "paper-figures", "claims"} <= parsed.ids
    assert "01_download_data" in text                 # named, though not executed here
    assert "01_download_data.html" not in parsed.links
    assert (built.out_dir / "claims.csv").read_text().startswith("notebook,key,item")


def test_finish_progress_widgets_and_carriage_returns():
    state = {"box": {"model_name": "HBoxModel",
                     "state": {"children": ["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]}},
             "l": {"model_name": "HTMLModel", "state": {"value": "label:\u2007100%"}},
             "p": {"model_name": "FloatProgressModel", "state": {"value": 7.0, "max": 7.0}},
             "r": {"model_name": "HTMLModel", "state": {"value": "\u20077/7\u2007[00:01&lt;00:00]"}}}
    nb = {"metadata": {"widgets": {nbtools.WIDGET_STATE: {"state": state}}},
          "cells": [{"cell_type": "code", "outputs": [
              {"output_type": "display_data",
               "data": {nbtools.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "label: 0%"}},
              {"output_type": "stream", "name": "stderr", "text": "a 10%\ra 50%\r"},
              {"output_type": "stream", "name": "stderr", "text": "a 100%\ndone\n"}]}]}
    nbtools.tidy_executed(nb)
    outs = nb["cells"][0]["outputs"]
    assert outs[0]["data"]["text/plain"] == "label: 100%|##########| 7/7 [00:01<00:00]"
    assert nbtools.WIDGET_VIEW in outs[0]["data"]          # the live widget stays for Jupyter
    assert len(outs) == 2 and outs[1]["text"] == "a 100%\ndone\n"
    assert nbtools.widget_text(state, "l") is None


def test_shown_path_never_shows_the_machine(tmp_path, monkeypatch):
    from lamostcannon import paths

    assert nbtools.shown_path(paths.ROOT / "build" / "site") == "build/site"
    assert nbtools.shown_path(paths.ROOT.parent / "shared" / "data") == "../shared/data"
    monkeypatch.setenv("LAMOSTCANNON_DATA", str(tmp_path / "elsewhere"))
    assert nbtools.shown_path(tmp_path / "elsewhere" / "processed" / "x.fits") == \
        "data/processed/x.fits"
    assert nbtools.shown_path("relative/name.txt") == "relative/name.txt"
    far = nbtools.shown_path(Path("/opt/somewhere/deep/file.fits"))
    assert not far.startswith("/") and far.endswith("deep/file.fits")


def test_site_needs_executed_notebooks(tmp_path):
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        site.build_site(tmp_path, tmp_path / "out")


def test_compact_table_drops_empty_columns():
    import numpy as np
    import pandas as pd

    df = pd.DataFrame({"a": [1.23456, 2.0], "b": [np.nan, np.nan], "c": ["", ""], "d": ["x", ""],
                       "e": [None, None]})
    out = nbtools.compact_table(df)
    assert list(out.columns) == ["a", "d"] and out.loc[0, "a"] == 1.235
    assert list(nbtools.compact_table(df, max_columns=1).columns) == ["a"]
    assert list(df.columns) == ["a", "b", "c", "d", "e"]        # the input is left alone
