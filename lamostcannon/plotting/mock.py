"""Figures of the mock universe's spectra: mock against real LAMOST spectra.

:func:`plot_mock_vs_real` draws the output of :func:`lamostcannon.mock.synth.realism_rms`: the
normalised real and mock spectra of one or more stars and their difference, with the rms.
"""

from __future__ import annotations

import numpy as np

#: Default wavelength panels (rest frame, A): blue arm, green, red arm.
DEFAULT_RANGES = ((3900.0, 4600.0), (4600.0, 5700.0), (6000.0, 6800.0), (8400.0, 8800.0))


def plot_mock_vs_real(results, ranges=DEFAULT_RANGES, *, names=None):
    """Normalised real (black) and mock (red) LAMOST spectra, with the difference below each.

    Parameters
    ----------
    results : dict or sequence of dict
        Outputs of :func:`lamostcannon.mock.synth.realism_rms` (keys ``wave``, ``real``, ``mock``,
        ``good``, ``rms``, ``labels``).
    ranges : sequence of (lo, hi)
        Rest-frame wavelength panels in Angstrom, one column each.
    names : sequence of str, optional
        A label per star (e.g. "G dwarf"); defaults to the labels.

    Returns
    -------
    matplotlib.figure.Figure
        One row per star, one column per wavelength range.
    """
    import matplotlib.pyplot as plt

    if isinstance(results, dict):
        results = [results]
    n_star, n_col = len(results), len(ranges)
    fig = plt.figure(figsize=(3.4 * n_col, 2.4 * n_star), layout="constrained")
    sub = fig.subfigures(n_star, 1, squeeze=False)[:, 0]
    for k, res in enumerate(results):
        axes = sub[k].subplots(2, n_col, sharex="col", squeeze=False,
                               gridspec_kw={"height_ratios": [3, 1]})
        lab = res["labels"]
        title = (names[k] + ": " if names is not None else "") + (
            f"Teff {lab['teff']:.0f} K, log g {lab['logg']:.2f}, [Fe/H] {lab['fe_h']:+.2f}; "
            f"rms {res['rms']:.3f}")
        sub[k].suptitle(title, fontsize="small")
        wave = res["wave"]
        real = np.where(res["good"], res["real"], np.nan)
        mock = np.where(res["good"], res["mock"], np.nan)
        for j, (lo, hi) in enumerate(ranges):
            sel = (wave >= lo) & (wave <= hi)
            top, bottom = axes[0, j], axes[1, j]
            top.plot(wave[sel], real[sel], color="k", lw=0.7, label="LAMOST DR10")
            top.plot(wave[sel], mock[sel], color="tab:red", lw=0.7, label="mock")
            bottom.plot(wave[sel], (real - mock)[sel], color="0.3", lw=0.6)
            bottom.axhline(0.0, color="tab:red", lw=0.5)
            top.set_xlim(lo, hi)
            bottom.set_ylim(-0.2, 0.2)
            bottom.set_xlabel(r"rest wavelength [$\mathrm{\AA}$]")
            if j == 0:
                top.set_ylabel("normalised flux")
                bottom.set_ylabel("real - mock")
            if j == 0 and k == 0:
                top.legend(loc="lower left", fontsize="x-small")
    return fig
