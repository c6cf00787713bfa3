"""Figures of the catalogue (notebook 05): Kiel diagram, label distributions, flag fractions,
recovery of the mock truth and model fits across the Kiel diagram (paper Fig 8).

Every function takes the per-star catalogue or the per-observation table as an astropy Table or a
pandas DataFrame and returns a matplotlib Figure; saving is :func:`lamostcannon.plotting.savefig`.
"""

from __future__ import annotations

import numpy as np

from .. import catalog, labels as labelsets
from . import label_text, use_style



def _frame(table):
    """A DataFrame from a Table or DataFrame, FITS byte strings decoded (shared with ``catalog``)."""
    from ..catalog import _as_frame

    return _as_frame(table)


def kiel_diagram(stars, color: str = "fe_h", gridsize: int = 80, vmin=-1.0, vmax=0.4):
    """Kiel diagram (teff vs logg) of the catalogue, hexagonal bins coloured by the median ``color``.

    Two panels: all stars by density, and by median [Fe/H] (or ``color``); the dwarf/giant
    boundary of eq. 1 is drawn in both.
    """
    import matplotlib.pyplot as plt

    use_style()
    df = _frame(stars)
    ok = np.isfinite(df["teff"]) & np.isfinite(df["logg"])
    df = df[ok]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
    extent = (float(np.nanpercentile(df["teff"], 0.5)), float(np.nanpercentile(df["teff"], 99.5)),
              float(np.nanpercentile(df["logg"], 0.5)), float(np.nanpercentile(df["logg"], 99.5)))
    hb = axes[0].hexbin(df["teff"], df["logg"], gridsize=gridsize, bins="log", mincnt=1,
                        cmap="Greys", extent=extent)
    fig.colorbar(hb, ax=axes[0], label="stars per bin")
    c = df[color].to_numpy(float)
    fin = np.isfinite(c)
    hc = axes[1].hexbin(df["teff"][fin], df["logg"][fin], C=c[fin], reduce_C_function=np.median,
                        gridsize=gridsize, mincnt=3, cmap="viridis", vmin=vmin, vmax=vmax,
                        extent=extent)
    fig.colorbar(hc, ax=axes[1], label=f"median {label_text(color)}")
    teff = np.linspace(extent[0], extent[1], 200)
    boundary = np.where(teff < 5200, 4.18, -6e-4 * teff + 7.3)
    for ax in axes:
        ax.plot(teff, boundary, color="tab:red", lw=1, ls="--", label="eq. 1 dwarf/giant split")
        ax.set_xlabel(label_text("teff"))
    axes[0].set_ylabel(label_text("logg"))
    axes[0].invert_xaxis()
    axes[0].invert_yaxis()
    axes[0].legend(loc="upper left", fontsize="small")
    axes[0].set_title(f"{len(df):,} stars")
    axes[1].set_title(f"coloured by {label_text(color)}")
    fig.tight_layout()
    return fig


def label_distributions(stars, label_names=catalog.ALL_LABELS, bins: int = 60):
    """Histograms of every label of the catalogue, dwarf-model and giant-model stars separately."""
    import matplotlib.pyplot as plt

    use_style()
    df = _frame(stars)
    names = [n for n in label_names if n in df]
    ncol = 5
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.1 * nrow))
    axes = np.atleast_1d(axes).ravel()
    giant = df["giantmodel"].to_numpy(bool)
    for ax, name in zip(axes, names):
        values = df[name].to_numpy(float)
        fin = np.isfinite(values)
        if not fin.any():
            ax.set_visible(False)
            continue
        edges = np.linspace(*np.nanpercentile(values, [0.2, 99.8]), bins + 1)
        for sel, lab, col in ((~giant, "dwarf model", "tab:blue"), (giant, "giant model", "tab:orange")):
            if (sel & fin).any():
                ax.hist(values[sel & fin], bins=edges, histtype="step", color=col, label=lab)
        ax.set_xlabel(label_text(name))
        ax.set_yticks([])
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def flag_fractions(stars):
    """Fraction of stars with each extrapolation flag and each bit of ``flag``.

    For each flag the fraction is among the stars whose model estimates that label.
    """
    import matplotlib.pyplot as plt

    use_style()
    df = _frame(stars)
    giant = df["giantmodel"].to_numpy(bool)
    names, fractions = [], []
    for col in catalog.extrap_columns():
        label = col[:-7]
        if label == "kiel":
            has = np.ones(len(df), bool)
        else:
            has = np.array([label in labelsets.model_labels(g) for g in (False, True)])[giant.astype(int)]
        if has.any():
            names.append(col)
            fractions.append(df[col].to_numpy(bool)[has].mean())
    flags = df["flag"].to_numpy(int)
    short = {catalog.FLAG_NO_PIXELS: "no usable pixels", catalog.FLAG_NOT_CONVERGED: "not converged",
             catalog.FLAG_NO_LASP: "no LAMOST teff/logg", catalog.FLAG_NONFINITE: "non-finite labels"}
    for bit, text in catalog.FLAG_BITS.items():
        names.append(f"flag {bit}: {short.get(bit, text[:24])}")
        fractions.append(((flags & bit) != 0).mean())
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(names) + 1))
    y = np.arange(len(names))
    ax.barh(y, fractions, color="tab:gray")
    ax.set_yticks(y, names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("fraction of stars")
    for yi, f in zip(y, fractions):
        ax.text(f, yi, f" {100 * f:.1f}%", va="center", fontsize="x-small")
    fig.tight_layout()
    return fig


def truth_comparison(stars, truth, label_names=("teff", "logg", "fe_h", "o_fe", "mg_fe", "alpha_fe"),
                     key: str = "designation"):
    """Inferred catalogue labels against the mock truth, joined on ``key``; one panel per label.

    Each panel gives the bias and the scatter (standard deviation) of inferred - true.
    """
    import matplotlib.pyplot as plt

    use_style()
    df = _frame(stars).merge(_frame(truth), on=key, suffixes=("", "_true"))
    names = [n for n in label_names if n in df and f"{n}_true" in df]
    ncol = min(3, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow))
    axes = np.atleast_1d(axes).ravel()
    for ax, name in zip(axes, names):
        x, y = df[f"{name}_true"].to_numpy(float), df[name].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            ax.set_title(f"{label_text(name)}: no star with both values", fontsize="small")
            continue
        ax.hexbin(x[ok], y[ok], gridsize=50, bins="log", mincnt=1, cmap="Greys")
        lo, hi = np.nanpercentile(np.r_[x[ok], y[ok]], [0.5, 99.5])
        ax.plot([lo, hi], [lo, hi], color="tab:red", lw=1)
        d = y[ok] - x[ok]
        ax.set_title(f"{label_text(name)}: bias {np.mean(d):+.3g}, scatter {np.std(d):.3g}",
                     fontsize="small")
        ax.set_xlabel(f"true {label_text(name)}")
        ax.set_ylabel(f"inferred {label_text(name)}")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def fit_examples(wavelength, flux, ivar, model_flux, titles, window=(4000.0, 5500.0), *,
                 model_s2=None, ylim=None):
    """Data and best-fit model spectra of a few observations, both with 1-sigma bands (paper Fig 8).

    Each panel has its own y-range, wide enough for every finite data and model value in the
    window (a cool giant's molecular bands are not clipped); a legend names the data band
    (1-sigma from the inverse variance) and the model band (the model's intrinsic scatter
    ``s_lambda``).

    Parameters
    ----------
    wavelength : array (P,), Angstrom
    flux, ivar, model_flux : arrays (n, P)
    titles : list of n strings (e.g. teff, logg, [Fe/H] of each star)
    window : wavelength range shown
    model_s2 : array (P,) or (n, P), optional
        Intrinsic variance ``s^2`` of the model of each star (the dwarf and giant models differ).
    ylim : (low, high), optional
        A fixed y-range for every panel instead of the automatic one.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    use_style()
    wavelength = np.asarray(wavelength, float)
    flux = np.atleast_2d(np.asarray(flux, float))
    ivar = np.atleast_2d(np.asarray(ivar, float))
    model_flux = np.atleast_2d(np.asarray(model_flux, float))
    n = len(flux)
    if not (flux.shape == ivar.shape == model_flux.shape) or flux.shape[1] != wavelength.size:
        raise ValueError(f"flux {flux.shape}, ivar {ivar.shape} and model_flux {model_flux.shape} "
                         f"must all be (n, P) with P = {wavelength.size} like wavelength")
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} spectra")
    if model_s2 is None:
        s = np.zeros_like(model_flux)
    else:
        s2 = np.asarray(model_s2, float)
        s2 = np.broadcast_to(s2, model_flux.shape) if s2.ndim == 1 else s2
        if s2.shape != model_flux.shape:
            raise ValueError(f"model_s2 {np.shape(model_s2)} must be (P,) or (n, P)")
        s = np.sqrt(np.where(np.isfinite(s2) & (s2 > 0), s2, 0.0))
    sel = (wavelength >= window[0]) & (wavelength <= window[1])
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.45 * n + 0.9), sharex=True)
    axes = np.atleast_1d(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ax in enumerate(axes):
        w = wavelength[sel]
        f, iv, m, si = flux[i][sel], ivar[i][sel], model_flux[i][sel], s[i][sel]
        with np.errstate(divide="ignore"):
            sig = np.where(iv > 0, 1 / np.sqrt(np.where(iv > 0, iv, 1.0)), np.nan)
        fd = np.where(iv > 0, f, np.nan)
        ax.fill_between(w, fd - sig, fd + sig, color=colors[i % len(colors)], alpha=0.3, lw=0)
        ax.plot(w, fd, color=colors[i % len(colors)], lw=0.6)
        if model_s2 is not None:
            ax.fill_between(w, m - si, m + si, color="k", alpha=0.2, lw=0)
        ax.plot(w, m, color="k", lw=0.6)
        if ylim is not None:
            ax.set_ylim(*ylim)
        else:
            vals = np.concatenate([fd - sig, fd + sig, m - si, m + si])
            vals = vals[np.isfinite(vals)]
            if vals.size:
                lo, hi = vals.min(), vals.max()
                pad = 0.05 * (hi - lo or 0.1)
                ax.set_ylim(lo - pad, hi + pad)
        ax.text(0.01, 0.06, titles[i], transform=ax.transAxes, fontsize="x-small",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1.0})
    axes[-1].set_xlabel(r"rest-frame vacuum wavelength [$\AA$]")
    fig.supylabel("normalised flux")
    handles = [Patch(facecolor="0.5", alpha=0.5, label=r"LAMOST data $\pm 1\sigma$ (colour per star)"),
               Line2D([], [], color="k", lw=0.8,
                      label="best-fit Cannon model" + (r" $\pm s_\lambda$" if model_s2 is not None
                                                       else ""))]
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize="small",
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.35 / fig.get_figheight()))
    return fig
