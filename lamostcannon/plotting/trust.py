"""Figures of the trust calibrations: pulls before and after, OOD scores, what the flag caught.

Used by notebooks 04 (mock: CV pulls) and 09 (real: CV and repeat-pair pulls, the OOD score of
hot stars, M dwarfs and non-stars, best-fit model spectra of flagged objects).
"""

from __future__ import annotations

import numpy as np

from . import label_text

__all__ = ["pull_histograms", "ood_score_distributions", "model_spectra_panels"]


def _grid(n, ncols, panel=(2.6, 2.2)):
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def pull_histograms(pulls, label_names, *, title=None, ncols=5, zmax=5.0):
    """Histograms of ``pull_formal_<label>`` (formal errors) and ``pull_<label>`` (calibrated)
    for each label, with the unit Gaussian; the legend gives each one's 68%-quantile spread.

    Parameters
    ----------
    pulls : DataFrame, or dict name -> DataFrame
        :func:`lamostcannon.trust.cv_pulls` or :func:`lamostcannon.trust.pair_pulls` output; a
        dict draws one row of panels per table (``ncols`` = number of labels), titled by name.
    label_names : sequence of str
    """
    from scipy.stats import norm

    tables = pulls if isinstance(pulls, dict) else {"": pulls}
    panels = [(key, t, n) for key, t in tables.items() for n in label_names if f"pull_{n}" in t]
    if isinstance(pulls, dict):
        ncols = max(1, len([n for n in label_names if any(f"pull_{n}" in t
                                                           for t in tables.values())]))
    fig, axes = _grid(len(panels), ncols)
    bins = np.linspace(-zmax, zmax, 41)
    x = np.linspace(-zmax, zmax, 200)
    for ax, (key, table, n) in zip(axes, panels):
        for col, colour, what in ((f"pull_formal_{n}", "0.6", "formal"),
                                  (f"pull_{n}", "C0", "calibrated")):
            if col not in table:
                continue
            p = table[col].to_numpy(float)
            p = p[np.isfinite(p)]
            spread = np.quantile(np.abs(p), 0.6827) if p.size else np.nan
            ax.hist(np.clip(p, -zmax, zmax), bins=bins, density=True, histtype="step",
                    color=colour, lw=1.2, label=f"{what}: {spread:.2f}")
        ax.plot(x, norm.pdf(x), "k--", lw=0.8)
        ax.set_xlabel(f"pull of {label_text(n)}")
        if key:
            ax.set_title(key, fontsize=8)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def ood_score_distributions(groups: dict, threshold: float, *, title=None, smax=None):
    """Cumulative distributions of ``ood_score`` for groups of spectra (e.g. held-out training
    stars, hot stars, M dwarfs, non-stars, degraded spectra), with the ``UNLIKE_TRAINING``
    threshold. ``groups``: ``{name: scores}``; the legend gives the flagged fraction."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    finite = [np.asarray(s, float)[np.isfinite(s)] for s in groups.values()]
    top = smax or max([np.quantile(s, 0.98) for s in finite if s.size] + [threshold * 2])
    for (name, s), colour in zip(groups.items(), [f"C{k}" for k in range(10)]):
        s = np.sort(np.asarray(s, float)[np.isfinite(s)])
        if s.size == 0:
            continue
        frac = np.mean(s > threshold)
        ax.step(np.clip(s, 0, top), np.arange(1, s.size + 1) / s.size, where="post",
                color=colour, label=f"{name} (n={s.size}): {frac:.0%} above")
    ax.axvline(threshold, color="k", ls="--", lw=0.8)
    ax.set_xlim(0, top)
    ax.set_xlabel("ood_score")
    ax.set_ylabel("cumulative fraction")
    ax.legend(fontsize=6, loc="lower right", frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def model_spectra_panels(wavelength, flux, ivar, model_flux, titles, *, region=(3800.0, 7000.0),
                         ncols=1):
    """Data, best-fit model and normalised residual of a few spectra (e.g. rows of the
    model-spectra file of the ``label`` command), one panel each."""
    import matplotlib.pyplot as plt

    n = len(titles)
    fig, axes = plt.subplots(n, ncols, figsize=(7.0, 1.9 * n), squeeze=False, sharex=True)
    w = np.asarray(wavelength, float)
    sel = (w >= region[0]) & (w <= region[1])
    for k, ax in enumerate(axes.ravel()[:n]):
        f, iv, m = (np.asarray(a[k], float) for a in (flux, ivar, model_flux))
        good = sel & (iv > 0) & np.isfinite(f)
        fp = np.where(good, f, np.nan)
        ax.plot(w[sel], fp[sel], color="k", lw=0.5, label="data")
        ax.plot(w[sel], m[sel], color="C3", lw=0.6, label="model")
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(good, (f - m) * np.sqrt(iv), np.nan)
        ax.plot(w[sel], 0.25 + 0.02 * np.clip(r[sel], -10, 10), color="C0", lw=0.4,
                label="residual / sigma (x0.02, +0.25)")
        ax.set_ylim(0.0, 1.5)
        ax.set_title(titles[k], fontsize=7)
    axes.ravel()[0].legend(fontsize=6, loc="lower right", frameon=False, ncol=3)
    axes.ravel()[n - 1].set_xlabel(r"rest-frame vacuum wavelength [$\AA$]")
    fig.tight_layout()
    return fig
