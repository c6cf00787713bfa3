"""Figure helpers for cross-validation (paper Figs 5, 6, 7) and the KDE extrapolation boundaries.

Inputs come from :mod:`lamostcannon.validation` (the CV table of
:func:`~lamostcannon.validation.cross_validate`, :func:`~lamostcannon.validation.cv_metrics`,
the boundaries); these helpers only draw and return a Figure.
"""

from __future__ import annotations

import numpy as np

from . import use_style
from .science import label_text


def _grid(n, ncols, panel):
    import matplotlib.pyplot as plt

    use_style()
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _fmt(name, value):
    if name == "teff":
        return f"{value:.0f}"
    return f"{value:.3f}"


def _stats_title(name, n, row):
    """Two-line panel title: N and r, then scatter and bias (with the label's unit)."""
    from . import label_unit

    unit = label_unit(name)
    unit = f" {unit}" if unit else ""
    first = f"N = {n:,}"
    if row is None:
        return first
    r = row.get("correlation", np.nan)
    first += f", r = {r:.2f}"
    return (f"{first}\nscatter {_fmt(name, row['scatter'])}{unit}, "
            f"bias {'+' if row['bias'] >= 0 else ''}{_fmt(name, row['bias'])}{unit}")


def cv_one_to_one(cv, *, metrics=None, boundaries=None, label_names=None, ncols=3,
                  true_text="GALAH", title=None, level=0.9):
    """Figs 5 and 6: CV-inferred against true labels, one panel per label.

    Each panel shows the stars, the one-to-one line and, as horizontal dashed lines, the KDE
    extrapolation boundaries (where finite and inside the panel); its title gives the number of
    stars N and, from ``metrics``, the correlation r, the scatter and the bias, so that the
    statistics never sit on the lines. One legend for the figure names the line styles.

    Parameters
    ----------
    cv : DataFrame from :func:`lamostcannon.validation.cross_validate` (``true_<label>``,
        ``inferred_<label>``); other tables with those columns work too (e.g. CV-inferred against
        the mock's true labels).
    metrics : DataFrame from :func:`~lamostcannon.validation.cv_metrics`, optional
    boundaries : dict label -> (low, high), optional
    true_text : str
        Where the true labels come from, for the x-axis label.
    level : float
        The level of the boundaries (for the legend text).
    """
    from matplotlib.lines import Line2D

    from lamostcannon.validation import cv_labels

    names = list(label_names) if label_names is not None else cv_labels(cv)
    fig, axes = _grid(len(names), ncols, (2.9, 2.9))
    any_boundary = False
    for ax, name in zip(axes, names):
        t = np.asarray(cv[f"true_{name}"], float)
        i = np.asarray(cv[f"inferred_{name}"], float)
        ok = np.isfinite(t) & np.isfinite(i)
        ax.scatter(t[ok], i[ok], s=3, c="k", alpha=0.5, lw=0, rasterized=True)
        both = np.concatenate([t[ok], i[ok]])
        lo, hi = (np.percentile(both, [0.5, 99.5]) if both.size else (0.0, 1.0))
        pad = 0.08 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="C1", lw=0.8)
        if boundaries is not None and name in boundaries:
            for b in boundaries[name]:
                if b is not None and np.isfinite(b) and lo < b < hi:
                    ax.axhline(b, color="C3", lw=0.8, ls="--")
                    any_boundary = True
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"{label_text(name)} ({true_text})", fontsize=8)
        ax.set_ylabel(f"{label_text(name)} (CV)", fontsize=8)
        row = metrics.loc[name] if metrics is not None and name in metrics.index else None
        ax.set_title(_stats_title(name, int(ok.sum()), row), fontsize=7, loc="left")
    handles = [Line2D([], [], color="k", marker="o", ls="none", ms=3, alpha=0.5,
                      label="reference stars (labelled by a model that did not see them)"),
               Line2D([], [], color="C1", lw=0.8, label="one-to-one")]
    if boundaries is not None:
        handles.append(Line2D([], [], color="C3", lw=0.8, ls="--",
                              label=f"KDE extrapolation boundary ({level:.0%}; beyond it: flagged)"
                              + ("" if any_boundary else ", none inside these panels")))
    top = 1.0 - 0.32 / fig.get_figheight()
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7,
               bbox_to_anchor=(0.5, 1.0))
    if title:  # tight_layout makes room for it below the legend
        fig.suptitle(title, y=top, va="top")
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def relative_precision(tables, *, title=None, reference=None):
    """Fig 7: precision (2 x CV scatter) relative to the unbiased range, per abundance.

    Parameters
    ----------
    tables : DataFrame from :func:`lamostcannon.validation.unbiased_precision`, or a dict
        ``{"dwarfs": df, "giants": df}``; one bar per label and group.
    reference : (low, high, text), optional
        A band to shade, e.g. ``(0.3, 0.5, "paper: generally 30-50%")``.
    """
    import matplotlib.pyplot as plt

    use_style()
    if not isinstance(tables, dict):
        tables = {"": tables}
    labels = []
    for df in tables.values():
        labels += [n for n in df.index if n not in labels]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(labels) + 1.5), 3.4))
    width = 0.8 / len(tables)
    x = np.arange(len(labels))
    for k, (group, df) in enumerate(tables.items()):
        vals = [df.loc[n, "relative_precision"] if n in df.index else np.nan for n in labels]
        ax.bar(x + (k - (len(tables) - 1) / 2) * width, vals, width, label=group or None,
               color=f"C{k}")
    ax.set_xticks(x)
    ax.set_xticklabels([label_text(n) for n in labels], rotation=45, ha="right", fontsize=8)
    if reference is not None:
        ax.axhspan(reference[0], reference[1], color="0.85", zorder=0, lw=0, label=reference[2])
    ax.set_ylabel("2 x CV scatter / unbiased range")
    if len(tables) > 1 or reference is not None:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def kde_boundary(true, inferred, *, name="label", level=0.9, boundaries=None, grid_size=300,
                 true_text="true"):
    """How a boundary is found: the Silverman KDE of (true, inferred) and
    ``F(y) = P(l_true < y | l_inferred = y)`` with the ``level`` and ``1 - level`` lines.

    Left: the data, KDE contours, the one-to-one line and the boundaries (horizontal). Right:
    ``F`` against the inferred value; a boundary is where ``F`` leaves ``(1 - level, level)``.
    Both panels have a legend, and the two ``F`` levels are labelled on their lines.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from scipy.stats import gaussian_kde

    from lamostcannon.validation import boundary_1d, conditional_cdf

    use_style()
    t = np.asarray(true, float)
    i = np.asarray(inferred, float)
    ok = np.isfinite(t) & np.isfinite(i)
    t, i = t[ok], i[ok]
    if boundaries is None:
        boundaries = boundary_1d(t, i, level)
    finite_b = [b for b in boundaries if b is not None and np.isfinite(b)]
    lo, hi = np.percentile(np.concatenate([t, i]), [0.5, 99.5])
    pad = 0.15 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.0, 3.7))
    a1.scatter(t, i, s=2, c="0.5", lw=0, rasterized=True)
    kde = gaussian_kde(np.vstack([t, i]), bw_method="silverman")
    g = np.linspace(lo, hi, 80)
    X, Y = np.meshgrid(g, g)
    Z = kde(np.vstack([X.ravel(), Y.ravel()])).reshape(X.shape)
    a1.contour(X, Y, Z, levels=Z.max() * np.array([0.05, 0.2, 0.4, 0.6, 0.8]), colors="C0",
               linewidths=0.7)
    a1.plot([lo, hi], [lo, hi], color="C1", lw=0.8)
    for b in finite_b:
        a1.axhline(b, color="C3", ls="--", lw=0.8)
    a1.set_xlim(lo, hi)
    a1.set_ylim(lo, hi)
    a1.set_xlabel(f"{label_text(name)} ({true_text})")
    a1.set_ylabel(f"{label_text(name)} (CV)")
    handles = [Line2D([], [], color="0.5", marker="o", ls="none", ms=2, label=f"N = {t.size:,}"),
               Line2D([], [], color="C0", lw=0.7, label="KDE (Silverman)"),
               Line2D([], [], color="C1", lw=0.8, label="one-to-one"),
               Line2D([], [], color="C3", lw=0.8, ls="--",
                      label="boundary" if finite_b else "boundary (none in range)")]
    a1.legend(handles=handles, loc="upper left", fontsize=7)
    y = np.linspace(lo, hi, grid_size)
    F = conditional_cdf(t, i, y)
    a2.plot(y, F, color="k", label=r"$F(y)$")
    for v in (level, 1 - level):
        a2.axhline(v, color="0.5", ls=":", lw=0.8)
        # the label at the end of the line where the curve is further away from it
        left = abs(np.nan_to_num(F[0]) - v) > abs(np.nan_to_num(F[-1]) - v)
        a2.text(lo if left else hi, v, f" F = {v:.1f} ", ha="left" if left else "right",
                va="bottom", fontsize=7, color="0.3")
    for b in finite_b:
        a2.axvline(b, color="C3", ls="--", lw=0.8)
    a2.plot([], [], color="0.5", ls=":", lw=0.8,
            label=f"{1 - level:.1f} and {level:.1f}: beyond them the true value lies on one side "
                  f"{level:.0%} of the time")
    a2.plot([], [], color="C3", ls="--", lw=0.8, label="boundary")
    a2.set_xlim(lo, hi)
    a2.set_ylim(0, 1)
    a2.set_xlabel(f"inferred {label_text(name)}, y")
    a2.set_ylabel(r"$F(y) = P(l_{\rm true} < y \mid l_{\rm inferred} = y)$", fontsize=8)
    fig.legend(*a2.get_legend_handles_labels(), loc="upper center", ncol=3, fontsize=7,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.3 / fig.get_figheight()))
    return fig
