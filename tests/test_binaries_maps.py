"""Tests of lamostcannon.binaries, lamostcannon.maps and plotting.science (synthetic truth)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from lamostcannon import binaries, maps  # noqa: E402

ELEMENTS = ["o_fe", "mg_fe", "ca_fe", "ba_fe"]
SIGMA = {"o_fe": 0.10, "mg_fe": 0.05, "ca_fe": 0.06, "ba_fe": 0.12}


# ----------------------------------------------------------------------------- eq. 6
def test_chemical_distance_known_answer():
    delta = np.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [np.nan, 0.1, 0.1]])
    sigma = np.array([0.1, 0.1, 0.15])
    d = binaries.chemical_distance(delta, sigma)
    np.testing.assert_allclose(d[:2], [3.0, 0.0])  # sqrt(1 + 4 + 4)
    assert np.isnan(d[2])
    assert binaries.chemical_distance(delta[0], sigma, pair_scaling=True) == pytest.approx(3 / np.sqrt(2))
    with pytest.raises(ValueError, match="elements"):
        binaries.chemical_distance(delta, sigma[:2])


def test_pair_distance_uses_named_sigmas():
    pairs = pd.DataFrame({"o_fe_1": [0.2], "o_fe_2": [0.0], "mg_fe_1": [0.0], "mg_fe_2": [0.1]})
    d = binaries.pair_distance(pairs, ["o_fe", "mg_fe"], {"o_fe": 0.1, "mg_fe": 0.05})
    np.testing.assert_allclose(d, [np.sqrt(8.0)])
    with pytest.raises(KeyError, match="ca_fe"):
        binaries.pair_distance(pairs, ["ca_fe"], {"o_fe": 0.1})


# ----------------------------------------------------------------------------- selection
def _catalog():
    return pd.DataFrame({
        "source_id": [1, 2, 3, 4, 5, 6, 7, 8],
        "teff": [5500, 5600, 5000, 5100, 5800, 6200, 5300, np.nan],
        "logg": [4.5, 4.4, 2.5, 4.6, 4.3, 4.2, 4.5, 4.5],
        "giantmodel": [False, False, True, False, False, False, False, False],
        "fe_h": [0.0, 0.05, -0.3, -0.2, 0.1, 0.2, -0.1, 0.0],
    })


def test_binary_pairs_selection():
    bins = pd.DataFrame({"source_id1": [1, 3, 5, 7, 99, 2], "source_id2": [2, 4, 6, 8, 1, 7],
                         "sep_AU": [100.0, 200, 300, 400, 500, 600]})
    pairs = binaries.binary_pairs(_catalog(), bins)
    # (1,2) ok; (3,4) has a giant; (5,6) dteff = 400; (7,8) no teff; 99 missing; (2,7) dteff 300
    assert list(pairs["sep_AU"]) == [100.0]
    assert pairs.loc[0, "delta_teff"] == pytest.approx(100.0)
    assert pairs.loc[0, "delta_fe_h"] == pytest.approx(0.05)
    loose = binaries.binary_pairs(_catalog(), bins, max_delta_teff=None, dwarfs_only=False)
    assert sorted(loose["sep_AU"]) == [100.0, 200.0, 300.0, 600.0]


def _field(rng, n=4000):
    return pd.DataFrame({"source_id": np.arange(1000, 1000 + n),
                         "teff": rng.uniform(4500, 6500, n), "logg": np.full(n, 4.4),
                         "fe_h": rng.normal(-0.2, 0.3, n)})


def test_field_pairs_match_the_binaries_delta_feh(rng):
    field = _field(rng)
    target = np.abs(rng.normal(0.0, 0.06, 300))  # binaries: much closer in [Fe/H] than random pairs
    pairs = binaries.field_pairs(field, target, 1500, seed=3, batch_size=50_000)
    assert len(pairs) == 1500
    assert (pairs["delta_teff"] < 250).all()
    assert (pairs["index_1"] != pairs["index_2"]).all()
    p_matched = stats.ks_2samp(pairs["delta_fe_h"], target).pvalue
    assert p_matched > 0.05
    # without the rejection step the field pairs are far from the target: the test has power
    i, j = rng.integers(len(field), size=(2, 1500))
    unmatched = np.abs(field["fe_h"].to_numpy()[i] - field["fe_h"].to_numpy()[j])
    assert stats.ks_2samp(unmatched, target).pvalue < 1e-10
    again = binaries.field_pairs(field, target, 1500, seed=3, batch_size=50_000)
    pd.testing.assert_frame_equal(pairs, again)
    other = binaries.field_pairs(field, target, 1500, seed=4, batch_size=50_000)
    assert not np.array_equal(pairs["index_1"], other["index_1"])


def test_field_pairs_exclude_ids(rng):
    field = _field(rng, 300)
    excluded = field["source_id"].to_numpy()[:150]
    pairs = binaries.field_pairs(field, [0.01, 0.05, 0.1], 50, seed=0, exclude_ids=excluded,
                                 batch_size=5000)
    assert not set(pairs["source_id_1"]).intersection(excluded)
    assert not set(pairs["source_id_2"]).intersection(excluded)


def test_kde_peak_and_separation_growth(rng):
    assert binaries.kde_peak(rng.normal(2.0, 0.3, 3000)) == pytest.approx(2.0, abs=0.1)
    # identical values (binaries with identical abundances: distance 0) have that value as mode,
    # not scipy's singular-covariance error; too few finite values give NaN
    assert binaries.kde_peak(np.zeros(50)) == 0.0
    assert binaries.kde_peak([1.5, 1.5, np.nan]) == 1.5
    assert np.isnan(binaries.kde_peak([np.nan, 3.0]))
    n = 400
    # binaries: same true chemistry; field pairs: true chemistry differs by tau = 2 sigma
    bin_pairs, field_pairs = {}, {}
    for e in ELEMENTS:
        s = SIGMA[e]
        truth = rng.normal(0, 2 * s, n)
        bin_pairs[f"{e}_1"], bin_pairs[f"{e}_2"] = truth + rng.normal(0, s, n), truth + rng.normal(0, s, n)
        field_pairs[f"{e}_1"] = rng.normal(0, 2 * s, n) + rng.normal(0, s, n)
        field_pairs[f"{e}_2"] = rng.normal(0, 2 * s, n) + rng.normal(0, s, n)
    growth = binaries.separation_growth(pd.DataFrame(bin_pairs), pd.DataFrame(field_pairs),
                                        ELEMENTS, SIGMA)
    assert list(growth["added"]) == ELEMENTS
    assert (growth["ratio"] > 1.5).all()                       # expected sqrt(1 + 4) = 2.2
    assert np.all(np.diff(growth["median_field"] - growth["median_binary"]) > 0)
    assert (growth["peak_binary"] < growth["peak_field"]).all()


def _population(rng, n=6000):
    """Field dwarfs with S/N, distance and chemistry; noise grows as S/N falls."""
    snr = 10 ** rng.uniform(1.3, 3.0, n)
    df = pd.DataFrame({"source_id": np.arange(1, n + 1), "teff": rng.uniform(4300, 6500, n),
                       "logg": rng.uniform(4.1, 4.7, n), "giantmodel": np.zeros(n, bool),
                       "fe_h": rng.normal(-0.1, 0.25, n), "snr_z": snr,
                       "r_est": rng.uniform(50, 2000, n)})
    for e in ELEMENTS:
        df[e] = rng.normal(0.0, 2 * SIGMA[e], n) + rng.normal(0.0, SIGMA[e] * 30 / snr)
    return df


def _with_binaries(rng, df, n_pairs=300):
    """Add n_pairs binaries: nearby, bright pairs that share one chemistry."""
    n0 = len(df)
    rows = []
    for k in range(n_pairs):
        feh = rng.normal(-0.1, 0.25)
        chem = {e: rng.normal(0.0, 2 * SIGMA[e]) for e in ELEMENTS}
        d = rng.uniform(50, 300)
        for j in range(2):
            snr = 10 ** rng.uniform(2.0, 3.0)
            row = {"source_id": n0 + 2 * k + j + 1, "teff": rng.uniform(4300, 6500),
                   "logg": 4.5, "giantmodel": False, "fe_h": feh + rng.normal(0, 0.03),
                   "snr_z": snr, "r_est": d}
            row.update({e: chem[e] + rng.normal(0.0, SIGMA[e] * 30 / snr) for e in ELEMENTS})
            rows.append(row)
    full = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
    ids = np.arange(n0 + 1, n0 + 2 * n_pairs + 1)
    wide = pd.DataFrame({"source_id1": ids[0::2], "source_id2": ids[1::2]})
    return full, wide


def test_pair_distance_with_each_pairs_own_errors():
    pairs = pd.DataFrame({"o_fe_1": [0.3, 0.1], "o_fe_2": [0.0, 0.1], "e_o_fe_1": [0.3, 0.1],
                          "e_o_fe_2": [0.4, np.nan]})
    d = binaries.pair_distance(pairs, ["o_fe"], [0.1], errors=["e_o_fe"])
    assert d[0] == pytest.approx(0.3 / 0.5)
    assert np.isnan(d[1])  # no error, no distance
    assert binaries.pair_distance(pairs, ["o_fe"], [0.1])[0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="error columns"):
        binaries.pair_distance(pairs, ["o_fe"], [0.1], errors=[])


def test_field_pairs_match_snr_distance_and_delta_teff(rng):
    cat, wide = _with_binaries(rng, _population(rng))
    pairs = binaries.binary_pairs(cat, wide, max_delta_teff=None)
    field = cat[~cat["source_id"].isin(np.r_[wide["source_id1"], wide["source_id2"]])]
    matched = binaries.field_pairs(field, pairs, 3000, seed=1, max_delta_teff=None,
                                   match_star=("snr_z", "r_est"), match_delta_teff=True,
                                   batch_size=50_000)
    assert len(matched) == 3000
    stars_b = np.r_[pairs["snr_z_1"], pairs["snr_z_2"]]
    stars_f = np.r_[matched["snr_z_1"], matched["snr_z_2"]]
    assert stats.ks_2samp(np.log10(stars_b), np.log10(stars_f)).statistic < 0.08
    assert np.r_[matched["r_est_1"], matched["r_est_2"]].max() <= pairs["r_est_1"].max() + 1e-9
    assert stats.ks_2samp(pairs["delta_teff"], matched["delta_teff"]).statistic < 0.1
    assert stats.ks_2samp(pairs["delta_fe_h"], matched["delta_fe_h"]).pvalue > 0.01
    # unmatched field pairs differ in S/N: the matching has power
    plain = binaries.field_pairs(field, pairs["delta_fe_h"], 3000, seed=1, max_delta_teff=None,
                                 batch_size=50_000)
    assert stats.ks_2samp(np.log10(stars_b),
                          np.log10(np.r_[plain["snr_z_1"], plain["snr_z_2"]])).statistic > 0.3
    with pytest.raises(ValueError, match="pair table"):
        binaries.field_pairs(field, pairs["delta_fe_h"], 10, match_star=("snr_z",))
    with pytest.raises(KeyError, match="parallax"):
        binaries.field_pairs(field, pairs, 10, match_star=("parallax",))


def test_separation_known_answers(rng):
    same = binaries.separation(rng.normal(1, 0.3, 400), rng.normal(1, 0.3, 4000))
    assert abs(same.auc - 0.5) < 3 * same.auc_err and same.auc_err < 0.03
    apart = binaries.separation(rng.normal(1, 0.1, 100), rng.normal(3, 0.1, 1000))
    assert apart.auc > 0.999 and apart.ratio == pytest.approx(3.0, rel=0.05)
    assert apart.mw_pvalue < 1e-10
    # AUC = P(binary distance < field distance), checked by brute force
    b, f = rng.gamma(2, 0.5, 50), rng.gamma(3, 0.5, 60)
    brute = np.mean(b[:, None] < f[None, :])
    assert binaries.separation(b, f).auc == pytest.approx(brute)
    with pytest.raises(ValueError, match=">= 2"):
        binaries.separation([1.0], [1.0, 2.0])


def test_null_control_separates_nothing_and_the_real_test_does(rng):
    cat, wide = _with_binaries(rng, _population(rng))
    real = binaries.compare_with_field(cat, wide, ELEMENTS, SIGMA, max_delta_teff=None, seed=2)
    assert real["separation"].auc > 0.8
    shuffled = binaries.shuffle_within_bins(cat, ELEMENTS, seed=3)
    null = binaries.compare_with_field(shuffled, wide, ELEMENTS, SIGMA, max_delta_teff=None, seed=2)
    sep = null["separation"]
    assert abs(sep.auc - 0.5) < 3 * sep.auc_err + 0.02, sep
    assert real["separation"].auc - sep.auc > 5 * real["separation"].auc_err


def test_shuffle_within_bins_keeps_bins_and_values(rng):
    df = _population(rng, 3000)
    out = binaries.shuffle_within_bins(df, ELEMENTS, seed=0)
    for c in ("teff", "logg", "fe_h", "source_id"):
        assert np.array_equal(out[c], df[c])
    assert not np.array_equal(out["o_fe"], df["o_fe"])
    def key(t):
        return [np.floor(t[c] / w) for c, w in (("teff", 250), ("logg", 0.25), ("fe_h", 0.1))]

    for (_, a), (_, b) in zip(df.groupby(key(df)), out.groupby(key(out))):
        np.testing.assert_allclose(np.sort(a["o_fe"]), np.sort(b["o_fe"]))
    # vectors move together: each shuffled row is some original star's abundances
    orig = {tuple(r) for r in df[ELEMENTS].to_numpy().round(12)}
    assert all(tuple(r) in orig for r in out[ELEMENTS].to_numpy().round(12))
    again = binaries.shuffle_within_bins(df, ELEMENTS, seed=0)
    pd.testing.assert_frame_equal(out, again)


def test_add_astrometry_joins_gaia_and_distances():
    cat = pd.DataFrame({"source_id": [1, 2, 3]})
    gaia = pd.DataFrame({"source_id": [2, 1], "parallax": [5.0, 2.0], "parallax_error": [0.1, 0.5]})
    dist = pd.DataFrame({"source_id": [1], "r_est": [480.0]})
    out = binaries.add_astrometry(cat, gaia, dist)
    np.testing.assert_allclose(out["parallax"], [2.0, 5.0, np.nan])
    np.testing.assert_allclose(out["parallax_over_error"], [4.0, 50.0, np.nan])
    np.testing.assert_allclose(out["r_est"], [480.0, np.nan, np.nan])


# ----------------------------------------------------------------------------- clusters
def test_teff_trend_known_answer(rng):
    teff = rng.uniform(4500, 6500, 200)
    a = 0.1 + 5e-5 * (teff - 5500) + rng.normal(0, 0.02, teff.size)
    tr = binaries.teff_trend(np.append(teff, np.nan), np.append(a, 0.0))
    assert tr.n == 200
    assert tr.slope_per_1000K == pytest.approx(0.05, abs=4 * tr.slope_err * 1000)
    assert tr.residual_dispersion == pytest.approx(0.02, rel=0.15)
    assert tr.dispersion == pytest.approx(np.std(a, ddof=1))
    assert tr.predict(5500) == pytest.approx(0.1, abs=0.01)


def test_cluster_members():
    members = pd.DataFrame({"source_id": [1, 2, 4, 5], "cluster": ["NGC_2632", "NGC_2632 ",
                                                                   "Melotte_22", "NGC_2632"],
                            "proba": [0.9, 0.7, 1.0, 0.3]})
    out = binaries.cluster_members(_catalog(), members)
    assert sorted(out["source_id"]) == [1, 2]


# ----------------------------------------------------------------------------- maps
def _disk(rng, n=60_000):
    R = rng.uniform(7.5, 15.0, n)
    z = rng.uniform(-4.0, 4.0, n)
    fe_h = 0.3 - 0.06 * (R - 8.0) - 0.2 * np.abs(z) + rng.normal(0, 0.1, n)
    phi = rng.uniform(-0.5, 0.5, n)
    return pd.DataFrame({"R": R, "z": z, "fe_h": fe_h, "X": R * np.cos(phi), "Y": R * np.sin(phi),
                         "Jz": rng.uniform(0, 60, n), "logg": rng.uniform(1, 4.5, n),
                         "vphi": rng.normal(220, 30, n), "teff": rng.uniform(4500, 5300, n),
                         "JR": rng.exponential(50, n), "ba_fe": rng.normal(0, 0.2, n),
                         "eu_fe": rng.normal(0.1, 0.2, n)})


def test_rz_maps_recover_known_gradient(rng):
    df = _disk(rng)
    df.loc[:99, "fe_h"] = np.nan
    m = maps.rz_maps(df, ["fe_h"], step=(0.5, 0.5), min_count=20)
    assert m.mean["fe_h"].shape == (15, 16)
    Rc, zc = np.meshgrid(m.x_centers, m.y_centers, indexing="ij")
    truth = 0.3 - 0.06 * (Rc - 8.0) - 0.2 * np.abs(zc)
    assert np.nanmax(np.abs(m.mean["fe_h"] - truth)) < 0.05
    assert m.count["fe_h"].sum() == len(df) - 100
    sparse = maps.rz_maps(df.iloc[:1200], ["fe_h"], step=(0.5, 0.5), min_count=20)
    assert np.isnan(sparse.mean["fe_h"]).all()  # ~5 stars per bin < 20
    g = maps.radial_gradient(df, "fe_h")
    assert g.slope == pytest.approx(-0.06, abs=3 * g.slope_err + 0.005)
    gz = maps.vertical_gradient(df, "fe_h", R_range=(7.5, 15.0))
    assert gz.slope == pytest.approx(-0.2, abs=3 * gz.slope_err + 0.01)
    assert len(m.to_frame()) == 15 * 16


def test_gradient_table_recovers_the_truth(rng):
    df = _disk(rng)
    truth = df.assign(fe_h=0.3 - 0.06 * (df["R"] - 8.0) - 0.2 * np.abs(df["z"]))  # noiseless
    df["o_fe"] = 0.05 + 0.1 * np.abs(df["z"]) + rng.normal(0, 0.05, len(df))
    truth["o_fe"] = 0.05 + 0.1 * np.abs(df["z"])
    tab = maps.gradient_table(df, ["fe_h", "o_fe"], truth=truth, vertical_kw={"R_range": (7.5, 15.0)})
    assert list(tab.index) == ["fe_h", "o_fe"]
    assert tab.loc["fe_h", "dR"] == pytest.approx(-0.06, abs=3 * tab.loc["fe_h", "dR_err"] + 0.005)
    assert tab.loc["fe_h", "dz"] == pytest.approx(-0.2, abs=3 * tab.loc["fe_h", "dz_err"] + 0.01)
    assert tab.loc["o_fe", "dz"] == pytest.approx(0.1, abs=3 * tab.loc["o_fe", "dz_err"] + 0.01)
    assert tab.loc["fe_h", "true_dR"] == pytest.approx(-0.06, abs=0.005)
    assert tab.loc["o_fe", "true_dz"] == pytest.approx(0.1, abs=0.005)
    assert "true_dR" not in maps.gradient_table(df, ["fe_h"]).columns
    with pytest.raises(ValueError, match="rows"):
        maps.gradient_table(df, ["fe_h"], truth=truth.iloc[:10])


def test_binned_maps_known_values():
    x = np.array([0.1, 0.2, 0.6, 0.7, 1.0, 1.5])
    y = np.zeros(6)
    m = maps.binned_maps(x, y, {"a": [1.0, 3.0, 5.0, np.nan, 7.0, 9.0]}, [0, 0.5, 1.0], [-1, 1],
                         min_count=1)
    np.testing.assert_allclose(m.mean["a"][:, 0], [2.0, 6.0])  # 1.0 is in the last bin; 1.5 out
    np.testing.assert_array_equal(m.count["a"][:, 0], [2, 2])


def test_thin_disk_and_giant_cuts(rng):
    df = _disk(rng, 5000)
    xy = maps.xy_maps(df, ["fe_h"], min_count=1)
    assert xy.n_stars == int((df["Jz"] < 30).sum())
    rv = maps.rvphi_maps(df, ["fe_h"], min_count=1, vphi_range=(0, 500), R_range=(7.5, 15.0))
    assert rv.n_stars == int(((df["Jz"] < 30) & (df["logg"] < 3)).sum())


def test_halo_sample_caps_and_is_reproducible(rng):
    df = _disk(rng)
    df["R"] = rng.uniform(3, 13, len(df))  # cover the default halo (R, |z|) bins
    df["z"] = rng.uniform(-6, 6, len(df))
    eu = maps.halo_sample(df, "eu_fe", seed=1)
    counts = eu.groupby(["R_bin", "absz_bin"]).size()
    assert counts.max() == maps.HALO_N_PER_BIN
    assert len(counts) == 9
    full_bin = ((df["R"] >= 3) & (df["R"] < 5) & (df["z"].abs() < 2)).sum()
    assert full_bin > 700 and counts[(0, 0)] == 700
    assert eu.index.is_unique
    pd.testing.assert_frame_equal(eu, maps.halo_sample(df, "eu_fe", seed=1))
    assert not eu.index.equals(maps.halo_sample(df, "eu_fe", seed=2).index)
    ba = maps.halo_sample(df, "ba_fe", seed=1)
    assert ba["teff"].between(4800, 5000).all()
    small = maps.halo_sample(df.iloc[:500], "eu_fe", seed=1)
    assert len(small) == ((df.iloc[:500]["R"] < 13) & (df.iloc[:500]["z"].abs() < 6)
                          & ~((df.iloc[:500]["R"] >= 5) & (df.iloc[:500]["R"] < 7))
                          & ~((df.iloc[:500]["R"] >= 9) & (df.iloc[:500]["R"] < 11))).sum()


def test_add_cartesian_follows_the_kinematics_frame():
    # Sun-like star: R = 8, phi = 0, vT = -232.24 (right-handed frame, disk stars have vT < 0)
    df = pd.DataFrame({"R": [8.0, 10.0, 5.0], "phi": [0.0, np.pi / 2, np.pi], "vT": [-232.24, -200.0, 30.0]})
    out = maps.add_cartesian(df)
    np.testing.assert_allclose(out["X"], [8.0, 0.0, -5.0], atol=1e-12)
    np.testing.assert_allclose(out["Y"], [0.0, 10.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(out["vphi"], [232.24, 200.0, -30.0])  # prograde positive
    assert "X" not in df.columns  # a copy, the input is untouched
    kept = maps.add_cartesian(out.assign(vphi=[1.0, 2.0, 3.0]))
    np.testing.assert_allclose(kept["vphi"], [1.0, 2.0, 3.0])  # existing columns are kept


def test_add_cartesian_agrees_with_kinematics():
    from lamostcannon import kinematics

    kin = kinematics.kinematics([120.0, 300.0], [20.0, -10.0], [1.5, 3.0], [-5.0, 2.0], [3.0, -4.0],
                                [20.0, -60.0], with_actions=False)
    out = maps.add_cartesian(kin.drop(columns=["X", "Y", "vphi"]))
    np.testing.assert_allclose(out[["X", "Y", "vphi"]].to_numpy(), kin[["X", "Y", "vphi"]].to_numpy(),
                               atol=1e-9)


def test_quality_mask():
    from lamostcannon.catalog import FLAG_NO_LASP, FLAG_NOT_CONVERGED

    df = pd.DataFrame({"chi2": [100.0, 6999.0, 7000.0, np.nan, 50.0, 60.0],
                       "flag": [0, 0, 0, 0, FLAG_NO_LASP, FLAG_NOT_CONVERGED]})
    np.testing.assert_array_equal(maps.quality_mask(df), [True, True, False, False, True, False])
    np.testing.assert_array_equal(maps.quality_mask(df, chi2_max=None),
                                  [True, True, True, False, True, False])
    np.testing.assert_array_equal(maps.quality_mask(df.drop(columns="flag"), 1000.0),
                                  [True, False, False, False, True, True])
    # with quality_flag (issue 12): any bit removes the star; labels=... removes extrapolated
    # values of those labels; flag is then not needed
    df["quality_flag"] = [0, 0, 0, 0, 4, 0]           # AT_BOUND on row 4
    df["flag"] = 0
    df["ba_fe"] = [0.1, 0.2, 0.3, 0.4, 0.5, np.nan]
    df["ba_fe_extrap"] = [False, True, False, False, False, False]
    np.testing.assert_array_equal(maps.quality_mask(df), [True, True, False, False, False, True])
    np.testing.assert_array_equal(maps.quality_mask(df, labels=["ba_fe"]),
                                  [True, False, False, False, False, False])
    masked, removed = maps.mask_extrapolated(df, ["ba_fe", "fe_h"])
    assert removed == {"ba_fe": 1, "fe_h": 0} and np.isnan(masked.loc[1, "ba_fe"])
    assert df.loc[1, "ba_fe"] == 0.2                    # a copy


# ----------------------------------------------------------------------------- figures
def test_science_figures_smoke(rng):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from lamostcannon.plotting import science

    df = _disk(rng, 8000)
    figs = []
    growth = pd.DataFrame({"n_elements": [1, 2], "added": ["o_fe", "mg_fe"],
                           "median_binary": [0.5, 0.8], "median_field": [1.2, 2.0],
                           "ratio": [2.4, 2.5]})
    figs.append(science.chemical_distance_figure(rng.gamma(2, 0.4, 100), rng.gamma(4, 0.6, 500),
                                                 growth=growth, peaks=(0.8, 2.5)))
    m = maps.rz_maps(df, ["fe_h", "ba_fe"], step=(1.0, 1.0), min_count=5)
    figs.append(science.rz_maps_figure(m))
    figs.append(science.xy_maps_figure(maps.xy_maps(df, ["fe_h"], min_count=2)))
    figs.append(science.rvphi_maps_figure(
        maps.rvphi_maps(df, ["fe_h", "eu_fe"], min_count=1, step=(1.0, 10.0)),
        ridge_box=(9, 11, 200, 220)))
    df["R"] = rng.uniform(3, 13, len(df))
    sample = maps.halo_sample(df, "ba_fe", seed=0, n_per_bin=50)
    figs.append(science.halo_transition_figure(sample, "ba_fe", color_by="JR"))
    teff = rng.uniform(5000, 6200, 40)
    figs.append(science.cluster_trend_figure(teff, 0.05 + 1e-4 * (teff - 5600)))
    assert all(isinstance(f, Figure) for f in figs)
    for f in figs:
        f.canvas.draw()
        plt.close(f)


def test_calibration_figures_smoke(rng):
    import matplotlib.pyplot as plt

    from lamostcannon import calibration
    from lamostcannon.plotting import calibration as calplot

    teff = rng.uniform(4200, 6500, 60)
    raw = {"alpha_fe": 0.05 - 5e-5 * (teff - 5500) + rng.normal(0, 0.02, 60)}
    cal = {"alpha_fe": 0.05 + rng.normal(0, 0.02, 60)}
    figs = [calplot.cluster_before_after(teff, raw, cal, labels=["alpha_fe"], truth={"alpha_fe": 0.05})]
    cat, wide = _with_binaries(rng, _population(rng, 2000), 60)
    res = binaries.compare_with_field(cat, wide, ELEMENTS, SIGMA, max_delta_teff=None, seed=0)
    res["null"] = res
    figs.append(calplot.distance_before_after({"raw": res, "calibrated": res}))
    df = pd.DataFrame({"group": np.repeat(np.arange(20), 3), "kind": "cluster",
                       "teff": rng.uniform(4200, 6500, 60), "logg": 4.5,
                       "snr_z": rng.uniform(50, 500, 60), "fe_h": 0.0,
                       "alpha_fe": rng.normal(0, 0.02, 60)})
    fit = calibration.fit(df, ["alpha_fe"], seed=0, n_boot=5)
    figs.append(calplot.corrections(fit, df, injected=lambda t: {"alpha_fe": 0 * t}))
    for f in figs:
        f.canvas.draw()
        plt.close(f)
