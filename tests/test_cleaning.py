"""Known-answer tests of the reference-set construction (lamostcannon.cleaning, paper section 2)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from lamostcannon import cleaning, labels
from lamostcannon.spectra import common_wavelength

ARCSEC = 1.0 / 3600.0

# ----------------------------------------------------------------------------------------------
# air / vacuum, windows
# ----------------------------------------------------------------------------------------------


def test_table2_has_every_element_and_ordered_windows():
    assert len(cleaning.GALAH_WINDOWS) == 21
    for el in labels.ELEMENTS:
        assert el in cleaning.GALAH_WINDOWS
    for el, ivs in cleaning.GALAH_WINDOWS.items():
        for lo, hi in ivs:
            assert 4700 < lo < hi < 7900, (el, lo, hi)
    assert cleaning.GALAH_WINDOWS["eu"] == [(5818.61, 5818.99), (6644.97, 6645.29)]
    assert len(cleaning.GALAH_WINDOWS["ti"]) == 21


def test_air_to_vacuum_known_value_and_round_trip():
    assert cleaning.air_to_vacuum(5000.0) == pytest.approx(5001.394, abs=2e-3)
    # H-alpha: 6562.80 A in air is 6564.61 A in vacuum
    assert cleaning.air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.01)
    x = np.linspace(3700, 9100, 101)
    np.testing.assert_allclose(cleaning.vacuum_to_air(cleaning.air_to_vacuum(x)), x, atol=1e-8)
    np.testing.assert_allclose(cleaning.air_to_vacuum(cleaning.vacuum_to_air(x)), x, atol=1e-8)


def test_window_mask_covers_the_containing_pixel_on_the_lamost_grid():
    wave = common_wavelength()
    lo, hi = cleaning.air_to_vacuum(np.array([5818.61, 5818.99]))
    edges = cleaning.pixel_edges(wave)
    containing = np.flatnonzero((edges[1:] > lo) & (edges[:-1] <= hi))
    bare = cleaning.window_mask(wave, [(5818.61, 5818.99)], min_halfwidth=0)
    assert set(np.flatnonzero(bare)) == set(containing) and 1 <= bare.sum() <= 2
    # default: at least one resolution element (lambda / R = 3.2 A at 5820 A) around the centre
    wide = cleaning.window_mask(wave, [(5818.61, 5818.99)])
    assert np.all(wide[bare])
    centre = 0.5 * (lo + hi)
    half = centre / (2 * cleaning.LAMOST_RESOLUTION)
    assert wave[wide].min() - 1.2 < centre - half and wave[wide].max() + 1.2 > centre + half
    assert 3 <= wide.sum() <= 5


def test_window_mask_elements_derived_labels_and_grid_limits():
    wave = common_wavelength()
    alpha = cleaning.window_mask(wave, "alpha_fe")
    union = np.zeros_like(alpha)
    for el in labels.ALPHA_ELEMENTS:
        union |= cleaning.window_mask(wave, f"{el}_fe")
    np.testing.assert_array_equal(alpha, union)
    assert not cleaning.window_mask(wave, [(9500.0, 9510.0)]).any()  # off the grid
    with pytest.raises(KeyError):
        cleaning.window_mask(wave, "fe")
    masks = cleaning.label_windows(wave, labels.DWARF_LABELS)
    assert set(masks) == {"o_fe", "eu_fe", "alpha_fe", "sc_fe", "s_fe"}


def test_label_elements():
    assert cleaning.label_elements(labels.DWARF_LABELS) == ["o", "eu", "mg", "si", "ca", "ti",
                                                             "sc", "ba", "y"]
    assert cleaning.label_elements(labels.GIANT_LABELS) == ["o", "eu", "mg", "al", "mn", "ba"]


# ----------------------------------------------------------------------------------------------
# windowed chi2, percentile rule, error-weighted mean
# ----------------------------------------------------------------------------------------------


def _window_grid(step=0.02, pad=0.2):
    pts = np.concatenate([np.arange(lo - pad, hi + pad, step)
                          for ivs in cleaning.GALAH_WINDOWS.values() for lo, hi in ivs])
    return np.unique(np.round(pts / step)) * step


def test_windowed_chi2_known_answer():
    wave = _window_grid()
    model = np.ones((3, wave.size))
    sigma = np.full_like(model, 0.01)
    flux = model.copy()
    eu = cleaning.window_mask(wave, "eu", min_halfwidth=0, grid_in_air=True)
    flux[1, eu] += 0.02  # (0.02 / 0.01)^2 = 4 per pixel
    flux[2, eu] += 0.03
    flux[2, np.flatnonzero(eu)[0]] = np.nan  # a masked pixel does not count
    chi2 = cleaning.windowed_chi2(wave, flux, sigma, model, ["eu", "mn"])
    np.testing.assert_allclose(chi2["eu"], [0.0, 4.0, 9.0])
    np.testing.assert_allclose(chi2["mn"], 0.0)
    total = cleaning.windowed_chi2(wave, flux, sigma, model, ["eu"], reduced=False)["eu"]
    assert total[1] == pytest.approx(4.0 * eu.sum())
    assert total[2] == pytest.approx(9.0 * (eu.sum() - 1))


def test_percentile_rule():
    chi2 = {"o": np.array([1.0] * 9 + [50.0]), "al": np.array([1.0] * 8 + [99.0, 1.0])}
    keep, thr = cleaning.percentile_rule(chi2, q=85)
    np.testing.assert_array_equal(np.flatnonzero(~keep), [8, 9])
    assert thr["o"] == pytest.approx(1.0)
    # when only stars 0-7 are judged on Al, star 8's bad Al no longer counts
    use = {"o": np.ones(10, bool), "al": np.arange(10) < 8}
    keep, _ = cleaning.percentile_rule(chi2, use, q=85)
    np.testing.assert_array_equal(np.flatnonzero(~keep), [9])
    # a star without a finite chi2 for an element it is judged on cannot be verified
    chi2["o"][0] = np.nan
    keep, _ = cleaning.percentile_rule(chi2, use, q=85)
    assert not keep[0]
    # 100 distinct values: the 85th percentile removes 15 of them
    keep, _ = cleaning.percentile_rule({"o": np.arange(100.0)}, q=85)
    assert (~keep).sum() == 15


def test_error_weighted_mean_known_answer():
    values = np.array([[0.1, 0.3, np.nan], [0.2, 0.2, 0.2], [np.nan, np.nan, np.nan]])
    errors = np.array([[0.1, 0.2, 0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    mean, err = cleaning.error_weighted_mean(values, errors)
    # weights 100 and 25: (10 + 7.5) / 125 = 0.14; error 1/sqrt(125)
    assert mean[0] == pytest.approx(0.14)
    assert err[0] == pytest.approx(1 / np.sqrt(125))
    assert mean[1] == pytest.approx(0.2) and err[1] == pytest.approx(0.1 / np.sqrt(3))
    assert np.isnan(mean[2]) and np.isnan(err[2])


def test_add_derived_labels_renames_galah_alpha():
    t = Table({f"{el}_fe": [0.1] for el in labels.ELEMENTS})
    for el in labels.ELEMENTS:
        t[f"e_{el}_fe"] = [0.1]
        t[f"flag_{el}_fe"] = [0]
    t["mg_fe"] = [0.5]
    t["flag_mg_fe"] = [1]
    t["alpha_fe"] = [9.0]
    cleaning.add_derived_labels(t)
    assert t["alpha_fe_galah"][0] == 9.0
    assert t["alpha_fe"][0] == pytest.approx(0.2)  # mean of 0.5, 0.1, 0.1, 0.1
    assert t["s_fe"][0] == pytest.approx(0.1)
    cleaning.add_derived_labels(t, drop_flagged_abundances=True)  # Mg left out
    assert t["alpha_fe"][0] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# cross-match and the full chain on a synthetic raw folder
# ----------------------------------------------------------------------------------------------


def test_crossmatch_radius_and_best_repeat():
    galah = Table({"sobject_id": [1, 2, 3], "ra": [10.0, 20.0, 30.0], "dec": [5.0, 5.0, 5.0]})
    lamost = Table({
        "obsid": [11, 12, 21, 31],
        "ra": [10.0, 10.0, 20.0, 30.0],
        "dec": [5.0 + 0.9 * ARCSEC, 5.0 + 0.2 * ARCSEC, 5.0 + 1.1 * ARCSEC, 5.0 - 0.5 * ARCSEC],
        "snrz": [80.0, 40.0, 99.0, 50.0],
        "teff": [5000.0, 5000.0, 5000.0, 5000.0],
    })
    m = cleaning.crossmatch(galah, lamost, radius_arcsec=1.0)
    assert list(m["sobject_id"]) == [1, 3]  # 1.1 arcsec is no match
    assert list(m["obsid"]) == [11, 31]  # the higher-snrz repeat wins over the nearer one
    assert list(m["n_lamost_obs"]) == [2, 1]
    np.testing.assert_allclose(m["sep_arcsec"], [0.9, 0.5], atol=1e-3)
    assert "lamost_teff" in m.colnames and "lamost_snrz" in m.colnames


def test_is_giant_on_the_eq1_boundary():
    teff = np.array([5000, 5000, 5199, 5200, 6000, 6000, 6000, np.nan])
    logg = np.array([4.17, 4.18, 4.179, 4.17, 3.69, 3.70, 3.71, 2.0])
    np.testing.assert_array_equal(labels.is_giant(teff, logg),
                                  [True, False, True, True, True, False, False, False])


N_STARS = 20
GIANTS = (10, 11, 12, 13)


def _write_raw(raw):
    """A raw folder whose cuts remove known numbers of stars (see the expected report below)."""
    rng = np.random.default_rng(1)
    n = N_STARS
    ra = 150.0 + 0.02 * np.arange(n)
    dec = np.full(n, -10.0)
    galah = Table({"sobject_id": 170000 + np.arange(n), "star_id": [f"s{i}" for i in range(n)],
                   "ra": ra, "dec": dec})
    galah["teff"] = np.where(np.isin(np.arange(n), GIANTS), 4700.0, 5800.0)
    galah["logg"] = np.where(np.isin(np.arange(n), GIANTS), 2.5, 4.3)
    galah["vmic"] = 1.2
    galah["fe_h"] = rng.normal(0, 0.2, n)
    for name in ("teff", "logg", "vmic", "fe_h"):
        galah[f"e_{name}"] = 0.1
    galah["flag_fe_h"] = 0
    galah["alpha_fe"] = 0.05
    for el in labels.ELEMENTS:
        galah[f"{el}_fe"] = rng.normal(0, 0.1, n)
        galah[f"e_{el}_fe"] = 0.05
        galah[f"flag_{el}_fe"] = 0
    galah["flag_cannon"] = 0
    galah["chi2_cannon"] = 1.0
    galah["snr_c1"] = 60.0
    galah["snr_c1"][2] = 25.0          # step galah_snr_c1
    galah["chi2_cannon"][3] = 5.0      # step chi2_cannon
    galah["flag_cannon"][4] = 1        # step flag_cannon
    galah["o_fe"][6] = np.nan          # step labels_missing (o_fe used by both models)
    galah["mg_fe"][7] = np.nan         # dwarf: alpha_fe from Si, Ca, Ti -> kept
    galah["al_fe"][8] = np.nan         # dwarf: Al not a dwarf label -> kept
    galah["flag_o_fe"][0] = 1          # flagged but kept (paper section 2.1)

    matched = [i for i in range(n) if i not in (18, 19)]
    rows = []
    for i in matched:
        rows.append((i, 0.5, 80.0))
    rows.append((0, 0.3, 40.0))        # a repeat of star 0 with lower snrz
    rows.append((18, 1.5, 80.0))       # step crossmatch: too far
    lam = Table({"obsid": np.arange(len(rows)) + 1000,
                 "ra": [ra[i] for i, _, _ in rows],
                 "dec": [dec[i] + s * ARCSEC for _, s, _ in rows],
                 "snrz": [z for _, _, z in rows]})
    lam["snrz"][lam["obsid"] == 1000 + matched.index(1)] = 20.0  # step lamost_snrz
    giant_rows = np.isin([i for i, _, _ in rows], GIANTS)
    lam["teff"] = np.where(giant_rows, 4700.0, 5800.0)
    lam["logg"] = np.where(giant_rows, 2.6, 4.2)
    lam["teff"][matched.index(5)] = -9999.0  # step lamost_params
    lam["z"] = 1e-4
    lam["filename"] = [f"spec-55000-plan_sp01-{k:03d}.fits.gz" for k in range(len(rows))]
    (raw / "galah").mkdir(parents=True)
    (raw / "lamost").mkdir(parents=True)
    galah.write(raw / "galah" / "catalog.fits")
    lam.write(raw / "lamost" / "catalog.fits")

    # window spectra: star 9 is missing; chi2 = 1 everywhere except star 10 (giant) in Mn,
    # star 15 (dwarf) in Eu and star 14 (dwarf) in Al, which dwarfs are not judged on
    wave = _window_grid()
    in_file = [i for i in range(n) if i != 9]
    model = np.ones((len(in_file), wave.size), np.float32)
    sigma = np.full_like(model, 0.01)
    flux = model + 0.01  # reduced chi2 = 1
    for star, el in ((10, "mn"), (15, "eu"), (14, "al")):
        m = cleaning.window_mask(wave, el, min_halfwidth=0, grid_in_air=True)
        flux[in_file.index(star), m] = 1.1  # chi2 = 100
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(wave, name="WAVE"), fits.ImageHDU(flux, name="FLUX"),
            fits.ImageHDU(sigma, name="SIGMA"), fits.ImageHDU(model, name="MODEL"),
            fits.table_to_hdu(Table({"sobject_id": galah["sobject_id"][in_file]}))]
    hdus[-1].name = "OBJECTS"
    fits.HDUList(hdus).writeto(raw / "galah" / "window_spectra.fits")


EXPECTED = [("galah_catalog", 0, 20), ("crossmatch", 2, 18), ("lamost_snrz", 1, 17),
            ("galah_snr_c1", 1, 16), ("chi2_cannon", 1, 15), ("flag_cannon", 1, 14),
            ("lamost_params", 1, 13), ("labels_missing", 1, 12), ("window_spectrum", 1, 11),
            ("window_chi2", 2, 9), ("dwarfs", 0, 6), ("giants", 0, 3)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    _write_raw(raw)
    return cleaning.build_reference_set(raw)


def test_build_reference_set_counts_per_cut(reference):
    table, report = reference
    got = list(zip(report["step"], report["removed"], report["remaining"]))
    assert got == EXPECTED
    sid = sorted(int(s) - 170000 for s in table["sobject_id"])
    assert sid == [0, 7, 8, 11, 12, 13, 14, 16, 17]
    assert sorted(int(s) - 170000 for s in table["sobject_id"][table["giant"]]) == [11, 12, 13]
    assert report.loc[report.step == "window_chi2", "fraction_removed"].item() == pytest.approx(2 / 11)


def test_reference_set_columns_and_provenance(reference):
    table, _ = reference
    for name in labels.DWARF_LABELS + labels.GIANT_LABELS:
        assert name in table.colnames
    assert np.isfinite(table["alpha_fe"]).all() and np.isfinite(table["s_fe"]).all()
    assert "alpha_fe_galah" in table.colnames
    row0 = table[table["sobject_id"] == 170000][0]
    assert row0["obsid"] == 1000  # the snrz-80 observation, not the snrz-40 repeat
    assert str(table["alpha_fe"].unit) == "dex" and str(table["teff"].unit) == "K"
    assert table.meta["lamostcannon_version"]
    assert len(table.meta["sha256_galah_catalog"]) == 64
    assert table.meta["chi2w_p85_mn"] > 1


def test_reference_set_write_read_round_trip(reference, tmp_path):
    table, _ = reference
    path = cleaning.write_reference_set(table, tmp_path / "reference_set.fits")
    back = cleaning.read_reference_set(path)
    assert back.colnames == table.colnames and len(back) == len(table)
    np.testing.assert_allclose(back["alpha_fe"], table["alpha_fe"])
    assert str(back["alpha_fe"].unit) == "dex" and str(back["teff"].unit) == "K"
    assert back["alpha_fe"].description == table["alpha_fe"].description
    assert back.meta["sha256_galah_catalog"] == table.meta["sha256_galah_catalog"]
    assert back["giant"].dtype == bool and list(back["filename"]) == list(table["filename"])
    assert back["sobject_id"].dtype.byteorder in "=|<" and back["fe_h"].dtype.isnative
    back.to_pandas().to_parquet(tmp_path / "x.parquet")  # arrow needs native byte order


def test_with_true_labels_takes_the_truth_and_recomputes_the_means():
    from astropy.table import Table

    ref = Table({"sobject_id": [11, 12]})
    truth = Table({"sobject_id": [12, 11, 13]})
    for name in labels.STELLAR + tuple(f"{x}_fe" for x in labels.ELEMENTS):
        ref[name] = [9.0, 9.0]
        truth[name] = [2.0, 1.0, 7.0]
        if name.endswith("_fe"):
            ref[f"e_{name}"] = [0.1, 0.1]
    truth["mg_fe"] = [0.4, 0.0, 0.0]
    out = cleaning.with_true_labels(ref, truth)
    assert list(out["teff"]) == [1.0, 2.0] and list(ref["teff"]) == [9.0, 9.0]
    # equal errors: alpha is the plain mean of Mg, Si, Ca, Ti
    assert out["alpha_fe"][1] == pytest.approx((0.4 + 2.0 * 3) / 4)
    with pytest.raises(KeyError, match="no row in the truth table"):
        cleaning.with_true_labels(Table({"sobject_id": [99]}), truth)
