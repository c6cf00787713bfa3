"""Figure helpers for the science figures (paper Figs 9-14 and 17). Each returns a Figure.

Notebooks compute with :mod:`lamostcannon.binaries` and :mod:`lamostcannon.maps` and pass the
results here; these helpers only draw. Labels are mathtext (no LaTeX).
"""

from __future__ import annotations

import numpy as np

from . import label_text, use_style


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

    ``growth`` (optional) is :func:`lamostcannon.binaries.separation_growth`'s table, drawn in a
    second panel (medians and their ratio against the elements added); ``peaks`` an optional
    ``(binary, field)`` pair of KDE modes marked with vertical lines.
    """
    d_binary = np.asarray(d_binary, float)
    d_field = np.asarray(d_field, float)
    d_binary, d_field = d_binary[np.isfinite(d_binary)], d_field[np.isfinite(d_field)]
    fig, axes = _subplots(2 if growth is not None else 1, 2, panel=(3.6, 3.0))
    ax = axes[0, 0]
    both = np.concatenate([d_binary, d_field]) if d_binary.size + d_field.size else np.array([1.0])
    if bins is None:
        bins = np.linspace(0, np.percentile(both, 99) * 1.05 + 1e-9, 30)
    ax.hist(d_field, bins=bins, density=True, histtype="stepfilled", alpha=0.4, color="0.5",
            label=f"field pairs ({d_field.size})")
    ax.hist(d_binary, bins=bins, density=True, histtype="step", lw=1.5, color="C3",
            label=f"wide binaries ({d_binary.size})")
    if peaks is not None:
        for p, c in zip(peaks, ("C3", "0.3")):
            if np.isfinite(p):
                ax.axvline(p, color=c, ls="--", lw=0.8)
    ax.set_xlabel("chemical distance (eq. 6)")
    ax.set_ylabel("density")
    ax.legend()
    if growth is not None:
        ax = axes[0, 1]
        k = np.asarray(growth["n_elements"])
        ax.plot(k, growth["median_binary"], "o-", color="C3", label="binaries (median)")
        ax.plot(k, growth["median_field"], "s-", color="0.4", label="field (median)")
        ax.set_xticks(k)
        ax.set_xticklabels([label_text(e) for e in growth["added"]], rotation=60, fontsize=7)
        ax.set_xlabel("element added")
        ax.set_ylabel("median distance")
        ax2 = ax.twinx()
        ax2.plot(k, growth["ratio"], "^:", color="C0", label="field / binary")
        ax2.set_ylabel("field / binary", color="C0")
        ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- Figs 10-12
def maps_figure(maps, labels=None, *, ncols=3, cmap="viridis", percentiles=(2, 98),
                show_sun=None, vlims=None):
    """Grid of mean-label maps (one panel per label) from a :class:`maps.LabelMaps`.

    Colour limits per panel are the ``percentiles`` of the finite bin means unless ``vlims``
    (dict label -> (lo, hi)) says otherwise. ``show_sun``: an ``(x, y)`` point to mark.
    """
    labels = list(labels or maps.labels)
    fig, axes = _subplots(len(labels), ncols, sharex=True, sharey=True)
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
        fig.colorbar(im, ax=ax, pad=0.02, fraction=0.06)
        ax.set_title(label_text(lab))
        if show_sun is not None:
            ax.plot(*show_sun, marker="*", color="k", ms=6, mec="w", mew=0.4)
    for ax in axes[-1, :]:
        ax.set_xlabel(label_text(maps.x))
    for ax in axes[:, 0]:
        ax.set_ylabel(label_text(maps.y))
    fig.tight_layout()
    return fig


def rz_maps_figure(maps, labels=None, **kw):
    """Fig 10: ``(R, z)`` mean-label maps (from :func:`maps.rz_maps`)."""
    return maps_figure(maps, labels, show_sun=kw.pop("show_sun", (8.0, 0.025)), **kw)


def xy_maps_figure(maps, labels=None, **kw):
    """Fig 11: thin-disk ``(X, Y)`` maps (from :func:`maps.xy_maps`); the Sun is at (8, 0)."""
    fig = maps_figure(maps, labels, show_sun=kw.pop("show_sun", (8.0, 0.0)), **kw)
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
def halo_transition_figure(sample, element, *, color_by="vphi", R_bins=None, absz_bins=None,
                           clim=None, cmap="coolwarm_r", xlim=(-2.5, 0.6), ylim=None):
    """Figs 13/14: ``element`` against [Fe/H] in a grid of ``(R, |z|)`` bins.

    ``sample`` is :func:`lamostcannon.maps.halo_sample`'s table (``R_bin``, ``absz_bin``,
    ``fe_h``, ``element``, ``color_by``). Columns of the grid are R bins, rows |z| bins (lowest
    |z| at the bottom). ``R_bins``/``absz_bins`` (the ``(lo, hi)`` pairs used for the sample)
    only title the panels.
    """
    import matplotlib.pyplot as plt

    from .. import maps as _maps

    R_bins = list(R_bins or _maps.HALO_R_BINS)
    absz_bins = list(absz_bins or _maps.HALO_ABSZ_BINS)
    use_style()
    nr, nz = len(R_bins), len(absz_bins)
    fig, axes = plt.subplots(nz, nr, figsize=(2.7 * nr + 0.8, 2.4 * nz), sharex=True,
                             sharey=True, squeeze=False)
    c_all = np.asarray(sample[color_by], float) if len(sample) else np.array([0.0])
    if clim is None:
        finite = c_all[np.isfinite(c_all)]
        clim = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
    sc = None
    for i in range(nr):
        for j in range(nz):
            ax = axes[nz - 1 - j, i]
            sub = sample[(np.asarray(sample["R_bin"]) == i) & (np.asarray(sample["absz_bin"]) == j)]
            sc = ax.scatter(sub["fe_h"], sub[element], c=sub[color_by], s=3, lw=0, cmap=cmap,
                            vmin=clim[0], vmax=clim[1], rasterized=True)
            ax.text(0.03, 0.96, f"{R_bins[i][0]:g}<R<{R_bins[i][1]:g}\n"
                    f"{absz_bins[j][0]:g}<|z|<{absz_bins[j][1]:g}  N={len(sub)}",
                    transform=ax.transAxes, va="top", fontsize=7)
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
        fig.colorbar(sc, ax=axes.ravel().tolist(), pad=0.01, fraction=0.03, label=label_text(color_by))
    return fig


# ----------------------------------------------------------------------------- Fig 17
def cluster_trend_figure(teff, abundance, trend=None, *, label="alpha_fe", cluster="Praesepe"):
    """Fig 17: a cluster's abundance against teff with the linear trend and its dispersion.

    ``trend`` is :func:`lamostcannon.binaries.teff_trend`'s result (fitted here if None)."""
    import matplotlib.pyplot as plt

    from ..binaries import teff_trend

    use_style()
    teff = np.asarray(teff, float)
    abundance = np.asarray(abundance, float)
    if trend is None:
        trend = teff_trend(teff, abundance)
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(teff, abundance, "o", ms=3, color="C0", label=f"{cluster} members (N={trend.n})")
    ok = np.isfinite(teff)
    if ok.any():
        t = np.linspace(np.nanmin(teff), np.nanmax(teff), 50)
        ax.plot(t, trend.predict(t), "k-",
                label=f"slope {trend.slope_per_1000K:+.3f} dex/1000 K, "
                      f"$\\sigma$ = {trend.dispersion:.3f} dex")
    ax.set_xlabel(label_text("teff"))
    ax.set_ylabel(label_text(label))
    ax.legend(loc="best")
    fig.tight_layout()
    return fig
