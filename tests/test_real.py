"""Tests of lamostcannon.real: label tables, the training cut, extrapolation flags, repeat pairs.

Unit tests use small synthetic tables; the ``real`` tests read the real LAMOST files (skipped on
a user's machine without them, failures in CI, see ``conftest.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lamostcannon import real


# --------------------------------------------------------------------------------------------
# Unit tests (no real files)
# --------------------------------------------------------------------------------------------


def test_read_label_table_aliases(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"OBSID": [1, 2], "FileName": ["a.fits", "b.fits"], "Teff": [5000.0, 6000.0],
                  "logg": [4.5, "bad"], "[Fe/H]": [0.1, -0.2], "snrg": [40, 20]}).to_csv(path,
                                                                                     index=False)
    t = real.read_label_table(path)
    assert list(t["filename"]) == ["a.fits", "b.fits"]
    assert t["obsid"].dtype == np.int64
    assert t["fe_h"].tolist() == [0.1, -0.2]
    assert np.isnan(t.loc[1, "logg"])  # unparsable -> NaN, not an exception


def test_read_label_table_names_missing_columns(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"filename": ["a"], "teff": [5000.0]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"lacks \['logg', 'fe_h'\]"):
        real.read_label_table(path)
    pd.DataFrame({"teff": [1.0], "logg": [1.0], "feh": [1.0]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="filename or obsid"):
        real.read_label_table(path)


def test_training_selection():
    t = pd.DataFrame({"teff": [5000, 7000, 6999, 5000, np.nan], "logg": [4, 4, 4, 4, 4],
                      "fe_h": [0, 0, 0, 0, 0], "snrg": [31, 50, 30, 29, 80]})
    sel = real.training_selection(t, snr_min=30, teff_max=7000)
    assert sel.tolist() == [True, False, False, False, False]


def test_real_sources_missing_folder_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv(real.ENV_SPECTRA, str(tmp_path / "nowhere"))
    with pytest.raises(real.RealDataMissing, match=real.ENV_SPECTRA) as err:
        real.real_sources()
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "spectra").mkdir()
    monkeypatch.setenv(real.ENV_SPECTRA, str(tmp_path / "spectra"))
    with pytest.raises(real.RealDataMissing, match="label table"):
        real.real_sources()


def test_real_sources_user_folder(monkeypatch, tmp_path):
    (tmp_path / "spectra").mkdir()
    labels = tmp_path / "mine.csv"
    labels.write_text("filename,teff,logg,feh\n")
    monkeypatch.setenv(real.ENV_SPECTRA, str(tmp_path / "spectra"))
    monkeypatch.setenv(real.ENV_LABELS, str(labels))
    monkeypatch.setenv(real.ENV_REPEATS, str(tmp_path / "no_repeats"))
    src = real.real_sources()
    assert src.spectra_dir == (tmp_path / "spectra").resolve()
    assert src.labels_path == labels.resolve()
    assert src.repeats_dir is None
    assert real.run_name(src) == "real_spectra"
    with pytest.raises(real.RealDataMissing, match=real.ENV_REPEATS):
        real.real_sources(require_repeats=True)


def test_store_path_for_differs_by_folder(tmp_path):
    a = real.store_path_for(tmp_path / "a", "real")
    b = real.store_path_for(tmp_path / "b", "real")
    assert a != b and a.name.startswith("real_") and a.suffix == ".zarr"


def test_read_repeat_groups_mixed_ids(tmp_path):
    (tmp_path / "x1.fits.gz").write_bytes(b"")
    (tmp_path / "groups.csv").write_text(
        "combined_obsid,combined_file,GroupID,GroupSize\n"
        "11,night/F1/x1.fits.gz,1.0,2\n12,night/F2/x2.fits.gz,1,2\n"
        "13,x3.fits.gz,4,1\n14,x4.fits.gz,,1\n")
    g = real.read_repeat_groups(tmp_path / "groups.csv")
    assert g["group"].tolist() == [1, 1, 4]
    assert g["filename"].tolist() == ["x1.fits.gz", "x2.fits.gz", "x3.fits.gz"]
    assert g["exists"].tolist() == [True, False, False]
    assert g["obsid"].tolist() == [11, 12, 13]


def test_repeat_pairs_known_answer():
    groups = pd.DataFrame({"group": [1, 1, 2, 2, 2, 3]})
    p = real.repeat_pairs(groups)
    assert list(map(tuple, p[["i", "j"]].to_numpy())) == [(0, 1), (2, 3), (2, 4), (3, 4)]
    p = real.repeat_pairs(groups, usable=[True, True, True, False, True, True])
    assert list(map(tuple, p[["i", "j"]].to_numpy())) == [(0, 1), (2, 4)]


def test_pair_spreads_recover_error_scale(rng):
    """Simulate visits with true errors 2x the quoted ones: z spread ~2, CV-normalised as set."""
    n_star, names = 4000, ["teff", "fe_h"]
    truth = rng.normal([5500, -0.3], [500, 0.3], size=(n_star, 2))
    quoted = np.array([20.0, 0.03])
    visits = truth[:, None, :] + rng.normal(0, 2 * quoted, size=(n_star, 2, 2))
    labels = visits.reshape(-1, 2)
    errors = np.broadcast_to(quoted, labels.shape)
    groups = pd.DataFrame({"group": np.repeat(np.arange(n_star), 2)})
    pairs = real.repeat_pairs(groups)
    cv = {"teff": 80.0, "fe_h": 0.12}  # = 2 x the true single-visit error
    d = real.pair_differences(labels, errors, pairs, names, cv_scatter=cv)
    s = real.pair_spreads(d, names)
    assert len(pairs) == n_star and (s["n"] == n_star).all()
    np.testing.assert_allclose(s["z_std"], 2.0, rtol=0.05)
    np.testing.assert_allclose(s["z_robust"], 2.0, rtol=0.07)
    np.testing.assert_allclose(s["zcv_std"], 0.5, rtol=0.05)
    np.testing.assert_allclose(s["single_visit"], 2 * quoted, rtol=0.07)
    np.testing.assert_allclose(d["delta_teff"], labels[0::2, 0] - labels[1::2, 0])


def test_pair_differences_checks_shapes():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        real.pair_differences(np.zeros((3, 2)), np.zeros((3, 3)), pd.DataFrame(
            {"group": [], "i": [], "j": []}), ["a", "b"])


def test_robust_std():
    assert real.robust_std([1.0, np.nan, 1.0, 1.0]) == 0.0
    assert np.isnan(real.robust_std([]))
    x = np.random.default_rng(1).normal(0, 3, 20000)
    assert abs(real.robust_std(x) - 3) < 0.1


def test_extrapolation_table():
    names = ["teff", "logg"]
    values = np.array([[5000, 4.0], [7500, 4.0], [5000, 6.0], [np.nan, 4.0], [6900, 4.0]])
    b = {"teff": (4000.0, 7200.0), "logg": (-np.inf, 5.0)}
    lr = np.array([[4200.0, 1.0], [7000.0, 4.8]])
    t = real.extrapolation_table(values, names, boundaries=b, label_range=lr)
    assert t["teff_extrap"].tolist() == [False, True, False, False, False]
    assert t["logg_extrap"].tolist() == [False, False, True, False, False]
    assert t["kde_extrap"].tolist() == [False, True, True, False, False]
    assert t["outside_training"].tolist() == [False, True, True, False, False]
    assert t["extrap"].tolist() == [False, True, True, False, False]
    only_range = real.extrapolation_table(pd.DataFrame(values, columns=names), names,
                                          label_range=lr)
    assert list(only_range.columns) == ["outside_training", "extrap"]
    with pytest.raises(ValueError, match="expected 2"):
        real.extrapolation_table(values[:, :1], names)


def test_flag_fractions():
    teff = np.array([7100, 7200, 7600, 9000, 9500])
    flags = pd.DataFrame({"extrap": [False, True, True, True, False]})
    f = real.flag_fractions(teff, flags, bins=(7000, 7500, 8000, np.inf))
    assert f.loc["7000-7500", "extrap"] == 0.5
    assert f.loc["7500-8000", "extrap"] == 1.0
    assert f.loc[">=8000", "n"] == 2
    assert f.loc["all", "extrap"] == pytest.approx(0.6)


# --------------------------------------------------------------------------------------------
# Real LAMOST files
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tmp_data(monkeypatch, tmp_path):
    """Stores and products in a temporary data root."""
    monkeypatch.setenv("LAMOSTCANNON_DATA", str(tmp_path / "data"))
    monkeypatch.delenv(real.ENV_SPECTRA, raising=False)
    monkeypatch.delenv(real.ENV_LABELS, raising=False)
    monkeypatch.delenv(real.ENV_REPEATS, raising=False)
    return tmp_path / "data"


@pytest.mark.real
def test_default_sources_are_the_shared_files(real_lamost, tmp_data):
    src = real.real_sources(require_repeats=True)
    assert src.spectra_dir == real_lamost / "dr10"
    assert src.labels_path.name == "catalog.csv"
    assert real.run_name(src) == "real_dr10"
    cat = real.read_label_table(src.labels_path)
    assert len(cat) == 1726
    assert int((cat["teff"] < real.TEFF_MAX).sum()) == 1566
    assert int((cat["teff"] >= real.TEFF_MAX).sum()) == 160
    # the training cut of notebook 09: about a thousand FGK stars with snrg > 30
    assert 1000 < int(real.training_selection(cat).sum()) < 1200


@pytest.mark.real
def test_build_sample_aligns_spectra_with_labels(real_lamost, tmp_data, tmp_path):
    src = real.real_sources()
    s = real.build_sample(src, limit=40, n_workers=1, store_path=tmp_path / "s.zarr")
    t = s.table
    assert len(t) == 40 and t["ok"].all()
    assert s.flux.shape == s.ivar.shape == (40, 3909)
    assert s.flux.dtype == np.float32 and np.isfinite(s.flux).all()
    assert ((s.ivar > 0).sum(axis=1) > 2000).all()
    # row k of the spectra is the file named in row k of the table
    from lamostcannon.spectra import preprocess, read_lamost

    for k in (0, 17, 39):
        f, i = preprocess(read_lamost(src.spectra_dir / t.loc[k, "filename"]))
        np.testing.assert_array_equal(s.flux[k], f)
        np.testing.assert_array_equal(s.ivar[k], i)
    assert (t["train"] == (real.training_selection(t) & t["ok"])).all()
    assert not (t["train"] & t["hot"]).any()
    lab, fl, iv = s.subset(t["train"].to_numpy())
    assert lab.shape == (int(t["train"].sum()), 3) and fl.shape[0] == lab.shape[0]
    # resuming the same store reads the same rows
    again = real.build_sample(src, limit=40, n_workers=1, store_path=tmp_path / "s.zarr")
    np.testing.assert_array_equal(again.flux, s.flux)


@pytest.mark.real
def test_build_sample_user_table_by_obsid_reports_missing(real_lamost, tmp_data, tmp_path,
                                                          monkeypatch):
    """A user's folder and a label table without filenames: matched by obsid."""
    import shutil

    cat = pd.read_csv(real_lamost / "dr10" / "catalog.csv").iloc[:6]
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in cat["filename"].iloc[:5]:
        shutil.copy(real_lamost / "dr10" / name, folder / name)
    table = cat[["obsid", "teff", "logg", "feh"]].rename(columns={"feh": "FEH"})
    table.to_csv(tmp_path / "mine.csv", index=False)
    monkeypatch.setenv(real.ENV_SPECTRA, str(folder))
    monkeypatch.setenv(real.ENV_LABELS, str(tmp_path / "mine.csv"))
    s = real.build_sample(n_workers=1)
    assert s.table["ok"].tolist() == [True] * 5 + [False]
    assert "obsid not found" in s.table.loc[5, "reason"]
    assert (s.ivar[5] == 0).all()
    assert s.table["snrg"].notna().iloc[:5].all()  # header S/N used without an snrg column


@pytest.mark.real
def test_load_repeats_reports_missing_files(real_lamost, tmp_data, tmp_path):
    groups, flux, ivar = real.load_repeats(store_path=tmp_path / "r.zarr", n_workers=1)
    assert len(groups) == 222 and flux.shape == (222, 3909)
    assert int(groups["ok"].sum()) == 220
    assert (groups.loc[~groups["ok"], "reason"] == "file not found").all()
    assert (groups["ok"] == groups["exists"]).all()
    pairs = real.repeat_pairs(groups, groups["ok"].to_numpy())
    assert len(pairs) > 140
    assert (groups["group"].to_numpy()[pairs["i"]] == groups["group"].to_numpy()[pairs["j"]]).all()


def test_read_label_table_reads_lasp_sentinels_as_missing(tmp_path):
    p = tmp_path / "lasp.csv"
    pd.DataFrame({"obsid": [1, 2], "teff": [5800.0, -9999.0], "logg": [4.4, -9999.0],
                  "feh": [-0.2, -9999.0]}).to_csv(p, index=False)
    t = real.read_label_table(p)
    assert np.isnan(t.loc[1, ["teff", "logg", "fe_h"]].to_numpy(float)).all()
    assert not real.training_selection(t)[1]


def test_pair_table_and_flag_evaluation():
    groups = pd.DataFrame({"group": [1, 1, 2, 2, 2]})
    labelled = pd.DataFrame({"teff": [5000.0, 5010.0, 6000.0, 6020.0, 5990.0],
                             "e_teff_formal": [10.0] * 5, "e_teff_random": [15.0] * 5,
                             "snr": [50.0, 60.0, 40.0, 30.0, 20.0]})
    pairs = real.pair_table(groups, labelled, ["teff"], usable=[True, True, True, True, False])
    assert pairs[["i", "j"]].to_numpy().tolist() == [[0, 1], [2, 3]]
    assert pairs["delta_teff"].tolist() == [-10.0, -20.0] and pairs["snr2"].tolist() == [60, 30]
    assert pairs["r1_teff"].tolist() == [15.0, 15.0]
    ref = pd.DataFrame({"teff": [5000.0, 5000.0, 7600.0, 5000.0, 5000.0, np.nan],
                        "logg": [4.0] * 6})
    lab = pd.DataFrame({"teff": [5050.0, 6000.0, 6900.0, 5100.0, 4950.0, 5000.0],
                        "logg": [4.1, 3.0, 4.0, 4.0, 3.9, 4.0],
                        "quality_flag": [0, 64, 2, 0, 256, 0]})
    ev = real.flag_evaluation(ref, lab, outside_kind=[False] * 5 + [True])
    # catastrophic: rows 1 (1000 K off), 2 (hot, 700 K off) and 5 (outside the kind)
    assert ev["n_catastrophic"] == 3 and ev["catch_rate"] == pytest.approx(2 / 3)
    assert ev["n_good"] == 3 and ev["false_flag_rate"] == pytest.approx(1 / 3)
    assert ev["n_unflagged"] == 3


def test_outside_kind():
    plate = pd.DataFrame({"class": ["STAR", "STAR", "GALAXY", "STAR", "STAR", "Unknown"],
                          "subclass": ["G2", "dM1", "Non", "A2", "K7", "Non"]})
    assert real.outside_kind(plate).tolist() == [False, True, True, True, False, True]
    dr10 = pd.DataFrame({"class": ["STAR"] * 3, "subclass": ["A7", "A1", "F5"],
                         "teff": [6900.0, 9000.0, 6400.0]})
    assert real.outside_kind(dr10).tolist() == [False, True, False]


def test_degrade_kinds(rng):
    from lamostcannon.spectra import N_PIXELS

    flux = np.ones((3, N_PIXELS), np.float32)
    ivar = np.full((3, N_PIXELS), 1e4, np.float32)
    f, i = real.degrade(flux, ivar, "noise", seed=1)
    assert np.allclose(i, 1e4 / 16) and 0.03 < np.std(f - 1) < 0.05
    f, _ = real.degrade(flux, ivar, "tilt")
    assert f[0, 0] == pytest.approx(0.85) and f[0, -1] == pytest.approx(1.15)
    f, _ = real.degrade(flux, ivar, "emission")
    assert f.max() > 1.3 and np.median(f) == pytest.approx(1.0)
    f, _ = real.degrade(flux * 0.9, ivar, "gap", seed=2)
    assert 200 < np.sum(f[0] == 1.0) < 600
    with pytest.raises(ValueError, match="kind"):
        real.degrade(flux, ivar, "nonsense")
