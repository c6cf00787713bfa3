"""Cross-validation and extrapolation boundaries (paper section 4).

* :func:`kfold` and :func:`cross_validate`: seeded k-fold CV (k = 12 in the paper). Every
  reference star gets labels from a model that never saw it.
* :func:`cv_metrics`: per label, the scatter (standard deviation of ``inferred - true``, and a
  robust 1.4826 x MAD version), the bias (mean of ``inferred - true``) and the Pearson correlation
  of true and inferred values (Figs 5 and 6).
* :func:`extrapolation_boundaries`: the inferred values beyond which the model is biased or
  unprobed. With ``p(l_true, l_inferred)`` approximated by a Gaussian KDE (Silverman bandwidth),

      F(y) = P(l_true < y | l_inferred = y),

  the model is *biased* at ``y`` when ``p(l_true | l_inferred = y)`` puts at least ``level``
  (0.9) of its mass on one side of ``y``: ``F(y) >= level`` (it over-predicts: the true values lie
  below) or ``F(y) <= 1 - level`` (it under-predicts). Walking down and up from the median of the
  inferred values, the *low* and *high boundaries* are the first ``y`` where the model becomes
  biased (linearly interpolated between grid points). A Cannon that shrinks labels towards the
  training mean over-predicts at the low end and under-predicts at the high end; an expanding one
  the reverse; both are caught. No boundary within ``extend`` standard deviations of the data gives
  ``-inf`` / ``+inf``. Stars beyond a boundary are flagged (:func:`extrapolation_flags`, the
  ``*_extrap`` columns of Table 1). Fig 7 is :func:`unbiased_precision`: twice the scatter over
  the width of the unbiased range.

Files: ``processed/cv_<group>.parquet`` (:func:`write_cv`) and
``processed/extrapolation_<group>.json`` (:func:`write_boundaries`), group ``dwarf`` or ``giant``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from . import paths

log = logging.getLogger(__name__)

GROUPS = ("dwarf", "giant")

# ---------------------------------------------------------------------------------------------
# Folds and cross-validation
# ---------------------------------------------------------------------------------------------


def kfold(n: int, k: int = 12, seed=None) -> np.ndarray:
    """Assign ``n`` items to ``k`` folds at random, reproducibly.

    The folds are balanced (sizes differ by at most one): item ``i`` of a seeded permutation goes
    to fold ``i mod k``.

    Parameters
    ----------
    n : int
        Number of items (reference stars), ``n >= k``.
    k : int
        Number of folds (12 in the paper).
    seed : int or numpy.random.Generator, optional
        Default: the ``LAMOSTCANNON_SEED`` setting.

    Returns
    -------
    folds : int array (n,) with values in ``0 .. k-1``.
    """
    n, k = int(n), int(k)
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if n < k:
        raise ValueError(f"need at least k={k} items for {k}-fold CV, got n={n}")
    if seed is None:
        from .config import settings

        seed = settings().seed
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    folds[rng.permutation(n)] = np.arange(n) % k
    return folds


def _as_matrix(values, label_names=None):
    """(S, L) float array and the label names from an array, DataFrame, Table or dict."""
    if hasattr(values, "colnames") or hasattr(values, "columns") or isinstance(values, dict):
        cols = list(values.colnames if hasattr(values, "colnames") else
                    values.columns if hasattr(values, "columns") else values.keys())
        names = list(label_names) if label_names is not None else cols
        missing = [c for c in names if c not in cols]
        if missing:
            raise KeyError(f"columns {missing} are missing (have {cols})")
        arr = np.column_stack([np.ma.filled(np.ma.asarray(values[c], dtype=float), np.nan)
                               for c in names])
        return arr, names
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected a (S, L) array, got shape {arr.shape}")
    names = list(label_names) if label_names is not None else [f"label{i}" for i in
                                                                range(arr.shape[1])]
    if len(names) != arr.shape[1]:
        raise ValueError(f"{len(names)} label names for an array with {arr.shape[1]} columns")
    return arr, names


_WORK: dict = {}


def _init_worker(work, parent_pid=None):
    """Worker start: exit when the parent dies (a killed notebook leaves no fold running), keep
    the CV inputs (inherited without copying under fork) and use one BLAS thread per process, so
    that ``n_jobs`` processes share the cores instead of fighting."""
    if parent_pid is not None:
        from .parallel import die_with_parent

        die_with_parent(parent_pid)
    _WORK.clear()
    _WORK.update(work)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass


def _run_fold(fold):
    from .cannon import CannonModel

    w = _WORK
    held = w["folds"] == fold
    model = CannonModel(list(w["names"]), **w["model_kwargs"])
    kwargs = dict(w["train_kwargs"])
    if w.get("errors") is not None:
        kwargs["label_errors"] = w["errors"][~held]
    model.train(w["labels"][~held], w["flux"][~held], w["ivar"][~held], **kwargs)
    bins = _ood_bins(model, w["flux"].shape[1]) if w.get("diagnostics", True) else None
    res = model.test(w["flux"][held], w["ivar"][held], residual_bins=bins, **w["test_kwargs"])
    out = {"labels": np.asarray(res.labels, dtype=float)}
    for key in ("chi2", "converged", "flag", "n_pixels"):
        if getattr(res, key, None) is not None:
            out[key] = np.asarray(getattr(res, key))
    if w.get("diagnostics", True):
        out.update(_fold_diagnostics(model, w["labels"][~held], w["flux"][held], w["ivar"][held],
                                     res))
    if w.get("extra_star") is not None:  # other visits of the held-out stars, same fold model
        sel = np.flatnonzero(held[w["extra_star"]])
        if sel.size:
            xf, xi = w["extra_flux"][sel], w["extra_ivar"][sel]
            xr = model.test(xf, xi, residual_bins=bins, **w["test_kwargs"])
            extra = {"rows": sel, "labels": np.asarray(xr.labels, dtype=float),
                     "flag": np.asarray(xr.flag)}
            extra.update(_fold_diagnostics(model, w["labels"][~held], xf, xi, xr))
            out["extra"] = extra
    return fold, out


def _ood_bins(model, n_pixels):
    """The OOD window bins of :mod:`lamostcannon.ood` on the model's grid (None without one)."""
    from . import ood

    wavelength = getattr(model, "wavelength", None)
    if wavelength is None:
        from .spectra import N_PIXELS, common_wavelength

        wavelength = common_wavelength() if n_pixels == N_PIXELS else None
    if wavelength is None:
        return None
    return ood._Binner(model, ood.window_masks(wavelength))


def _fold_diagnostics(model, train_labels, flux, ivar, res) -> dict:
    """What the held-out fold tells the calibrations: formal errors, S/N, chi2 per pixel, the
    OOD window statistics and the label density under the fold's own training labels."""
    from . import ood

    labels = np.asarray(res.labels, dtype=float)
    out = {"snr": ood.spectrum_snr(flux, ivar)}
    if getattr(res, "cov", None) is not None:
        out["e_formal"] = np.asarray(res.errors, dtype=float)
    if getattr(res, "n_pixels", None) is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            npix = np.asarray(res.n_pixels, float)
            out["chi2_per_pixel"] = np.where(npix > 0, np.asarray(res.chi2, float) / npix, np.nan)
    binned = dict(getattr(res, "binned", {}) or {})
    if not binned:   # a result computed without the bins (e.g. trust.diagnostics on old runs)
        bins = _ood_bins(model, flux.shape[1])
        if bins is not None:
            binned = {k[4:]: v for k, v in ood.residual_statistics(
                model, labels, flux, ivar, None, binner=bins).items()}
    out.update({f"ood_{k}": np.asarray(v, dtype=float) for k, v in binned.items()})
    try:
        density = ood.LabelDensity.from_labels(train_labels, model.label_names)
        out["ood_log_density"] = density.log_density(labels, model.label_names)
    except ValueError as exc:  # too few training stars for a KDE
        log.warning("no label density for this fold: %s", exc)
    return out


def cross_validate(labels, flux, ivar, label_names, k: int = 12, seed=None, *, folds=None,
                   n_jobs=None, ids=None, train_kwargs=None, test_kwargs=None,
                   diagnostics: bool = True, extra=None, label_errors=None, **model_kwargs):
    """k-fold cross-validation of a :class:`lamostcannon.cannon.CannonModel`.

    For each fold a model is trained on the other ``k - 1`` folds and tests (infers the labels of)
    the held-out fold.

    Parameters
    ----------
    labels : (S, L) array in physical units, or a Table / DataFrame with ``label_names`` columns
    flux, ivar : arrays (S, P)
        Continuum-normalised flux and inverse variance on the common grid.
    label_names : sequence of str (L,)
    k : int
        Number of folds (12 in the paper).
    seed : int or Generator, optional
        Seed of :func:`kfold` (default the ``LAMOSTCANNON_SEED`` setting).
    folds : int array (S,), optional
        Fold of each star; overrides ``k`` and ``seed``.
    n_jobs : int, optional
        Folds run in this many processes (each limited to one BLAS thread). Default: the
        ``LAMOSTCANNON_WORKERS`` setting, at most ``k``. ``1`` runs in this process.
    ids : array (S,), optional
        Star identifiers copied to an ``id`` column.
    train_kwargs, test_kwargs : dict, optional
        Keyword arguments of ``CannonModel.train`` and ``CannonModel.test``.
    diagnostics : bool
        Also return what the calibrations of :mod:`lamostcannon.uncertainty` and
        :mod:`lamostcannon.ood` are fitted on (see Returns).
    extra : tuple (star, flux, ivar), optional
        Other observations (repeat visits) of the training stars: ``star`` (M,) the row of each
        one's star, ``flux, ivar`` (M, P). Each is labelled by the fold model that held out its
        star, so a visit and its training visit form a held-out repeat pair.
    label_errors : (S, L) array or a table with ``e_<label>`` columns, optional
        Errors of the training labels: each fold model is trained with its training stars'
        (``CannonModel.train(label_errors=...)``, errors in variables), so the CV measures that
        procedure.
    **model_kwargs
        Keyword arguments of ``CannonModel`` (e.g. ``wavelength``, ``label_mask``).

    Returns
    -------
    pandas DataFrame, one row per star in input order: ``fold``, ``true_<label>``,
    ``inferred_<label>`` for each label, and ``chi2``, ``converged``, ``flag`` (the test step's
    bitmask), ``n_pixels`` when the test step gives them. With ``diagnostics``, per held-out
    star: ``e_<label>_formal`` (formal error), ``snr`` (:func:`lamostcannon.ood.spectrum_snr`),
    ``chi2_per_pixel``, the OOD window statistics ``ood_<window>`` (fold model's residuals) and
    ``ood_log_density`` (KDE of the fold's training labels at the CV labels).

    With ``extra``, a tuple ``(cv, extra_table)``: ``extra_table`` has one row per extra
    observation, in input order, with ``star``, ``fold``, ``inferred_<label>``, ``flag`` and the
    same diagnostics.
    """
    import pandas as pd

    y, names = _as_matrix(labels, label_names)
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    if flux.shape != ivar.shape or flux.ndim != 2 or flux.shape[0] != y.shape[0]:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must be (S, P) with "
                         f"S = {y.shape[0]} rows of labels {y.shape}")
    if not np.all(np.isfinite(y)):
        bad = int((~np.isfinite(y)).any(axis=1).sum())
        raise ValueError(f"{bad} stars have non-finite labels; remove them before CV")
    folds = kfold(len(y), k, seed) if folds is None else np.asarray(folds, dtype=np.int64)
    if folds.shape != (len(y),):
        raise ValueError(f"folds must have shape ({len(y)},), got {folds.shape}")
    fold_ids = np.unique(folds)
    if n_jobs is None:
        from .config import settings

        n_jobs = settings().n_workers
    n_jobs = max(1, min(int(n_jobs), len(fold_ids)))
    test_kwargs = dict(test_kwargs or {})
    train_kwargs = dict(train_kwargs or {})

    extra_star = extra_flux = extra_ivar = None
    if extra is not None:
        extra_star = np.asarray(extra[0], dtype=np.int64)
        extra_flux, extra_ivar = np.asarray(extra[1]), np.asarray(extra[2])
        if extra_flux.shape != extra_ivar.shape or extra_flux.shape != (extra_star.size,
                                                                         flux.shape[1]):
            raise ValueError(f"extra spectra {extra_flux.shape} must be ({extra_star.size}, "
                             f"{flux.shape[1]}) like their ivar {extra_ivar.shape}")
        if extra_star.size and (extra_star.min() < 0 or extra_star.max() >= len(y)):
            raise ValueError(f"extra star indices must lie in 0..{len(y) - 1}")
    errors = None
    if label_errors is not None:
        from .cannon import _label_errors_array

        errors = _label_errors_array(label_errors, names, y.shape)
    work = {"folds": folds, "names": names, "labels": y, "flux": flux, "ivar": ivar,
            "errors": errors,
            "extra_star": extra_star, "extra_flux": extra_flux, "extra_ivar": extra_ivar,
            "model_kwargs": model_kwargs, "train_kwargs": train_kwargs, "test_kwargs": test_kwargs,
            "diagnostics": bool(diagnostics)}
    results = {}
    if n_jobs == 1:
        _WORK.clear()
        _WORK.update(work)
        try:
            for f in fold_ids:
                results[int(f)] = _run_fold(int(f))[1]
                log.info("CV fold %d/%d done", len(results), len(fold_ids))
        finally:
            _WORK.clear()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(work, os.getpid())) as pool:
            futures = [pool.submit(_run_fold, int(f)) for f in fold_ids]
            for fut in as_completed(futures):
                f, out = fut.result()
                results[f] = out
                log.info("CV fold %d/%d done", len(results), len(fold_ids))

    inferred = np.full_like(y, np.nan)
    e_formal = np.full_like(y, np.nan)
    columns = {}
    for f, out in results.items():
        held = folds == f
        inferred[held] = out["labels"]
        if "e_formal" in out:
            e_formal[held] = out["e_formal"]
        for key, value in out.items():
            if key in ("labels", "e_formal", "extra"):
                continue
            if key not in columns:
                fill = np.nan if value.dtype.kind == "f" else 0
                columns[key] = np.full(len(y), fill, dtype=value.dtype)
            columns[key][held] = value
    cols = {}
    if ids is not None:
        ids = np.asarray(ids)
        cols["id"] = ids.astype(ids.dtype.newbyteorder("=")) if ids.dtype.byteorder == ">" else ids
    cols["fold"] = folds
    for j, name in enumerate(names):
        cols[f"true_{name}"] = y[:, j]
        cols[f"inferred_{name}"] = inferred[:, j]
    if diagnostics:
        for j, name in enumerate(names):
            cols[f"e_{name}_formal"] = e_formal[:, j]
    cols.update(columns)
    df = pd.DataFrame(cols)
    df.attrs["label_names"] = list(names)
    df.attrs["k"] = len(fold_ids)
    if extra is None:
        return df
    m = extra_star.size
    xcols = {"star": extra_star, "fold": folds[extra_star] if m else np.zeros(0, np.int64)}
    lab = np.full((m, len(names)), np.nan)
    ef = np.full((m, len(names)), np.nan)
    more = {}
    for out in results.values():
        x = out.get("extra")
        if x is None:
            continue
        r = x["rows"]
        lab[r] = x["labels"]
        if "e_formal" in x:
            ef[r] = x["e_formal"]
        for key, value in x.items():
            if key in ("rows", "labels", "e_formal"):
                continue
            if key not in more:
                more[key] = np.full(m, np.nan if value.dtype.kind == "f" else 0, value.dtype)
            more[key][r] = value
    for j, name in enumerate(names):
        xcols[f"inferred_{name}"] = lab[:, j]
        xcols[f"e_{name}_formal"] = ef[:, j]
    xcols.update(more)
    return df, pd.DataFrame(xcols)


def cv_labels(cv) -> list[str]:
    """Label names of a CV table (the ``true_<label>`` columns, in order)."""
    return [c.removeprefix("true_") for c in cv.columns if c.startswith("true_")]


def cv_true_inferred(cv, label_names=None):
    """``(true, inferred, names)`` as (S, L) arrays from a :func:`cross_validate` table."""
    names = list(label_names) if label_names is not None else cv_labels(cv)
    true = np.column_stack([np.asarray(cv[f"true_{n}"], dtype=float) for n in names])
    inferred = np.column_stack([np.asarray(cv[f"inferred_{n}"], dtype=float) for n in names])
    return true, inferred, names


def with_true_labels(cv, table, key: str = "sobject_id"):
    """A copy of a CV table whose ``true_<label>`` columns come from another label table.

    Rows are matched on ``cv["id"] == table[key]`` (e.g. the mock universe's true labels, or
    another survey's). Labels the table lacks keep their values; unmatched rows get NaN.
    """
    if "id" not in cv.columns:
        raise KeyError("the CV table has no 'id' column; pass ids= to cross_validate")
    keys = np.asarray(table[key])
    row_of = {k: i for i, k in enumerate(keys.tolist())}
    rows = np.array([row_of.get(k, -1) for k in cv["id"].tolist()], dtype=np.int64)
    out = cv.copy()
    cols = table.colnames if hasattr(table, "colnames") else list(table.columns)
    for name in cv_labels(cv):
        if name in cols:
            v = np.ma.filled(np.ma.asarray(table[name], dtype=float), np.nan)
            out[f"true_{name}"] = np.where(rows >= 0, v[np.maximum(rows, 0)], np.nan)
    return out


def _pair(true, inferred, label_names):
    if inferred is None:
        if not hasattr(true, "columns"):
            raise TypeError("give (true, inferred), or a cross_validate DataFrame alone")
        return cv_true_inferred(true, label_names)
    t, names = _as_matrix(true, label_names)
    i, _ = _as_matrix(inferred, names)
    if t.shape != i.shape:
        raise ValueError(f"true {t.shape} and inferred {i.shape} must have the same shape")
    return t, i, names


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def cv_metrics(true, inferred=None, label_names=None):
    """Scatter, bias and correlation per label (the numbers in Figs 5 and 6).

    Parameters
    ----------
    true, inferred : (S, L) arrays, or Tables / DataFrames with label columns; or a
        :func:`cross_validate` DataFrame as ``true`` alone.
    label_names : sequence of str, optional

    Returns
    -------
    pandas DataFrame indexed by label with columns ``n`` (stars with both values finite),
    ``scatter`` (std of ``inferred - true``, ddof=0), ``robust_scatter`` (1.4826 x median absolute
    deviation of the difference), ``bias`` (mean of ``inferred - true``), ``correlation`` (Pearson
    r of true and inferred).
    """
    import pandas as pd

    t, i, names = _pair(true, inferred, label_names)
    rows = []
    for j, name in enumerate(names):
        ok = np.isfinite(t[:, j]) & np.isfinite(i[:, j])
        d = i[ok, j] - t[ok, j]
        n = int(ok.sum())
        if n >= 2:
            scatter = float(np.std(d))
            robust = float(1.4826 * np.median(np.abs(d - np.median(d))))
            bias = float(np.mean(d))
            st, si = np.std(t[ok, j]), np.std(i[ok, j])
            corr = float(np.corrcoef(t[ok, j], i[ok, j])[0, 1]) if st > 0 and si > 0 else np.nan
        else:
            scatter = robust = bias = corr = np.nan
        rows.append({"label": name, "n": n, "scatter": scatter, "robust_scatter": robust,
                     "bias": bias, "correlation": corr})
    return pd.DataFrame(rows).set_index("label")


# ---------------------------------------------------------------------------------------------
# KDE extrapolation boundaries
# ---------------------------------------------------------------------------------------------


def _kde(true, inferred):
    """Silverman-bandwidth Gaussian KDE of (true, inferred), both standardised with the mean and
    std of ``true`` (a common affine map keeps ``true < inferred`` comparisons intact; the
    full-covariance KDE is affine-equivariant, so this only helps the numerics)."""
    from scipy.stats import gaussian_kde

    t = np.asarray(true, dtype=float)
    i = np.asarray(inferred, dtype=float)
    ok = np.isfinite(t) & np.isfinite(i)
    t, i = t[ok], i[ok]
    if t.size < 5:
        raise ValueError(f"need at least 5 finite (true, inferred) pairs, got {t.size}")
    mu, sd = float(np.mean(t)), float(np.std(t))
    sd = sd if sd > 0 else 1.0
    ts, is_ = (t - mu) / sd, (i - mu) / sd
    try:
        kde = gaussian_kde(np.vstack([ts, is_]), bw_method="silverman")
    except np.linalg.LinAlgError as err:
        raise ValueError("true and inferred values are perfectly correlated (or constant): "
                         "the KDE of p(true, inferred) is degenerate") from err
    return kde, ts, is_, mu, sd


def conditional_cdf(true, inferred, grid):
    """``F(y) = P(l_true < y | l_inferred = y)`` under the Silverman KDE of (true, inferred).

    The Gaussian KDE's conditional at ``l_inferred = y`` is itself a mixture of Gaussians: kernel
    ``j`` (centred on star ``j``, kernel covariance ``[[a, c], [c, b]]``) contributes weight
    ``∝ N(y; inferred_j, b)``, mean ``true_j + (c / b)(y - inferred_j)`` and variance
    ``a - c^2 / b``; so ``F`` is evaluated exactly, without a 2-D grid.

    Parameters
    ----------
    true, inferred : arrays (S,)
    grid : array (G,)
        Inferred values ``y`` (physical units).

    Returns
    -------
    F : array (G,)
    """
    from scipy.special import log_ndtr, logsumexp

    kde, ts, is_, mu, sd = _kde(true, inferred)
    (a, c), (_, b) = kde.covariance
    v = max(a - c * c / b, 1e-12 * a)
    y = (np.asarray(grid, dtype=float) - mu) / sd
    out = np.empty(y.shape)
    for lo in range(0, y.size, 256):  # chunks keep memory at 256 x S
        yy = y.ravel()[lo:lo + 256, None]
        logw = -0.5 * (yy - is_[None, :]) ** 2 / b
        m = ts[None, :] + (c / b) * (yy - is_[None, :])
        logphi = log_ndtr((yy - m) / math.sqrt(v))
        out.ravel()[lo:lo + 256] = np.exp(logsumexp(logw + logphi, axis=1) -
                                          logsumexp(logw, axis=1))
    return out


def _crossing(y0, y1, g0, g1):
    """Where the linear interpolation of g between (y0, g0) and (y1, g1) crosses zero."""
    if g1 == g0:
        return y1
    return y0 + (y1 - y0) * (0.0 - g0) / (g1 - g0)


def boundary_1d(true, inferred, level: float = 0.9, *, grid_size: int = 2001,
                extend: float = 3.0):
    """Low and high extrapolation boundaries of one label; see the module docstring.

    Parameters
    ----------
    true, inferred : arrays (S,)
    level : float
        Fraction of ``p(l_true | l_inferred)`` on one side of ``l_inferred`` that makes the model
        biased (0.9 in the paper).
    grid_size : int
        Points of the grid in inferred value.
    extend : float
        The grid runs from ``min(inferred) - extend * std`` to ``max(inferred) + extend * std``
        (std of the true values).

    Returns
    -------
    (low, high) : floats; ``-inf`` / ``+inf`` when the model is unbiased to the end of the grid.
    """
    if not 0.5 < level < 1:
        raise ValueError(f"level must lie in (0.5, 1), got {level}")
    t = np.asarray(true, dtype=float)
    i = np.asarray(inferred, dtype=float)
    ok = np.isfinite(t) & np.isfinite(i)
    t, i = t[ok], i[ok]
    sd = float(np.std(t)) or 1.0
    grid = np.linspace(i.min() - extend * sd, i.max() + extend * sd, grid_size)
    F = conditional_cdf(t, i, grid)
    g = np.maximum(F, 1.0 - F) - level  # >= 0 where biased
    start = int(np.argmin(np.abs(grid - np.median(i))))
    if g[start] >= 0:
        log.warning("the model is biased at the median inferred value %.4g: no unbiased range",
                    grid[start])
        return float(grid[start]), float(grid[start])
    below = np.flatnonzero(g[:start] >= 0)
    low = -np.inf if below.size == 0 else _crossing(grid[below[-1]], grid[below[-1] + 1],
                                                    g[below[-1]], g[below[-1] + 1])
    above = np.flatnonzero(g[start:] >= 0)
    if above.size == 0:
        high = np.inf
    else:
        j = start + above[0]
        high = _crossing(grid[j - 1], grid[j], g[j - 1], g[j])
    return float(low), float(high)


def extrapolation_boundaries(true, inferred=None, level: float = 0.9, label_names=None, **kw):
    """Extrapolation boundaries of every label (:func:`boundary_1d`).

    Parameters
    ----------
    true, inferred : (S, L) arrays or label tables; or a :func:`cross_validate` DataFrame alone.
    level : float
        0.9 in the paper.

    Returns
    -------
    dict label -> (low, high), in physical units of the label.
    """
    t, i, names = _pair(true, inferred, label_names)
    return {name: boundary_1d(t[:, j], i[:, j], level, **kw) for j, name in enumerate(names)}


def extrapolation_flags(values, boundaries):
    """Flag values beyond the extrapolation boundaries.

    Parameters
    ----------
    values : Table, DataFrame or dict with a column per label (physical units)
    boundaries : dict label -> (low, high)

    Returns
    -------
    pandas DataFrame of bool, a column per label present in both: ``True`` where the value lies
    below ``low`` or above ``high``. Non-finite values are not flagged (they fail elsewhere).
    """
    import pandas as pd

    cols = list(values.colnames if hasattr(values, "colnames") else
                values.columns if hasattr(values, "columns") else values.keys())
    out = {}
    for name, (low, high) in boundaries.items():
        if name not in cols:
            continue
        v = np.ma.filled(np.ma.asarray(values[name], dtype=float), np.nan)
        with np.errstate(invalid="ignore"):
            out[name] = (v < low) | (v > high)
    return pd.DataFrame(out)


def _one_sided(t, i, masks) -> float:
    """Fraction of the stars in ``masks`` whose truth lies on the majority side of the inferred
    value, the majority taken in each mask separately; NaN when the masks are empty."""
    n = sum(int(m.sum()) for m in masks)
    if n == 0:
        return float("nan")
    hits = sum(max(np.sum(t[m] < i[m]), np.sum(t[m] > i[m])) for m in masks)
    return float(hits / n)


def boundary_check(cv, boundaries) -> "pd.DataFrame":
    """Do the extrapolation boundaries mark where the model is biased? (held-out CV stars)

    A boundary is where ``p(l_true | l_inferred)`` first puts ``level`` (0.9) of its mass on one
    side of ``l_inferred``; beyond it the truth should lie on one side of the inferred value (the
    side of the bias: outward for a compressed response, inward for an over-dispersed one) about
    that often or more. Inside, the same count in the halves above and below the median inferred
    value is the comparison: a label with less than perfect correlation is somewhat one-sided
    there too. How many stars lie beyond depends on the sample size (Silverman's bandwidth
    shrinks as ``S^(-1/6)``, so a larger reference set resolves boundaries that a smaller one
    smooths away); the one-sided fraction beyond them does not.

    Parameters
    ----------
    cv : DataFrame of :func:`cross_validate` (``true_<label>``, ``inferred_<label>``)
    boundaries : dict label -> (low, high), from :func:`extrapolation_boundaries`

    Returns
    -------
    DataFrame indexed by label: ``flagged`` (fraction of the CV stars beyond a boundary),
    ``n_beyond``, ``one_sided_beyond`` (fraction of those whose truth lies on the majority side of
    the inferred value, counted beyond each boundary separately; NaN when none),
    ``one_sided_inside`` (the same for the others, in the halves above and below the median).
    """
    import pandas as pd

    rows = {}
    for name, (low, high) in boundaries.items():
        if f"true_{name}" not in cv or f"inferred_{name}" not in cv:
            continue
        t = np.asarray(cv[f"true_{name}"], dtype=float)
        i = np.asarray(cv[f"inferred_{name}"], dtype=float)
        ok = np.isfinite(t) & np.isfinite(i)
        t, i = t[ok], i[ok]
        if t.size == 0:
            continue
        above, below = i > high, i < low
        inside = ~(above | below)
        centre = np.median(i)
        n_beyond = int(above.sum() + below.sum())
        rows[name] = {"flagged": n_beyond / t.size, "n_beyond": n_beyond,
                      "one_sided_beyond": _one_sided(t, i, [above, below]),
                      "one_sided_inside": _one_sided(t, i, [inside & (i > centre),
                                                            inside & (i <= centre)])}
    return pd.DataFrame.from_dict(rows, orient="index")


def unbiased_precision(metrics, boundaries, inferred=None):
    """Precision relative to the unbiased range (Fig 7).

    ``relative_precision = 2 * scatter / (high - low)``, with ``(low, high)`` the extrapolation
    boundaries; an infinite boundary is replaced by the extreme inferred value when ``inferred``
    is given (the range is then bounded by what the model was seen to produce), else the ratio is 0.

    Parameters
    ----------
    metrics : DataFrame from :func:`cv_metrics`
    boundaries : dict label -> (low, high)
    inferred : (S, L) array, label table, or a :func:`cross_validate` DataFrame, optional

    Returns
    -------
    DataFrame indexed by label: ``precision`` (2 x scatter), ``low``, ``high``,
    ``unbiased_range``, ``relative_precision``.
    """
    import pandas as pd

    ext = {}
    if inferred is not None:
        if hasattr(inferred, "columns") and any(c.startswith("inferred_") for c in inferred.columns):
            _, arr, names = cv_true_inferred(inferred)
        else:
            arr, names = _as_matrix(inferred, list(metrics.index))
        for j, n in enumerate(names):
            ext[n] = (np.nanmin(arr[:, j]), np.nanmax(arr[:, j]))
    rows = []
    for label in metrics.index:
        if label not in boundaries:
            continue
        low, high = boundaries[label]
        if label in ext:
            low = max(low, ext[label][0])
            high = min(high, ext[label][1])
        precision = 2.0 * float(metrics.loc[label, "scatter"])
        width = high - low
        rows.append({"label": label, "precision": precision, "low": low, "high": high,
                     "unbiased_range": width,
                     "relative_precision": precision / width if width > 0 else np.nan})
    return pd.DataFrame(rows).set_index("label")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _check_group(group):
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    return group


def boundaries_path(group: str) -> Path:
    """``processed/extrapolation_<group>.json``."""
    return paths.processed_dir() / f"extrapolation_{_check_group(group)}.json"


def cv_path(group: str) -> Path:
    """``processed/cv_<group>.parquet``."""
    return paths.processed_dir() / f"cv_{_check_group(group)}.parquet"


def _num(x):
    return None if not np.isfinite(x) else float(x)


def write_boundaries(boundaries, path, *, level=0.9, metrics=None, meta=None):
    """Write boundaries as JSON: ``{"level", "labels": {label: {"low", "high"}}, "provenance"}``.

    Infinite boundaries are written as ``null``. ``metrics`` (a :func:`cv_metrics` frame) adds the
    CV scatter and bias per label. Written to a temporary name and renamed into place.
    """
    from .cleaning import provenance

    path = Path(path)
    record = {"level": float(level), "method": "Gaussian KDE of (true, CV-inferred), Silverman "
              "bandwidth; boundary where p(true | inferred) puts >= level on one side",
              "labels": {}}
    for name, (low, high) in boundaries.items():
        entry = {"low": _num(low), "high": _num(high)}
        if metrics is not None and name in metrics.index:
            for key in ("scatter", "robust_scatter", "bias", "correlation"):
                if key in metrics.columns:
                    entry[key] = _num(float(metrics.loc[name, key]))
        record["labels"][name] = entry
    record["provenance"] = {**provenance(), **(meta or {})}
    paths.ensure(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    log.info("wrote %s", path)
    return path


def read_boundaries(path):
    """Read :func:`write_boundaries` output: dict label -> (low, high) with ``null`` as
    ``-inf`` / ``+inf``."""
    try:
        record = json.loads(Path(path).read_text())
        return {name: (-np.inf if e["low"] is None else e["low"],
                       np.inf if e["high"] is None else e["high"])
                for name, e in record["labels"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an extrapolation-boundaries file written by "
                         f"write_boundaries ({type(exc).__name__}: {exc})") from None


def write_cv(cv, path):
    """Write a CV table to Parquet (temporary name, then renamed into place)."""
    path = Path(path)
    paths.ensure(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    cv.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    log.info("wrote %s (%d rows)", path, len(cv))
    return path


def read_cv(path):
    """Read a CV table written by :func:`write_cv`."""
    import pandas as pd

    return pd.read_parquet(path)


# ---------------------------------------------------------------------------------------------
# Calibrations beside the models (written by notebook 04; see lamostcannon.trust)
# ---------------------------------------------------------------------------------------------


def uncertainty_path(group: str) -> Path:
    """``processed/uncertainty_<group>.json``: error model and label skill of a model."""
    return paths.processed_dir() / f"uncertainty_{_check_group(group)}.json"


def ood_path(group: str) -> Path:
    """``processed/ood_<group>.json``: the out-of-distribution calibration of a model."""
    return paths.processed_dir() / f"ood_{_check_group(group)}.json"


def read_skill(group: str, path=None) -> dict:
    """The CV skill of each label of a model (:func:`lamostcannon.uncertainty.assess_skill`),
    from ``uncertainty_<group>.json``: ``{label: {"skill": bool, "correlation", ...}}``."""
    from .uncertainty import read_error_model

    path = Path(path) if path is not None else uncertainty_path(group)
    if not path.exists():
        raise FileNotFoundError(f"no {path}; run notebook 04 (cross-validation) first")
    return read_error_model(path).skill


def skilled_labels(group: str, labels=None, path=None) -> list:
    """Labels of ``labels`` (default: the model's) with CV skill, in the given order."""
    skill = read_skill(group, path)
    names = list(labels) if labels is not None else list(skill)
    return [n for n in names if skill.get(n, {}).get("skill", True)]


def truth_recovery(stars, truth, label_sets, *, key: str = "designation", skill=None,
                   good=None):
    """How well a catalogue recovers the mock's true labels, beside what a catalogue that learned
    nothing would give.

    A catalogue that returns the training mean scatters about the truth by the true labels' own
    spread and correlates with nothing, so ``scatter`` is to be read against ``spread`` and
    ``correlation`` against 0 (notebook 05 asserts ``scatter < 0.8 spread`` or
    ``correlation > 0.5`` for every label with CV skill).

    Parameters
    ----------
    stars : astropy Table or DataFrame
        The per-star catalogue: ``key``, ``giantmodel``, the label columns and, for the default
        selection, ``quality_flag``.
    truth : astropy Table or DataFrame
        ``truth/truth.fits`` of the mock (``key`` and the true label columns).
    label_sets : dict
        ``{"dwarf": labels, "giant": labels}``: the labels of each model to compare (labels
        absent from either table are skipped).
    key : str
        Column joining the two tables.
    skill : dict, optional
        ``{group: {label: {"skill": bool, ...}}}``; default :func:`read_skill` of each group.
    good : callable, optional
        ``good(joined) -> bool array`` selecting the rows (default ``quality_flag == 0``).

    Returns
    -------
    DataFrame indexed by ``(model, label)``: ``n``, ``scatter`` (std of inferred - true, in the
    label's unit), ``spread`` (std of the true values of the same stars), ``correlation``
    (Pearson, inferred against true) and ``skill``.
    """
    import pandas as pd

    from .catalog import _as_frame

    if not isinstance(label_sets, dict) or not set(label_sets) <= {"dwarf", "giant"}:
        raise ValueError(f"label_sets must be a dict with keys 'dwarf'/'giant', got {label_sets!r}")
    names = sorted({n for v in label_sets.values() for n in v})
    s = _as_frame(stars)
    t = _as_frame(truth, [key, *names])
    for col in (key, "giantmodel"):
        if col not in s.columns:
            raise KeyError(f"stars has no {col!r} column")
    joined = s.merge(t, on=key, suffixes=("", "_true"))
    keep = np.asarray(good(joined) if good is not None else joined["quality_flag"] == 0, bool)
    rows = {}
    for group, group_labels in label_sets.items():
        in_group = keep & (joined["giantmodel"].to_numpy(bool) == (group == "giant"))
        sk = skill[group] if skill is not None else read_skill(group)
        for n in group_labels:
            if n not in joined.columns or f"{n}_true" not in joined.columns:
                continue
            x = joined.loc[in_group, n].to_numpy(float)
            y = joined.loc[in_group, f"{n}_true"].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < 3:
                continue
            x, y = x[ok], y[ok]
            corr = float(np.corrcoef(x, y)[0, 1]) if np.ptp(x) > 0 and np.ptp(y) > 0 else 0.0
            rows[(group, n)] = {"n": int(ok.sum()), "scatter": float(np.std(x - y)),
                                "spread": float(np.std(y)), "correlation": corr,
                                "skill": bool(sk.get(n, {}).get("skill", True))}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["model", "label"])
    return out
