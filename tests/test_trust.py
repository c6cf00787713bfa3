"""Tests of the trust machinery: the error model (lamostcannon.uncertainty), the
out-of-distribution score (lamostcannon.ood), the labelling core and its quality_flag
(lamostcannon.labelling), the calibration workflow (lamostcannon.trust) and the -9999 helper."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lamostcannon import labelling, labels, ood, trust, uncertainty

P = 3909


# --------------------------------------------------------------------------------------------
# LAMOST's -9999 is missing everywhere
# --------------------------------------------------------------------------------------------

def test_pipeline_values_read_sentinels_as_missing():
    x = labels.pipeline_value([5800.0, -9999.0, np.nan, 0.0, 1e5, 4200.0], "teff")
    assert np.isnan(x[1:5]).all() and x[0] == 5800.0 and x[5] == 4200.0
    assert np.isnan(labels.pipeline_value([-9999.0], "logg")).all()
    assert labels.pipeline_value(np.ma.masked_array([4.4, 2.0], [False, True]), "logg")[0] == 4.4
    assert not labels.is_giant(-9999.0, -9999.0)       # was True: -9999 < the eq. 1 boundary
    assert labels.pipeline_known([4800, -9999, 4800], [2.5, 2.5, -9999]).tolist() == [
        True, False, False]


# --------------------------------------------------------------------------------------------
# The error model: simulate, fit, recover; check on held-out data
# --------------------------------------------------------------------------------------------

def _simulate(rng, n=1200, n_pairs=300, scale=2.0, floor=0.05, rfloor=0.01, outliers=0.0):
    """CV residuals and repeat pairs drawn from a known error model."""
    snr = 10 ** rng.uniform(1.3, 2.6, n)
    ef = 1.0 / snr                                     # formal error ~ 1/S/N
    e_rand = np.sqrt((scale * ef) ** 2 + rfloor ** 2)
    d = rng.normal(0, np.sqrt(e_rand ** 2 + floor ** 2))
    bad = rng.random(n) < outliers
    d[bad] = rng.normal(0, 20 * floor, bad.sum())      # catastrophic residuals
    cv = pd.DataFrame({"true_x": np.zeros(n), "inferred_x": d, "e_x_formal": ef, "snr": snr,
                       "fold": np.arange(n) % 12})
    s1, s2 = 10 ** rng.uniform(1.4, 2.6, (2, n_pairs))
    e1, e2 = 1 / s1, 1 / s2
    r1, r2 = (np.sqrt((scale * e) ** 2 + rfloor ** 2) for e in (e1, e2))
    pairs = pd.DataFrame({"delta_x": rng.normal(0, np.hypot(r1, r2)), "e1_x": e1, "e2_x": e2,
                          "snr1": s1, "snr2": s2})
    return cv, pairs


def test_error_model_recovers_random_part_and_floor(rng):
    cv, pairs = _simulate(rng)
    model = uncertainty.fit_error_model(cv, ["x"], pairs=pairs, fit_gamma=False)
    p = model.labels["x"]
    assert p.scale == pytest.approx(2.0, rel=0.15)
    assert p.floor == pytest.approx(0.05, rel=0.15)
    assert model.meta["per_label"]["x"]["n_pairs"] == len(pairs)
    # held-out data from the same model: unit pulls, 68% within +-1
    cv2, pairs2 = _simulate(np.random.default_rng(5))
    tot, ran = model.apply(["x"], cv2[["e_x_formal"]].to_numpy(), cv2["snr"].to_numpy())
    pull = cv2["inferred_x"].to_numpy() / tot[:, 0]
    assert np.mean(np.abs(pull) < 1) == pytest.approx(0.683, abs=0.04)
    pp = trust.pair_pulls(pairs2, model, ["x"])
    assert np.quantile(np.abs(pp["pull_x"]), 0.683) == pytest.approx(1.0, abs=0.12)
    # the random part is smaller than the total and never below the formal error
    assert (ran[:, 0] < tot[:, 0]).all() and (ran[:, 0] >= cv2["e_x_formal"].to_numpy()).all()


def test_error_model_ignores_catastrophic_tails(rng):
    cv, _ = _simulate(rng, outliers=0.1)
    model = uncertainty.fit_error_model(cv, ["x"], fit_gamma=False)
    tot = model.labels["x"].total(cv["e_x_formal"], cv["snr"])
    core = np.abs(cv["inferred_x"]) < 5 * 0.05
    # a variance fit would be blown up ~6x by the 10% outliers; the quantile fit is not
    assert np.median(tot) < 0.2 and np.mean(np.abs(cv["inferred_x"][core] / tot[core]) < 1) > 0.6


def test_error_model_file_round_trip_and_missing_label(tmp_path, rng):
    cv, pairs = _simulate(rng, n=400, n_pairs=60)
    model = uncertainty.fit_error_model(cv, ["x"], pairs=pairs, meta={"what": "test"})
    model.skill = {"x": {"skill": False, "correlation": 0.1, "relative_precision": None}}
    path = uncertainty.write_error_model(model, tmp_path / "uncertainty_test.json")
    back = uncertainty.read_error_model(path)
    assert back.labels["x"] == model.labels["x"]
    assert back.skilled(["x"]) == [] and back.meta["provenance"]["what"] == "test"
    assert "lamostcannon_version" in back.meta["provenance"]
    tot, ran = back.apply(["x", "y"], np.array([[0.01, 0.3]]), np.array([50.0]))
    assert tot[0, 1] == ran[0, 1] == 0.3            # no parameters: the formal error
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="uncertainty calibration"):
        uncertainty.read_error_model(tmp_path / "bad.json")


def test_assess_skill_rule():
    metrics = pd.DataFrame({"correlation": [0.95, 0.2, 0.8]}, index=["teff", "ba_fe", "mg_fe"])
    precision = pd.DataFrame({"relative_precision": [np.nan, 0.5, 1.4]}, index=["teff", "ba_fe",
                                                                                "mg_fe"])
    skill = uncertainty.assess_skill(metrics, precision)
    assert [n for n, v in skill.items() if v["skill"]] == ["teff"]
    assert "0.3" in skill["teff"]["rule"]
    # with n: a correlation just above the threshold is not yet skill, one clearly above it is
    m = pd.DataFrame({"correlation": [0.33, 0.45, 0.33], "n": [800, 800, 100_000]},
                     index=["a", "b", "c"])
    assert {n: v["skill"] for n, v in uncertainty.assess_skill(m).items()} == {
        "a": False, "b": True, "c": True}


def test_pull_summary_bins_and_within_one(rng):
    pull = rng.standard_normal(3000)
    snr = rng.uniform(10, 100, 3000)
    s = uncertainty.pull_summary(pull, snr, n_bins=3)
    assert list(s.index)[-1] == "all" and s.loc["all", "n"] == 3000
    assert s["spread"].between(0.9, 1.1).all() and s.loc["all", "within_1"] == pytest.approx(
        0.683, abs=0.03)


# --------------------------------------------------------------------------------------------
# The OOD statistics
# --------------------------------------------------------------------------------------------

class _FlatModel:
    """A model predicting flux 1 everywhere (theta = (1, 0...)), L = 2."""

    def __init__(self):
        from lamostcannon.cannon import LabelScaler
        from lamostcannon.spectra import common_wavelength

        self.label_names = ("teff", "fe_h")
        self.wavelength = common_wavelength()
        self.theta = np.zeros((P, 6))
        self.theta[:, 0] = 1.0
        self.s2 = np.zeros(P)
        self.pixel_ok = np.ones(P, bool)
        self.scaler = LabelScaler(np.array([5500.0, 0.0]), np.array([500.0, 0.3]))


def test_spectrum_snr_is_the_median_of_flux_sqrt_ivar():
    flux = np.ones((2, P))
    ivar = np.full((2, P), 400.0)
    ivar[1, :100] = 0
    ivar[1, 100:200] = np.nan
    assert ood.spectrum_snr(flux, ivar) == pytest.approx([20.0, 20.0])
    assert np.isnan(ood.spectrum_snr(np.ones((1, P)), np.zeros((1, P)))[0])


def test_window_statistic_sees_coherent_residuals_not_noise(rng):
    model = _FlatModel()
    masks = ood.window_masks(model.wavelength)
    assert set(masks) == set(ood.WINDOWS) and all(m.any() for m in masks.values())
    n = 400
    ivar = np.full((n, P), 100.0 ** 2)
    flux = 1 + rng.standard_normal((n, P)) / 100.0
    # a broad Balmer-like absorption the model does not have, 3% deep, in half of the spectra
    from lamostcannon.cleaning import air_to_vacuum

    dip = 0.03 * np.exp(-0.5 * ((model.wavelength - air_to_vacuum(4861.3)) / 15.0) ** 2)
    flux[n // 2:] -= dip
    stats = ood.residual_statistics(model, np.tile([5500.0, 0.0], (n, 1)), flux, ivar, masks)
    clean, dipped = stats["ood_balmer_wings"][:n // 2], stats["ood_balmer_wings"][n // 2:]
    assert np.median(clean) == pytest.approx(1.0, abs=0.15)     # white noise: 1
    assert np.median(dipped) > 4 * np.median(clean)
    # the molecular bands do not see a Balmer line
    assert np.median(stats["ood_molecular_bands"][n // 2:]) == pytest.approx(1.0, abs=0.2)
    # a failed fit gives NaN, never an error
    bad = ood.residual_statistics(model, np.array([[np.nan, 0.0]]), flux[:1], ivar[:1], masks)
    assert np.isnan(bad["ood_balmer_wings"][0])


def _calibration_table(rng, n=600):
    snr = 10 ** rng.uniform(1.3, 2.5, n)
    t = pd.DataFrame({"snr": snr, "chi2_per_pixel": np.exp(rng.normal(0, 0.1, n)),
                      "ood_log_density": rng.normal(-3, 0.5, n)})
    for c in ood.STAT_COLUMNS:   # statistics that grow with S/N, log-normal scatter
        t[c] = np.exp(-1 + 0.3 * np.log(snr) + rng.normal(0, 0.3, n))
    return t


def test_ood_calibration_threshold_and_round_trip(tmp_path, rng):
    t = _calibration_table(rng)
    train = np.column_stack([rng.normal(5500, 400, 500), rng.normal(4.3, 0.3, 500),
                             rng.normal(-0.2, 0.3, 500)])
    cal = ood.fit_calibration(t, train, ["teff", "logg", "fe_h"], quantile=0.98)
    assert cal.lines["ood_balmer_wings"][1] == pytest.approx(0.3, abs=0.05)
    score = cal.score({c: t[c].to_numpy() for c in cal.components}, t["snr"].to_numpy())
    assert np.mean(score > cal.threshold) == pytest.approx(0.02, abs=0.01)
    # a spectrum with strong residuals in one window scores above the threshold
    one = {c: np.array([t[c].median()]) for c in cal.components}
    one["ood_molecular_bands"] = one["ood_molecular_bands"] * 50
    assert cal.score(one, np.array([t["snr"].median()]))[0] > cal.threshold
    # below the calibration's lowest S/N the lines are not extrapolated
    low = cal.z("ood_balmer_wings", [0.1], [1.0])
    at_min = cal.z("ood_balmer_wings", [0.1], [cal.snr_min])
    assert low == pytest.approx(at_min)
    path = ood.write_calibration(cal, tmp_path / "ood_test.json")
    back = ood.read_calibration(path)
    assert back.threshold == cal.threshold and back.components == cal.components
    assert back.density.log_density(train[:3], ["teff", "logg", "fe_h"]) == pytest.approx(
        cal.density.log_density(train[:3], ["teff", "logg", "fe_h"]))
    assert json.loads(path.read_text())["provenance"]["lamostcannon_version"]
    with pytest.raises(KeyError, match="diagnostics"):
        ood.fit_calibration(t.drop(columns="snr"), train, ["teff", "logg", "fe_h"])


# --------------------------------------------------------------------------------------------
# The labelling core with a real (small) Cannon
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-label Cannon trained on spectra of a random quadratic model, with its CV-based
    calibrations written beside it (model_toy.fits, uncertainty_toy.json, ood_toy.json)."""
    from lamostcannon import cannon, spectra, validation

    rng = np.random.default_rng(3)
    names = ["teff", "logg", "fe_h"]
    L, T, n = 3, cannon.n_terms(3), 400
    theta = np.zeros((P, T))
    theta[:, 0] = 1 - 0.3 * rng.random(P) ** 3
    theta[:, 1:L + 1] = 0.02 * rng.standard_normal((P, L))
    theta[:, L + 1:] = 0.003 * rng.standard_normal((P, T - L - 1))
    x = 0.8 * rng.standard_normal((n, L))
    lab = np.array([5800, 4.3, -0.2]) + x * np.array([300, 0.3, 0.3])
    snr = rng.uniform(20, 200, n)
    flux = cannon.vectorize(x) @ theta.T + rng.standard_normal((n, P)) / snr[:, None]
    ivar = np.tile(snr[:, None] ** 2, (1, P))
    model = cannon.CannonModel(names, wavelength=spectra.common_wavelength()).train(
        lab, flux, ivar)
    root = tmp_path_factory.mktemp("toy")
    path = root / "model_toy.fits"
    model.write(path)
    cv = validation.cross_validate(lab, flux, ivar, names, k=4, seed=1, n_jobs=1,
                                   wavelength=spectra.common_wavelength())
    bounds = validation.extrapolation_boundaries(cv)
    validation.write_boundaries(bounds, root / "extrapolation_toy.json")
    trust.calibrate(model, cv, lab, fit_rows=cv["fold"].to_numpy() % 2 == 0, model_path=path,
                    skill=uncertainty.assess_skill(validation.cv_metrics(cv)))
    return {"path": path, "model": model, "theta": theta, "labels": lab, "flux": flux,
            "ivar": ivar, "rng": rng}


def test_companions_are_found_beside_the_model(trained):
    path = trained["path"]
    for kind in ("extrapolation", "uncertainty", "ood"):
        assert labelling.companion_path(path, kind) == path.with_name(f"{kind}_toy.json")
    bundle = labelling.ModelBundle.load(path)
    assert bundle.name == "toy" and bundle.errors is not None and bundle.ood is not None
    assert bundle.boundaries is not None and bundle.skilled_labels() == ["teff", "logg", "fe_h"]
    with pytest.raises(ValueError):
        labelling.companion_path(path, "nonsense")


def test_labeller_columns_errors_and_quality_bits(trained):
    from lamostcannon import cannon

    bundle = labelling.ModelBundle.load(trained["path"])
    labeller = labelling.Labeller({"toy": bundle})
    rng = trained["rng"]
    n = 8
    x = 0.5 * rng.standard_normal((n, 3))
    flux = cannon.vectorize(x) @ trained["theta"].T + rng.standard_normal((n, P)) / 100
    ivar = np.full((n, P), 100.0 ** 2, np.float32)
    ivar[1] = 0.0                                    # nothing to fit
    flux[2] = 1 + rng.standard_normal(P) / 3         # S/N 3 noise
    ivar[2] = 9.0
    out = labeller.label(flux, ivar, pipeline_class=["STAR"] * 6 + ["GALAXY", "STAR"],
                         redshift=[0.0] * 7 + [0.1])
    assert list(out.columns) == list(labeller.columns())
    qf = out["quality_flag"].to_numpy()
    assert qf[1] & labelling.QF_FIT_FAILED and np.isnan(out.loc[1, "teff"])
    assert qf[2] & labelling.QF_LOW_SNR
    assert qf[6] & labelling.QF_NOT_STELLAR and qf[7] & labelling.QF_NOT_STELLAR
    good = [0, 3, 4, 5]
    assert (qf[good] & ~labelling.QF_UNLIKE_TRAINING == 0).all()
    # errors: total >= random >= formal, and calibrated ones are larger than the formal
    e, r, f = (out[f"e_teff{s}"].to_numpy()[good] for s in ("", "_random", "_formal"))
    assert (e >= r).all() and (r >= f).all() and (e > f).all()
    assert out["snr"].to_numpy()[0] == pytest.approx(100, rel=0.1)
    assert np.isfinite(out["ood_score"].to_numpy()[good]).all()


def test_labeller_fingerprint_carries_the_labelling_code(trained, monkeypatch):
    # a resumed catalogue run compares fingerprints: parts labelled by other code are refused
    labeller = labelling.Labeller({"toy": labelling.ModelBundle.load(trained["path"])})
    code = labelling.code_fingerprint()
    assert len(code) == 16 and int(code, 16) >= 0 and labelling.code_fingerprint() == code
    before = labeller.fingerprint()
    assert before["code"] == code
    monkeypatch.setattr(labelling, "_CODE_FINGERPRINT", "0" * 16)  # as if cannon.py had changed
    assert labeller.fingerprint() != before


def test_labeller_two_models_eq1_and_no_pipeline(trained):
    bundle = labelling.ModelBundle.load(trained["path"])
    dwarf = labelling.ModelBundle.from_model(bundle.model, "dwarf")
    giant = labelling.ModelBundle.from_model(bundle.model, "giant")
    labeller = labelling.Labeller({"dwarf": dwarf, "giant": giant})
    flux, ivar = trained["flux"][:4].astype(np.float32), trained["ivar"][:4].astype(np.float32)
    out = labeller.label(flux, ivar, pipeline_teff=[4800, 5800, -9999, np.nan],
                         pipeline_logg=[2.5, 4.4, -9999, 4.4])
    assert out["model"].tolist()[:2] == ["giant", "dwarf"]
    nopipe = (out["quality_flag"].to_numpy() & labelling.QF_NO_PIPELINE) != 0
    assert nopipe.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="dwarf"):
        labelling.Labeller({"a": dwarf, "b": giant})
    # one pipeline value for four spectra would route all four like the first: refused
    with pytest.raises(ValueError, match=r"pipeline_teff has shape \(1,\), expected \(4,\)"):
        labeller.label(flux, ivar, pipeline_teff=[4800], pipeline_logg=[2.5])
    with pytest.raises(ValueError, match="redshift"):
        labeller.label(flux, ivar, redshift=np.zeros(5))


def test_labeller_decides_the_compiled_newton_on_the_whole_chunk(trained, monkeypatch):
    """The labelling core runs the compiled Newton iteration for a chunk of at least
    ``kernels.NEWTON_MIN_SPECTRA`` spectra, for both models' shares of it however small, and
    the numpy one below: the same chunk takes the same path in any process."""
    from lamostcannon import cannon, kernels

    bundle = labelling.ModelBundle.load(trained["path"])
    labeller = labelling.Labeller({
        "dwarf": labelling.ModelBundle.from_model(bundle.model, "dwarf"),
        "giant": labelling.ModelBundle.from_model(bundle.model, "giant")})
    seen = []
    real_test = cannon.CannonModel.test

    def spy(self, flux, ivar, **kwargs):
        seen.append((len(flux), kwargs.get("compiled")))
        return real_test(self, flux, ivar, **kwargs)

    monkeypatch.setattr(cannon.CannonModel, "test", spy)
    flux, ivar = trained["flux"][:6].astype(np.float32), trained["ivar"][:6].astype(np.float32)
    teff, logg = [4800, 4700, 4900, 5800, 4800, 4750], [2.5, 2.4, 2.6, 4.4, 2.5, 2.3]
    for threshold, expect in ((6, True), (7, False)):
        monkeypatch.setattr(kernels, "NEWTON_MIN_SPECTRA", threshold)
        seen.clear()
        labeller.label(flux, ivar, pipeline_teff=teff, pipeline_logg=logg)
        assert sorted(n for n, _ in seen) == [1, 5]  # the dwarf's share is one spectrum
        assert {c for _, c in seen} == {expect}


def test_model_spectra_file_matches_chi2(trained, tmp_path):
    from astropy.io import fits

    bundle = labelling.ModelBundle.load(trained["path"])
    labeller = labelling.Labeller({"toy": bundle})
    flux, ivar = trained["flux"][:5].astype(np.float32), trained["ivar"][:5].astype(np.float32)
    out = labeller.label(flux, ivar)
    writer = labelling.ModelSpectraWriter(tmp_path / "ms.fits", bundle.wavelength)
    writer.add(out.iloc[:2], flux[:2], ivar[:2], labeller.predict(out.iloc[:2]))
    writer.add(out.iloc[2:], flux[2:], ivar[2:], labeller.predict(out.iloc[2:]))
    path = writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ms.fits"]
    with fits.open(path) as h:
        assert h["FLUX"].data.shape == h["MODEL"].data.shape == (5, P)
        stars = h["STARS"].data
        f, iv, m = (h[k].data.astype(float) for k in ("FLUX", "IVAR", "MODEL"))
    s2 = bundle.model.s2
    chi2 = np.sum((f - m) ** 2 * iv / (1 + iv * s2), axis=1)
    np.testing.assert_allclose(chi2, out["chi2"], rtol=2e-3)
    assert list(stars["teff"]) == pytest.approx(out["teff"].tolist())


def test_cross_validate_extra_visits_and_repeat_pairs(trained):
    from lamostcannon import validation

    lab, flux, ivar = trained["labels"][:120], trained["flux"][:120], trained["ivar"][:120]
    rng = np.random.default_rng(9)
    star = np.arange(0, 120, 6)
    xflux = flux[star] + rng.standard_normal((star.size, P)) / np.sqrt(ivar[star])
    cv, extra = validation.cross_validate(lab, flux, ivar, ["teff", "logg", "fe_h"], k=4, seed=2,
                                          n_jobs=1, extra=(star, xflux, ivar[star]))
    for col in ("snr", "chi2_per_pixel", "e_teff_formal", "ood_log_density", *ood.STAT_COLUMNS):
        assert col in cv.columns and np.isfinite(cv[col]).all(), col
    assert (extra["star"].to_numpy() == star).all() and (extra["fold"] == cv["fold"][star].to_numpy()).all()
    pairs = trust.cv_repeat_pairs(cv, extra, ["teff", "logg", "fe_h"])
    # both visits labelled by the fold model that never saw the star: noise-level differences
    z = pairs["delta_teff"] / np.hypot(pairs["e1_teff"], pairs["e2_teff"])
    assert 0.5 < np.quantile(np.abs(z), 0.683) < 2.0
    with pytest.raises(ValueError, match="extra star"):
        validation.cross_validate(lab, flux, ivar, ["teff", "logg", "fe_h"], k=4, n_jobs=1,
                                  extra=(np.array([500]), xflux[:1], ivar[:1]))


def test_describe_quality_lists_every_bit():
    qf = np.array([0, labelling.QF_LOW_SNR, labelling.QF_LOW_SNR | labelling.QF_POOR_FIT])
    d = labelling.describe_quality(qf)
    assert d.loc["LOW_SNR", "fraction"] == pytest.approx(2 / 3)
    assert d.loc["any", "fraction"] == pytest.approx(2 / 3)
    assert set(d.index) == {n for n, _ in labelling.QUALITY_BITS.values()} | {"any"}
    text = labelling.quality_flag_description()
    for b, (n, _) in labelling.QUALITY_BITS.items():
        assert f"{b}={n}" in text


def test_binned_statistics_inside_the_test_step_match_the_standalone_ones(trained):
    """The OOD window statistics computed inside the batched test step (the cheap path the
    labelling core uses) equal those recomputed from the fitted labels."""
    model = trained["model"]
    binner = ood._Binner(model, ood.window_masks(model.wavelength))
    flux, ivar = trained["flux"][:50].copy(), trained["ivar"][:50].copy()
    ivar[3, 100:400] = 0.0                      # missing pixels inside some windows
    res = model.test(flux, ivar, residual_bins=binner)
    alone = ood.residual_statistics(model, res.labels, flux, ivar, None, binner=binner)
    for name in binner.names:
        np.testing.assert_allclose(res.binned[name], alone[f"ood_{name}"], rtol=1e-4)


def test_survey_repeat_pairs_half_exclusion_eq1_and_pulls(trained, monkeypatch, tmp_path):
    """Survey repeat pairs: one half of the stars (never the excluded ones), both observations
    with the model eq. 1 picks (a visit eq. 1 sends to the other model, or without LASP labels,
    is in no dwarf pair), formal-error pulls of a model that is exactly right near unit spread."""
    from lamostcannon import cannon, real

    model, theta = trained["model"], trained["theta"]
    rng = np.random.default_rng(11)
    n_star = 80
    des = np.array([f"J{k:06d}" for k in range(n_star)])
    x_star = 0.5 * rng.standard_normal((n_star, 3))
    rows = []
    for k in range(n_star):
        for v in range(2 + k % 2):
            teff, logg = 5800.0, 4.3
            if k == 3:
                teff = -9999.0                      # no pipeline labels: not paired
            if k == 5 and v == 1:
                logg = 2.0                          # eq. 1 says giant for this visit only
            rows.append((1000 * k + v, des[k], f"spec-{k}-{v}.fits.gz", teff, logg, k))
    cat = pd.DataFrame(rows, columns=["obsid", "designation", "filename", "teff", "logg", "star"])
    snr = rng.uniform(30, 150, len(cat))

    def fake_load(files, store_path, n_workers=None):
        order = {f"spec-{k}-{v}.fits.gz": i for i, (k, v) in enumerate(
            zip(cat["star"], cat["obsid"] % 1000))}
        idx = np.array([order[f.rsplit("/", 1)[-1]] for f in files])
        x = x_star[cat["star"].to_numpy()[idx]]
        flux = cannon.vectorize(x) @ theta.T + rng.standard_normal((idx.size, P)) / snr[idx, None]
        ivar = np.tile(snr[idx, None] ** 2, (1, P))
        return flux.astype(np.float32), ivar.astype(np.float32), pd.DataFrame({"ok": np.ones(idx.size, bool)})

    monkeypatch.setattr(real, "load_spectra", fake_load)
    out = trust.survey_repeat_pairs({"dwarf": model, "giant": model}, cat, tmp_path,
                                    tmp_path / "store.zarr", exclude=[des[7]], half="fit")
    pairs = out["dwarf"]
    fit_stars = set(des[trust.repeat_half(des) == "fit"]) - {des[3], des[7]}
    dwarf_visits = cat[cat["logg"] > 3.5].groupby("designation").size()
    expected = sum(dwarf_visits[d] * (dwarf_visits[d] - 1) // 2 for d in fit_stars)
    assert set(pairs["designation"]) <= fit_stars and len(pairs) == expected
    assert (pairs["designation"] == des[5]).sum() == (1 if des[5] in fit_stars else 0)
    assert out["giant"].empty
    assert pairs["fold"].between(0, 11).all() and np.isfinite(pairs[["snr1", "snr2"]]).all().all()
    assert 0.05 < np.mean(trust.repeat_half(des) == "fit") < 0.95
    z = pairs["delta_teff"] / np.hypot(pairs["e1_teff"], pairs["e2_teff"])
    assert 0.75 < np.quantile(np.abs(z), 0.683) < 1.3


def test_a_spectra_store_serves_the_current_file_after_it_is_regenerated(real_lamost,
                                                                          tmp_path):
    """The trust stores read repeat visits through ``real.load_spectra``: a file regenerated
    under the same name (a new mock) is read again, not served from the store (see
    tests/test_store.py for the store's side)."""
    import os

    from lamostcannon import spectra as sp
    from lamostcannon.real import load_spectra

    originals = sorted((real_lamost / "dr10").glob("*.fits.gz"))[:3]
    src = tmp_path / "visit.fits.gz"
    src.write_bytes(originals[0].read_bytes())
    store = tmp_path / "s.zarr"
    flux0, _, _ = load_spectra([src, originals[1]], store, n_workers=1)
    mtime = src.stat().st_mtime_ns
    src.write_bytes(originals[2].read_bytes())
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    flux, ivar, meta = load_spectra([src, originals[1]], store, n_workers=1)
    expect_f, expect_i = sp.preprocess(sp.read_lamost(originals[2]))
    np.testing.assert_array_equal(flux[0], expect_f)
    np.testing.assert_array_equal(ivar[0], expect_i)
    np.testing.assert_array_equal(flux[1], flux0[1])
    assert meta["ok"].all() and meta["status"].tolist() == ["stored", "already_stored"]


def test_label_density_grid_matches_the_kernel_sum_and_scipy(rng):
    """The tabulated KDE (numpy only) against the sum over the kernels (scipy's gaussian_kde)
    where the training set has stars, and its interpolation against scipy's on the same grid."""
    from scipy.interpolate import RegularGridInterpolator

    names = ["teff", "logg", "fe_h"]
    train = np.column_stack([rng.normal(5500, 500, 800), rng.normal(4.3, 0.3, 800),
                             rng.normal(-0.2, 0.3, 800)])
    d = ood.LabelDensity.from_labels(train, names)
    grid = d.log_density(train[:300], names)
    exact = d.exact_log_density(train[:300], names)
    # the grid's own approximation (the points binned to the nodes): ~0.1 typical
    assert np.median(np.abs(grid - exact)) < 0.06 and np.abs(grid - exact).max() < 0.3
    # the kernel is scipy's (Silverman's factor times the unbiased covariance)
    interp, bw = d._grid()
    assert bw == pytest.approx(float(np.sqrt(np.min(np.diag(d._kde_object().covariance)))),
                               rel=1e-12)
    axes = [interp.start + interp.step * np.arange(n) for n in interp.values.shape]
    x = rng.uniform(-d.GRID_HALF_WIDTH, d.GRID_HALF_WIDTH, (2000, 3))
    assert interp(x) == pytest.approx(RegularGridInterpolator(axes, interp.values)(x),
                                      rel=1e-12, abs=1e-9)
    # far from the stars: floored on the grid, falling beyond it
    corner = d.mean + d.std * np.array([[4.8, -4.8, 4.8], [4.8, -4.8, 30.0]])
    far = d.log_density(corner, names)
    assert interp.values.max() - far[0] == pytest.approx(d.GRID_FLOOR)
    assert far[1] < far[0] - 10
