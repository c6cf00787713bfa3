"""Figures of the mock-against-real comparison of :mod:`lamostcannon.realism`.

* :func:`scatter_vs_wavelength`: the intrinsic scatter ``s`` of two Cannon models (e.g. real and
  mock) against wavelength, with the comparison regions shaded;
* :func:`classifier_map`: where a classifier tells mock from real spectra: its per-pixel weights
  and the mean real - mock difference of the twins, with the AUC of each region;
* :func:`through_the_model`: one real star and its mock twin against a model, with the residuals
  in units of the noise.
"""

from __future__ import annotations

import numpy as np

#: Panels (rest-frame A) of the wavelength figures.
DEFAULT_PANELS = ((3900.0, 5000.0), (5000.0, 6400.0), (6400.0, 9000.0))


def _shade_regions(ax, regions, lo, hi):
    for k, (name, (a, b)) in enumerate(regions.items()):
        if b < lo or a > hi:
            continue
        ax.axvspan(max(a, lo), min(b, hi), color="0.92" if k % 2 else "0.85", lw=0, zorder=0)


def scatter_vs_wavelength(wave, scatters, *, regions=None, panels=DEFAULT_PANELS, ylim=None,
                          title=None):
    """Intrinsic scatter ``s`` of several models against wavelength.

    Parameters
    ----------
    wave : array (P,)
        Rest-frame wavelength, A.
    scatters : dict label -> array (P,)
        ``s`` per pixel (NaN where a model has no trained pixel), e.g. ``{"real DR10": ...,
        "mock": ...}``; drawn in that order.
    regions : dict name -> (lo, hi), optional
        Shaded (e.g. :data:`lamostcannon.realism.REGIONS`).
    panels : sequence of (lo, hi)
        One row per wavelength range.
    ylim : (lo, hi), optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.3 * len(panels)), squeeze=False,
                             layout="constrained")
    colours = ("k", "tab:red", "tab:blue", "tab:green")
    for ax, (lo, hi) in zip(axes[:, 0], panels):
        sel = (wave >= lo) & (wave <= hi)
        if regions:
            _shade_regions(ax, regions, lo, hi)
        for (label, s), c in zip(scatters.items(), colours):
            ax.plot(wave[sel], np.asarray(s)[sel], color=c, lw=0.6, label=label)
        ax.set_xlim(lo, hi)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_ylabel("intrinsic scatter $s$")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel(r"rest wavelength [$\mathrm{\AA}$]")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def classifier_map(result, *, regions=None, panels=DEFAULT_PANELS):
    """Where the mock differs from real spectra, as a classifier sees it.

    Parameters
    ----------
    result : dict
        Output of :func:`lamostcannon.realism.classifier_auc` (``wave``, ``weights``,
        ``mean_diff``, ``auc``).
    regions : dict name -> (lo, hi), optional
        Shaded and labelled with their AUC.
    panels : sequence of (lo, hi)

    Returns
    -------
    matplotlib.figure.Figure
        Per panel: the logistic-regression weights per standardised pixel (top; positive: more
        flux looks real) and the mean real - mock normalised flux of the twins (bottom).
    """
    import matplotlib.pyplot as plt

    wave, weights, diff = result["wave"], result["weights"], result["mean_diff"]
    fig = plt.figure(figsize=(10, 3.0 * len(panels)), layout="constrained")
    sub = fig.subfigures(len(panels), 1, squeeze=False)[:, 0]
    for sf, (lo, hi) in zip(sub, panels):
        top, bottom = sf.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1]})
        sel = (wave >= lo) & (wave <= hi)
        for ax in (top, bottom):
            if regions:
                _shade_regions(ax, regions, lo, hi)
            ax.axhline(0.0, color="0.5", lw=0.5)
        top.plot(wave[sel], weights[sel], color="tab:purple", lw=0.6)
        bottom.plot(wave[sel], diff[sel], color="0.2", lw=0.6)
        if regions:
            for name, (a, b) in regions.items():
                if lo <= 0.5 * (a + b) <= hi and name in result["auc"]:
                    top.text(0.5 * (a + b), 1.0, f"AUC {result['auc'][name]:.2f}",
                             transform=top.get_xaxis_transform(), ha="center", va="bottom",
                             fontsize="x-small")
        top.set_ylabel("weight")
        bottom.set_ylabel("real - mock")
        bottom.set_xlim(lo, hi)
        bottom.set_xlabel(r"rest wavelength [$\mathrm{\AA}$]")
    fig.suptitle(f"mock vs real classifier: ROC AUC {result['auc']['all']:.3f} on the whole "
                 f"spectrum ({result['n']} twins each)", fontsize="medium")
    return fig


def through_the_model(wave, real, mock, *, ranges=((4700.0, 4900.0), (5100.0, 5300.0),
                                                   (6450.0, 6650.0)), title=None):
    """A real star and its mock twin against the same model.

    Parameters
    ----------
    wave : array (P,)
    real, mock : dict
        ``flux``, ``ivar``, ``model`` (P,) and ``label`` (legend text) each, e.g. from
        :func:`lamostcannon.realism.through_model`.
    ranges : sequence of (lo, hi)
        Rest-frame panels, A.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Top: both spectra and their model fits; bottom: residuals / sigma.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ranges), figsize=(3.6 * len(ranges), 4.2), sharex="col",
                             squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [2, 1]})
    for j, (lo, hi) in enumerate(ranges):
        sel = (wave >= lo) & (wave <= hi)
        top, bottom = axes[0, j], axes[1, j]
        for d, c, off in ((real, "k", 0.0), (mock, "tab:red", 0.25)):
            good = sel & (d["ivar"] > 0)
            f = np.where(good, d["flux"], np.nan)
            top.plot(wave[sel], f[sel] + off, color=c, lw=0.7, label=d["label"])
            top.plot(wave[sel], d["model"][sel] + off, color="tab:orange", lw=0.7, ls="--")
            z = np.where(good, (d["flux"] - d["model"]) * np.sqrt(np.maximum(d["ivar"], 0.0)),
                         np.nan)
            bottom.plot(wave[sel], z[sel], color=c, lw=0.6)
        bottom.axhline(0.0, color="0.5", lw=0.5)
        top.set_xlim(lo, hi)
        bottom.set_xlabel(r"rest wavelength [$\mathrm{\AA}$]")
        if j == 0:
            top.set_ylabel("normalised flux (+offset)")
            bottom.set_ylabel("residual / sigma")
            top.legend(loc="lower left", fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="small")
    return fig
