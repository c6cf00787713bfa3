"""Tests of the quadratic Cannon (lamostcannon.cannon): known answers, simulate-and-recover,
agreement with a slow scipy reference fit, label masks, bad data, files and input checks.

The simulations draw theta and s per pixel, labels per star, and spectra from the model itself
(paper eq. 3) with a fixed seed, so every tolerance below is a statement about statistical noise.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from lamostcannon import cannon
from lamostcannon.cannon import CannonModel, LabelScaler, ModelFileError

NAMES = ("teff", "logg", "fe_h", "mg_fe")
MEAN = np.array([4800.0, 2.6, -0.25, 0.1])
STD = np.array([300.0, 0.4, 0.3, 0.08])


# ---------------------------------------------------------------------------------------------
# known answers
# ---------------------------------------------------------------------------------------------

def test_vectorize_known_answer():
    eta = cannon.vectorize([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(eta, [[1, 1, 2, 3, 1, 2, 3, 4, 6, 9]])
    assert cannon.term_names(["a", "b", "c"]) == [
        "1", "a", "b", "c", "a*a", "a*b", "a*c", "b*b", "b*c", "c*c"]


@pytest.mark.parametrize("n_labels", range(1, 13))
def test_term_count(n_labels):
    t = cannon.n_terms(n_labels)
    assert t == (n_labels ** 2 + 3 * n_labels) // 2 + 1
    assert cannon.vectorize(np.zeros((2, n_labels))).shape == (2, t)
    assert len(cannon.term_names([f"l{k}" for k in range(n_labels)])) == t


def test_n_terms_rejects_zero_labels():
    with pytest.raises(ValueError, match="at least one label"):
        cannon.n_terms(0)


def test_jacobian_matches_finite_differences(rng):
    x = rng.normal(size=(5, 4))
    jac = cannon.vectorize_jacobian(x)
    assert jac.shape == (5, cannon.n_terms(4), 4)
    h = 1e-6
    for k in range(4):
        dx = np.zeros(4)
        dx[k] = h
        fd = (cannon.vectorize(x + dx) - cannon.vectorize(x - dx)) / (2 * h)
        np.testing.assert_allclose(jac[:, :, k], fd, atol=1e-8)


def test_label_scaler_roundtrip_and_errors(rng):
    lab = MEAN + STD * rng.normal(size=(50, 4))
    sc = LabelScaler.fit(lab)
    x = sc.transform(lab)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(sc.inverse_transform(x), lab, rtol=1e-12)
    with pytest.raises(ValueError, match="zero spread"):
        LabelScaler.fit(np.column_stack([lab[:, 0], np.ones(50)]))
    with pytest.raises(ValueError, match="expected 4 labels"):
        sc.transform(np.zeros((3, 5)))


def test_quartic_value_gradient_hessian_match_direct_evaluation(rng):
    """The Euler-theorem value, gradient and Hessian of the test-step polynomial are exact."""
    tab = cannon._tables(3)
    poly = rng.normal(size=(6, tab["K4"]))
    x = rng.normal(size=(6, 3))
    q = cannon._Quartic(poly, tab)
    val, grad, hess = q.all(x)

    def f(xx):
        return np.einsum("nm,nm->n", poly, cannon._monomials4(xx, tab))

    np.testing.assert_allclose(val, f(x), rtol=1e-10, atol=1e-10)
    h = 1e-5
    for k in range(3):
        d = np.zeros(3)
        d[k] = h
        np.testing.assert_allclose(grad[:, k], (f(x + d) - f(x - d)) / (2 * h), rtol=1e-6,
                                   atol=1e-6)
        gp = q.all(x + d)[1]
        gm = q.all(x - d)[1]
        np.testing.assert_allclose(hess[:, :, k], (gp - gm) / (2 * h), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# simulate and recover
# ---------------------------------------------------------------------------------------------

class Sim:
    """Spectra drawn from the quadratic model itself with known theta, s and labels."""

    def __init__(self, seed=11, n_pix=250):
        rng = np.random.default_rng(seed)
        self.rng = rng
        t = cannon.n_terms(4)
        self.theta = np.zeros((n_pix, t))
        self.theta[:, 0] = 0.9 + 0.05 * rng.standard_normal(n_pix)
        self.theta[:, 1:5] = 0.04 * rng.standard_normal((n_pix, 4))
        self.theta[:, 5:] = 0.01 * rng.standard_normal((n_pix, t - 5))
        self.s = np.where(rng.random(n_pix) < 0.3, 0.0, rng.uniform(0.002, 0.03, n_pix))
        self.n_pix = n_pix

    def labels(self, n):
        return MEAN + STD * self.rng.standard_normal((n, 4))

    def spectra(self, labels, snr):
        x = (labels - MEAN) / STD
        mu = cannon.vectorize(x) @ self.theta.T
        sigma = np.ones_like(mu) / np.asarray(snr)[:, None]
        flux = mu + self.rng.standard_normal(mu.shape) * np.sqrt(sigma ** 2 + self.s ** 2)
        return flux, 1.0 / sigma ** 2

    def theta_in_model_units(self, model):
        """True theta re-expressed for the model's (sample) standardisation: the quadratic
        space is closed under affine maps, so eta_true = eta_model @ M exactly."""
        pts = MEAN + STD * self.rng.standard_normal((200, 4))
        e_true = cannon.vectorize((pts - MEAN) / STD)
        e_model = cannon.vectorize(model.scaler.transform(pts))
        m = np.linalg.lstsq(e_model, e_true, rcond=None)[0]
        return self.theta @ m.T


@pytest.fixture(scope="module")
def sim():
    return Sim()


@pytest.fixture(scope="module")
def trained(sim):
    lab = sim.labels(800)
    flux, ivar = sim.spectra(lab, sim.rng.uniform(40, 150, 800))
    model = CannonModel(NAMES, wavelength=np.linspace(4000, 5000, sim.n_pix))
    model.train(lab, flux, ivar)
    return model, lab, flux, ivar


@pytest.fixture(scope="module")
def test_set(sim):
    lab = sim.labels(300)
    snr = sim.rng.uniform(30, 120, 300)
    flux, ivar = sim.spectra(lab, snr)
    return lab, flux, ivar


def _theta_covariance(model, lab, ivar):
    x = model.scaler.transform(lab)
    eta = cannon.vectorize(x)
    w = ivar / (1 + ivar * model.s2)
    gram = np.einsum("sp,st,su->ptu", w, eta, eta)
    return np.linalg.inv(gram)


def test_training_recovers_theta_within_formal_errors(sim, trained):
    """Pulls (theta_hat - theta_true) / sigma_theta over all pixels and terms: unit spread.

    sigma_theta from the weighted normal equations at the fitted s^2. With 250 x 15 pulls the
    spread is known to ~2% (seeds 11-13 give 1.01-1.02); tolerance 0.9-1.1, |mean| < 0.1.
    """
    model, lab, _, ivar = trained
    truth = sim.theta_in_model_units(model)
    err = np.sqrt(np.einsum("ptt->pt", _theta_covariance(model, lab, ivar)))
    pulls = ((model.theta - truth) / err).ravel()
    assert 0.9 < pulls.std() < 1.1, pulls.std()
    assert abs(pulls.mean()) < 0.1


def test_training_recovers_s_within_noise(sim, trained):
    """s^2 pulls against the Fisher error sqrt(2 / sum w^2) of eq. 5, for pixels with real
    scatter. The maximum-likelihood s^2 is biased low by about T / sum(w) (the T fitted
    coefficients absorb part of the residual variance); the pulls are taken about that expected
    bias. Over four seeds their mean is within 0.22 of 0 and their std 0.95-1.14."""
    model, lab, _, ivar = trained
    w = ivar / (1 + ivar * model.s2)
    sd = np.sqrt(2.0 / (w ** 2).sum(axis=0))
    bias = -model.n_terms / w.sum(axis=0)
    has = sim.s ** 2 > 5 * sd
    pulls = (model.s2 - sim.s ** 2 - bias)[has] / sd[has]
    assert has.sum() > 100
    assert 0.85 < pulls.std() < 1.25, pulls.std()
    assert abs(pulls.mean()) < 0.3, pulls.mean()
    # pixels without intrinsic scatter get small s
    assert np.median(np.sqrt(model.s2[sim.s == 0])) < 0.003


def test_training_s2_maximises_the_profile_likelihood(trained):
    """At a few pixels, eq. 5 (theta profiled out by an independent lstsq) is lower at s^2
    moved by +-3% than at the fitted s^2 (or s^2 sits at the s^2 = 0 boundary)."""
    model, lab, flux, ivar = trained
    eta = cannon.vectorize(model.scaler.transform(lab))

    def profile(p, v):
        w = ivar[:, p] / (1 + ivar[:, p] * v)
        sw = np.sqrt(w)
        th = np.linalg.lstsq(eta * sw[:, None], flux[:, p] * sw, rcond=None)[0]
        r = flux[:, p] - eta @ th
        return -0.5 * np.sum(w * r * r - np.log(w))

    for p in np.flatnonzero(model.s2 > 1e-5)[:8]:
        best = profile(p, model.s2[p])
        assert best >= profile(p, 0.97 * model.s2[p]) - 1e-9
        assert best >= profile(p, 1.03 * model.s2[p]) - 1e-9


def test_test_step_pulls_have_unit_spread(trained, test_set):
    """(inferred - true) / formal error over 300 stars: std within 0.85-1.15 per label (seeds
    11-13 give 0.95-1.09), mean within 0.2."""
    model, *_ = trained
    lab, flux, ivar = test_set
    res = model.test(flux, ivar)
    assert res.flag.max() == 0 and res.converged.all()
    pulls = (res.labels - lab) / res.errors
    std = pulls.std(axis=0)
    assert np.all((std > 0.85) & (std < 1.15)), std
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.2), pulls.mean(axis=0)
    assert res.labels.shape == (300, 4) and res.cov.shape == (300, 4, 4)
    assert np.all(res.n_pixels == model.n_pixels)


def test_batched_fit_matches_scipy_reference(trained, test_set):
    """The batched Newton fit and per-star scipy.optimize.least_squares agree to 0.01 in
    standardised label units, and reach the same chi2."""
    model, *_ = trained
    _, flux, ivar = test_set
    sub = slice(0, 30)
    res = model.test(flux[sub], ivar[sub])
    ref, ref_chi2 = model.test_reference(flux[sub], ivar[sub])
    diff = np.abs(res.labels - ref) / model.scaler.std
    assert diff.max() < 0.01, diff.max()
    np.testing.assert_allclose(res.chi2, ref_chi2, rtol=1e-6)


def test_chi2_and_windows_match_explicit_residuals(trained, test_set):
    model, *_ = trained
    _, flux, ivar = test_set
    win = {"blue": np.arange(model.n_pixels) < 40, "odd": np.arange(model.n_pixels) % 2 == 1}
    res = model.test(flux[:20], ivar[:20], windows=win)
    w = ivar[:20] / (1 + ivar[:20] * model.s2)
    r2 = w * (flux[:20] - model.predict(res.labels)) ** 2
    np.testing.assert_allclose(res.chi2, r2.sum(axis=1), rtol=1e-8)
    for name, m in win.items():
        np.testing.assert_allclose(res.chi2_windows[name], r2[:, m].sum(axis=1), rtol=1e-8)


def test_threads_and_chunks_do_not_change_results(trained, test_set):
    model, *_ = trained
    _, flux, ivar = test_set
    a = model.test(flux[:50], ivar[:50], chunk_size=7, n_threads=2)
    b = model.test(flux[:50], ivar[:50], chunk_size=64, n_threads=1)
    # other chunk shapes and thread counts sum in another order (BLAS): the same solution to a
    # millionth of each star's formal error, not to the bit
    err = np.sqrt(np.diagonal(b.cov, axis1=1, axis2=2))
    assert np.all(np.abs(a.labels - b.labels) <= 1e-6 * err), np.max(np.abs(a.labels - b.labels) / err)
    np.testing.assert_array_equal(a.flag, b.flag)


def test_predict_and_table(trained, test_set):
    model, *_ = trained
    _, flux, ivar = test_set
    one = model.predict(model.scaler.mean)
    assert one.shape == (model.n_pixels,)
    np.testing.assert_allclose(one, model.theta[:, 0])
    res = model.test(flux[:5], ivar[:5], windows={"w": np.ones(model.n_pixels, bool)})
    tab = res.to_table()
    for col in (*NAMES, *(f"e_{n}" for n in NAMES), "chi2", "chi2_w", "n_pixels", "n_iter",
                "converged", "flag"):
        assert col in tab.colnames
    assert str(tab["teff"].unit) == "K" and str(tab["e_fe_h"].unit) == "dex"
    assert len(tab) == 5


def test_init_start_is_used(trained, test_set):
    model, *_ = trained
    lab, flux, ivar = test_set
    a = model.test(flux[:10], ivar[:10])
    b = model.test(flux[:10], ivar[:10], init=lab[:10])
    np.testing.assert_allclose(a.labels, b.labels, atol=1e-6 * STD.max())


# ---------------------------------------------------------------------------------------------
# label masks, missing data, flags
# ---------------------------------------------------------------------------------------------

def test_label_mask_fixes_masked_terms_to_zero(sim):
    lab = sim.labels(400)
    flux, ivar = sim.spectra(lab, np.full(400, 80.0))
    on = np.arange(sim.n_pix) < sim.n_pix // 2
    model = CannonModel(NAMES, label_mask={"mg_fe": on}).train(lab, flux, ivar)
    has_mg = np.array(["mg_fe" in t for t in model.term_names])
    assert np.all(model.theta[np.ix_(~on, has_mg)] == 0.0)
    assert np.all(np.abs(model.theta[np.ix_(on, has_mg)]).sum(axis=1) > 0)
    assert np.all(np.abs(model.theta[:, ~has_mg]).sum(axis=1) > 0)
    assert model.active_terms().sum() == on.sum() * len(has_mg) + (~on).sum() * (~has_mg).sum()
    res = model.test(flux[:50], ivar[:50])
    assert np.all(np.isfinite(res.labels)) and res.converged.all()
    with pytest.raises(ValueError, match="unknown label"):
        CannonModel(NAMES, label_mask={"ba_fe": on})
    with pytest.raises(ValueError, match="bool array"):
        CannonModel(NAMES, label_mask={"mg_fe": on.astype(int)})


def test_pixels_without_training_data(sim):
    lab = sim.labels(300)
    flux, ivar = sim.spectra(lab, np.full(300, 80.0))
    ivar[:, :3] = 0.0
    flux[:, :3] = np.nan
    ivar[:250, 3] = 0.0                     # 50 stars left: >= 2 T = 30, trained
    ivar[:290, 4] = 0.0                     # 10 stars left: too few
    model = CannonModel(NAMES).train(lab, flux, ivar)
    assert model.pixel_ok.tolist()[:6] == [False, False, False, True, False, True]
    assert np.all(np.isinf(model.s2[~model.pixel_ok]))
    np.testing.assert_array_equal(model.theta[~model.pixel_ok, 0], 1.0)
    assert np.all(model.theta[~model.pixel_ok, 1:] == 0.0)
    assert np.all(np.isfinite(model.theta))
    # the test step ignores those pixels even where they carry (bad) data
    tflux, tivar = sim.spectra(lab[:20], np.full(20, 80.0))
    tflux[:, :3] = np.nan
    res = model.test(tflux, tivar)
    assert np.all(np.isfinite(res.labels)) and np.all(res.flag == 0)
    assert np.all(res.n_pixels == model.pixel_ok.sum())


def test_bad_spectra_get_flags_not_exceptions(trained, test_set):
    model, *_ = trained
    _, flux, ivar = test_set
    f = flux[:6].copy()
    iv = ivar[:6].copy()
    iv[0] = 0.0                             # no data
    iv[1] = np.nan                          # all NaN ivar
    iv[2, :10] = np.nan                     # some NaN ivar
    iv[3, 10:20] = -1.0                     # negative ivar
    f[4, 5] = np.nan                        # NaN flux with ivar > 0
    f[5, :] = np.nan                        # NaN flux where ivar = 0 is just missing data
    iv[5, :] = 0.0
    iv[5, :100] = ivar[5, :100]
    f[5, :100] = flux[5, :100]
    res = model.test(f, iv)
    no, bad = cannon.FLAG_NO_PIXELS, cannon.FLAG_BAD_INPUT
    assert res.flag[0] & no and not res.flag[0] & bad
    assert res.flag[1] & no and res.flag[1] & bad
    assert np.all(np.isnan(res.labels[:2])) and np.all(np.isnan(res.chi2[:2]))
    assert res.n_pixels[0] == 0
    for k, n_bad in ((2, 10), (3, 10), (4, 1)):
        assert res.flag[k] & bad and not res.flag[k] & no
        assert res.n_pixels[k] == model.n_pixels - n_bad
        assert np.all(np.isfinite(res.labels[k]))
    assert res.flag[5] == 0 and res.n_pixels[5] == 100
    tab = res.to_table()
    assert np.isnan(tab["teff"][0])


def test_flag_bits_are_distinct_powers_of_two():
    bits = list(cannon.FLAG_BITS)
    assert len(set(bits)) == len(bits)
    assert all(b & (b - 1) == 0 for b in bits)


def test_labels_beyond_the_bound_are_clipped_and_flagged(trained, sim):
    model, *_ = trained
    lab = np.array([MEAN + 8 * STD * np.array([1, 0, 0, 0])])
    flux, ivar = sim.spectra(lab, np.array([200.0]))
    res = model.test(flux, ivar, bound=0.5)
    hi = model.label_range[1] + 0.5 * model.scaler.std
    assert res.flag[0] & cannon.FLAG_AT_BOUND
    assert res.labels[0, 0] <= hi[0] + 1e-6


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def test_write_read_roundtrip_is_exact(trained, test_set, tmp_path):
    from lamostcannon import __version__

    model, *_ = trained
    _, flux, ivar = test_set
    path = model.write(tmp_path / "model.fits")
    back = CannonModel.read(path)
    for attr in ("theta", "s2", "pixel_ok", "starts", "wavelength", "label_range"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(model, attr))
    np.testing.assert_array_equal(back.scaler.mean, model.scaler.mean)
    np.testing.assert_array_equal(back.scaler.std, model.scaler.std)
    assert back.label_names == model.label_names
    assert back.training_hash == model.training_hash and len(model.training_hash) == 64
    assert back.meta["version"] == __version__ and back.meta["date"]
    a, b = model.test(flux[:10], ivar[:10]), back.test(flux[:10], ivar[:10])
    np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(FileExistsError):
        model.write(path)
    model.write(path, overwrite=True)


def test_write_read_keeps_label_mask(sim, tmp_path):
    lab = sim.labels(300)
    flux, ivar = sim.spectra(lab, np.full(300, 80.0))
    on = np.arange(sim.n_pix) % 3 == 0
    model = CannonModel(NAMES, label_mask={"logg": on}).train(lab, flux, ivar)
    back = CannonModel.read(model.write(tmp_path / "m.fits"))
    assert set(back.label_mask) == {"logg"}
    np.testing.assert_array_equal(back.label_mask["logg"], on)
    assert back.wavelength is None


def test_truncated_or_corrupt_file_raises(trained, tmp_path):
    model, *_ = trained
    path = model.write(tmp_path / "model.fits")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.fits"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="trunc.fits"):
        CannonModel.read(trunc)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF                   # corrupt data: the checksum catches it
    bad = tmp_path / "bad.fits"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError):
        CannonModel.read(bad)
    with pytest.raises(FileNotFoundError):
        CannonModel.read(tmp_path / "missing.fits")


def test_mismatched_file_raises_naming_what_was_expected(trained, tmp_path):
    from astropy.io import fits

    model, *_ = trained
    path = model.write(tmp_path / "model.fits")
    with fits.open(path) as hdul:
        hdus = [h.copy() for h in hdul]
    no_s2 = tmp_path / "no_s2.fits"
    fits.HDUList([h for h in hdus if h.name != "S2"]).writeto(no_s2)
    with pytest.raises(ModelFileError, match="missing HDU 'S2'"):
        CannonModel.read(no_s2)
    wrong = tmp_path / "wrong_shape.fits"
    bad = [h.copy() for h in hdus]
    for h in bad:                           # a consistent file (no stale checksums), wrong shape
        h.header.remove("CHECKSUM", ignore_missing=True)
        h.header.remove("DATASUM", ignore_missing=True)
        if h.name == "THETA":
            h.data = h.data[:, :-1]
    fits.HDUList(bad).writeto(wrong)
    with pytest.raises(ModelFileError, match=r"THETA has shape \(250, 14\), expected \(250, 15\)"):
        CannonModel.read(wrong)
    other = tmp_path / "other.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros(3))]).writeto(other)
    with pytest.raises(ModelFileError, match="FORMAT"):
        CannonModel.read(other)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def test_training_input_errors(sim):
    lab = sim.labels(100)
    flux, ivar = sim.spectra(lab, np.full(100, 50.0))
    m = CannonModel(NAMES)
    with pytest.raises(ValueError, match=r"shape \(S, 4\).*got shape \(100, 3\)"):
        m.train(lab[:, :3], flux, ivar)
    bad = lab.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="fe_h"):
        m.train(bad, flux, ivar)
    iv = ivar.copy()
    iv[0, 0] = -1
    with pytest.raises(ValueError, match="1 negative"):
        m.train(lab, flux, iv)
    iv[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        m.train(lab, flux, iv)
    f = flux.copy()
    f[1, 1] = np.nan
    with pytest.raises(ValueError, match="flux is NaN/inf at 1 pixels where ivar > 0"):
        m.train(lab, f, ivar)
    with pytest.raises(ValueError, match="same shape"):
        m.train(lab, flux, ivar[:, :-1])
    with pytest.raises(ValueError, match="labels have 99 rows"):
        m.train(lab[:99], flux, ivar)
    with pytest.raises(ValueError, match="more training spectra than model terms"):
        m.train(lab[:10], flux[:10], ivar[:10])
    with pytest.raises(ValueError, match="expected 10 pixels"):
        CannonModel(NAMES, wavelength=np.arange(10.0)).train(lab, flux, ivar)


def test_training_accepts_a_table(sim):
    from astropy.table import Table

    lab = sim.labels(200)
    flux, ivar = sim.spectra(lab, np.full(200, 50.0))
    table = Table(dict(zip(NAMES, lab.T)))
    a = CannonModel(NAMES).train(table, flux, ivar)
    b = CannonModel(NAMES).train(lab, flux, ivar)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.training_hash == b.training_hash
    del table["logg"]
    with pytest.raises(ValueError, match=r"lacks columns \['logg'\]"):
        CannonModel(NAMES).train(table, flux, ivar)


def test_test_step_input_errors(trained, test_set):
    model, *_ = trained
    _, flux, ivar = test_set
    with pytest.raises(ValueError, match="expected 250 pixels"):
        model.test(flux[:2, :-1], ivar[:2, :-1])
    with pytest.raises(ValueError, match="same shape"):
        model.test(flux[:2], ivar[:3])
    with pytest.raises(ValueError, match=r"windows\['x'\] must be a bool mask of shape \(250,\)"):
        model.test(flux[:2], ivar[:2], windows={"x": np.ones(10, bool)})
    with pytest.raises(RuntimeError, match="not trained"):
        CannonModel(NAMES).test(flux[:2], ivar[:2])
    with pytest.raises(ValueError, match=r"shape \(S, 4\)"):
        model.predict(np.zeros((2, 5)))


def test_newton_step_matches_batched_cholesky(rng):
    """The LAPACK-based Newton step gives the loop Cholesky's step and definiteness verdict."""
    a = rng.normal(size=(40, 10, 10))
    h = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(10)
    h[::3] -= 5.0 * np.eye(10)                          # indefinite ones
    h[5, 2, 2] = np.nan                                 # non-finite: not PD
    g = rng.normal(size=(40, 10))
    step, ok = cannon._newton_step(h, g)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ref, ok_ref = cannon._batched_cholesky_solve(h, -g)
    np.testing.assert_array_equal(ok, ok_ref)
    assert 0 < ok.sum() < ok.size
    np.testing.assert_allclose(step[ok], ref[ok], rtol=1e-9, atol=1e-12)
    assert np.all(step[~ok] == 0.0)


def test_test_step_trained_pixel_slices_match_fancy_index(sim):
    """Copying the trained pixels as slices (and in row blocks) changes nothing."""
    lab = sim.labels(300)
    flux, ivar = sim.spectra(lab, np.full(300, 80.0))
    ivar[:, [0, 1, 7, 100]] = 0.0                       # untrained pixels, three runs of ok
    model = CannonModel(NAMES).train(lab, flux, ivar)
    assert not model.pixel_ok.all()
    tflux, tivar = sim.spectra(lab[:45], np.full(45, 60.0))
    tflux = tflux.astype(np.float32)
    win = {"a": np.arange(sim.n_pix) % 5 == 0}
    a = model.test(tflux, tivar, windows=win, chunk_size=45)
    assert model._test_arrays()["ok_runs"] is not None
    model._test_arrays()["ok_runs"] = None              # force the fancy-index path
    b = model.test(tflux, tivar, windows=win, chunk_size=45)
    # the same numbers in arrays at other addresses: bit-identical with OpenBLAS, but a BLAS may
    # choose its kernels by alignment, so the invariant is agreement far below the formal errors
    err = np.sqrt(np.diagonal(b.cov, axis1=1, axis2=2))
    assert np.all(np.abs(a.labels - b.labels) <= 1e-6 * err)
    np.testing.assert_allclose(a.chi2_windows["a"], b.chi2_windows["a"], rtol=1e-9)
    np.testing.assert_array_equal(a.flag, b.flag)
    assert np.all(np.isfinite(a.labels))


def test_float32_polynomial_is_polished_to_the_exact_minimum(trained, test_set, monkeypatch):
    """The degree 2-4 coefficients come from a float32 product; one Newton step on the exact
    float64 gradient puts each converged fit on the minimum of the exact chi2: the labels equal
    those of a float64 polynomial to 1e-6 of each star's formal error (the float32 iteration
    alone is ~1e-5, at most ~1e-3, off; measured on the giant model of notebook 03), the chi2
    to 1e-9 and the formal errors to 1e-4, and the gradient of the explicit chi2 vanishes."""
    model, *_ = trained
    _, flux, ivar = test_set
    fast = model.test(flux, ivar, chunk_size=64)
    monkeypatch.setattr(cannon, "POLY_FLOAT32", False)
    slow = model.test(flux, ivar, chunk_size=64)
    clean = (fast.flag == 0) & (slow.flag == 0)
    assert clean.mean() > 0.9
    err = slow.errors[clean]
    assert np.all(np.abs(fast.labels[clean] - slow.labels[clean]) <= 1e-6 * err)
    np.testing.assert_allclose(fast.chi2[clean], slow.chi2[clean], rtol=1e-9)
    np.testing.assert_allclose(fast.errors[clean], err, rtol=1e-4)
    np.testing.assert_array_equal(fast.flag, slow.flag)
    # at the minimum: the Newton step of the explicit chi2 is below 1e-6 formal errors
    x = model.scaler.transform(fast.labels[clean])
    eta = cannon.vectorize(x)
    th = model.theta
    w = ivar[clean] / (1 + ivar[clean] * model.s2)
    r = flux[clean] - eta @ th.T
    grad = -2 * np.einsum("sp,pt,stl->sl", w * r, th, cannon.vectorize_jacobian(x))
    step = np.linalg.solve(np.linalg.inv(fast.cov[clean] / np.outer(model.scaler.std,
                                                                     model.scaler.std)) * 2,
                           grad[:, :, None])[:, :, 0]
    assert np.all(np.abs(step) * model.scaler.std <= 1e-6 * fast.errors[clean])


def test_fits_on_a_bound_minimise_over_the_other_labels(trained, sim):
    """A star whose best fit has a label on its bound: the other labels sit at the minimum of
    chi2 with that label held (the constrained minimum), checked against scipy's bounded
    least_squares over the free labels. (A clipped full Newton step stops where the step's
    coupling to the held label vanishes instead, up to a few formal errors away.)"""
    from scipy.optimize import least_squares

    model, *_ = trained
    rng = np.random.default_rng(5)
    lab = MEAN + STD * rng.standard_normal((40, 4))
    lab[:, 0] = MEAN[0] + 6 * STD[0] * np.sign(rng.standard_normal(40))  # beyond the bound
    lab[:, 1] += 2.0 * (lab[:, 0] - MEAN[0]) / STD[0] * STD[1] / 6       # coupled to it
    flux, ivar = sim.spectra(lab, rng.uniform(60, 150, 40))
    res = model.test(flux, ivar, bound=0.3)
    lo, hi = model._bounds(0.3)
    span = hi - lo
    w = ivar / (1 + ivar * model.s2)
    checked = 0
    for s in np.flatnonzero((res.flag & cannon.FLAG_AT_BOUND) > 0):
        x = model.scaler.transform(res.labels[s][None])[0]
        pin = (x <= lo + 1e-9 * span) | (x >= hi - 1e-9 * span)
        free = ~pin

        def resid(xf, s=s, x=x, free=free):
            y = x.copy()
            y[free] = xf
            return np.sqrt(w[s]) * (flux[s] - cannon.vectorize(y)[0] @ model.theta.T)

        ref = least_squares(resid, x[free], bounds=(lo[free], hi[free]), xtol=1e-14,
                            ftol=1e-14, gtol=1e-14)
        err = res.errors[s][free] / model.scaler.std[free]
        assert np.all(np.abs(ref.x - x[free]) <= 1e-4 * err), np.abs(ref.x - x[free]) / err
        assert np.sum(resid(x[free]) ** 2) <= 2 * ref.cost + 1e-6
        checked += 1
    assert checked >= 30 and res.converged.all()


# ----------------------------------------------------------------------------- errors in variables
def test_regression_calibration_moves_noisy_labels_towards_the_truth(rng, caplog):
    n = 4000
    cov = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    true = rng.multivariate_normal([5.0, -1.0, 2.0], cov, n)
    err = np.column_stack([np.full(n, 0.7), rng.uniform(0.2, 0.6, n), np.zeros(n)])
    noisy = true + rng.standard_normal((n, 3)) * err
    rc = cannon.regression_calibrate(noisy, err)
    for k in (0, 1):   # closer to the truth than the noisy labels, and no longer attenuated
        assert np.std(rc[:, k] - true[:, k]) < 0.9 * np.std(noisy[:, k] - true[:, k])
        assert abs(np.polyfit(rc[:, k], true[:, k], 1)[0] - 1.0) < 0.05
        assert np.polyfit(noisy[:, k], true[:, k], 1)[0] < 0.85
    # a label without errors, uncorrelated with the noisy ones, stays where it is
    np.testing.assert_allclose(rc[:, 2], noisy[:, 2], atol=0.05)
    np.testing.assert_allclose(rc.mean(axis=0), noisy.mean(axis=0), atol=1e-12)
    # a label that is noise only shrinks to its mean, with a warning
    only_noise = np.column_stack([noisy[:, 0], rng.standard_normal(n)])
    with caplog.at_level("WARNING", logger="lamostcannon.cannon"):
        out = cannon.regression_calibrate(only_noise, np.column_stack([err[:, 0], np.ones(n)]))
    assert np.std(out[:, 1]) < 0.1 and "noise only" in caplog.text
    with pytest.raises(ValueError, match="S >= 2"):
        cannon.regression_calibrate(noisy[:1], err[:1])


def test_training_with_label_errors_undoes_the_dilution(sim):
    # the same spectra, trained on noisy labels with and without their errors: held-out labels
    # against the truth scatter less and are no longer stretched away from the mean
    rng = np.random.default_rng(5)
    lab = sim.labels(1500)
    flux, ivar = sim.spectra(lab, np.full(1500, 200.0))
    err = np.tile(0.5 * STD, (1500, 1))
    noisy = lab + rng.standard_normal(lab.shape) * err
    test_lab = sim.labels(300)
    tflux, tivar = sim.spectra(test_lab, np.full(300, 200.0))
    wave = np.linspace(4000, 5000, sim.n_pix)
    plain = CannonModel(NAMES, wavelength=wave).train(noisy, flux, ivar)
    eiv = CannonModel(NAMES, wavelength=wave).train(noisy, flux, ivar, label_errors=err)
    assert eiv.meta["errors_in_variables"] and not plain.meta["errors_in_variables"]
    assert eiv.training_hash != plain.training_hash
    got = {k: m.test(tflux, tivar).labels for k, m in (("plain", plain), ("eiv", eiv))}
    for j in range(len(NAMES)):
        scatter = {k: np.std(v[:, j] - test_lab[:, j]) for k, v in got.items()}
        slope = {k: np.polyfit(test_lab[:, j], v[:, j], 1)[0] for k, v in got.items()}
        assert scatter["eiv"] < 0.8 * scatter["plain"], (NAMES[j], scatter)
        assert slope["plain"] > 1.1 and abs(slope["eiv"] - 1.0) < 0.1, (NAMES[j], slope)
    # errors given as a table with e_<label> columns (missing ones: no error)
    tab = {f"e_{n}": err[:, j] for j, n in enumerate(NAMES)}
    again = CannonModel(NAMES, wavelength=wave).train(noisy, flux, ivar, label_errors=tab)
    np.testing.assert_allclose(again.theta, eiv.theta, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="label_errors"):
        CannonModel(NAMES, wavelength=wave).train(noisy, flux, ivar, label_errors=-err)


def test_training_label_errors_are_the_abundance_ratios_only():
    from astropy.table import Table

    from lamostcannon import cleaning

    tab = Table({"teff": [5000.0, 5500.0, 6000.0], "e_teff": [80.0, 90.0, 100.0],
                 "e_logg": [0.2, 0.2, 0.2], "e_fe_h": [0.05, 0.06, 0.07],
                 "e_o_fe": [0.1, np.nan, 0.12], "e_alpha_fe": [0.03, 0.04, -1.0]})
    names = ("teff", "logg", "vmic", "fe_h", "o_fe", "alpha_fe", "s_fe")
    err = cleaning.training_label_errors(tab, names)
    assert err.shape == (3, len(names))
    # teff, logg, vmic and [Fe/H] enter as given, whatever errors the table has
    np.testing.assert_array_equal(err[:, :4], 0.0)
    # NaN, negative and missing errors: that label of that star is not corrected
    np.testing.assert_array_equal(err[:, 4], [0.1, 0.0, 0.12])
    np.testing.assert_array_equal(err[:, 5], [0.03, 0.04, 0.0])
    np.testing.assert_array_equal(err[:, 6], 0.0)
    # a DataFrame works the same
    np.testing.assert_array_equal(cleaning.training_label_errors(tab.to_pandas(), names), err)


def test_correcting_only_the_abundance_errors_undoes_their_dilution_and_keeps_teff(sim):
    # noisy training labels throughout, errors given for the abundance only (as notebook 03
    # trains the dwarfs): the held-out abundance is no longer stretched away from the mean and scatters less
    # about the truth, and teff is no worse than without the correction
    from lamostcannon import cleaning

    rng = np.random.default_rng(11)
    lab = sim.labels(1500)
    flux, ivar = sim.spectra(lab, np.full(1500, 200.0))
    sd = np.array([60.0, 0.2, 0.06, 0.06])      # mg_fe's error is 3/4 of its spread
    noisy = lab + rng.standard_normal(lab.shape) * sd
    table = {**{n: noisy[:, j] for j, n in enumerate(NAMES)},
             **{f"e_{n}": np.full(1500, sd[j]) for j, n in enumerate(NAMES)}}
    err = cleaning.training_label_errors(table, NAMES)
    assert np.count_nonzero(err.any(axis=0)) == 1 and err[0, 3] == sd[3]
    test_lab = sim.labels(300)
    tflux, tivar = sim.spectra(test_lab, np.full(300, 200.0))
    wave = np.linspace(4000, 5000, sim.n_pix)
    got = {k: CannonModel(NAMES, wavelength=wave).train(noisy, flux, ivar, label_errors=e)
           .test(tflux, tivar).labels for k, e in (("plain", None), ("abundance", err))}
    j = NAMES.index("mg_fe")
    slope = {k: np.polyfit(test_lab[:, j], v[:, j], 1)[0] for k, v in got.items()}
    scatter = {k: np.std(v[:, j] - test_lab[:, j]) for k, v in got.items()}
    assert slope["plain"] > 1.2 and abs(slope["abundance"] - 1.0) < 0.15, slope
    assert scatter["abundance"] < 0.8 * scatter["plain"], scatter
    teff = {k: np.std(v[:, 0] - test_lab[:, 0]) for k, v in got.items()}
    assert teff["abundance"] < 1.1 * teff["plain"], teff


def test_compiled_newton_takes_the_same_steps_as_numpy(trained, test_set, sim, monkeypatch):
    """The compiled Newton iteration (:func:`lamostcannon.kernels.newton_fits`, one spectrum at
    a time) is the batched numpy one: same accepted steps, so the same iteration counts, flags
    and minima (labels within 1e-6 of the formal errors; measured here: identical counts and
    flags, labels within ~1e-12; only the rounding of the linear solves and sums differs), for
    ordinary stars, stars beyond the label bounds (projected steps) and several starts (the
    stop on joining an explored basin); a polynomial with NaN gives up alike. Calls
    below ``kernels.NEWTON_MIN_SPECTRA`` spectra stay in numpy (numba's loading would cost more
    than it saves)."""
    from lamostcannon import kernels

    if not kernels.ENABLED:
        pytest.skip("numba kernels switched off (LAMOSTCANNON_NUMBA=0)")
    model, *_ = trained
    _, flux, ivar = test_set
    monkeypatch.setattr(kernels, "NEWTON_MIN_SPECTRA", 1)  # compiled for calls of any size
    rng = np.random.default_rng(11)
    lab = MEAN + STD * rng.standard_normal((40, 4))
    lab[:, 0] = MEAN[0] + 6 * STD[0] * np.sign(rng.standard_normal(40))  # beyond the bound
    f2, i2 = sim.spectra(lab, rng.uniform(60, 150, 40))
    flux, ivar = np.vstack([flux, f2]), np.vstack([ivar, i2])
    runs = {}
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        runs[enabled] = model.test(flux, ivar, chunk_size=64, n_starts=3, bound=0.3)
    fast, slow = runs[True], runs[False]
    assert np.any(slow.flag & cannon.FLAG_AT_BOUND)
    # the two paths round their linear solves differently, so a step decided on a threshold
    # (accept, converge) could in principle go the other way on some CPU: allow one star in 100
    allowed = max(1, len(flux) // 100)
    assert np.sum(fast.flag != slow.flag) <= allowed
    assert np.sum(fast.n_iter != slow.n_iter) <= allowed
    same = (fast.flag == slow.flag) & np.all(np.isfinite(slow.labels), axis=1)
    same &= (slow.flag & cannon.FLAG_NOT_CONVERGED) == 0
    assert same.sum() >= len(flux) - 2 * allowed - np.sum(~np.isfinite(slow.labels).all(axis=1))
    assert np.all(np.abs(fast.labels[same] - slow.labels[same]) <= 1e-6 * slow.errors[same])
    # a polynomial with NaN coefficients: no step, not converged, same iterations
    tab = cannon._tables(2)
    poly = np.zeros((3, tab["K4"]))
    poly[:, 0] = 10.0
    poly[:, 3] = poly[:, 5] = 1.0   # x0^2 + x1^2
    poly[1, 4] = np.nan
    x0 = np.full((3, 2), 0.7)
    out = {}
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        with np.errstate(invalid="ignore"):
            out[enabled] = cannon._newton(cannon._Quartic(poly, tab), x0, np.full(2, -5.0),
                                          np.full(2, 5.0), 20)
    for a, b in zip(out[True], out[False]):
        np.testing.assert_allclose(a, b, atol=1e-12, equal_nan=True)
    assert not out[True][3][1] and out[True][3][0] and out[True][3][2]
    # below the threshold a call never loads numba: the numpy iteration runs (monkeypatched away)
    monkeypatch.setattr(kernels, "NEWTON_MIN_SPECTRA", len(flux) + 1)
    monkeypatch.setattr(kernels, "newton_fits", None)
    small = model.test(flux, ivar, chunk_size=64, n_starts=3, bound=0.3)
    np.testing.assert_array_equal(small.n_iter, slow.n_iter)  # the same numpy code as `slow`


def test_a_broken_numba_falls_back_to_numpy(trained, test_set, monkeypatch, caplog):
    """If the kernels cannot be loaded (numba broken, an unsupported platform), the test step
    says so once in the log and runs the numpy iteration: the same labels, no exception."""
    from lamostcannon import kernels

    model, *_ = trained
    _, flux, ivar = test_set
    monkeypatch.setattr(kernels, "ENABLED", False)
    expect = model.test(flux, ivar, chunk_size=64)

    def broken():
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "NEWTON_MIN_SPECTRA", 1)
    monkeypatch.setattr(kernels, "_READY", {})
    monkeypatch.setattr(kernels, "_RESAMPLED", [0])
    monkeypatch.setattr(kernels, "_compile", broken)
    with caplog.at_level("WARNING", logger="lamostcannon.kernels"):
        got = model.test(flux, ivar, chunk_size=64)
        assert not kernels.use_for_resampling(10 ** 6)
    assert "compiled kernels unavailable" in caplog.text and "no LLVM here" in caplog.text
    assert caplog.text.count("compiled kernels unavailable") == 1
    np.testing.assert_array_equal(got.labels, expect.labels)
    np.testing.assert_array_equal(got.flag, expect.flag)


def test_default_starts_find_the_deepest_of_four_basins():
    """A chi2 with four minima, (x0^2 - 1)^2 + (x1^2 - 1)^2 tilted so that (-1, -1) is the
    deepest, and starting points that rank the basins the wrong way round (the best-ranked one
    in the shallowest): each further start explores one more basin, so 2 starts stop in the
    second-shallowest and the default (:data:`cannon.N_STARTS`) reaches the deepest."""
    # (x_k^2 - 1)^2 = x_k^4 - 2 x_k^2 + 1 for k = 0, 1, plus a constant and the tilt
    poly, tab = _quartic_2d({(0, 0, 0, 0): 1.0, (0, 0): -2.0, (1, 1, 1, 1): 1.0, (1, 1): -2.0,
                             (): 12.0, (0,): 0.1, (1,): 0.2})
    cand = np.array([[1.0, 1.0], [-1.2, 1.2], [1.3, -1.3], [-1.4, -1.4]])
    cand_m4 = _monomials(cand, tab)
    assert np.all(np.diff(poly[0] @ cand_m4.T) > 0)  # ranked from the shallowest basin
    lo, hi = np.full(2, -3.0), np.full(2, 3.0)

    def fit(n_starts):
        return cannon._fit_labels(poly, cand_m4, cand, lo, hi, tab, n_starts, 50)

    x2, chi2_2 = fit(2)[:2]
    x, chi2 = fit(cannon.N_STARTS)[:2]
    assert np.all(np.sign(x2[0]) == [-1, 1]), x2
    assert np.all(np.sign(x[0]) == [-1, -1]) and chi2[0] < chi2_2[0] - 0.3, (x, chi2)
    assert cannon.N_STARTS >= 4
    default = inspect.signature(cannon.CannonModel.test).parameters["n_starts"].default
    assert default == cannon.N_STARTS


def _quartic_2d(coefficients):
    """A chi2 polynomial in 2 labels from {monomial (tuple of label indices): coefficient}."""
    tab = cannon._tables(2)
    index = {m: k for k, m in enumerate(tab["monos"])}
    poly = np.zeros((1, tab["K4"]))
    for mono, value in coefficients.items():
        poly[0, index[mono]] = value
    return poly, tab


def _monomials(points, tab):
    return np.array([[np.prod(p[list(m)]) for m in tab["monos"]] for p in points])


@pytest.mark.parametrize("barrier, flagged", [(1.0, True), (0.02, False)])
def test_multiple_minima_only_beyond_the_formal_errors(barrier, flagged, monkeypatch):
    """Two minima 2 apart with delta chi2 0.004: ``MULTIPLE_MINIMA`` when they are many formal
    errors apart (a deep double well: sigma 0.5), not when the second lies inside the best
    fit's own error bars (a shallow one: sigma 3.5), unless every distinct minimum counts."""
    # barrier * (x0^2 - 1)^2 + 0.002 x0 + x1^2 + 12
    poly, tab = _quartic_2d({(0, 0, 0, 0): barrier, (0, 0): -2.0 * barrier, (1, 1): 1.0,
                             (): 12.0 + barrier, (0,): 0.002})
    cand = np.array([[-1.0, 0.0], [1.0, 0.0]])
    lo, hi = np.full(2, -3.0), np.full(2, 3.0)
    x, chi2, _, conv, flags, _ = cannon._fit_labels(poly, _monomials(cand, tab), cand, lo, hi,
                                                    tab, 2, 50)
    assert conv[0] and x[0, 0] < -0.9
    assert bool(flags[0] & cannon.FLAG_MULTIPLE_MINIMA) == flagged
    monkeypatch.setattr(cannon, "MULTIPLE_MINIMA_SIGMA", 0.0)
    flags = cannon._fit_labels(poly, _monomials(cand, tab), cand, lo, hi, tab, 2, 50)[4]
    assert flags[0] & cannon.FLAG_MULTIPLE_MINIMA


def test_multiple_minima_with_a_non_finite_hessian_keeps_the_flag(monkeypatch):
    """Where the best fit's Hessian is not finite its formal errors are unknown: the test
    step neither raises nor drops ``MULTIPLE_MINIMA`` for that spectrum, and the others in the
    chunk are judged as usual."""
    poly, tab = _quartic_2d({(0, 0, 0, 0): 0.02, (0, 0): -0.04, (1, 1): 1.0, (): 12.02,
                             (0,): 0.002})
    poly = np.vstack([poly, poly])
    cand = np.array([[-1.0, 0.0], [1.0, 0.0]])
    real = cannon._Quartic.all

    def nan_hessian_for_the_first(self, x):
        chi2, grad, hess = real(self, x)
        hess = hess.copy()
        hess[0] = np.nan
        return chi2, grad, hess

    monkeypatch.setattr(cannon._Quartic, "all", nan_hessian_for_the_first)
    flags = cannon._fit_labels(poly, _monomials(cand, tab), cand, np.full(2, -3.0),
                               np.full(2, 3.0), tab, 2, 50)[4]
    # the shallow well's second minimum lies inside the error bars: flagged only where the
    # errors are unknown
    assert flags[0] & cannon.FLAG_MULTIPLE_MINIMA and not flags[1] & cannon.FLAG_MULTIPLE_MINIMA
