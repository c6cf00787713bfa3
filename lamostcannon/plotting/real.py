"""Figure helpers for the real LAMOST spectra (notebook 09): extrapolation flags and repeat visits.

Inputs come from :mod:`lamostcannon.real` (:func:`~lamostcannon.real.extrapolation_table`,
:func:`~lamostcannon.real.pair_differences`, :func:`~lamostcannon.real.pair_spreads`) and the
trained model; these helpers only draw and return a :class:`matplotlib.figure.Figure`, which the
notebook saves with :func:`lamostcannon.plotting.savefig`.
"""

from __future__ import annotations

import numpy as np

from . import use_style

#: Flag groups of :func:`hot_star_flags`: (description, colour). The groups are disjoint.
FLAG_GROUPS = (("not flagged", "C0"), ("outside training range", "C1"), ("beyond KDE boundary", "C3"))


def _flag(flags, key, n):
    try:
        col = flags[key]
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"flags must have a boolean column {key!r}; "
                         "expected the table of lamostcannon.real.extrapolation_table") from err
    col = np.asarray(col, bool)
    if col.shape != (n,):
        raise ValueError(f"flags[{key!r}] has shape {col.shape}, expected ({n},) like hot_teff")
    return col


def hot_star_flags(hot_teff, inferred_teff, flags, teff_boundary, teff_train_max, *, title=None):
    """Cannon against LASP effective temperature for stars hotter than the training set.

    The stars are coloured by flag group: not flagged (``~extrap``), outside the training range
    only (``outside_training & ~kde_extrap``) and beyond the KDE extrapolation boundary
    (``kde_extrap``, paper section 4); the legend gives the number in each group.

    Parameters
    ----------
    hot_teff : array (N,)
        LASP effective temperature of each star (K); drawn on a log axis.
    inferred_teff : array (N,)
        Cannon effective temperature of each star (K).
    flags : DataFrame or mapping of boolean arrays (N,)
        Columns ``extrap``, ``outside_training`` and ``kde_extrap``, as from
        :func:`lamostcannon.real.extrapolation_table`.
    teff_boundary : float
        Upper KDE extrapolation boundary of :math:`T_{\\rm eff}` (K), drawn as a dashed line.
    teff_train_max : float
        Highest training :math:`T_{\\rm eff}` (K), drawn as a dotted line.
    title : str, optional
        Axes title; default ``"<N> stars hotter than the training set"``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    use_style()
    hot_teff = np.asarray(hot_teff, float)
    inferred_teff = np.asarray(inferred_teff, float)
    if hot_teff.ndim != 1 or inferred_teff.shape != hot_teff.shape:
        raise ValueError(f"hot_teff {hot_teff.shape} and inferred_teff {inferred_teff.shape} "
                         "must both be (N,)")
    n = hot_teff.size
    extrap = _flag(flags, "extrap", n)
    outside = _flag(flags, "outside_training", n)
    kde = _flag(flags, "kde_extrap", n)
    selections = (~extrap, outside & ~kde, kde)

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for sel, (label, color) in zip(selections, FLAG_GROUPS):
        ax.scatter(hot_teff[sel], inferred_teff[sel], s=10, c=color, label=f"{label} ({sel.sum()})")
    ax.axhline(teff_boundary, color="C3", ls="--", lw=0.8,
               label=f"upper KDE boundary ({teff_boundary:.0f} K)")
    ax.axhline(teff_train_max, color="C1", ls=":", lw=0.8,
               label=f"hottest training star ({teff_train_max:.0f} K)")
    ax.set_xscale("log")
    ax.set_xlabel(r"LASP $T_{\rm eff}$ [K]")
    ax.set_ylabel(r"Cannon $T_{\rm eff}$ [K]")
    ax.set_title(title if title is not None else f"{n} stars hotter than the training set")
    ax.legend(fontsize=7)
    return fig


def repeat_pulls(diffs, spreads, names, *, zmax=6.0):
    """Histograms of the repeat-pair pulls per label against N(0, 1) and N(0, robust spread).

    For a pair of visits, :math:`z = \\Delta l / \\sqrt{\\sigma_1^2 + \\sigma_2^2}` with the formal
    errors :math:`\\sigma`; it has unit spread when the formal errors describe the visit-to-visit
    scatter. Each panel shows the pulls (clipped to :math:`\\pm` ``zmax``), the unit normal and a
    normal with the robust spread ``z_robust``; the title gives the single-visit precision.

    Parameters
    ----------
    diffs : DataFrame
        One row per pair with columns ``z_<l>``, from :func:`lamostcannon.real.pair_differences`.
    spreads : DataFrame
        Indexed by label, with columns ``z_robust`` and ``single_visit``, from
        :func:`lamostcannon.real.pair_spreads`.
    names : sequence of str (L,)
        Label names, one panel each.
    zmax : float
        Half-width of the histogram range.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    use_style()
    names = list(names)
    if not names:
        raise ValueError("names must list at least one label")
    missing = [f"z_{n}" for n in names if f"z_{n}" not in diffs.columns]
    missing += [f"spreads[{n!r}]" for n in names if n not in spreads.index]
    if missing:
        raise ValueError(f"missing {missing}; expected diffs from real.pair_differences and "
                         "spreads from real.pair_spreads")

    fig, axes = plt.subplots(1, len(names), figsize=(9.5, 3.0), sharey=True, squeeze=False)
    axes = axes.ravel()
    x = np.linspace(-zmax, zmax, 241)
    bins = np.linspace(-zmax, zmax, 25)
    for ax, n in zip(axes, names):
        z = diffs[f"z_{n}"].to_numpy(float)
        z = z[np.isfinite(z)]
        ax.hist(np.clip(z, -zmax, zmax), bins=bins, density=True, color="0.6", label="repeat pairs")
        ax.plot(x, np.exp(-x**2 / 2) / np.sqrt(2 * np.pi), color="C0", label="N(0, 1)")
        r = float(spreads.loc[n, "z_robust"])
        ax.plot(x, np.exp(-x**2 / (2 * r**2)) / np.sqrt(2 * np.pi * r**2), color="C3", ls="--",
                label=f"N(0, {r:.2f})")
        ax.set_xlabel(rf"$\Delta${n} / $\sqrt{{\sigma_1^2+\sigma_2^2}}$")
        ax.set_title(f"{n}: single visit {spreads.loc[n, 'single_visit']:.3g}", fontsize=8)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
