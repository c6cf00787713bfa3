"""Known-answer tests of cross-validation, metrics and KDE extrapolation boundaries (section 4)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from lamostcannon import validation

# ----------------------------------------------------------------------------------------------
# folds
# ----------------------------------------------------------------------------------------------


def test_kfold_reproducible_and_balanced():
    a = validation.kfold(1000, 12, seed=7)
    b = validation.kfold(1000, 12, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, validation.kfold(1000, 12, seed=8))
    counts = np.bincount(a, minlength=12)
    assert counts.size == 12 and counts.max() - counts.min() <= 1 and counts.sum() == 1000
    assert np.array_equal(validation.kfold(25, 5, seed=np.random.default_rng(3)),
                          validation.kfold(25, 5, seed=np.random.default_rng(3)))
    with pytest.raises(ValueError, match="at least k=12"):
        validation.kfold(5, 12, seed=1)


# ----------------------------------------------------------------------------------------------
# cross_validate, with a linear stand-in model (fast) and with the real Cannon
# ----------------------------------------------------------------------------------------------


class _LinearModel:
    """flux = [1, labels] @ A, fitted by least squares; test inverts it. Records what it saw."""

    def __init__(self, label_names, **kwargs):
        self.label_names = list(label_names)
        self.kwargs = kwargs

    def train(self, labels, flux, ivar):
        x = np.column_stack([np.ones(len(labels)), labels])
        self.A = np.linalg.lstsq(x, flux, rcond=None)[0]
        self.seen = {tuple(np.round(f[:3], 12)) for f in flux}
        return self

    def test(self, flux, ivar, **kwargs):
        lab = np.linalg.lstsq(self.A[1:].T, (flux - self.A[0]).T, rcond=None)[0].T
        leaked = np.array([tuple(np.round(f[:3], 12)) in self.seen for f in flux])
        return types.SimpleNamespace(labels=lab, chi2=leaked.astype(float),
                                     converged=np.ones(len(flux), bool))


@pytest.fixture
def linear_cannon(monkeypatch):
    fake = types.ModuleType("lamostcannon.cannon")
    fake.CannonModel = _LinearModel
    monkeypatch.setitem(sys.modules, "lamostcannon.cannon", fake)
    return fake


def test_cross_validate_holds_each_fold_out(linear_cannon, rng):
    n, p = 120, 30
    labels = rng.normal(size=(n, 2))
    A = rng.normal(size=(3, p))
    flux = np.column_stack([np.ones(n), labels]) @ A + rng.normal(0, 1e-3, (n, p))
    ivar = np.ones_like(flux)
    cv = validation.cross_validate(labels, flux, ivar, ["a", "b"], k=12, seed=5, n_jobs=1,
                                   ids=np.arange(n) + 100, diagnostics=False)
    assert list(cv.columns) == ["id", "fold", "true_a", "inferred_a", "true_b", "inferred_b",
                                "chi2", "converged"]
    np.testing.assert_array_equal(cv["fold"], validation.kfold(n, 12, seed=5))
    assert (cv["chi2"] == 0).all()  # no star was in its own model's training set
    np.testing.assert_allclose(cv[["inferred_a", "inferred_b"]], labels, atol=0.01)
    # two processes give the same table
    cv2 = validation.cross_validate(labels, flux, ivar, ["a", "b"], k=12, seed=5, n_jobs=2,
                                    ids=np.arange(n) + 100, diagnostics=False)
    pd.testing.assert_frame_equal(cv, cv2)
    with pytest.raises(ValueError, match="non-finite"):
        bad = labels.copy()
        bad[0, 0] = np.nan
        validation.cross_validate(bad, flux, ivar, ["a", "b"], k=12, seed=5, n_jobs=1)
    with pytest.raises(ValueError, match=r"\(S, P\)"):
        validation.cross_validate(labels, flux[:10], ivar[:10], ["a", "b"], n_jobs=1)


class _ErrorsModel(_LinearModel):
    """Records the label errors each fold model was trained with."""

    trained_with: list = []

    def train(self, labels, flux, ivar, label_errors=None):
        _ErrorsModel.trained_with.append((np.asarray(labels)[:, 0].copy(), label_errors))
        return super().train(labels, flux, ivar)


def test_cross_validate_trains_each_fold_with_its_stars_errors(monkeypatch, rng):
    fake = types.ModuleType("lamostcannon.cannon")
    fake.CannonModel = _ErrorsModel
    from lamostcannon import cannon as real_cannon

    fake._label_errors_array = real_cannon._label_errors_array
    monkeypatch.setitem(sys.modules, "lamostcannon.cannon", fake)
    _ErrorsModel.trained_with = []
    n, p = 60, 10
    labels = rng.normal(size=(n, 2))
    flux = np.column_stack([np.ones(n), labels]) @ rng.normal(size=(3, p))
    errors = np.column_stack([labels[:, 0] ** 2, np.full(n, 0.1)])  # a function of the star
    validation.cross_validate(labels, flux, np.ones_like(flux), ["a", "b"], k=4, seed=2,
                              n_jobs=1, diagnostics=False, label_errors=errors)
    assert len(_ErrorsModel.trained_with) == 4
    for lab_a, err in _ErrorsModel.trained_with:
        assert err.shape == (len(lab_a), 2)
        np.testing.assert_array_equal(err[:, 0], lab_a ** 2)  # the training stars' own errors
    # a table with e_<label> columns works too; a missing column means no error
    _ErrorsModel.trained_with = []
    validation.cross_validate(labels, flux, np.ones_like(flux), ["a", "b"], k=4, seed=2,
                              n_jobs=1, diagnostics=False, label_errors={"e_a": errors[:, 0]})
    assert all(np.all(err[:, 1] == 0) for _, err in _ErrorsModel.trained_with)


def test_cross_validate_with_the_cannon_recovers_labels(rng):
    cannon = pytest.importorskip("lamostcannon.cannon")
    n, p, names = 240, 150, ["teff", "fe_h"]
    true = np.column_stack([rng.uniform(4800, 6200, n), rng.uniform(-0.8, 0.3, n)])
    x = (true - true.mean(0)) / true.std(0)
    theta = rng.normal(0, 0.05, (p, 6))
    theta[:, 0] = 1.0
    eta = np.column_stack([np.ones(n), x, x[:, :1] ** 2, x[:, :1] * x[:, 1:], x[:, 1:] ** 2])
    flux = eta @ theta.T + rng.normal(0, 0.005, (n, p))
    ivar = np.full_like(flux, 1 / 0.005**2)
    assert hasattr(cannon, "CannonModel")
    cv = validation.cross_validate(true, flux, ivar, names, k=4, seed=1, n_jobs=1)
    m = validation.cv_metrics(cv)
    assert m.loc["teff", "scatter"] < 60 and m.loc["fe_h", "scatter"] < 0.05
    assert (m["correlation"] > 0.98).all()
    # what the calibrations need, per held-out star (no OOD windows on a 150-pixel toy grid)
    for col in ("e_teff_formal", "e_fe_h_formal", "snr", "chi2_per_pixel", "ood_log_density"):
        assert col in cv.columns and np.isfinite(cv[col]).all(), col
    assert cv["snr"].median() == pytest.approx(200, rel=0.05)
    # formal errors of a model of the noise itself: CV residuals / formal errors ~ unit
    z = (cv["inferred_teff"] - cv["true_teff"]) / cv["e_teff_formal"]
    assert 0.7 < np.quantile(np.abs(z), 0.683) < 1.5


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def test_cv_metrics_known_answers():
    true = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    inferred = true + np.array([[0.1, 1.0], [0.1, -1.0], [0.1, 1.0], [0.1, -1.0]])
    m = validation.cv_metrics(true, inferred, ["a", "b"])
    assert m.loc["a", "bias"] == pytest.approx(0.1)
    assert m.loc["a", "scatter"] == pytest.approx(0.0, abs=1e-12)
    assert m.loc["a", "correlation"] == pytest.approx(1.0)
    assert m.loc["b", "bias"] == pytest.approx(0.0)
    assert m.loc["b", "scatter"] == pytest.approx(1.0)
    assert m.loc["b", "robust_scatter"] == pytest.approx(1.4826)
    assert np.isnan(m.loc["b", "correlation"])  # constant true values
    assert list(m["n"]) == [4, 4]
    # the same from DataFrames and from a CV table, NaN rows ignored
    cv = pd.DataFrame({"fold": 0, "true_a": [0, 1, 2, 3, 4.0], "inferred_a": [0, 2, 2, 4, np.nan]})
    m2 = validation.cv_metrics(cv)
    assert m2.loc["a", "n"] == 4 and m2.loc["a", "bias"] == pytest.approx(0.5)
    assert m2.loc["a", "scatter"] == pytest.approx(0.5)
    m3 = validation.cv_metrics(pd.DataFrame({"a": [0, 1.0, 2]}), pd.DataFrame({"a": [0, 1.0, 3]}))
    assert m3.loc["a", "bias"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# KDE boundaries
# ----------------------------------------------------------------------------------------------


def test_conditional_cdf_of_a_gaussian_shrinkage_known_answer(rng):
    # true ~ N(0, 1), inferred = 0.5 true + N(0, 0.1): E[true | y] = y / 0.52, sd 0.196. The
    # Silverman KDE widens the conditional by sqrt(1 + f^2), f = n^(-1/6).
    n = 2000
    true = rng.normal(size=n)
    inferred = 0.5 * true + rng.normal(0, 0.1, n)
    f2 = n ** (-1 / 3)
    sd = np.sqrt((1 - 0.25 / 0.26) * (1 + f2))
    grid = np.array([-0.3, -0.1, 0.0, 0.2])
    expected = norm.cdf((grid - grid / 0.52) / sd)
    np.testing.assert_allclose(validation.conditional_cdf(true, inferred, grid), expected,
                               atol=0.05)
    low, high = validation.boundary_1d(true, inferred, 0.9)
    y90 = norm.ppf(0.9) * sd / (1 / 0.52 - 1)  # 0.283
    assert high == pytest.approx(y90, rel=0.12) and low == pytest.approx(-y90, rel=0.12)


def test_boundaries_of_a_clipped_model_land_at_the_clip(rng):
    # the model cannot go beyond +-1: near the clip most true values lie beyond it
    true = rng.normal(size=1500)
    inferred = np.clip(true, -1.0, 1.0) + rng.normal(0, 0.05, true.size)
    low, high = validation.boundary_1d(true, inferred, 0.9)
    # within a fraction of the KDE bandwidth (Silverman: ~0.3 std = 0.2 here) of the clip
    assert abs(high - 1.0) < 0.15 and abs(low + 1.0) < 0.15
    # an unbiased model has no boundary inside the data
    fair = true + rng.normal(0, 0.1, true.size)
    low, high = validation.boundary_1d(true, fair, 0.9)
    assert low < fair.min() and high > fair.max()
    # a looser level puts the boundaries further in
    low80, high80 = validation.boundary_1d(true, inferred, 0.8)
    assert high80 < validation.boundary_1d(true, inferred, 0.9)[1]


def test_boundary_check_finds_the_bias_beyond_the_boundaries(rng):
    # a compressed response: beyond the boundaries the truth lies outward ~90% of the time or
    # more; an unbiased label has (almost) nothing beyond them
    true = rng.normal(size=(3000, 2))
    inferred = np.column_stack([0.5 * true[:, 0] + rng.normal(0, 0.1, 3000),
                                true[:, 1] + rng.normal(0, 0.1, 3000)])
    cv = pd.DataFrame({"true_a": true[:, 0], "inferred_a": inferred[:, 0],
                       "true_b": true[:, 1], "inferred_b": inferred[:, 1]})
    b = validation.extrapolation_boundaries(cv)
    check = validation.boundary_check(cv, b)
    assert list(check.index) == ["a", "b"]
    a = check.loc["a"]
    assert a["n_beyond"] > 100 and a["flagged"] == pytest.approx(a["n_beyond"] / 3000)
    assert a["one_sided_beyond"] > 0.85 and a["one_sided_beyond"] > a["one_sided_inside"] + 0.1
    assert check.loc["b", "flagged"] < 0.01
    # hand-made boundaries: counted exactly
    cv2 = pd.DataFrame({"true_x": [0.0, 3.0, 1.0, 0.0, 1.0, 0.3],
                        "inferred_x": [2.0, 2.5, 2.2, -2.0, 0.2, 0.4]})
    c = validation.boundary_check(cv2, {"x": (-1.0, 1.0), "missing": (0, 1)})
    assert list(c.index) == ["x"]
    # above: two of three below the inferred value; below: one of one; inside (both under the
    # median inferred value, 1.2): one truth above, one below
    assert c.loc["x", "n_beyond"] == 4 and c.loc["x", "one_sided_beyond"] == pytest.approx(3 / 4)
    assert c.loc["x", "one_sided_inside"] == pytest.approx(1 / 2)


def test_extrapolation_boundaries_flags_and_json(rng, tmp_path):
    true = rng.normal(size=(800, 2))
    inferred = np.column_stack([np.clip(true[:, 0], -1, 1), true[:, 1] + rng.normal(0, .1, 800)])
    cv = pd.DataFrame({"true_a": true[:, 0], "inferred_a": inferred[:, 0],
                       "true_b": true[:, 1], "inferred_b": inferred[:, 1]})
    b = validation.extrapolation_boundaries(cv)
    assert set(b) == {"a", "b"} and np.isfinite(b["a"]).all()
    assert b == validation.extrapolation_boundaries(true, inferred, label_names=["a", "b"])
    path = validation.write_boundaries(b, tmp_path / "extrapolation_dwarf.json", level=0.9,
                                       metrics=validation.cv_metrics(cv))
    back = validation.read_boundaries(path)
    assert back.keys() == b.keys()
    for k in b:
        np.testing.assert_allclose(back[k], b[k])
    flags = validation.extrapolation_flags(
        pd.DataFrame({"teff": [3999.0, 5000.0, 6001.0, np.nan], "x": [0, 0, 0, 0]}),
        {"teff": (4000.0, 6000.0), "logg": (1.0, 5.0)})
    assert list(flags.columns) == ["teff"]
    assert list(flags["teff"]) == [True, False, True, False]
    inf_b = {"teff": (-np.inf, 6000.0)}
    validation.write_boundaries(inf_b, tmp_path / "x.json")
    assert validation.read_boundaries(tmp_path / "x.json")["teff"] == (-np.inf, 6000.0)


def test_unbiased_precision_known_answer():
    metrics = pd.DataFrame({"scatter": [0.1, 50.0]}, index=pd.Index(["a", "teff"], name="label"))
    out = validation.unbiased_precision(metrics, {"a": (-0.5, 0.5), "teff": (-np.inf, 6000.0)},
                                        inferred=pd.DataFrame({"a": [-1.0, 1.0],
                                                               "teff": [4000.0, 7000.0]}))
    assert out.loc["a", "precision"] == pytest.approx(0.2)
    assert out.loc["a", "relative_precision"] == pytest.approx(0.2)
    assert out.loc["teff", "unbiased_range"] == pytest.approx(2000.0)
    assert out.loc["teff", "relative_precision"] == pytest.approx(0.05)


def test_group_paths():
    assert validation.boundaries_path("giant").name == "extrapolation_giant.json"
    assert validation.cv_path("dwarf").name == "cv_dwarf.parquet"
    with pytest.raises(ValueError):
        validation.cv_path("subgiant")


def test_figure_helpers_draw(rng):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lamostcannon.plotting import training as ptrain
    from lamostcannon.plotting import validation as pval

    true = rng.normal(size=(300, 2))
    cv = pd.DataFrame({"true_teff": 5000 + 500 * true[:, 0],
                       "inferred_teff": 5000 + 450 * true[:, 0] + rng.normal(0, 50, 300),
                       "true_mg_fe": 0.1 * true[:, 1], "inferred_mg_fe": 0.07 * true[:, 1] + rng.normal(0, .03, 300)})
    m = validation.cv_metrics(cv)
    b = validation.extrapolation_boundaries(cv)
    figs = [pval.cv_one_to_one(cv, metrics=m, boundaries=b),
            pval.relative_precision({"dwarfs": validation.unbiased_precision(m, b, cv)}),
            pval.kde_boundary(cv["true_mg_fe"], cv["inferred_mg_fe"], name="mg_fe"),
            ptrain.kiel_diagram(cv["true_teff"], 4 + true[:, 1], color=true[:, 0])]
    w = 10 ** (3.5682 + 1e-4 * np.arange(3909))
    model = types.SimpleNamespace(wavelength=w, label_names=("teff", "mg_fe"),
                                  theta=rng.normal(size=(w.size, 6)), s2=np.full(w.size, 1e-4),
                                  pixel_ok=np.ones(w.size, bool))
    flux = 1 + rng.normal(0, 0.01, (2, w.size))
    figs += [ptrain.coefficients_vs_wavelength(model),
             ptrain.model_vs_data(w, flux, np.full_like(flux, 1e4), np.ones_like(flux),
                                  s2=model.s2, names=["a", "b"], highlight=w < 4850)]
    for fig in figs:
        assert fig.axes
        plt.close(fig)


def test_with_true_labels_matches_on_id():
    cv = pd.DataFrame({"id": [3, 1, 2], "fold": 0, "true_a": [0.0, 0, 0], "inferred_a": [1.0, 2, 3],
                       "true_b": [5.0, 5, 5], "inferred_b": [5.0, 5, 5]})
    other = pd.DataFrame({"sobject_id": [1, 2, 4], "a": [10.0, 20.0, 40.0]})
    out = validation.with_true_labels(cv, other)
    np.testing.assert_array_equal(out["true_a"], [np.nan, 10.0, 20.0])
    np.testing.assert_array_equal(out["true_b"], [5.0, 5, 5])
    assert (cv["true_a"] == 0).all()  # the input is left alone
