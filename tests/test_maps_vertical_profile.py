"""maps.vertical_profile, transition_height and peak_height (claims of notebook 07)."""

import numpy as np
import pandas as pd
import pytest

from lamostcannon import maps


def _stars(n=20000, seed=3):
    rng = np.random.default_rng(seed)
    z = rng.uniform(-4, 4, n)
    R = rng.uniform(7.0, 9.0, n)
    feh = -0.1 - 1.0 / (1 + np.exp(-(np.abs(z) - 2.0) / 0.3)) + rng.normal(0, 0.1, n)  # step at 2 kpc
    alfe = 0.2 - 0.05 * (np.abs(z) - 1.5) ** 2 + rng.normal(0, 0.05, n)               # peak at 1.5 kpc
    return pd.DataFrame({"R": R, "z": z, "fe_h": feh, "al_fe": alfe})


def test_transition_and_peak_heights_are_found():
    t = _stars()
    prof = maps.vertical_profile(t, "fe_h", R_range=(7.5, 8.5))
    assert list(prof.columns) == ["absz", "n", "mean", "sem"] and len(prof) == 16
    assert prof["n"].sum() == int(((t.R >= 7.5) & (t.R < 8.5)).sum())
    assert maps.transition_height(prof) == pytest.approx(2.0, abs=0.15)
    assert maps.peak_height(maps.vertical_profile(t, "al_fe")) == pytest.approx(1.5, abs=0.3)


def test_no_crossing_or_edge_peak_gives_nan():
    t = _stars()
    t["flat"] = 0.1 * np.abs(t["z"])          # monotonic: no interior peak
    prof = maps.vertical_profile(t, "flat")
    assert np.isnan(maps.peak_height(prof))
    t["const"] = np.random.default_rng(0).normal(0, 1e-3, len(t))
    few = maps.vertical_profile(t.iloc[:10], "const", min_count=20)
    assert np.isnan(maps.transition_height(few)) and np.isnan(maps.peak_height(few))
    with pytest.raises(ValueError, match="step"):
        maps.vertical_profile(t, "fe_h", step=5.0)
