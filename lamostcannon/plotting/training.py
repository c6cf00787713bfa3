"""Figure helpers for the reference set and the trained models (paper Figs 2, 3, 8, 15, 16).

Each function returns a :class:`matplotlib.figure.Figure`; notebooks save it with
:func:`lamostcannon.plotting.savefig`. Nothing here computes science: the inputs are the reference
set, spectra from the store and a trained :class:`lamostcannon.cannon.CannonModel`.
"""

from __future__ import annotations

import numpy as np

from . import use_style
from .science import label_text

#: Regions of the LAMOST spectrum shown by :func:`model_vs_data` by default (vacuum, Angstrom):
#: H-beta with its neighbours, and the Mg b triplet region.
DEFAULT_REGIONS = ((4820.0, 4920.0), (5150.0, 5200.0))

#: Panels of :func:`galah_vs_lamost` (Fig. 2): title, centre (*air* Angstrom, as Table 2) and,
#: optionally, the half-width (Angstrom). H-beta (no GALAH window: LAMOST and the Cannon model
#: only) and a Mn feature are the two panels of the paper's figure; the others show the lines of
#: the labels Mg, Ba, Eu and O.
GALAH_PANELS = (("H-beta", 4861.3, 40.0), ("Mn 4783", 4783.4), ("Mg 5711", 5711.1),
                ("Ba 6497", 6496.9), ("Eu 6645", 6645.1), ("O triplet 7772-7775", 7773.6))


def kiel_diagram(teff, logg, color=None, *, color_label="[Fe/H] (GALAH)", boundary=True,
                 title=None):
    """Fig 3: the reference set in the (LAMOST) Kiel diagram, coloured by e.g. GALAH [Fe/H].

    Parameters
    ----------
    teff, logg : arrays (S,)
        LAMOST effective temperature (K) and surface gravity.
    color : array (S,), optional
        Colour of each point.
    boundary : bool
        Draw the dwarf/giant division of eq. 1.
    """
    import matplotlib.pyplot as plt

    use_style()
    teff = np.asarray(teff, float)
    logg = np.asarray(logg, float)
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    if color is None:
        ax.scatter(teff, logg, s=4, c="k", lw=0)
    else:
        c = np.asarray(color, float)
        lo, hi = np.nanpercentile(c, [1, 99]) if np.isfinite(c).any() else (0, 1)
        sc = ax.scatter(teff, logg, s=4, c=c, lw=0, vmin=lo, vmax=hi, cmap="viridis")
        fig.colorbar(sc, ax=ax, label=color_label)
    if boundary:
        t = np.linspace(min(np.nanmin(teff), 3500.0), max(np.nanmax(teff), 7500.0), 200)
        ax.plot(t, np.where(t < 5200.0, 4.18, -6e-4 * t + 7.3), "r-", lw=1,
                label="dwarf/giant division (eq. 1)")
        ax.legend(loc="upper left")
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel(r"$T_{\rm eff}$ [K] (LAMOST)")
    ax.set_ylabel(r"$\log g$ (LAMOST)")
    if title:
        ax.set_title(title)
    return fig


def model_vs_data(wavelength, flux, ivar, model_flux, *, s2=None, regions=DEFAULT_REGIONS,
                  names=None, highlight=None):
    """Figs 2 and 8: continuum-normalised LAMOST spectra against the Cannon model.

    One row per star, one column per wavelength region. The data are drawn with their 1-sigma
    band, the model with its intrinsic scatter ``s`` as a band; pixels without data are left out.

    Parameters
    ----------
    wavelength : array (P,)
        Rest-frame vacuum wavelengths (Angstrom).
    flux, ivar, model_flux : arrays (S, P)
        Normalised flux, its inverse variance and the model (``CannonModel.predict``).
    s2 : array (P,), optional
        Model intrinsic variance ``s^2``.
    regions : sequence of (lo, hi)
        Wavelength ranges, Angstrom.
    names : sequence of str (S,), optional
        Row titles (e.g. the LAMOST designation and labels).
    highlight : bool array (P,) or dict name -> bool array (P,), optional
        Pixels to shade (e.g. an element's GALAH windows from
        :func:`lamostcannon.cleaning.window_mask`).
    """
    import matplotlib.pyplot as plt

    use_style()
    w = np.asarray(wavelength, float)
    flux = np.atleast_2d(np.asarray(flux, float))
    ivar = np.atleast_2d(np.asarray(ivar, float))
    model_flux = np.atleast_2d(np.asarray(model_flux, float))
    n, m = flux.shape[0], len(regions)
    fig, axes = plt.subplots(n, m, figsize=(3.6 * m, 1.9 * n + 0.4), squeeze=False,
                             sharex="col")
    if highlight is not None and not isinstance(highlight, dict):
        highlight = {"windows": highlight}
    s = np.sqrt(np.where(np.isfinite(s2), s2, 0.0)) if s2 is not None else np.zeros_like(w)
    for i in range(n):
        good = ivar[i] > 0
        with np.errstate(divide="ignore"):
            err = np.where(good, 1.0 / np.sqrt(np.where(good, ivar[i], 1.0)), np.nan)
        f = np.where(good, flux[i], np.nan)
        for j, (lo, hi) in enumerate(regions):
            ax = axes[i, j]
            sel = (w >= lo) & (w <= hi)
            ax.fill_between(w[sel], (f - err)[sel], (f + err)[sel], color="0.7", lw=0, step="mid")
            ax.step(w[sel], f[sel], where="mid", color="k", lw=0.8,
                    label=r"LAMOST $\pm 1\sigma$")
            ax.fill_between(w[sel], (model_flux[i] - s)[sel], (model_flux[i] + s)[sel],
                            color="C1", alpha=0.35, lw=0, step="mid")
            ax.step(w[sel], model_flux[i][sel], where="mid", color="C1", lw=0.9,
                    label=r"Cannon model $\pm s_\lambda$" if s2 is not None else "Cannon model")
            for k, (_, mask) in enumerate((highlight or {}).items()):
                for a, b in _runs(w, np.asarray(mask, bool) & sel):
                    ax.axvspan(a, b, color=f"C{3 + k}", alpha=0.2, lw=0)
            ax.set_xlim(lo, hi)
            if i == n - 1:
                ax.set_xlabel(r"rest-frame vacuum wavelength [$\rm\AA$]")
            if j == 0:
                ax.set_ylabel("normalised flux")
                if names is not None:
                    ax.set_title(str(names[i]), loc="left", fontsize=8)
    axes[0, 0].legend(loc="lower left")
    fig.tight_layout()
    return fig


def _runs(w, mask):
    """(start, end) wavelengths of contiguous True runs of ``mask`` (pixel edges)."""
    if not mask.any():
        return []
    idx = np.flatnonzero(mask)
    splits = np.flatnonzero(np.diff(idx) > 1)
    starts = np.r_[idx[0], idx[splits + 1]]
    ends = np.r_[idx[splits], idx[-1]]
    half = np.gradient(w) / 2
    return [(w[a] - half[a], w[b] + half[b]) for a, b in zip(starts, ends)]


def _sigma_text(name, std):
    """``"1 sd = 512 K"`` for the ylabel of a coefficient panel."""
    from . import label_unit

    unit = label_unit(name)
    value = f"{std:.0f}" if name == "teff" else f"{std:.2g}"
    return f"(1 sd = {value}{' ' + unit if unit else ''})"


def coefficients_vs_wavelength(model, *, wavelength=None, label_names=None, min_wavelength=4000.0,
                               title=None):
    r"""Figs 15 and 16: the linear coefficients ``theta`` of each label, and the model scatter
    ``s``, against wavelength.

    Units: the labels are standardised before training (paper section 3), so the linear
    coefficient :math:`\theta_{\lambda,l}` is the change of *normalised flux* when the label ``l``
    rises by one training-set standard deviation (given in each panel's label, e.g.
    "1 sd = 512 K"), the other labels at their means; :math:`s_\lambda` is in normalised flux.
    Untrained pixels are left out, and so is the noisy blue end below ``min_wavelength`` (the
    paper omits lambda < 4000 A).

    Parameters
    ----------
    model : trained :class:`lamostcannon.cannon.CannonModel`
    wavelength : array (P,), optional
        Default ``model.wavelength``.
    label_names : sequence of str, optional
        Subset of the model's labels to draw (default all).
    """
    import matplotlib.pyplot as plt

    use_style()
    w = np.asarray(model.wavelength if wavelength is None else wavelength, float)
    names = list(model.label_names) if label_names is None else list(label_names)
    ok = np.asarray(model.pixel_ok, bool) & (w >= min_wavelength)
    scaler = getattr(model, "scaler", None)
    stds = dict(zip(model.label_names, np.asarray(scaler.std, float))) if scaler is not None else {}
    n = len(names) + 1
    fig, axes = plt.subplots(n, 1, figsize=(10.0, 1.05 * n + 0.9), sharex=True, squeeze=False)
    axes = axes[:, 0]
    s = np.sqrt(np.where(ok, model.s2, np.nan))
    axes[0].plot(w, s, color="k", lw=0.6)
    axes[0].set_ylabel(r"$s_\lambda$", rotation=0, ha="right", va="center")
    for k, name in enumerate(names):
        col = 1 + list(model.label_names).index(name)
        ax = axes[k + 1]
        ax.axhline(0, color="0.6", lw=0.5)
        ax.plot(w, np.where(ok, model.theta[:, col], np.nan), color=f"C{k % 10}", lw=0.6)
        text = r"$\theta$ " + label_text(name).split(" [")[0]
        if name in stds:
            text += "\n" + _sigma_text(name, stds[name])
        ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    axes[-1].set_xlabel(r"rest-frame vacuum wavelength [$\rm\AA$]")
    axes[-1].set_xlim(w[ok].min() if ok.any() else w.min(), w.max())
    units = (r"$\theta$: change of normalised flux per +1 training-set standard deviation of the "
             r"label (others at their means); $s_\lambda$: intrinsic scatter, normalised flux")
    fig.text(0.5, 1.0 - 0.12 / fig.get_figheight(), units, ha="center", va="top", fontsize=7.5)
    if title:
        axes[0].set_title(title)
    fig.subplots_adjust(hspace=0.08, top=1.0 - 0.55 / fig.get_figheight())
    return fig


def _break_gaps(w, *arrays, factor=3.0):
    """Insert NaN between pixels further apart than ``factor`` times the median spacing, so that
    a line plot does not bridge the gaps of a windowed spectrum."""
    w = np.asarray(w, float)
    if w.size < 2:
        return (w, *[np.asarray(a, float) for a in arrays])
    gap = np.flatnonzero(np.diff(w) > factor * np.median(np.diff(w))) + 1
    return (np.insert(w, gap, np.nan), *[np.insert(np.asarray(a, float), gap, np.nan)
                                         for a in arrays])


def _panel_ylim(*arrays, pad=0.06):
    """(low, high) that holds every finite value of ``arrays`` with a margin; None if none."""
    vals = np.concatenate([np.asarray(a, float).ravel() for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return None
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo or 0.1
    return lo - pad * span, hi + pad * span


def galah_vs_lamost(wavelength, flux, ivar, galah, *, panels=GALAH_PANELS, halfwidth=10.0,
                    windows=None, title=None, model_flux=None, model_s2=None,
                    model_label="Cannon model"):
    """Fig. 2: one star's LAMOST spectrum against its GALAH high-resolution spectrum and, when
    given, the LAMOST Cannon model of the star.

    One panel per line region, ``centre +- halfwidth``, each with its own y-range (a deep H-beta
    does not flatten a weak Eu line). The LAMOST flux (R ~ 1800) is a line through its pixels
    with its 1-sigma band; the GALAH flux (R ~ 28,000; with its 1-sigma band when ``galah`` has
    ``sigma``) and GALAH's best-fit model are thin lines, drawn only where GALAH's window spectra
    have pixels (H-beta has none); the Cannon model (``model_flux``) is drawn with its intrinsic
    scatter ``s`` as a band; the Table 2 line windows (:data:`lamostcannon.cleaning.GALAH_WINDOWS`)
    are shaded and labelled. The axis is rest-frame vacuum wavelength: GALAH's air wavelengths and
    the windows are converted with :func:`lamostcannon.cleaning.air_to_vacuum`.

    Parameters
    ----------
    wavelength : array (P,)
        The LAMOST rest-frame vacuum grid (Angstrom), e.g. ``SpectraStore.wavelength``.
    flux, ivar : arrays (P,)
        The star's normalised LAMOST flux and its inverse variance (0 where there is no data).
    galah : dict
        The GALAH pixels, as :func:`lamostcannon.cleaning.read_window_spectrum` returns them:
        ``wave`` (air, Angstrom), ``flux``, ``model`` and optionally ``sigma``, arrays (Q,).
    panels : sequence of (title, centre) or (title, centre, halfwidth)
        Panel titles, centres (*air* Angstrom) and optional half-widths (Angstrom).
    halfwidth : float
        Half-width of the panels that do not give their own, Angstrom.
    windows : dict element -> list of (lo, hi), optional
        Air-wavelength windows to shade; default all of Table 2.
    model_flux : array (P,), optional
        The Cannon model of this star on ``wavelength`` (``CannonModel.predict`` at its labels).
    model_s2 : array (P,), optional
        The model's intrinsic variance ``s^2`` (drawn as a +-s band around ``model_flux``).
    model_label : str
        Legend text of the Cannon model (e.g. "Cannon model at the GALAH labels").
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    from ..cleaning import GALAH_WINDOWS, air_to_vacuum

    use_style()
    w = np.asarray(wavelength, float)
    f = np.asarray(flux, float).ravel()
    iv = np.asarray(ivar, float).ravel()
    if not (w.shape == f.shape == iv.shape):
        raise ValueError(f"wavelength {w.shape}, flux {f.shape} and ivar {iv.shape} must all be "
                         "(P,)")
    for key in ("wave", "flux", "model"):
        if key not in galah:
            raise KeyError(f"galah needs {key!r} (see cleaning.read_window_spectrum); has "
                           f"{sorted(galah)}")
    gw = air_to_vacuum(np.asarray(galah["wave"], float))
    gf, gm = np.asarray(galah["flux"], float), np.asarray(galah["model"], float)
    gs = np.asarray(galah["sigma"], float) if galah.get("sigma") is not None else None
    if not (gw.shape == gf.shape == gm.shape) or (gs is not None and gs.shape != gw.shape):
        raise ValueError(f"galah wave {gw.shape}, flux {gf.shape}, model {gm.shape}"
                         f"{'' if gs is None else f' and sigma {gs.shape}'} must all be (Q,)")
    if gs is None:
        gw, gf, gm = _break_gaps(gw, gf, gm)
    else:
        gw, gf, gm, gs = _break_gaps(gw, gf, gm, gs)
    mf = ms = None
    if model_flux is not None:
        mf = np.asarray(model_flux, float).ravel()
        if mf.shape != w.shape:
            raise ValueError(f"model_flux {mf.shape} must be (P,) like wavelength {w.shape}")
        ms = np.zeros_like(mf)
        if model_s2 is not None:
            s2 = np.asarray(model_s2, float).ravel()
            if s2.shape != w.shape:
                raise ValueError(f"model_s2 {s2.shape} must be (P,) like wavelength {w.shape}")
            ms = np.sqrt(np.where(np.isfinite(s2) & (s2 > 0), s2, 0.0))
    windows = GALAH_WINDOWS if windows is None else windows
    good = iv > 0
    with np.errstate(divide="ignore"):
        err = np.where(good, 1.0 / np.sqrt(np.where(good, iv, 1.0)), np.nan)
    fl = np.where(good, f, np.nan)

    n = len(panels)
    ncol = 2 if n > 1 else 1
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.5 * nrow + 0.6), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        name, centre_air = panel[0], float(panel[1])
        hw = float(panel[2]) if len(panel) > 2 else float(halfwidth)
        c = float(air_to_vacuum(centre_air))
        lo, hi = c - hw, c + hw
        sel = (w >= lo - 3.0) & (w <= hi + 3.0)  # a pixel beyond each edge so the line reaches it
        inside = (w >= lo) & (w <= hi)
        for el, ivs in windows.items():
            for a, b in ivs:
                va, vb = air_to_vacuum(np.array([a, b], float))
                if vb < lo or va > hi:
                    continue
                ax.axvspan(va, vb, color="C2", alpha=0.18, lw=0, zorder=0)
                if lo <= 0.5 * (va + vb) <= hi:
                    ax.text(0.5 * (va + vb), 1.01, el.capitalize(), fontsize=6, color="C2",
                            transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        ax.fill_between(w[sel], (fl - err)[sel], (fl + err)[sel], color="C0", alpha=0.2, lw=0)
        ax.plot(w[sel], fl[sel], "-", color="C0", lw=1.2, marker="o", ms=2.5,
                label=r"LAMOST (R ~ 1800) $\pm 1\sigma$")
        gsel = (gw >= lo) & (gw <= hi) | ~np.isfinite(gw)
        ax.plot(gw[gsel], gf[gsel], color="k", lw=0.6,
                label="GALAH (R ~ 28,000)" + (r" $\pm 1\sigma$" if gs is not None else ""))
        if gs is not None:
            ax.fill_between(gw[gsel], (gf - gs)[gsel], (gf + gs)[gsel], color="k", alpha=0.15,
                            lw=0)
        ax.plot(gw[gsel], gm[gsel], color="C3", lw=0.6, ls="--", label="GALAH best-fit model")
        in_arrays = [(fl - err)[inside], (fl + err)[inside], gf[gsel & np.isfinite(gw)],
                     gm[gsel & np.isfinite(gw)]]
        if mf is not None:
            ax.fill_between(w[sel], (mf - ms)[sel], (mf + ms)[sel], color="C1", alpha=0.3, lw=0)
            ax.plot(w[sel], mf[sel], "-", color="C1", lw=1.0,
                    label=model_label + (r" $\pm s_\lambda$" if model_s2 is not None else ""))
            in_arrays += [(mf - ms)[inside], (mf + ms)[inside]]
        ylim = _panel_ylim(*in_arrays)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(MaxNLocator(5, steps=[1, 2, 5, 10]))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.0f"))
        ax.set_title(name, loc="left", fontsize=8, pad=10)
        ax.axhline(1.0, color="0.6", lw=0.4, zorder=0)
    for i in range(0, n, ncol):
        axes[i].set_ylabel("normalised flux")
    for ax in axes[max(0, n - ncol):n]:
        ax.set_xlabel(r"rest-frame vacuum wavelength [$\rm\AA$]")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:n]:  # the first panel may lack GALAH pixels (H-beta): collect from all
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=7,
               bbox_to_anchor=(0.5, 1.0))
    top = 1.0 - 0.3 / fig.get_figheight()  # below the legend; tight_layout makes room for a title
    if title:
        fig.suptitle(title, fontsize=9, y=top, va="top")
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig
