"""The mock universe against real LAMOST spectra through the Cannon's eyes
(:mod:`lamostcannon.realism`).

The fast version of ``benchmarks/bench_realism.py``: a seeded subset of the held-out (odd obsid)
real DR10 stars of notebook 09's training cut and their mock twins. The mock is tuned on the even
obsids only, so these numbers test it. Needs the real spectra (skips without them, fails under
``LAMOSTCANNON_REQUIRE_REAL=1``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lamostcannon import realism
from lamostcannon.spectra import common_wavelength

#: Held-out stars used by the fast test (of ~550), and the seed of the subset and of the twins.
N_FAST = 260
SEED = 0


@pytest.fixture(scope="module")
def held_out(real_lamost):
    real, mock, result = realism.run(realism.TEST_PARITY, max_stars=N_FAST, seed=SEED,
                                     classifier_kw={"k": 4})
    return real, mock, result


def test_twins_match_the_real_stars_in_labels_and_snr(held_out):
    real, mock, _ = held_out
    assert len(real.table) == len(mock.table) == N_FAST
    assert np.all(real.table["obsid"] % 2 == realism.TEST_PARITY)
    np.testing.assert_allclose(mock.labels("true_"), real.labels())
    snr_real = realism.gband_snr(real.flux, real.ivar)
    snr_mock = realism.gband_snr(mock.flux, mock.ivar)
    ratio = snr_mock / snr_real
    assert abs(np.median(ratio) - 1) < 0.05 and np.percentile(np.abs(ratio - 1), 90) < 0.2, ratio


def test_mock_meets_the_issue_13_targets_on_held_out_stars(held_out):
    """Issue 13's targets on the held-out stars: per region the median and 95th percentile of the
    intrinsic scatter within a factor 2 of the real model's; per label the 12-fold CV scatter
    within 25%; the chi2-per-pixel quartiles within 30%. Measured when written (260 stars):
    see the printed report; before the systematics, molecular-band and S/N fixes the red regions
    had s ratios of 0.2."""
    _, _, result = held_out
    print(realism.format_report(result))
    s = result["s"][["ratio_median", "ratio_p95"]]
    assert ((s >= 0.5) & (s <= 2.0)).all().all(), s
    assert result["cv"]["ratio"].between(0.75, 1.25).all(), result["cv"]
    assert result["chi2"]["ratio"].between(1 / 1.3, 1.3).all(), result["chi2"]
    assert realism.targets_met(result) == {"s": True, "cv_scatter": True, "chi2_quartiles": True,
                                           "auc_goal": result["classifier"]["auc"]["all"] <= 0.6}


def test_classifier_reports_every_region(held_out):
    _, _, result = held_out
    auc = result["classifier"]["auc"]
    assert set(auc) == {"all", *realism.REGIONS}
    assert all(0.0 <= v <= 1.0 for v in auc.values())
    weights = result["classifier"]["weights"]
    assert weights.shape == common_wavelength().shape and np.isfinite(weights).sum() > 3000


def test_the_comparison_fails_a_mock_that_is_wrong(held_out):
    """The targets are not a formality: twins whose spectra belong to other stars (rows shuffled,
    a model that can learn nothing) have an intrinsic scatter far beyond a factor 2 of the real
    model's."""
    from lamostcannon.cannon import CannonModel

    real, mock, result = held_out
    order = np.random.default_rng(1).permutation(len(mock.table))
    model = CannonModel(realism.LABELS, wavelength=common_wavelength()).train(
        mock.labels(), mock.flux[order], mock.ivar[order])
    ratio = realism.scatter_by_region(model)["median"] / result["s"]["real_median"]
    assert (ratio > 2.0).any(), ratio


# ------------------------------------------------------------------------------------------------
# The classifier on mock data alone (no real spectra needed)
# ------------------------------------------------------------------------------------------------

def _mock_pair(n=160, seed=3):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"obsid": np.arange(n) * 2 + 1, "teff": rng.uniform(4800, 6500, n),
                          "logg": rng.uniform(3.8, 4.6, n), "fe_h": rng.uniform(-0.6, 0.3, n),
                          "snrg": rng.uniform(40, 150, n), "z": rng.normal(0, 1e-4, n)})
    a = realism.RealismSet("real", table, *realism.synthesize_twins(
        realism.twin_stars(table, rng), rng)[:2])
    b = realism.RealismSet("mock", table, *realism.synthesize_twins(
        realism.twin_stars(table, rng), rng)[:2])
    return a, b


def test_classifier_cannot_tell_two_mock_realisations_apart_but_finds_a_planted_feature():
    a, b = _mock_pair()
    same = realism.classifier_auc(a, b, k=4)
    assert 0.3 < same["auc"]["all"] < 0.7, same["auc"]
    wave = common_wavelength()
    planted = (wave > 6100) & (wave < 6115)
    flux = b.flux.copy()
    flux[:, planted] *= 0.97
    b2 = realism.RealismSet("mock", b.table, flux, b.ivar)
    found = realism.classifier_auc(a, b2, k=4)
    assert found["auc"]["6000-6800"] > 0.85, found["auc"]
    assert found["auc"]["4000-4700"] < 0.75, found["auc"]
    # the weight map points at the planted dip (more flux looks "real")
    w = found["weights"]
    assert np.nanmean(w[planted]) > 3 * np.nanmedian(np.abs(w))
