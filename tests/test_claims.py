"""The claims table: the paper's numbers typed once, this run's recorded by the notebooks,
verdicts computed (lamostcannon.claims)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lamostcannon import claims
from lamostcannon.claims import PAPER_CLAIMS, PaperClaim, Recorder, verdict

ROOT = Path(__file__).resolve().parent.parent
PAPER_TEXT = ROOT.parent / "shared" / "paper" / "wheeler2020.txt"


# ----------------------------------------------------------------------------- the paper's side
def test_paper_claims_are_well_formed():
    for key, c in PAPER_CLAIMS.items():
        assert c.key == key and c.what and c.source and c.paper()
        assert re.match(r"^[a-z][a-z0-9_]+$", key), key
    with pytest.raises(ValueError, match="kind"):
        PaperClaim("x", "x", "sec. 1", "guess", 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        PaperClaim("x", "x", "sec. 1", "value", 1.0)
    with pytest.raises(ValueError, match="-1, 0 or"):
        PaperClaim("x", "x", "sec. 1", "sign", 3)
    with pytest.raises(ValueError, match="low"):
        PaperClaim("x", "x", "sec. 1", "range", low=2.0, high=1.0)


#: claim -> text that must appear in the paper (the number was typed from it)
_IN_PAPER = {
    "reference_stars": "leave 1722 stars", "reference_dwarfs": "1190 dwarfs",
    "reference_giants": "532 giants", "catalog_observations": "4,541,883 observations",
    "catalog_stars": "3,744,284 stars", "cv_scatter_dwarf_abundances": "0.05 to 0.23 dex for dwarfs",
    "cv_scatter_giant_abundances": "0.07 to 0.22 dex for giants",
    "praesepe_alpha_dispersion": "Praesepe is 0.07 dex", "cv_scatter_dwarf_alpha": "dwarfs: 0.06 dex",
    "binary_distance_peak": "peak at a distance of", "field_distance_peak": "0.8 and reference stars peak at a distance of 2.5",
    "precision_relative_to_unbiased_range": "30-50% level", "halo_vphi_outer": "80 \\pm 70",
    "giants_in_maps": "nearly 800,000 giant", "giant_feh_unbiased_down_to": "\\approx -1.5",
    "crossmatch_candidates": "roughly ten thousand",
}


def test_paper_numbers_are_the_papers():
    if not PAPER_TEXT.is_file():
        pytest.skip(f"paper text not found at {PAPER_TEXT}")
    text = PAPER_TEXT.read_text()
    for key, snippet in _IN_PAPER.items():
        assert key in PAPER_CLAIMS
        assert snippet in text, (key, snippet)
    assert PAPER_CLAIMS["reference_stars"].value == 1722
    assert PAPER_CLAIMS["giant_fraction"].value == pytest.approx(532 / 1722)
    assert PAPER_CLAIMS["cv_scatter_dwarf_abundances"].paper() == "0.05-0.23"


# ----------------------------------------------------------------------------- verdicts
def test_range_verdicts():
    c = PAPER_CLAIMS["cv_scatter_dwarf_abundances"]
    assert verdict(c, 0.1) == ("agrees", "within the paper's 0.05-0.23")
    v, why = verdict(c, 0.251, reason="GALAH-like Eu noise")
    assert v == "differs" and why.startswith("0.021 dex above the paper's 0.05-0.23")
    assert why.endswith("notebook: GALAH-like Eu noise")
    assert verdict(c, 0.01)[1].startswith("0.04 dex below")
    assert verdict(c, 0.3)[1].endswith("no reason given")


def test_value_verdicts():
    c = PAPER_CLAIMS["giant_fraction"]
    assert verdict(c, 0.33)[0] == "agrees"
    v, why = verdict(c, 0.556, reason="the mock's selection favours giants")
    assert v == "differs"
    assert why.startswith("differs by +0.247, +80% from the paper's 0.309")
    exact = PAPER_CLAIMS["giant_abundance_labels"]
    assert verdict(exact, 6) == ("agrees", "as in the paper")
    assert verdict(exact, 5)[0] == "differs"
    assert verdict(PAPER_CLAIMS["praesepe_alpha_dispersion"], 0.046)[1].startswith(
        "differs by -0.024 dex, -34%")
    assert verdict(c, float("nan"))[0] == "differs"
    assert verdict(c, "many")[0] == "differs"


def test_count_verdicts_depend_on_the_data():
    c = PAPER_CLAIMS["reference_stars"]
    v, why = verdict(c, 1528, data="mock")
    assert v == "not comparable" and "0.887 x the paper's 1,722" in why
    assert verdict(c, 1750, data="real") == ("agrees", "within 5% of 1,722")
    v, why = verdict(c, 900, data="real", reason="half the overlap")
    assert v == "differs" and why.startswith("0.523 x the paper's 1,722")


def test_sign_and_trend_verdicts():
    down = PAPER_CLAIMS["feh_vertical_gradient"]
    assert verdict(down, -0.32, err=0.02) == (
        "agrees", "negative, as in the paper (-0.32 dex/kpc, 16.0 sigma)")
    assert verdict(down, -0.01, err=0.02)[0] == "inconclusive"
    assert verdict(down, 0.1, err=0.01)[0] == "differs"
    assert verdict(down, -0.3)[0] == "agrees"                   # no error: the sign alone
    none = PAPER_CLAIMS["separation_vs_chemical_distance"]
    assert verdict(none, 0.05, err=0.1)[0] == "agrees"
    assert verdict(none, 0.5, err=0.1)[0] == "differs"
    assert verdict(none, 0.05)[0] == "inconclusive"
    trend = PAPER_CLAIMS["praesepe_alpha_teff_slope"]
    assert verdict(trend, 0.037, err=0.01)[0] == "agrees"
    assert verdict(trend, -0.037, err=0.01)[0] == "agrees"
    assert verdict(trend, 0.005, err=0.01)[0] == "inconclusive"
    assert verdict(PAPER_CLAIMS["cv_flagged_fraction"], 0.03) == ("reported",
                                                                  "the paper gives no number")


# ----------------------------------------------------------------------------- recording
def test_recorder_writes_atomically_and_starts_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMOSTCANNON_SOURCE", "mock")
    rec = Recorder("02_cleaning", directory=tmp_path)
    assert json.loads(rec.path.read_text())["records"] == []
    out = rec.record("giant_fraction", np.float32(0.556), reason="mock selection")
    assert out[0] == "differs"
    rec.record("cv_scatter_dwarf_abundances", np.float64(0.1), item="o_fe")
    rec.record("cv_scatter_dwarf_abundances", 0.2, item="eu_fe")
    rec.record("cv_scatter_dwarf_abundances", 0.12, item="o_fe")    # replaces, not duplicates
    payload = json.loads(rec.path.read_text())
    assert payload["notebook"] == "02_cleaning" and payload["data"] == "mock"
    assert payload["run"]["source"] == "mock"
    items = [(r["key"], r["item"], r["value"]) for r in payload["records"]]
    assert items == [("giant_fraction", "", pytest.approx(0.556, abs=1e-6)),
                     ("cv_scatter_dwarf_abundances", "eu_fe", 0.2),
                     ("cv_scatter_dwarf_abundances", "o_fe", 0.12)]
    assert not list(tmp_path.glob(".*tmp"))
    # a rerun of the notebook starts its file afresh
    Recorder("02_cleaning", directory=tmp_path)
    assert json.loads(rec.path.read_text())["records"] == []


def test_recorder_checks_its_inputs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="02_cleaning"):
        Recorder("cleaning", directory=tmp_path)
    rec = Recorder("03_training", directory=tmp_path)
    with pytest.raises(KeyError, match="not a paper claim"):
        rec.record("reference_star", 1)
    with pytest.raises(TypeError, match="number"):
        rec.record("reference_stars", "many")
    with pytest.raises(ValueError, match="mock"):
        rec.record("reference_stars", 1, data="simulated")
    monkeypatch.setenv("LAMOSTCANNON_SOURCE", "archive")
    assert Recorder("05_catalog_inference", directory=tmp_path).data == "real"
    assert Recorder("09_real_lamost_spectra", data="real", directory=tmp_path).data == "real"


# ----------------------------------------------------------------------------- the table
def _two_notebooks(tmp_path):
    a = Recorder("02_cleaning", directory=tmp_path, data="mock")
    a.record("reference_stars", 1528)
    a.record("giant_fraction", 0.556, reason="mock selection")
    b = Recorder("09_real_lamost_spectra", directory=tmp_path, data="real")
    b.record("repeat_over_cv_precision", 0.4, item="teff", reason="LASP label noise")
    (tmp_path / "07_broken.json").write_text("{not json")
    return a, b


def test_gather_computes_verdicts_and_lists_unrecorded(tmp_path, caplog):
    _two_notebooks(tmp_path)
    table = claims.gather(tmp_path)
    assert list(table.columns[:len(claims.COLUMNS)]) == list(claims.COLUMNS)
    recorded = table[table["verdict"] != "not recorded"]
    assert list(recorded["notebook"]) == ["02_cleaning", "02_cleaning", "09_real_lamost_spectra"]
    assert list(recorded["verdict"]) == ["not comparable", "differs", "differs"]
    assert recorded.iloc[2]["reason"].endswith("notebook: LASP label noise")
    assert recorded.iloc[2]["item"] == "teff" and recorded.iloc[2]["data"] == "real"
    unrecorded = table[table["verdict"] == "not recorded"]
    assert len(unrecorded) == len(PAPER_CLAIMS) - 3
    assert "07_broken.json" in caplog.text
    # the verdict is computed from the paper's side at gather time, not stored in the files
    text = (tmp_path / "02_cleaning.json").read_text()
    assert "differs" not in text and "not comparable" not in text
    assert len(claims.gather(tmp_path, include_unrecorded=False)) == 3


def test_write_table_and_readme_block(tmp_path):
    _two_notebooks(tmp_path)
    table = claims.gather(tmp_path)
    out = claims.write_table(table, tmp_path / "build")
    md = out["md"].read_text()
    assert "| notebook | claim | paper |" in md
    assert "| 02_cleaning | giant fraction of the reference set | 0.309 |" in md
    assert claims.summary(table) in md
    back = pd.read_csv(out["csv"])
    assert len(back) == len(table) and set(claims.COLUMNS) <= set(back.columns)
    rows = json.loads(out["json"].read_text())
    assert rows[0]["key"] == "reference_stars" and rows[0]["value"] == 1528
    assert not list((tmp_path / "build").glob(".*tmp"))

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{claims.README_BEGIN}\nOLD-CONTENT\n{claims.README_END}\n\nrest\n")
    assert claims.update_readme(table, readme) is True
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nrest\n") and "OLD-CONTENT" not in text
    assert claims.update_readme(table, readme) is False            # idempotent
    with pytest.raises(ValueError, match="no claims block"):
        claims.update_readme(table, tmp_path / "build" / "claims.md")


def test_readme_claims_block_has_the_papers_side():
    """The README's table is generated: every paper value and source in it is the package's."""
    text = (ROOT / "README.md").read_text()
    assert claims.README_BEGIN in text and claims.README_END in text
    block = text.split(claims.README_BEGIN, 1)[1].split(claims.README_END, 1)[0]
    rows = [[c.replace("\\|", "|") for c in line.split(" | ")] for line in block.splitlines()
            if line.startswith("| ") and not line.startswith("| notebook")]
    by_what = {c.what: c for c in PAPER_CLAIMS.values()}
    seen = set()
    for cells in rows:
        # "what (item)": the item may hold spaces and parentheses ("11 < R < 13 kpc")
        what = cells[1] if cells[1] in by_what else next(
            w for w in sorted(by_what, key=len, reverse=True) if cells[1].startswith(w + " ("))
        claim = by_what[what]
        seen.add(claim.key)
        unit = f" {claim.unit}" if claim.unit and claim.paper()[-1:].isdigit() else ""
        assert cells[2] == claim.paper() + unit, (what, cells[2])
        assert cells[3] == claim.source, (what, cells[3])
    assert seen == set(PAPER_CLAIMS), set(PAPER_CLAIMS) - seen


def test_record_returns_a_readable_verdict_and_the_notebook_table(tmp_path):
    rec = Recorder("06_wide_binaries", directory=tmp_path, data="mock")
    out = rec.record("praesepe_alpha_dispersion", 0.046, reason="the mock's cluster is tight")
    assert out.verdict == "differs" and out[0] == "differs"
    assert repr(out).startswith("praesepe_alpha_dispersion = 0.046; paper 0.07: differs (")
    rec.record("cv_scatter_dwarf_alpha", 0.059)
    Recorder("02_cleaning", directory=tmp_path).record("giant_fraction", 0.3)
    t = rec.table()
    assert list(t["key"]) == ["praesepe_alpha_dispersion", "cv_scatter_dwarf_alpha"]
    assert list(t["verdict"]) == ["differs", "agrees"]
    assert "item" not in t.columns and t.loc[0, "unit"] == "dex"   # no empty columns
