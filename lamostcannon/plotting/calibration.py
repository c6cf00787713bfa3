"""Figures of the temperature calibration (:mod:`lamostcannon.calibration`), notebook 06.

* :func:`cluster_before_after`: a held-out cluster's abundances against teff, raw and
  calibrated (paper Fig 17 and its correction), with the linear trends and the true value;
* :func:`distance_before_after`: eq. 6 distances of wide binaries and matched field pairs, raw
  and calibrated, with and without the Delta teff cut (paper Fig 9 and its correction);
* :func:`corrections`: the fitted correction of each label against teff with the calibrators'
  within-group deviations (and, for the mock, the injected bias).
"""

from __future__ import annotations

import numpy as np

from . import label_text, use_style


def _grid(n, ncols, panel=(3.3, 2.7)):
    import matplotlib.pyplot as plt

    use_style()
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def cluster_before_after(teff, raw, calibrated, *, labels, truth=None, cluster="Praesepe",
                         ncols=3):
    """A cluster's abundances against teff, raw (grey) and calibrated (colour).

    Parameters
    ----------
    teff : array (S,), K
    raw, calibrated : dict ``{label: array (S,)}`` (dex)
    labels : sequence of label names (one panel each)
    truth : dict ``{label: float}``, optional; the cluster's true value (dashed line)

    Each panel's legend gives the slope (dex per 1000 K) and the standard deviation of both.
    """
    from ..binaries import teff_trend

    teff = np.asarray(teff, float)
    labels = list(labels)
    fig, axes = _grid(len(labels), min(ncols, len(labels)))
    grid = np.linspace(np.nanmin(teff), np.nanmax(teff), 50) if teff.size else np.array([])
    for ax, name in zip(axes, labels):
        for values, style, color, what in ((raw[name], "o", "0.6", "raw"),
                                           (calibrated[name], "o", "C0", "calibrated")):
            v = np.asarray(values, float)
            ok = np.isfinite(v) & np.isfinite(teff)
            if ok.sum() < 3:
                continue
            tr = teff_trend(teff[ok], v[ok])
            ax.plot(teff[ok], v[ok], style, ms=2.5, color=color, alpha=0.8,
                    label=f"{what}: {tr.slope_per_1000K:+.3f}/kK, $\\sigma$ {tr.dispersion:.3f}")
            ax.plot(grid, tr.predict(grid), "-", color=color, lw=1.2)
        if truth is not None and name in truth and np.isfinite(truth[name]):
            ax.axhline(truth[name], color="k", ls="--", lw=0.8, label="true value")
        ax.set_xlabel(label_text("teff"))
        ax.set_ylabel(label_text(name))
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"{cluster} dwarfs (held out of the calibration)", fontsize=9)
    fig.tight_layout()
    return fig


def distance_before_after(results, *, bins=None):
    """Eq. 6 distances of binaries (red) and matched field pairs (grey), one panel per case.

    Parameters
    ----------
    results : dict ``{title: result}`` with ``result`` from
        :func:`lamostcannon.binaries.compare_with_field` (``d_binary``, ``d_field``,
        ``separation``); optionally ``result["null"]``, a null-control result whose binaries are
        drawn dashed.
    """
    titles = list(results)
    fig, axes = _grid(len(titles), 2, panel=(3.6, 2.9))
    allv = np.concatenate([np.r_[r["d_binary"], r["d_field"]] for r in results.values()])
    allv = allv[np.isfinite(allv)]
    if bins is None:
        hi = np.percentile(allv, 99) * 1.05 + 1e-9 if allv.size else 1.0
        bins = np.linspace(0.0, hi, 30)
    for ax, title in zip(axes, titles):
        r = results[title]
        sep = r["separation"]
        ax.hist(r["d_field"], bins=bins, density=True, histtype="stepfilled", alpha=0.4,
                color="0.5", label=f"field pairs ({sep.n_field})")
        ax.hist(r["d_binary"], bins=bins, density=True, histtype="step", lw=1.5, color="C3",
                label=f"binaries ({sep.n_binary}), AUC {sep.auc:.2f}$\\pm${sep.auc_err:.2f}")
        if "null" in r:
            ns = r["null"]["separation"]
            ax.hist(r["null"]["d_binary"], bins=bins, density=True, histtype="step", lw=1.0,
                    ls="--", color="C0", label=f"null control, AUC {ns.auc:.2f}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("chemical distance (eq. 6)")
        ax.set_ylabel("density")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def corrections(calibration, calibrators=None, *, labels=None, injected=None, logg=4.5,
                fe_h=0.0, snr=(30.0, 100.0, 500.0), ncols=3):
    """The fitted correction ``f - <f>_ref`` of each label against teff.

    Parameters
    ----------
    calibration : :class:`lamostcannon.calibration.Calibration`
    calibrators : DataFrame, optional
        :func:`lamostcannon.calibration.calibrators` output; each star's deviation from its
        group's mean (plus the group's mean correction) is drawn as a point.
    labels : label names (default all the calibration's)
    injected : callable ``(teff) -> {label: array}``, optional
        For the mock: the bias put into the training labels, drawn dashed.
    logg, fe_h : the fixed values at which the curves are drawn
    snr : S/N values of the curves (when the correction uses S/N); the band is the 1-sigma
        calibration uncertainty of the middle one.
    """
    import pandas as pd

    labels = list(labels or calibration.label_names)
    fig, axes = _grid(len(labels), min(ncols, len(labels)))
    lo, hi = calibration.ranges["teff"]
    t = np.linspace(lo, hi, 100)
    uses_snr = "snr_z" in calibration.inputs
    curves = snr if uses_snr else (None,)
    for ax, name in zip(axes, labels):
        if calibrators is not None and name in calibrators:
            df = calibrators[np.isfinite(calibrators[name])]
            d, _ = calibration.correction(name, df)
            y = df[name].to_numpy(float)
            g = df["group"].to_numpy()
            dev = y - pd.Series(y).groupby(g).transform("mean").to_numpy()
            dev = dev + pd.Series(d).groupby(g).transform("mean").to_numpy()
            cl = (df["kind"] == "cluster").to_numpy() if "kind" in df else np.zeros(len(df), bool)
            ax.plot(df["teff"].to_numpy()[cl], dev[cl], ".", ms=2, color="C2", alpha=0.4,
                    label="cluster members")
            ax.plot(df["teff"].to_numpy()[~cl], dev[~cl], ".", ms=2, color="C1", alpha=0.4,
                    label="binary stars")
        for k, s_n in enumerate(curves):
            grid = {"teff": t, "logg": np.full_like(t, logg), "fe_h": np.full_like(t, fe_h),
                    "snr_z": np.full_like(t, s_n if s_n is not None else 100.0)}
            delta, sigma = calibration.correction(name, grid)
            if k == len(curves) // 2:
                ax.fill_between(t, delta - sigma, delta + sigma, color="C0", alpha=0.3, lw=0)
            what = f"S/N {s_n:g}" if s_n is not None else f"logg {logg:g}"
            ax.plot(t, delta, "-", color=f"C{[0, 4, 9][k % 3]}", lw=1.2, label=f"correction, {what}")
        if injected is not None:
            ax.plot(t, np.asarray(injected(t)[name], float), "k--", lw=0.9, label="injected (mock)")
        ax.axhline(0.0, color="0.3", lw=0.5)
        ax.set_xlabel(label_text("teff"))
        ax.set_ylabel(f"correction of {label_text(name)}")
        ax.set_ylim(-0.5, 0.5)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
