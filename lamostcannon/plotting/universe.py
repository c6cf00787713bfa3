"""Figures of the raw inputs and of the mock universe (notebook 01). Each helper returns a Figure.

They take plain tables (astropy Tables or pandas DataFrames with the archive's column names, or
the mock's ``truth/truth.fits``) and only draw.
"""

from __future__ import annotations

import numpy as np

from . import FRAME_AXIS_TEXT, axis_text, colorbar_text, use_style

POPULATION_STYLE = {
    "thin": ("thin disk", "#1f77b4"),
    "thick": ("thick disk", "#d62728"),
    "halo_insitu": ("in-situ halo", "#ff7f0e"),
    "halo_accreted": ("accreted halo", "#2ca02c"),
    "cluster": ("Praesepe", "#9467bd"),
}


def _col(t, name):
    return np.asarray(t[name], dtype=float)


def _wrap_ra(ra):
    """RA in radians for an Aitoff/Mollweide axis (east to the left, 180 deg at the centre)."""
    ra = np.remainder(np.asarray(ra, float) + 360.0, 360.0)
    return np.radians(180.0 - ra)


def sky_footprints(lamost, galah, *, max_points: int = 40_000, seed: int = 0):
    """Equatorial Mollweide map of the LAMOST observations and the GALAH stars, with the
    -10 < dec < +10 deg stripe where both surveys observe.

    Parameters
    ----------
    lamost, galah : tables with ``ra``, ``dec`` (deg)
    max_points : at most this many points per survey are drawn (a seeded random subset)
    """
    import matplotlib.pyplot as plt

    use_style()
    rng = np.random.default_rng(seed)
    fig = plt.figure(figsize=(8.0, 4.4))
    ax = fig.add_subplot(111, projection="mollweide")
    for t, name, color, size in ((lamost, "LAMOST", "#1f77b4", 0.6), (galah, "GALAH", "#d62728", 1.0)):
        ra, dec = _col(t, "ra"), _col(t, "dec")
        idx = np.arange(ra.size)
        if ra.size > max_points:
            idx = np.sort(rng.choice(ra.size, max_points, replace=False))
        ax.scatter(_wrap_ra(ra[idx]), np.radians(dec[idx]), s=size, color=color, alpha=0.4,
                   lw=0, rasterized=True, label=f"{name} ({ra.size:,})")
    x = np.linspace(-np.pi, np.pi, 200)
    for d in (-10.0, 10.0):
        ax.plot(x, np.full_like(x, np.radians(d)), color="k", lw=0.6, ls="--")
    ax.set_xticks(np.radians([150, 120, 90, 60, 30, 0, -30, -60, -90, -120, -150]))
    ax.set_xticklabels(["30", "60", "90", "120", "150", "180", "210", "240", "270", "300", "330"],
                       fontsize=7)
    ax.grid(True, lw=0.3, alpha=0.5)
    leg = ax.legend(loc="lower right", markerscale=8, fontsize=7, frameon=True)
    for h in leg.legend_handles:
        h.set_alpha(1.0)
    ax.set_title("Sky coverage (RA, Dec); dashed: the -10 < Dec < +10 overlap stripe", fontsize=9)
    return fig


def alpha_feh_truth(truth, *, alpha: str = "alpha_fe", feh: str = "fe_h"):
    """True [alpha/Fe] against [Fe/H] for each population of the mock Galaxy (one panel each
    plus all together), showing the two disk sequences and the low-alpha accreted halo."""
    import matplotlib.pyplot as plt

    use_style()
    pops = [p for p in ("thin", "thick", "halo_insitu", "halo_accreted")
            if np.any(np.asarray(truth["population"]).astype(str) == p)]
    fig, axes = plt.subplots(1, len(pops) + 1, figsize=(2.6 * (len(pops) + 1), 2.9),
                             sharex=True, sharey=True)
    pop = np.asarray(truth["population"]).astype(str)
    x, y = _col(truth, feh), _col(truth, alpha)
    for ax, p in zip(axes[1:], pops):
        m = pop == p
        name, color = POPULATION_STYLE[p]
        ax.scatter(x[m], y[m], s=1, color=color, alpha=0.3, lw=0, rasterized=True)
        axes[0].scatter(x[m], y[m], s=0.5, color=color, alpha=0.15, lw=0, rasterized=True,
                        label=name)
        ax.set_title(f"{name} ({m.sum():,})")
    axes[0].set_title("all")
    leg = axes[0].legend(loc="lower left", markerscale=10, fontsize=6)
    for h in leg.legend_handles:
        h.set_alpha(1.0)
    for ax in axes:
        ax.set_xlabel("[Fe/H] (true)")
        ax.set_xlim(-2.5, 0.6)
        ax.set_ylim(-0.2, 0.5)
    axes[0].set_ylabel(r"[$\alpha$/Fe] (true)")
    fig.tight_layout()
    return fig


def kiel_truth(truth, *, observed=None):
    """True Kiel diagram (teff, logg) of the stars LAMOST observes, coloured by true [Fe/H]."""
    import matplotlib.pyplot as plt

    use_style()
    t = truth
    m = np.ones(len(t), bool) if observed is None else np.asarray(observed, bool)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    sc = ax.scatter(_col(t, "teff")[m], _col(t, "logg")[m], c=_col(t, "fe_h")[m], s=0.5,
                    vmin=-1.5, vmax=0.4, lw=0, rasterized=True)
    fig.colorbar(sc, ax=ax, label="true [Fe/H] [dex]")
    ax.set_xlim(7100, 3700)
    ax.set_ylim(5.0, 0.7)
    ax.set_xlabel(r"$T_{\rm eff}$ [K]")
    ax.set_ylabel(r"$\log g$")
    return fig


def galactic_rz(truth, *, observed=None, color="fe_h", vmin=-1.2, vmax=0.3):
    """Positions in Galactocentric (R, z) of the observed stars coloured by a truth column
    (the axes name the frame: :data:`lamostcannon.plotting.FRAME_AXIS_TEXT`)."""
    import matplotlib.pyplot as plt

    use_style()
    m = np.ones(len(truth), bool) if observed is None else np.asarray(observed, bool)
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    sc = ax.scatter(_col(truth, "R")[m], _col(truth, "z")[m], c=_col(truth, color)[m], s=0.5,
                    vmin=vmin, vmax=vmax, lw=0, rasterized=True)
    fig.colorbar(sc, ax=ax, label=colorbar_text(color, "true"))
    ax.set_xlim(0, 20)
    ax.set_ylim(-6, 6)
    ax.set_xlabel(axis_text("R"))
    ax.set_ylabel(axis_text("z"))
    return fig


#: Surface-density contour levels of paper Fig. 1, stars per kpc^2.
SURVEY_DENSITY_LEVELS = (5e1, 5e2, 5e3, 5e4)

#: Colours of the two surveys (as in :func:`sky_footprints`).
SURVEY_COLORS = {"LAMOST": "#1f77b4", "GALAH": "#d62728"}


def heliocentric_xyz(l, b, distance):
    """Heliocentric Galactic Cartesian coordinates (kpc).

    ``x = d cos b cos l`` (towards the Galactic centre), ``y = d cos b sin l`` (towards
    l = 90 deg, the direction of rotation), ``z = d sin b`` (towards the north Galactic pole).

    Parameters
    ----------
    l, b : arrays (N,)
        Galactic longitude and latitude, deg.
    distance : array (N,)
        Heliocentric distance ``d``, kpc.

    Returns
    -------
    x, y, z : arrays (N,), kpc
    """
    lr, br = np.radians(np.asarray(l, float)), np.radians(np.asarray(b, float))
    d = np.asarray(distance, float)
    return d * np.cos(br) * np.cos(lr), d * np.cos(br) * np.sin(lr), d * np.sin(br)


def _survey_members(truth):
    """``{"LAMOST": mask, "GALAH": mask}`` from the truth table's survey flags."""
    names = set(truth.colnames if hasattr(truth, "colnames") else truth.columns)
    if "n_obs" in names:
        lamost = np.asarray(truth["n_obs"], float) > 0
    elif "in_lamost" in names:
        lamost = np.asarray(truth["in_lamost"], bool)
    else:
        raise KeyError("truth needs an 'n_obs' or 'in_lamost' column to select the LAMOST stars")
    if "in_galah" not in names:
        raise KeyError("truth needs an 'in_galah' column to select the GALAH stars")
    return {"LAMOST": lamost, "GALAH": np.asarray(truth["in_galah"], bool)}


def surface_density(u, v, *, extent_u, extent_v, bin_kpc=0.25, smooth_bins=1.0, weight=1.0):
    """Projected surface density (stars per kpc^2) of points (u, v) on a regular grid.

    Counts in square bins of side ``bin_kpc``, smoothed by a Gaussian of ``smooth_bins`` bins
    (the smoothing conserves the number of stars) and divided by the bin area.

    Returns ``(u_centres, v_centres, sigma)`` with ``sigma`` of shape (len(v_centres),
    len(u_centres)), as :meth:`matplotlib.axes.Axes.contour` takes it.
    """
    from scipy.ndimage import gaussian_filter

    eu = np.arange(extent_u[0], extent_u[1] + 0.5 * bin_kpc, bin_kpc)
    ev = np.arange(extent_v[0], extent_v[1] + 0.5 * bin_kpc, bin_kpc)
    h, _, _ = np.histogram2d(np.asarray(u, float), np.asarray(v, float), bins=[eu, ev])
    h = h.T * float(weight)
    if smooth_bins > 0:
        h = gaussian_filter(h, smooth_bins, mode="constant")
    return 0.5 * (eu[1:] + eu[:-1]), 0.5 * (ev[1:] + ev[:-1]), h / bin_kpc**2


def survey_density_contours(truth, *, levels=SURVEY_DENSITY_LEVELS, extent_kpc=None,
                            z_extent_kpc=None, bin_kpc=0.25, smooth_bins=1.2, weight=1.0):
    """Paper Fig. 1: face-on (x, y; top) and edge-on (x, z; bottom) contours of the surface
    density of the GALAH and the LAMOST stars in heliocentric Galactic coordinates
    (:func:`heliocentric_xyz`).

    The Sun is at the origin and the Galactic centre at x = +8 kpc, y = 0 (marked), the
    heliocentric convention of the paper's figure, named on the axes
    (:data:`lamostcannon.plotting.FRAME_AXIS_TEXT`; the Galactocentric maps of Figs 10-12 put the
    centre at the origin and the Sun at X = +8). The contour
    levels are those of the paper, 5 x 10^{1,2,3,4} stars per kpc^2, drawn thicker with
    increasing density; a level a survey does not reach is simply absent (a mock smaller than
    the survey reaches fewer levels, and less far).

    Parameters
    ----------
    truth : table (the mock's ``truth/truth.fits``) with ``l``, ``b`` (deg), ``distance`` (kpc),
        ``n_obs`` (LAMOST observations; or the boolean ``in_lamost``) and ``in_galah``.
    levels : increasing sequence of float
        Surface densities to contour, stars per kpc^2.
    extent_kpc, z_extent_kpc : float, optional
        Half-width of the x and y axes and half-height of the z axis, kpc. Default: just
        enough (in steps of 2 kpc) to hold the lowest contour of both surveys.
    bin_kpc, smooth_bins : float
        Grid spacing (kpc) and the width of the Gaussian smoothing (in bins) of the counts
        (:func:`surface_density`).
    weight : float or dict survey -> float
        Stars each row stands for; 1 (the default) counts the rows themselves. Weighting a
        sub-sampled mock up to a survey's size also scales its shot noise: the low contours
        break up into single stars.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    use_style()
    levels = np.sort(np.asarray(levels, float))
    members = _survey_members(truth)
    x, y, z = heliocentric_xyz(_col(truth, "l"), _col(truth, "b"), _col(truth, "distance"))
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    dmax = np.abs(np.concatenate([x[finite], y[finite], z[finite], [1.0]])).max()
    grid = float(min(40.0, np.ceil(dmax + 2.0 * bin_kpc)))
    dens = {}  # (survey, plane) -> (u centres, v centres, sigma)
    reach = {"xy": [2.0], "z": [2.0]}
    for name, m in members.items():
        m = m & finite
        w = weight.get(name, 1.0) if isinstance(weight, dict) else weight
        for plane, v in (("xy", y), ("xz", z)):
            uc, vc, sig = surface_density(x[m], v[m], extent_u=(-grid, grid),
                                          extent_v=(-grid, grid), bin_kpc=bin_kpc,
                                          smooth_bins=smooth_bins, weight=w)
            dens[name, plane] = (uc, vc, sig)
            iv, iu = np.nonzero(sig >= levels[0])
            if iu.size:
                reach["xy"].append(np.abs(uc[iu]).max())
                reach["xy" if plane == "xy" else "z"].append(np.abs(vc[iv]).max())
    ext = (float(extent_kpc) if extent_kpc is not None
           else 2.0 * np.ceil((max(reach["xy"]) + 1.0) / 2.0))
    zext = (float(z_extent_kpc) if z_extent_kpc is not None
            else 2.0 * np.ceil((max(reach["z"]) + 1.0) / 2.0))
    fig, axes = plt.subplots(2, 1, figsize=(5.0, 4.6 * (1.0 + zext / ext) + 0.6), sharex=True,
                             gridspec_kw={"height_ratios": [2.0 * ext, 2.0 * zext]})
    widths = np.linspace(0.6, 1.9, levels.size)
    handles = []
    for name in ("GALAH", "LAMOST"):
        color = SURVEY_COLORS[name]
        for ax, plane in ((axes[0], "xy"), (axes[1], "xz")):
            uc, vc, sig = dens[name, plane]
            if np.nanmax(sig, initial=0.0) >= levels[0]:
                ax.contour(uc, vc, sig, levels=levels, colors=color, linewidths=widths)
        n = int((members[name] & finite).sum())
        handles.append(Line2D([], [], color=color, lw=1.4, label=f"{name} ({n:,} stars)"))
    for ax in axes:
        ax.plot(0.0, 0.0, marker="*", color="k", ms=7, ls="none", zorder=5)
        ax.plot(8.0, 0.0, marker="+", color="k", ms=8, mew=1.2, ls="none", zorder=5)
        ax.set_aspect("equal")
        ax.set_xlim(-ext, ext)
    axes[0].annotate("Sun", (0.0, 0.0), xytext=(-4, -4), textcoords="offset points", fontsize=7,
                     ha="right", va="top")
    axes[0].annotate("GC", (8.0, 0.0), xytext=(4, -4), textcoords="offset points", fontsize=7,
                     va="top")
    axes[0].set_ylim(-ext, ext)
    axes[1].set_ylim(-zext, zext)
    axes[0].set_ylabel(FRAME_AXIS_TEXT["helio_y"], fontsize=8)
    axes[1].set_ylabel(FRAME_AXIS_TEXT["helio_z"], fontsize=8)
    axes[1].set_xlabel(FRAME_AXIS_TEXT["helio_x"])
    for lv, lw in zip(levels, widths):
        exp = int(np.floor(np.log10(lv)))
        handles.append(Line2D([], [], color="0.35", lw=lw,
                              label=rf"${lv / 10**exp:g}\times10^{{{exp}}}$ kpc$^{{-2}}$"))
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=7, bbox_to_anchor=(0.5, 1.0))
    axes[0].text(0.02, 0.97, "face on", transform=axes[0].transAxes, va="top", fontsize=8)
    axes[1].text(0.02, 0.95, "edge on", transform=axes[1].transAxes, va="top", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=0.3)
    return fig
