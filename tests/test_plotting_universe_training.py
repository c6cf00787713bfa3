"""Tests of the paper Fig. 1 and Fig. 2 helpers (``plotting.universe.survey_density_contours``,
``plotting.training.galah_vs_lamost``) and of ``cleaning.read_window_spectrum``, on synthetic
inputs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from matplotlib.colors import to_hex
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure

from lamostcannon import cleaning, plotting
from lamostcannon.plotting import training, universe


# --------------------------------------------------------------------------------------------
# Fig. 1: survey footprints in heliocentric Galactic coordinates
# --------------------------------------------------------------------------------------------


def test_heliocentric_xyz_known_directions():
    x, y, z = universe.heliocentric_xyz([0.0, 90.0, 180.0, 33.0, 270.0],
                                        [0.0, 0.0, 0.0, 90.0, -30.0],
                                        [8.0, 2.0, 3.0, 1.5, 2.0])
    np.testing.assert_allclose(x, [8.0, 0.0, -3.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(y, [0.0, 2.0, 0.0, 0.0, -np.sqrt(3.0)], atol=1e-12)
    np.testing.assert_allclose(z, [0.0, 0.0, 0.0, 1.5, -1.0], atol=1e-12)


def test_surface_density_counts_stars_per_kpc2(rng):
    u = rng.uniform(-1.0, 1.0, 4000)
    v = rng.uniform(-1.0, 1.0, 4000)
    for smooth in (0.0, 1.5):
        uc, vc, sig = universe.surface_density(u, v, extent_u=(-5, 5), extent_v=(-4, 4),
                                               bin_kpc=0.25, smooth_bins=smooth, weight=3.0)
        assert sig.shape == (vc.size, uc.size) == (32, 40)
        # the smoothing conserves stars; the weight multiplies them
        assert sig.sum() * 0.25**2 == pytest.approx(3.0 * 4000, rel=1e-6)
    # a uniform 2 x 2 kpc square: 1000 stars per kpc^2 in its middle, times the weight
    assert np.median(sig[(np.abs(vc) < 0.5)][:, np.abs(uc) < 0.5]) == pytest.approx(3000, rel=0.25)


def _mock_truth(rng, n=6000, in_lamost_column=False):
    d_l = rng.exponential(1.5, n)
    d_g = rng.exponential(0.5, n)
    l = rng.uniform(0.0, 360.0, 2 * n)
    b = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, 2 * n))) * 0.3
    lamost = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    t = Table({"l": l, "b": b, "distance": np.r_[d_l, d_g], "in_galah": ~lamost})
    if in_lamost_column:
        t["in_lamost"] = lamost
    else:
        t["n_obs"] = lamost.astype(np.int32) * rng.integers(1, 3, 2 * n)
    return t


@pytest.mark.parametrize("in_lamost_column", [False, True])
def test_survey_density_contours(rng, in_lamost_column):
    truth = _mock_truth(rng, in_lamost_column=in_lamost_column)
    fig = universe.survey_density_contours(truth)
    assert isinstance(fig, Figure)
    face, edge = fig.axes
    # the heliocentric convention is named on the axes (the Galactic centre at x = +8)
    assert face.get_ylabel().startswith("y [kpc] (heliocentric")
    assert edge.get_ylabel().startswith("z [kpc] (heliocentric")
    assert edge.get_xlabel() == plotting.FRAME_AXIS_TEXT["helio_x"]
    assert "Galactic centre at x = +8" in edge.get_xlabel()
    # the default extent holds the lowest contour and is a multiple of 2 kpc
    lo, hi = face.get_xlim()
    assert lo == -hi and hi % 2 == 0 and 4 <= hi <= 20
    assert edge.get_xlim() == face.get_xlim()
    for ax in (face, edge):
        sets = [c for c in ax.get_children() if isinstance(c, ContourSet)]
        colours = {to_hex(c.get_edgecolor()[0]) for c in sets}
        assert colours == {universe.SURVEY_COLORS["LAMOST"], universe.SURVEY_COLORS["GALAH"]}
        for c in sets:
            assert set(c.levels) <= set(universe.SURVEY_DENSITY_LEVELS)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:2] == ["GALAH (6,000 stars)", "LAMOST (6,000 stars)"]
    assert len(texts) == 2 + len(universe.SURVEY_DENSITY_LEVELS)
    plt.close(fig)

    fig = universe.survey_density_contours(truth, extent_kpc=10.0, z_extent_kpc=3.0,
                                           weight={"LAMOST": 2.0})
    assert fig.axes[0].get_xlim() == (-10.0, 10.0) and fig.axes[1].get_ylim() == (-3.0, 3.0)
    plt.close(fig)


def test_survey_density_contours_needs_survey_columns(rng):
    truth = _mock_truth(rng, n=50)
    with pytest.raises(KeyError, match="in_galah"):
        universe.survey_density_contours(truth[["l", "b", "distance", "n_obs"]])
    with pytest.raises(KeyError, match="n_obs"):
        universe.survey_density_contours(truth[["l", "b", "distance", "in_galah"]])


# --------------------------------------------------------------------------------------------
# Fig. 2: GALAH against LAMOST for one star
# --------------------------------------------------------------------------------------------


def _window_wave():
    """An air grid made of short pieces around some Table 2 windows, with gaps between them."""
    pieces = [np.arange(a - 0.25, b + 0.25, 0.05)
              for el in ("mg", "ba", "eu", "o") for a, b in cleaning.GALAH_WINDOWS[el]]
    return np.sort(np.concatenate(pieces))


def _write_window_spectra(path, ids, wave, rng):
    flux = 1.0 - 0.3 * rng.random((len(ids), wave.size))
    sigma = np.full_like(flux, 0.01)
    model = flux + 0.005
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(wave.astype(np.float32), name="WAVE"),
        fits.ImageHDU(flux.astype(np.float32), name="FLUX"),
        fits.ImageHDU(sigma.astype(np.float32), name="SIGMA"),
        fits.ImageHDU(model.astype(np.float32), name="MODEL"),
        fits.BinTableHDU(Table({"sobject_id": np.asarray(ids, np.int64)}), name="OBJECTS"),
    ]).writeto(path)
    return flux.astype(np.float32), model.astype(np.float32)


def test_read_window_spectrum(tmp_path, rng):
    wave = _window_wave()
    ids = [131106373201002, 140515381001002, 170206321501002]
    path = tmp_path / "window_spectra.fits"
    flux, model = _write_window_spectra(path, ids, wave, rng)
    got = cleaning.read_window_spectrum(path, 140515381001002)
    assert set(got) == {"wave", "wave_vacuum", "flux", "sigma", "model"}
    np.testing.assert_allclose(got["wave"], wave.astype(np.float32))
    np.testing.assert_allclose(got["flux"], flux[1])
    np.testing.assert_allclose(got["model"], model[1])
    np.testing.assert_allclose(got["sigma"], 0.01, rtol=1e-6)
    np.testing.assert_allclose(got["wave_vacuum"], cleaning.air_to_vacuum(got["wave"]))
    assert got["wave_vacuum"][0] - got["wave"][0] == pytest.approx(1.32, abs=0.05)  # ~4730 A
    with pytest.raises(KeyError, match="not among the 3 stars"):
        cleaning.read_window_spectrum(path, 1)


def _fig2_inputs(rng, with_sigma=False):
    w = np.exp(np.arange(np.log(3700.0), np.log(9100.0), 1e-4))  # ~ LAMOST's log grid
    lines = [cleaning.air_to_vacuum(c) for c in (5711.1, 6496.9, 7772.0, 7774.2, 7775.4)]
    flux = 1.0 - sum(0.1 * np.exp(-0.5 * ((w - c) / 1.5) ** 2) for c in lines)
    hbeta = cleaning.air_to_vacuum(4861.3)
    flux = flux - 0.6 * np.exp(-0.5 * ((w - hbeta) / 6.0) ** 2)  # a deep, broad H-beta
    flux = flux + rng.normal(0.0, 0.005, w.size)
    ivar = np.full(w.size, 1e4)
    ivar[(w > 7780.0) & (w < 7782.0)] = 0.0  # a masked stretch is left out
    gw = _window_wave()
    gv = cleaning.air_to_vacuum(gw)
    gmodel = 1.0 - sum(0.5 * np.exp(-0.5 * ((gv - c) / 0.1) ** 2) for c in lines)
    galah = {"wave": gw, "flux": gmodel + rng.normal(0.0, 0.01, gw.size), "model": gmodel}
    if with_sigma:
        galah["sigma"] = np.full(gw.size, 0.01)
    return w, flux, ivar, galah


def test_galah_vs_lamost(rng):
    w, flux, ivar, galah = _fig2_inputs(rng)
    fig = training.galah_vs_lamost(w, flux, ivar, galah, title="a star")
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(training.GALAH_PANELS) == 6
    assert axes[0].get_title(loc="left") == "H-beta"
    for ax, panel in zip(axes, training.GALAH_PANELS):
        name, centre = panel[:2]
        hw = panel[2] if len(panel) > 2 else 10.0
        c = cleaning.air_to_vacuum(centre)
        assert ax.get_xlim() == pytest.approx((c - hw, c + hw))
        assert ax.get_title(loc="left") == name
        lamost_line, galah_line, model_line = ax.get_lines()[:3]
        assert lamost_line.get_marker() == "o"
        # GALAH pieces are not joined across the gaps between windows
        gx = np.asarray(galah_line.get_xdata(), float)
        if np.isfinite(gx).sum() > 1:
            assert np.isnan(gx).any()
            seg = np.split(gx, np.flatnonzero(np.isnan(gx)))
            assert all(np.diff(s[np.isfinite(s)]).max(initial=0.0) <= 3 * 0.05 + 1e-6 for s in seg)
    # y-range per panel: H-beta reaches down to ~0.4, the Eu panel stays near the continuum
    hb_lo = axes[0].get_ylim()[0]
    eu_lo = axes[4].get_ylim()[0]
    assert hb_lo < 0.5 and eu_lo > 0.5
    lx, ly = (np.asarray(a, float) for a in axes[0].get_lines()[0].get_data())
    inside = (lx > axes[0].get_xlim()[0]) & (lx < axes[0].get_xlim()[1]) & np.isfinite(ly)
    assert axes[0].get_ylim()[0] < ly[inside].min()  # nothing clipped
    o_panel = axes[5]
    labels = [t.get_text() for t in o_panel.texts]
    assert labels.count("O") == 3
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == [r"LAMOST (R ~ 1800) $\pm 1\sigma$", "GALAH (R ~ 28,000)",
                     "GALAH best-fit model"]
    assert fig._suptitle.get_text() == "a star"
    # the masked LAMOST stretch is NaN in the drawn line
    lx, ly = (np.asarray(a, float) for a in o_panel.get_lines()[0].get_data())
    assert np.all(np.isnan(ly[(lx > 7780.0) & (lx < 7782.0)]))
    plt.close(fig)

    one = training.galah_vs_lamost(w, flux, ivar, galah, panels=[("O", 7774.0)], halfwidth=5.0)
    assert len([ax for ax in one.axes if ax.get_visible()]) == 1
    plt.close(one)


def test_galah_vs_lamost_with_the_cannon_model(rng):
    w, flux, ivar, galah = _fig2_inputs(rng, with_sigma=True)
    model = flux + 0.01
    s2 = np.full(w.size, 0.02**2)
    fig = training.galah_vs_lamost(w, flux, ivar, galah, model_flux=model, model_s2=s2,
                                   model_label="Cannon model at the GALAH labels")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert r"Cannon model at the GALAH labels $\pm s_\lambda$" in texts
    assert r"GALAH (R ~ 28,000) $\pm 1\sigma$" in texts
    hbeta = fig.axes[0]
    assert len(hbeta.get_lines()) >= 4  # LAMOST, GALAH (empty here), GALAH model, Cannon model
    # the model band is drawn: a PolyCollection per band (LAMOST, GALAH, model) in a GALAH panel
    assert len(fig.axes[2].collections) >= 3
    plt.close(fig)
    with pytest.raises(ValueError, match="model_flux"):
        training.galah_vs_lamost(w, flux, ivar, galah, model_flux=model[:-1])
    with pytest.raises(ValueError, match="model_s2"):
        training.galah_vs_lamost(w, flux, ivar, galah, model_flux=model, model_s2=s2[:5])


def test_galah_vs_lamost_checks_shapes():
    w = np.linspace(5000.0, 8000.0, 100)
    galah = {"wave": np.array([5711.0, 5711.1]), "flux": np.ones(2), "model": np.ones(2)}
    with pytest.raises(ValueError, match=r"must all be \(P,\)"):
        training.galah_vs_lamost(w, np.ones(99), np.ones(100), galah)
    with pytest.raises(KeyError, match="model"):
        training.galah_vs_lamost(w, np.ones(100), np.ones(100), {"wave": w, "flux": w})
    with pytest.raises(ValueError, match=r"must all be \(Q,\)"):
        training.galah_vs_lamost(w, np.ones(100), np.ones(100),
                                 {"wave": np.ones(3), "flux": np.ones(2), "model": np.ones(2)})
