"""Smoke tests of the notebook-09 figure helpers (lamostcannon.plotting.real) on synthetic inputs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lamostcannon.plotting import real as preal


def test_hot_star_flags(rng):
    import matplotlib.pyplot as plt

    n = 40
    hot_teff = rng.uniform(7000.0, 15000.0, n)
    inferred = rng.uniform(6500.0, 8000.0, n)
    kde = inferred > 7400.0
    outside = inferred > 7100.0
    flags = pd.DataFrame({"kde_extrap": kde, "outside_training": outside, "extrap": kde | outside})
    fig = preal.hot_star_flags(hot_teff, inferred, flags, teff_boundary=7400.0, teff_train_max=7000.0)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_title() == f"{n} stars hotter than the training set"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == f"not flagged ({(~(kde | outside)).sum()})"
    assert texts[2] == f"beyond KDE boundary ({kde.sum()})"
    # disjoint groups: every star drawn once
    assert sum(len(c.get_offsets()) for c in ax.collections) == n
    plt.close(fig)

    with pytest.raises(ValueError, match="kde_extrap"):
        preal.hot_star_flags(hot_teff, inferred, flags.drop(columns="kde_extrap"), 7400.0, 7000.0)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        preal.hot_star_flags(hot_teff, inferred[:-1], flags, 7400.0, 7000.0)


def test_repeat_pulls(rng):
    import matplotlib.pyplot as plt

    names = ["teff", "logg", "fe_h"]
    diffs = pd.DataFrame({f"z_{n}": 2.0 * rng.standard_normal(200) for n in names})
    diffs.loc[0, "z_teff"] = np.nan          # non-finite pulls are left out
    diffs.loc[1, "z_logg"] = 50.0            # and far outliers clipped into the last bin
    spreads = pd.DataFrame({"z_robust": [2.0, 1.9, 2.1], "single_visit": [40.0, 0.05, 0.03]},
                           index=pd.Index(names, name="label"))
    fig = preal.repeat_pulls(diffs, spreads, names)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(names)
    assert fig.axes[0].get_title() == "teff: single visit 40"
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {
        "repeat pairs", "N(0, 1)", "N(0, 2.00)"}
    plt.close(fig)

    fig = preal.repeat_pulls(diffs, spreads, ["logg"])   # a single label still works
    assert len(fig.axes) == 1
    plt.close(fig)

    with pytest.raises(ValueError, match="z_mg_fe"):
        preal.repeat_pulls(diffs, spreads, ["teff", "mg_fe"])
