"""Figures of the raw inputs and of the mock universe (notebook 01). Each helper returns a Figure.

They take plain tables (astropy Tables or pandas DataFrames with the archive's column names, or
the mock's ``truth/truth.fits``) and only draw.
"""

from __future__ import annotations

import numpy as np

from . import use_style

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
    fig.colorbar(sc, ax=ax, label="[Fe/H]")
    ax.set_xlim(7100, 3700)
    ax.set_ylim(5.0, 0.7)
    ax.set_xlabel(r"$T_{\rm eff}$ [K]")
    ax.set_ylabel(r"$\log g$")
    return fig


def galactic_rz(truth, *, observed=None, color="fe_h", vmin=-1.2, vmax=0.3):
    """Positions in Galactocentric (R, z) of the observed stars coloured by a truth column."""
    import matplotlib.pyplot as plt

    use_style()
    m = np.ones(len(truth), bool) if observed is None else np.asarray(observed, bool)
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    sc = ax.scatter(_col(truth, "R")[m], _col(truth, "z")[m], c=_col(truth, color)[m], s=0.5,
                    vmin=vmin, vmax=vmax, lw=0, rasterized=True)
    fig.colorbar(sc, ax=ax, label=color)
    ax.set_xlim(0, 20)
    ax.set_ylim(-6, 6)
    ax.set_xlabel("R [kpc]")
    ax.set_ylabel("z [kpc]")
    return fig
