"""Figure helpers for the science figures (paper Figs 9-14 and 17). Each returns a Figure.

Notebooks compute with :mod:`lamostcannon.binaries` and :mod:`lamostcannon.maps` and pass the
results here; these helpers only draw. Labels are mathtext (no LaTeX).
"""

from __future__ import annotations

import numpy as np

from . import axis_text, colorbar_text, label_text, use_style


def _subplots(n, ncols, panel=(2.6, 2.4), **kw):
    import matplotlib.pyplot as plt

    use_style()
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows),
                             squeeze=False, **kw)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes


# ----------------------------------------------------------------------------- Fig 9
def chemical_distance_figure(d_binary, d_field, *, growth=None, peaks=None, bins=None):
    """Fig 9: distributions of the eq. 6 distance for binaries and matched field pairs.

    ``peaks`` (optional) is the ``(binary, field)`` pair of KDE modes
    (:func:`lamostcannon.binaries.kde_peak`), drawn dashed; the medians of both distributions are
    drawn dotted, and the legend gives both numbers for both groups, so a reader can tell the
    modes (the paper's "peaks") from the medians. ``growth`` (optional) is
    :func:`lamostcannon.binaries.separation_growth`'s table, drawn in a second panel (medians and
    their ratio against the elements added).
    """
    from matplotlib.lines import Line2D

    d_binary = np.asarray(d_binary, float)
    d_field = np.asarray(d_field, float)
    d_binary, d_field = d_binary[np.isfinite(d_binary)], d_field[np.isfinite(d_field)]
    fig, axes = _subplots(2 if growth is not None else 1, 2, panel=(3.8, 3.2))
    ax = axes[0, 0]
    both = np.concatenate([d_binary, d_field]) if d_binary.size + d_field.size else np.array([1.0])
    if bins is None:
        bins = np.linspace(0, np.percentile(both, 99) * 1.05 + 1e-9, 30)
    ax.hist(d_field, bins=bins, density=True, histtype="stepfilled", alpha=0.4, color="0.5",
            label=f"field pairs (N = {d_field.size:,})")
    ax.hist(d_binary, bins=bins, density=True, histtype="step", lw=1.5, color="C3",
            label=f"wide binaries (N = {d_binary.size:,})")
    colors = ("C3", "0.3")
    medians = tuple(float(np.median(d)) if d.size else np.nan for d in (d_binary, d_field))
    for m, c in zip(medians, colors):
        if np.isfinite(m):
            ax.axvline(m, color=c, ls=":", lw=1.0)
    handles, labels = ax.get_legend_handles_labels()
    if peaks is not None:
        for p, c in zip(peaks, colors):
            if p is not None and np.isfinite(p):
                ax.axvline(p, color=c, ls="--", lw=0.9)
        handles.append(Line2D([], [], color="0.2", ls="--", lw=0.9))
        labels.append(f"KDE mode: binaries {peaks[0]:.2f}, field {peaks[1]:.2f}")
    handles.append(Line2D([], [], color="0.2", ls=":", lw=1.0))
    labels.append(f"median: binaries {medians[0]:.2f}, field {medians[1]:.2f}")
    ax.set_xlabel("chemical distance (eq. 6)")
    ax.set_ylabel("density")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.6)  # head room: the legend stays clear of the peaks
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    if growth is not None:
        ax = axes[0, 1]
        k = np.asarray(growth["n_elements"])
        ax.plot(k, growth["median_binary"], "o-", color="C3", label="binaries (median)")
        ax.plot(k, growth["median_field"], "s-", color="0.4", label="field (median)")
        ax.set_xticks(k)
        ax.set_xticklabels([label_text(e) for e in growth["added"]], rotation=60, fontsize=7)
        ax.set_xlabel("element added (cumulative)")
        ax.set_ylabel("median distance")
        ax2 = ax.twinx()
        ax2.plot(k, growth["ratio"], "^:", color="C0", label="field / binary (right axis)")
        ax2.set_ylabel("field / binary", color="C0")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- Figs 10-12
def _extend(values, vmin, vmax) -> str:
    """Matplotlib's colour-bar ``extend`` for values saturating below ``vmin``/above ``vmax``."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    low, high = bool(v.size and v.min() < vmin), bool(v.size and v.max() > vmax)
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((low, high),
                                                                                 "neither")


def _mark(ax, xy, kind):
    """The Sun (star) or the Galactic centre (plus), with a short label."""
    if kind == "sun":
        ax.plot(*xy, marker="*", color="k", ms=7, mec="w", mew=0.4, ls="none", zorder=5,
                clip_on=False)
    else:  # drawn whole even on the edge of the map
        ax.plot(*xy, marker="+", color="k", ms=8, mew=1.2, ls="none", zorder=5, clip_on=False)
        ax.annotate("GC", xy, xytext=(3, 3), textcoords="offset points", fontsize=7)


def maps_figure(maps, labels=None, *, ncols=3, cmap="viridis", percentiles=(2, 98),
                show_sun=None, vlims=None, show_gc=None, stat="mean"):
    """Grid of mean-label maps (one panel per label) from a :class:`maps.LabelMaps`.

    Colour limits per panel are the ``percentiles`` of the finite bin means unless ``vlims``
    (dict label -> (lo, hi)) says otherwise; bins beyond the limits saturate, and the colour bar
    then shows arrows (``extend``). Each colour bar names the statistic and the unit
    (:func:`lamostcannon.plotting.colorbar_text`), each axis the frame
    (:data:`lamostcannon.plotting.FRAME_AXIS_TEXT`). ``show_sun``/``show_gc``: an ``(x, y)``
    point to mark as the Sun (star) or the Galactic centre (plus, labelled GC); a legend under
    the panels names the markers.
    """
    from matplotlib.lines import Line2D

    labels = list(labels or maps.labels)
    fig, axes = _subplots(len(labels), ncols, panel=(2.8, 2.5), sharex=True, sharey=True)
    for ax, lab in zip(axes.ravel(), labels):
        m = maps.mean[lab]
        finite = m[np.isfinite(m)]
        if vlims and lab in vlims:
            vmin, vmax = vlims[lab]
        elif finite.size:
            vmin, vmax = np.percentile(finite, percentiles)
        else:
            vmin, vmax = 0.0, 1.0
        im = ax.pcolormesh(maps.x_edges, maps.y_edges, m.T, cmap=cmap, vmin=vmin, vmax=vmax,
                           shading="flat", rasterized=True)
        cb = fig.colorbar(im, ax=ax, pad=0.02, fraction=0.06, extend=_extend(finite, vmin, vmax))
        cb.set_label(colorbar_text(lab, stat), fontsize=7)
        cb.ax.tick_params(labelsize=7)
        ax.set_title(label_text(lab).split(" [")[0])
        if show_sun is not None:
            _mark(ax, show_sun, "sun")
        if show_gc is not None:
            _mark(ax, show_gc, "gc")
    for ax in axes[-1, :]:
        ax.set_xlabel(axis_text(maps.x), fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(axis_text(maps.y), fontsize=8)
    handles = []
    if show_sun is not None:
        handles.append(Line2D([], [], marker="*", color="k", ls="none", ms=7,
                              label=f"Sun ({show_sun[0]:g}, {show_sun[1]:g})"))
    if show_gc is not None:
        handles.append(Line2D([], [], marker="+", color="k", ls="none", ms=8, mew=1.2,
                              label="Galactic centre (GC)"))
    n_text = f"{maps.n_stars:,} stars; bins with fewer than {maps.min_count} left empty"
    handles.append(Line2D([], [], ls="none", label=n_text))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7,
               bbox_to_anchor=(0.5, 0.0), handletextpad=0.3)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    return fig


def rz_maps_figure(maps, labels=None, **kw):
    """Fig 10: ``(R, z)`` mean-label maps (from :func:`maps.rz_maps`); the Sun at (8, 0.025)."""
    return maps_figure(maps, labels, show_sun=kw.pop("show_sun", (8.0, 0.025)), **kw)


def xy_maps_figure(maps, labels=None, **kw):
    """Fig 11: thin-disk ``(X, Y)`` maps (from :func:`maps.xy_maps`) in the right-handed
    Galactocentric frame: the Galactic centre at the origin (marked GC, when inside the map), the
    Sun at (8, 0)."""
    show_gc = kw.pop("show_gc", (0.0, 0.0))
    if show_gc is not None and not (maps.x_edges[0] <= show_gc[0] <= maps.x_edges[-1]
                                    and maps.y_edges[0] <= show_gc[1] <= maps.y_edges[-1]):
        show_gc = None
    fig = maps_figure(maps, labels, show_sun=kw.pop("show_sun", (8.0, 0.0)), show_gc=show_gc,
                      **kw)
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.set_aspect("equal", adjustable="box")
    return fig


def rvphi_maps_figure(maps, labels=None, *, ridge_box=None, **kw):
    """Fig 12: thin-disk giants in ``(R, v_phi)`` (from :func:`maps.rvphi_maps`).

    ``ridge_box``: optional ``(R_lo, R_hi, vphi_lo, vphi_hi)`` drawn dashed in every panel."""
    fig = maps_figure(maps, labels, **kw)
    if ridge_box is not None:
        from matplotlib.patches import Rectangle

        r0, r1, v0, v1 = ridge_box
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>" and ax.get_visible() and ax.collections:
                ax.add_patch(Rectangle((r0, v0), r1 - r0, v1 - v0, fill=False, ls="--", lw=0.8,
                                       ec="k"))
    return fig


# ----------------------------------------------------------------------------- Figs 13, 14
#: Colour columns whose sign matters (prograde/retrograde): drawn with a diverging colour map
#: centred on zero when their range straddles it.
DIVERGING = ("vphi", "vT", "vR", "vz", "Jphi")


def bin_text(lo, hi, name):
    """``"3 < R < 5 kpc"``, ``"0 < |z| < 2 kpc"`` (bins are labelled in kpc, not by index)."""
    return f"{lo:g} < {name} < {hi:g} kpc"


def halo_bin_table(sample, value=None, *, R_bins=None, absz_bins=None, agg="size"):
    """Per ``(R, |z|)`` bin of :func:`lamostcannon.maps.halo_sample`'s table: the number of stars
    (default) or ``agg`` of column ``value``, with rows and columns labelled in kpc
    (``"3 < R < 5 kpc"`` by ``"0 < |z| < 2 kpc"``) instead of the bin indices.

    Returns
    -------
    DataFrame (n_R, n_absz)
    """
    import pandas as pd

    from .. import maps as _maps

    R_bins = list(R_bins or _maps.HALO_R_BINS)
    absz_bins = list(absz_bins or _maps.HALO_ABSZ_BINS)
    g = sample.groupby(["R_bin", "absz_bin"])
    table = (g.size() if value is None else g[value].agg(agg)).unstack()
    table = table.reindex(index=range(len(R_bins)), columns=range(len(absz_bins)))
    if value is None:
        table = table.fillna(0).astype(int)
    table.index = pd.Index([bin_text(*b, "R") for b in R_bins], name="R bin")
    table.columns = pd.Index([bin_text(*b, "|z|") for b in absz_bins], name="|z| bin")
    return table


def halo_transition_figure(sample, element, *, color_by="vphi", R_bins=None, absz_bins=None,
                           clim=None, cmap="coolwarm_r", xlim=(-2.5, 0.6), ylim=None):
    """Figs 13/14: ``element`` against [Fe/H] in a grid of ``(R, |z|)`` bins.

    ``sample`` is :func:`lamostcannon.maps.halo_sample`'s table (``R_bin``, ``absz_bin``,
    ``fe_h``, ``element``, ``color_by``). Columns of the grid are R bins, rows |z| bins (lowest
    |z| at the bottom), each panel labelled with its bin in kpc and its number of stars.
    ``R_bins``/``absz_bins`` (the ``(lo, hi)`` pairs used for the sample) only label the panels.

    Colours: a column of :data:`DIVERGING` (``vphi``: prograde > 0) whose limits straddle zero
    gets a colour map centred on zero (white at 0, with a diverging ``cmap``); points beyond the
    limits ``clim`` (default: the 2nd-98th percentiles) saturate, and the colour bar shows arrows.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm

    from .. import maps as _maps

    R_bins = list(R_bins or _maps.HALO_R_BINS)
    absz_bins = list(absz_bins or _maps.HALO_ABSZ_BINS)
    use_style()
    nr, nz = len(R_bins), len(absz_bins)
    fig, axes = plt.subplots(nz, nr, figsize=(2.7 * nr + 0.9, 2.4 * nz), sharex=True,
                             sharey=True, squeeze=False)
    c_all = np.asarray(sample[color_by], float) if len(sample) else np.array([0.0])
    finite = c_all[np.isfinite(c_all)]
    if clim is None:
        clim = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
    vmin, vmax = float(clim[0]), float(clim[1])
    if color_by in DIVERGING and vmin < 0.0 < vmax:
        norm = TwoSlopeNorm(vcenter=0.0, vmin=vmin, vmax=vmax)
    else:
        norm = Normalize(vmin=vmin, vmax=vmax)
    sc = None
    for i in range(nr):
        for j in range(nz):
            ax = axes[nz - 1 - j, i]
            sub = sample[(np.asarray(sample["R_bin"]) == i) & (np.asarray(sample["absz_bin"]) == j)]
            sc = ax.scatter(sub["fe_h"], sub[element], c=sub[color_by], s=3, lw=0, cmap=cmap,
                            norm=norm, rasterized=True)
            ax.text(0.03, 0.96, f"{bin_text(*R_bins[i], 'R')}\n{bin_text(*absz_bins[j], '|z|')}"
                    f"\nN = {len(sub)}", transform=ax.transAxes, va="top", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.6, "pad": 1.0})
            if xlim is not None:
                ax.set_xlim(*xlim)
            if ylim is not None:
                ax.set_ylim(*ylim)
    for ax in axes[-1, :]:
        ax.set_xlabel(label_text("fe_h"))
    for ax in axes[:, 0]:
        ax.set_ylabel(label_text(element))
    fig.tight_layout()
    if sc is not None:
        cb = fig.colorbar(sc, ax=axes.ravel().tolist(), pad=0.01, fraction=0.03,
                          extend=_extend(finite, vmin, vmax))
        text = colorbar_text(color_by, stat="")
        if color_by in DIVERGING and vmin < 0.0 < vmax:
            text += " (centred on 0)"
        cb.set_label(text)
    return fig


# ----------------------------------------------------------------------------- Fig 17
def running_median(x, y, *, n_per_bin=None):
    """Medians of ``y`` in consecutive bins of ``x`` holding equal numbers of points.

    Parameters
    ----------
    x, y : arrays (N,); non-finite pairs are left out.
    n_per_bin : int, optional
        Points per bin; default ``max(5, N // 8)``.

    Returns
    -------
    x_med, y_med : arrays (B,), the medians of x and of y in each bin (B >= 1 when N >= 1).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not x.size:
        return np.array([]), np.array([])
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    n_per_bin = int(n_per_bin or max(5, x.size // 8))
    n_bins = max(1, x.size // n_per_bin)
    parts = np.array_split(np.arange(x.size), n_bins)
    return (np.array([np.median(x[p]) for p in parts]), np.array([np.median(y[p]) for p in parts]))


def cluster_trend_figure(teff, abundance, trend=None, *, label="alpha_fe", cluster="Praesepe",
                         running=True, n_per_bin=None):
    """Fig 17: a cluster's abundance against teff with its trend and dispersions.

    The straight line is :func:`lamostcannon.binaries.teff_trend` (fitted here if ``trend`` is
    None); with ``running`` a running median in teff (equal-count bins, :func:`running_median`)
    is drawn too, which follows a trend that is not straight. The title reports the total
    dispersion (standard deviation) and the scatter about the line and about the running median.
    """
    import matplotlib.pyplot as plt

    from ..binaries import teff_trend

    use_style()
    teff = np.asarray(teff, float)
    abundance = np.asarray(abundance, float)
    if trend is None:
        trend = teff_trend(teff, abundance)
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    ax.plot(teff, abundance, "o", ms=3, color="C0", label=f"{cluster} members (N = {trend.n})")
    ok = np.isfinite(teff) & np.isfinite(abundance)
    parts = [f"total dispersion {trend.dispersion:.3f} dex",
             f"about the line {trend.residual_dispersion:.3f}"]
    if ok.any():
        t = np.linspace(np.nanmin(teff[ok]), np.nanmax(teff[ok]), 50)
        ax.plot(t, trend.predict(t), "k--", lw=0.9,
                label=f"straight line: {trend.slope_per_1000K:+.3f} $\\pm$ "
                      f"{1000 * trend.slope_err:.3f} dex per 1000 K")
        if running and ok.sum() >= 10:
            xm, ym = running_median(teff[ok], abundance[ok], n_per_bin=n_per_bin)
            if xm.size >= 2:
                ax.plot(xm, ym, "-", color="C3", lw=1.4, marker="s", ms=3,
                        label=f"running median ({int(np.ceil(ok.sum() / xm.size))} stars per bin)")
                resid = abundance[ok] - np.interp(teff[ok], xm, ym)
                parts.append(f"about the running median {np.std(resid, ddof=1):.3f}")
    ax.set_xlabel(label_text("teff"))
    ax.set_ylabel(f"{label_text(label)} [dex]")
    ax.set_title("; ".join(parts[:2]) + ("\n" + parts[2] if len(parts) > 2 else ""), fontsize=8)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return fig
