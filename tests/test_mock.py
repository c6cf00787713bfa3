"""The mock universe: determinism, file formats, schemas and the science it is built to show.

File-level tests generate the ``tiny`` mock (a few hundred LAMOST spectra) into a temporary
folder; population tests draw the ``small`` universe's tables without spectra (a few seconds).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from lamostcannon import mock
from lamostcannon.labels import ELEMENTS
from lamostcannon.mock import chemistry, galaxy, surveys, writers

SEED = 77


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny mock written with two worker processes."""
    out = tmp_path_factory.mktemp("mock_tiny_a")
    return mock.generate(out, size="tiny", seed=SEED, progress=False, n_workers=2)


@pytest.fixture(scope="module")
def small_universe():
    """The tables of the default ``small`` universe (no spectra)."""
    return surveys.build_universe("small", 2020)


def _sha_map(out: Path) -> dict:
    man = json.loads((out / "manifest.json").read_text())
    return {r["path"]: r["sha256"] for r in man["files"]}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    other = mock.generate(tmp_path / "b", size="tiny", seed=SEED, progress=False, n_workers=1)
    a, b = _sha_map(tiny), _sha_map(other)
    assert a == b
    different = mock.generate(tmp_path / "c", size="tiny", seed=SEED + 1, progress=False,
                              n_workers=1)
    assert _sha_map(different) != a


def test_manifest_lists_every_file_with_its_hash(tiny):
    man = json.loads((tiny / "manifest.json").read_text())
    assert man["complete"] and man["source"] == "mock" and man["size"] == "tiny"
    assert man["seed"] == SEED
    listed = {r["path"] for r in man["files"]}
    on_disk = {str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == listed
    for rec in man["files"][:5] + man["files"][-5:]:
        data = (tiny / rec["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["size"]
        assert rec["source"] == "mock" and rec["date"]


def test_generate_is_idempotent(tiny, monkeypatch):
    # the mock's source hash is part of the identity; pin it (the code may be edited meanwhile)
    code = json.loads((tiny / "manifest.json").read_text())["params"]["code"]
    monkeypatch.setattr(mock, "_code_hash", lambda: code)
    spec = next((tiny / "lamost" / "spectra").iterdir())
    before = spec.stat().st_mtime_ns
    assert mock.generate(tiny, size="tiny", seed=SEED, progress=False) == tiny
    assert spec.stat().st_mtime_ns == before


def test_generate_refuses_a_folder_that_is_not_a_mock(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        mock.generate(tmp_path, size="tiny", seed=SEED, progress=False)


def test_every_lamost_file_reads_back_like_a_real_one(tiny):
    cat = Table.read(tiny / "lamost" / "catalog.fits")
    files = sorted((tiny / "lamost" / "spectra").glob("spec-*.fits.gz"))
    assert len(files) == len(cat) == len(set(cat["filename"]))
    assert {f.name for f in files} == set(cat["filename"])
    row_of = {n: i for i, n in enumerate(cat["filename"])}
    spectra = pytest.importorskip("lamostcannon.spectra")
    for f in files:
        sp = spectra.read_lamost(f)
        r = cat[row_of[f.name]]
        assert sp.meta["obsid"] == r["obsid"]
        assert sp.meta["designation"] == r["designation"]
        assert sp.meta["layout"] == "dr4-9"
        assert sp.flux.shape == (3909,)
        assert sp.meta["z"] == pytest.approx(r["z"], abs=1e-8)
        assert sp.meta["snrz"] == pytest.approx(r["snrz"], abs=0.01)
    with fits.open(files[0]) as hdul:
        hdul.verify("exception")
        h = hdul[0].header
        assert hdul[0].data.shape == (5, 3909) and hdul[0].data.dtype.kind == "f"
        assert h["DATA_V"] == "LAMOST DR4 v2" and h["VACUUM"] is True
        assert h["COEFF0"] == pytest.approx(3.5682) and h["COEFF1"] == pytest.approx(1e-4)
        assert "DATE" not in h
        w = hdul[0].data[2]
        assert np.allclose(np.log10(w), 3.5682 + 1e-4 * np.arange(3909), atol=2e-8)


API_LAMOST = ("obsid designation obsdate lmjd mjd planid spid fiberid ra dec snru snrg snrr snri "
              "snrz class subclass z z_err rv teff teff_err logg logg_err feh feh_err filename").split()
API_GALAH = (["sobject_id", "star_id", "ra", "dec", "teff", "e_teff", "logg", "e_logg", "fe_h",
              "e_fe_h", "flag_fe_h", "vmic", "vsini", "alpha_fe"]
             + [c for x in ELEMENTS for c in (f"{x}_fe", f"e_{x}_fe", f"flag_{x}_fe")]
             + ["flag_cannon", "chi2_cannon", "snr_c1", "snr_c2", "snr_c3", "snr_c4"])
API_GAIA = ("source_id ra dec ref_epoch parallax parallax_error pmra pmra_error pmdec pmdec_error "
            "radial_velocity radial_velocity_error phot_g_mean_mag").split()


def test_catalogue_schemas_match_the_api(tiny):
    assert Table.read(tiny / "lamost" / "catalog.fits").colnames == API_LAMOST
    assert Table.read(tiny / "galah" / "catalog.fits").colnames == API_GALAH
    assert Table.read(tiny / "gaia" / "gaia_source.fits").colnames == API_GAIA
    assert Table.read(tiny / "gaia" / "distances.fits").colnames == ["source_id", "r_est", "r_lo",
                                                                     "r_hi"]
    assert Table.read(tiny / "binaries" / "wide_binaries.fits").colnames == [
        "source_id1", "source_id2", "ra1", "dec1", "ra2", "dec2", "sep_AU", "pairdistance",
        "phot_g_mean_mag1", "phot_g_mean_mag2"]
    assert Table.read(tiny / "clusters" / "members.fits").colnames == [
        "source_id", "ra", "dec", "cluster", "proba"]
    with fits.open(tiny / "galah" / "window_spectra.fits") as h:
        n = len(h["OBJECTS"].data)
        npix = h["WAVE"].data.size
        for name in ("FLUX", "SIGMA", "MODEL"):
            assert h[name].data.shape == (n, npix) and h[name].data.dtype.itemsize == 4
        galah = Table.read(tiny / "galah" / "catalog.fits")
        assert set(h["OBJECTS"].data["sobject_id"]) <= set(galah["sobject_id"])
    truth = Table.read(tiny / "truth" / "truth.fits")
    for c in ("source_id", "designation", "sobject_id", "population", "teff", "fe_h", "vR", "vT"):
        assert c in truth.colnames


def test_tables_link_up(tiny):
    truth = Table.read(tiny / "truth" / "truth.fits")
    gaia = Table.read(tiny / "gaia" / "gaia_source.fits")
    lam = Table.read(tiny / "lamost" / "catalog.fits")
    assert len(set(gaia["source_id"])) == len(gaia) == len(truth)
    seen = truth[truth["n_obs"] > 0]
    assert set(lam["designation"]) == set(seen["designation"])
    assert set(lam["designation"]) == {d for d in truth["designation"] if d}
    dist = Table.read(tiny / "gaia" / "distances.fits")
    assert np.all((dist["r_lo"] <= dist["r_est"]) & (dist["r_est"] <= dist["r_hi"]))
    members = Table.read(tiny / "clusters" / "members.fits")
    assert set(members["cluster"]) == {c.name for c in surveys.CLUSTERS}
    assert set(members["source_id"]) <= set(gaia["source_id"])


# --------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("OBSID", 101000001), ("DESIG", "LAMOST J000000.00+000000.0"),
                                       ("VACUUM", True), ("Z", -0.00012345), ("SNRG", 94.11)])
def test_header_cards_parse_like_astropy_cards(key, value):
    card = writers.format_card(key, value, "a comment")
    assert len(card) == 80
    parsed = fits.Card.fromstring(card)
    assert parsed.keyword == key and parsed.comment == "a comment"
    assert parsed.value == pytest.approx(value) if isinstance(value, float) else parsed.value == value


def test_quantize_keeps_twelve_bits():
    x = np.array([1.0, 3.14159265, -2.5e-3, 1234.5678, 0.0], np.float32)
    q = writers.quantize(x)
    assert np.all(np.abs(q - x) <= np.abs(x) * 2.0**-12)
    assert writers.quantize(q).tobytes() == q.tobytes()


def test_solar_frame_conventions():
    sun = galaxy._sun_and_axes()[0]
    assert sun == pytest.approx([-8.0, 0.0, 0.025], abs=1e-6)
    # a star at rest in the Galactocentric frame at the Sun's position moves by -v_sun
    x, y, z = np.array([-8.0]), np.array([0.0]), np.array([0.025])
    _, _, _, pmra, pmdec, rv = galaxy.to_observables(x + 1e-3, y, z, np.array([-11.1]),
                                                     np.array([232.24]), np.array([7.25]))
    assert abs(rv[0]) < 0.5  # co-moving with the Sun
    assert galaxy.circular_velocity(8.0) == pytest.approx(220.0, rel=1e-3)


# --------------------------------------------------------------------------------------------
# Populations (the small universe's tables, no spectra)
# --------------------------------------------------------------------------------------------

def test_small_sizes_and_overlap(small_universe):
    u = small_universe
    assert 45_000 <= len(u.lamost) <= 55_000
    n_overlap = len(u.overlap)
    assert 5_000 <= n_overlap <= 9_000
    g = u.galah.set_index("star").loc[u.overlap.index]
    removed = (g["snr_c1"] < 30) | (g["chi2_cannon"] > 4) | (g["flag_cannon"] != 0)
    assert 0.35 <= removed.mean() <= 0.65
    assert 0.08 <= g["galah_wrong"].mean() <= 0.16
    assert 1000 <= len(u.binaries) and len(u.members) >= 1000


def test_repeats_are_about_ten_percent(small_universe):
    lam = small_universe.lamost
    counts = lam.groupby("designation").size()
    assert 0.08 <= (counts > 1).mean() <= 0.12
    rep = lam[lam["designation"].isin(counts[counts > 1].index)]
    assert rep.groupby("designation")["obsid"].nunique().min() >= 2


def test_two_alpha_sequences_and_a_distinct_accreted_halo(small_universe):
    s = small_universe.stars
    alpha = chemistry.mean_alpha(s)
    mid = (s["fe_h"] > -0.6) & (s["fe_h"] < -0.2)
    gap = np.median(alpha[mid & (s["population"] == "thick")]) - np.median(
        alpha[mid & (s["population"] == "thin")])
    assert gap > 0.1
    lowz = (s["fe_h"] > -1.5) & (s["fe_h"] < -1.0)
    acc = lowz & (s["population"] == "halo_accreted")
    ins = lowz & (s["population"] == "halo_insitu")
    assert np.median(alpha[ins]) - np.median(alpha[acc]) > 0.1
    assert np.median(s.loc[acc, "eu_fe"]) > np.median(s.loc[ins, "eu_fe"])
    assert np.median(s.loc[acc, "al_fe"]) < np.median(s.loc[ins, "al_fe"]) - 0.15
    assert np.median(s.loc[acc, "mn_fe"]) < np.median(s.loc[ins, "mn_fe"])
    # kinematics: the accreted halo barely rotates, the thick disk lags the thin disk
    assert abs(np.median(s.loc[s["population"] == "halo_accreted", "vT"])) < 40
    assert np.median(s.loc[s["population"] == "thin", "vT"]) > np.median(
        s.loc[s["population"] == "thick", "vT"]) + 20


def test_gradients_have_the_right_sign(small_universe):
    s = small_universe.stars
    thin = (s["population"] == "thin") & (s["z"].abs() < 0.3) & s["R"].between(6, 12)
    slope = np.polyfit(s.loc[thin, "R"], s.loc[thin, "fe_h"], 1)[0]
    assert -0.09 < slope < -0.03
    disk = s["population"].isin(["thin", "thick"]) & s["R"].between(7, 9)
    vslope = np.polyfit(s.loc[disk, "z"].abs(), s.loc[disk, "fe_h"], 1)[0]
    assert vslope < -0.1
    young = (s["population"] == "thin") & (s["age"] < 2)
    old = (s["population"] == "thin") & (s["age"] > 7)
    assert np.median(s.loc[young, "ba_fe"]) - np.median(s.loc[old, "ba_fe"]) > 0.15
    fe = s["population"] == "thin"
    assert np.polyfit(s.loc[fe, "fe_h"], s.loc[fe, "mn_fe"], 1)[0] > 0.1


def test_binaries_and_cluster_share_chemistry(small_universe):
    s = small_universe.stars.set_index("source_id")
    b = small_universe.binaries
    labels = ["fe_h"] + [f"{x}_fe" for x in ELEMENTS]
    p, q = s.loc[b["source_id1"]], s.loc[b["source_id2"]]
    assert np.allclose(p[labels].to_numpy(), q[labels].to_numpy())
    assert np.allclose(p["age"].to_numpy(), q["age"].to_numpy())
    assert (np.abs(p["teff"].to_numpy() - q["teff"].to_numpy()) > 0).all()
    assert ((b["sep_AU"] > 20) & (b["sep_AU"] < 1e5)).all() and (b["pairdistance"] > 2 / 3600).all()
    both = (p["n_obs"].to_numpy() > 0) & (q["n_obs"].to_numpy() > 0)
    assert both.sum() >= 800
    assert (p["distance"] < surveys.BINARY_MAX_DISTANCE_KPC).all()
    m = small_universe.members.set_index("source_id")
    for spec in surveys.CLUSTERS:
        cl = s.loc[m.index[(m["proba"] >= 0.7) & (m["cluster"] == spec.name)]]
        cl = cl[cl["kind"] == "cluster"]
        assert np.ptp(cl[labels].to_numpy(), axis=0).max() == 0.0, spec.name
        assert cl["fe_h"].iloc[0] == pytest.approx(spec.fe_h)
        assert np.allclose(cl["age"], spec.age)
        assert np.median(cl["distance"]) == pytest.approx(spec.distance_pc / 1000, rel=0.05)
    # clusters differ in chemistry, and their [X/Fe] follow the thin disk at their [Fe/H]
    first = s[s["kind"] == "cluster"].groupby("cluster")[labels].first()
    assert first["mg_fe"].nunique() == len(surveys.CLUSTERS)
    expected_mg = np.clip(-0.17 * first["fe_h"], -0.05, 0.15) + 0.02
    assert (np.abs(first["mg_fe"] - expected_mg) < 0.15).all()
    seen = s[(s["kind"] == "cluster") & (s["n_obs"] > 0)]
    per = seen.groupby("cluster").agg(n=("teff", "size"), lo=("teff", "min"), hi=("teff", "max"))
    assert per.loc["NGC_2632", "n"] >= 150 and per["n"].sum() >= 600
    assert (per["lo"] < 4700).all() and (per.drop("Melotte_25")["hi"] > 6300).all()
    assert s.loc[(s["kind"] == "cluster") & (s["sobject_id"] >= 0), "cluster"].nunique() >= 1


def test_galah_dwarf_systematics_are_in_the_catalogue_only(small_universe):
    u = small_universe
    g = u.galah.set_index("star")
    truth = u.stars.loc[g.index]
    bias = surveys.galah_dwarf_systematics(truth["teff"], truth["logg"])
    for x in ELEMENTS:
        # reported minus the label without systematics is exactly the documented bias
        np.testing.assert_allclose(g[f"{x}_fe"] - g[f"model_{x}_fe"], bias[x], atol=1e-12)
    giants = truth["logg"].to_numpy() < 3.5
    assert all(np.all(bias[x][giants] == 0.0) for x in ELEMENTS)
    cool = (truth["logg"].to_numpy() > 4.2) & (truth["teff"].to_numpy() < 4500)
    solar = (truth["logg"].to_numpy() > 4.2) & (np.abs(truth["teff"].to_numpy() - 5750) < 100)
    assert np.all(np.abs(bias["sc"][solar]) < 0.01) and np.median(bias["sc"][cool]) > 0.1
    # the truth table and the LAMOST spectra keep the unbiased values: the noise is unbiased
    for x in ("sc", "ti", "ba"):
        d = g[f"model_{x}_fe"] - truth[f"{x}_fe"]
        ok = ~g["galah_wrong"].to_numpy()
        assert abs(np.mean(d[ok])) < 0.01
    # the injected bias of the training labels, anchored like the calibration
    lab = surveys.training_label_bias(np.array([4200.0, 5750.0]), np.array([4.6, 4.4]),
                                      ["alpha_fe", "s_fe", "sc_fe"])
    assert lab["alpha_fe"][0] > 0.1 and abs(lab["alpha_fe"][1]) < 1e-12
    assert lab["s_fe"][0] < -0.1


def test_surveys_have_their_footprints(small_universe):
    s = small_universe.stars
    lam = s[s["n_obs"] > 0]
    gal = s[s["sobject_id"] >= 0]
    assert (lam["dec"] > -10.5).all() and (gal["dec"] < 10.5).all()
    assert lam["phot_g_mean_mag"].between(9, 17).all()
    assert gal["vmag"].between(12, 14.5).all()
    assert np.median(gal["distance"]) < 2.0 and np.percentile(lam["distance"], 95) > 4
    giants = lam["logg"] < 3.5
    assert 0.2 < giants.mean() < 0.5
    assert ((lam["teff"] >= 3800) & (lam["teff"] <= 7000)).all()
    assert (s["population"] == "halo_accreted").sum() > 1000
