"""Fitting and checking the trust calibrations of a model (notebooks 04 and 09).

:func:`calibrate` fits, on one part of the held-out data only, the error model
(:mod:`lamostcannon.uncertainty`) and the out-of-distribution calibration (:mod:`lamostcannon.ood`)
of a trained model from its cross-validation table (and repeat pairs when there are any), marks
the labels without CV skill, and writes ``uncertainty_<name>.json`` and ``ood_<name>.json`` beside
``model_<name>.fits``. :func:`cv_pulls`, :func:`pair_pulls` and :func:`flag_rates` check them on
the other part.

The split used throughout is the one of the project: even/odd (CV folds for the mock's reference
stars, LAMOST obsids or repeat GroupIDs for the real spectra). What is reported as a check was
never used in a fit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import ood as _ood
from . import uncertainty

log = logging.getLogger(__name__)

__all__ = ["calibrate", "cross_check", "diagnostics", "cv_pulls", "pair_pulls", "pull_table",
           "reference_repeats", "cv_repeat_pairs", "repeat_half", "survey_repeat_pairs",
           "flag_rates", "calibration_paths"]


def calibration_paths(model_path) -> dict:
    """``{"uncertainty": ..., "ood": ...}`` beside ``model_<name>.<ext>`` (where the labelling
    core looks for them, :func:`lamostcannon.labelling.companion_path`)."""
    model_path = Path(model_path)
    stem = model_path.name.split(".")[0]
    name = stem[len("model_"):] if stem.startswith("model_") else stem
    if stem.startswith("model_"):
        return {k: model_path.with_name(f"{k}_{name}.json") for k in ("uncertainty", "ood")}
    return {k: model_path.with_name(f"{stem}.{k}.json") for k in ("uncertainty", "ood")}


def diagnostics(model, labels, flux, ivar, train_labels, result=None) -> pd.DataFrame:
    """The OOD and error diagnostics of spectra labelled by ``model`` (not CV): the same columns
    as :func:`lamostcannon.validation.cross_validate` adds, for extra calibration spectra (e.g.
    in-distribution stars below the training S/N cut, which were never trained on)."""
    from .validation import _fold_diagnostics

    if result is None:
        from .validation import _ood_bins

        result = model.test(flux, ivar, residual_bins=_ood_bins(model, np.shape(flux)[1]))
    d = _fold_diagnostics(model, train_labels, flux, ivar, result)
    out = pd.DataFrame({k: v for k, v in d.items() if np.ndim(v) == 1})
    for j, n in enumerate(model.label_names):
        out[f"inferred_{n}"] = np.asarray(result.labels)[:, j]
        out[f"e_{n}_formal"] = d["e_formal"][:, j]
    return out


def calibrate(model, cv, train_labels, *, fit_rows, model_path=None, ref_errors=None,
              pairs=None, skill=None, extra_ood=None, ood_quantile: float = 0.98,
              poor_fit_quantile: float = 0.995, meta=None, write: bool = True):
    """Fit and (optionally) write the error model and the OOD calibration of a model.

    Parameters
    ----------
    model : CannonModel
        The trained model the calibrations belong to (its training hash goes into provenance).
    cv : DataFrame
        Its cross-validation table with diagnostics.
    train_labels : array (S, L)
        Training labels (the shipped KDE).
    fit_rows : bool array (len(cv),)
        CV rows to fit on; the others are held out for the checks.
    model_path : path, optional
        Where the model file is (the calibrations are written beside it).
    ref_errors : dict label -> array (len(cv),), optional
        Reference labels' own errors (GALAH ``e_<x>``).
    pairs : DataFrame, optional
        Repeat pairs (``delta_<l>``, ``e1_<l>``, ``e2_<l>``) to fit the random part on.
    skill : dict, optional
        :func:`lamostcannon.uncertainty.assess_skill` output, stored with the error model.
    extra_ood : DataFrame, optional
        More in-distribution spectra for the OOD calibration (:func:`diagnostics` output).
    ood_quantile, poor_fit_quantile : float
        See :func:`lamostcannon.ood.fit_calibration`.
    meta : dict, optional
        Provenance: what the calibration was fitted on.
    write : bool
        Write ``uncertainty_<name>.json`` and ``ood_<name>.json`` beside ``model_path``.

    Returns
    -------
    (ErrorModel, OODCalibration)
    """
    names = list(model.label_names)
    fit_rows = np.asarray(fit_rows, bool)
    if fit_rows.shape != (len(cv),):
        raise ValueError(f"fit_rows must have shape ({len(cv)},), got {fit_rows.shape}")
    prov = {"model_training_hash": getattr(model, "training_hash", None),
            "model_file": None if model_path is None else Path(model_path).name,
            "n_fit_cv": int(fit_rows.sum()), "n_heldout_cv": int((~fit_rows).sum()),
            "n_fit_pairs": 0 if pairs is None else int(len(pairs)), **(meta or {})}
    errors = uncertainty.fit_error_model(cv, names, ref_errors=ref_errors, pairs=pairs,
                                         rows=fit_rows, meta=prov)
    errors.skill = dict(skill or {})
    table = cv[fit_rows]
    if extra_ood is not None and len(extra_ood):
        table = pd.concat([table, extra_ood], ignore_index=True)
    cal = _ood.fit_calibration(table, train_labels, names, quantile=ood_quantile,
                               poor_fit_quantile=poor_fit_quantile,
                               meta={**prov, "n_extra_spectra": 0 if extra_ood is None else
                                     int(len(extra_ood))})
    if write:
        if model_path is None:
            raise ValueError("model_path is needed to write the calibrations beside the model")
        where = calibration_paths(model_path)
        uncertainty.write_error_model(errors, where["uncertainty"])
        _ood.write_calibration(cal, where["ood"])
    return errors, cal


def cv_pulls(cv, errors, label_names, *, ref_errors=None, rows=None, truth=None) -> pd.DataFrame:
    """Pulls of CV residuals, before (formal errors) and after calibration.

    ``pull_formal_<l> = (l_CV - l_ref) / sqrt(e_formal^2 + (k e_ref)^2)`` and
    ``pull_<l> = (l_CV - l_ref) / sqrt(e_<l>^2 + (k e_ref)^2)`` with ``k`` the fitted
    ``ref_factor`` of the reference errors ``e_ref``; with ``truth`` (a DataFrame of true
    labels row-aligned with ``cv``, the mock), also ``pull_truth_<l> = (l_CV - l_true) / e_<l>``.
    ``rows`` selects the held-out rows. Returns one row per selected star with ``snr``.
    """
    t = cv if rows is None else cv[np.asarray(rows, bool)]
    sel = None if rows is None else np.asarray(rows, bool)
    ef = np.column_stack([t[f"e_{n}_formal"].to_numpy(float) for n in label_names])
    tot, _ = errors.apply(label_names, ef, t["snr"].to_numpy(float))
    out = pd.DataFrame({"snr": t["snr"].to_numpy(float)})
    for j, n in enumerate(label_names):
        d = t[f"inferred_{n}"].to_numpy(float) - t[f"true_{n}"].to_numpy(float)
        er = np.zeros_like(d)
        if ref_errors is not None and n in ref_errors and n in errors.labels:
            er = np.asarray(ref_errors[n], float)
            er = er if sel is None else er[sel]
            er = errors.labels[n].ref_factor * np.where(np.isfinite(er), er, 0.0)
        out[f"pull_formal_{n}"] = uncertainty.pulls(d, np.hypot(ef[:, j], er))
        out[f"pull_{n}"] = uncertainty.pulls(d, np.hypot(tot[:, j], er))
        if truth is not None and n in truth:
            tv = np.asarray(truth[n], float)
            tv = tv if sel is None else tv[sel]
            out[f"pull_truth_{n}"] = uncertainty.pulls(t[f"inferred_{n}"].to_numpy(float) - tv,
                                                       tot[:, j])
    return out


def pair_pulls(pairs, errors, label_names) -> pd.DataFrame:
    """Pulls of repeat-pair differences, before and after calibration.

    ``pull_formal_<l> = delta / sqrt(e1^2 + e2^2)`` (formal) and
    ``pull_<l> = delta / sqrt(e_random,1^2 + e_random,2^2)``; ``snr`` is the lower S/N of the two
    visits (``snr1``, ``snr2`` columns of ``pairs``).
    """
    out = pd.DataFrame({"snr": np.fmin(pairs["snr1"].to_numpy(float),
                                       pairs["snr2"].to_numpy(float))})
    for n in label_names:
        d = pairs[f"delta_{n}"].to_numpy(float)
        e1, e2 = pairs[f"e1_{n}"].to_numpy(float), pairs[f"e2_{n}"].to_numpy(float)
        _, r1 = errors.apply([n], e1[:, None], pairs["snr1"].to_numpy(float))
        _, r2 = errors.apply([n], e2[:, None], pairs["snr2"].to_numpy(float))
        out[f"pull_formal_{n}"] = uncertainty.pulls(d, np.hypot(e1, e2))
        out[f"pull_{n}"] = uncertainty.pulls(d, np.hypot(r1[:, 0], r2[:, 0]))
    return out


def pull_table(pulls: pd.DataFrame, label_names, *, prefix: str = "pull_", bins=None,
               n_bins: int = 3) -> pd.DataFrame:
    """:func:`lamostcannon.uncertainty.pull_summary` of ``<prefix><label>`` for every label,
    stacked (index: label, S/N bin)."""
    parts = {n: uncertainty.pull_summary(pulls[f"{prefix}{n}"], pulls["snr"], bins=bins,
                                         n_bins=n_bins)
             for n in label_names if f"{prefix}{n}" in pulls}
    return pd.concat(parts, names=["label"])


def flag_rates(quality_flag, groups) -> pd.DataFrame:
    """Fraction of rows with ``quality_flag != 0`` per group (``{name: bool mask}``), with the
    fraction of each bit."""
    from .labelling import QUALITY_BITS

    qf = np.asarray(quality_flag).astype(np.int64)
    rows = []
    for name, mask in groups.items():
        m = np.asarray(mask, bool)
        row = {"group": name, "n": int(m.sum()),
               "flagged": float(np.mean(qf[m] != 0)) if m.any() else np.nan}
        for b, (bn, _) in QUALITY_BITS.items():
            row[bn] = float(np.mean((qf[m] & b) != 0)) if m.any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("group")


def cross_check(model, cv, train_labels, *, half, pairs=None, pair_half=None, ref_errors=None,
                truth=None, extra_ood=None, extra_half=None, **kwargs):
    """Held-out checks of the calibration procedure, both ways round.

    The calibrations are fitted on one half (``half`` True: CV rows; ``pair_half``: repeat pairs;
    ``extra_half``: extra OOD spectra) and checked on the other, then the other way round, so
    every star's pull comes from a calibration that never saw it, and the checks use all stars
    (twice the statistics of one split; the shipped calibration is one of the two halves' fits).

    Returns
    -------
    dict with ``cv`` (:func:`cv_pulls` of every CV star, from the other half's fit), ``pairs``
    (:func:`pair_pulls` of every pair, or None), ``ood_flagged`` (fraction of the held-out CV
    stars above the other half's ``UNLIKE_TRAINING`` threshold) and ``poor_fit_flagged``.
    """
    names = list(model.label_names)
    half = np.asarray(half, bool)
    cv_parts, pair_parts, ood_flag, poor_flag = [], [], [], []
    for fit_half in (True, False):
        rows = half == fit_half
        p_fit = None
        if pairs is not None:
            ph = np.asarray(pair_half, bool)
            p_fit = pairs[ph == fit_half].reset_index(drop=True)
        e_fit = None
        if extra_ood is not None:
            e_fit = extra_ood[np.asarray(extra_half, bool) == fit_half]
        errors, cal = calibrate(model, cv, train_labels, fit_rows=rows, ref_errors=ref_errors,
                                pairs=p_fit, extra_ood=e_fit, write=False, **kwargs)
        held = ~rows
        part = cv_pulls(cv, errors, names, ref_errors=ref_errors, rows=held, truth=truth)
        part.index = np.flatnonzero(held)
        cv_parts.append(part)
        if pairs is not None:
            pp = pair_pulls(pairs[np.asarray(pair_half, bool) != fit_half], errors, names)
            pair_parts.append(pp)
        t = cv[held]
        snr = t["snr"].to_numpy(float)
        score = cal.score({c: t[c].to_numpy(float) for c in cal.components}, snr)
        ood_flag.append(score > cal.threshold)
        poor_flag.append(cal.z("chi2_per_pixel", t["chi2_per_pixel"].to_numpy(float), snr)
                         > cal.poor_fit_threshold)
    return {"cv": pd.concat(cv_parts).sort_index(),
            "pairs": pd.concat(pair_parts, ignore_index=True) if pair_parts else None,
            "ood_flagged": float(np.mean(np.concatenate(ood_flag))),
            "poor_fit_flagged": float(np.mean(np.concatenate(poor_flag)))}


def reference_repeats(table, lamost_catalog, spectra_dir, store_path, *, n_workers=None):
    """Other LAMOST observations of the training stars (repeat visits), read and preprocessed.

    Parameters
    ----------
    table : Table or DataFrame
        The training stars (one row each) with ``designation`` and the training ``obsid``.
    lamost_catalog : Table or DataFrame
        The LAMOST catalogue (``obsid``, ``designation``, ``filename``).
    spectra_dir : path
        Where the catalogue's ``filename`` files are.
    store_path : path
        Spectra store for the extra visits (created or resumed; see
        :func:`lamostcannon.real.load_spectra`).

    Returns
    -------
    star : int array (M,)
        Row in ``table`` of each extra visit's star.
    flux, ivar : float32 arrays (M, P)
    obsid : int array (M,)
    Only visits that could be read are returned.
    """
    from .catalog import _as_frame
    from .real import load_spectra

    stars = _as_frame(table, ["designation", "obsid"])
    cat = _as_frame(lamost_catalog, ["obsid", "designation", "filename"])
    row_of = {d: k for k, d in enumerate(stars["designation"].astype(str))}
    train_obsid = set(np.asarray(stars["obsid"], np.int64).tolist())
    cat = cat[cat["designation"].astype(str).isin(row_of) &
              ~cat["obsid"].astype(np.int64).isin(train_obsid)].drop_duplicates("obsid")
    cat = cat.sort_values("obsid").reset_index(drop=True)
    if len(cat) == 0:
        from .spectra import N_PIXELS as P

        return (np.zeros(0, np.int64), np.ones((0, P), np.float32), np.zeros((0, P), np.float32),
                np.zeros(0, np.int64))
    files = [str(Path(spectra_dir) / f) for f in cat["filename"].astype(str)]
    # a file changed since it was stored (a regenerated mock) replaces its row: see store.py
    flux, ivar, meta = load_spectra(files, store_path, n_workers=n_workers)
    ok = meta["ok"].to_numpy(bool)
    star = np.array([row_of[d] for d in cat["designation"].astype(str)], np.int64)
    log.info("%d repeat visits of %d training stars (%d unreadable)", int(ok.sum()),
             len(set(star[ok])), int((~ok).sum()))
    return star[ok], flux[ok], ivar[ok], cat["obsid"].to_numpy(np.int64)[ok]


def cv_repeat_pairs(cv, extra_table, label_names) -> pd.DataFrame:
    """Repeat pairs of the CV: each extra visit (``cross_validate(..., extra=...)``) against its
    star's training visit, both labelled by the fold model that held the star out.

    Returns the pair columns of :func:`lamostcannon.uncertainty.fit_error_model` (``delta_<l>``,
    ``e1_<l>``, ``e2_<l>``, ``snr1``, ``snr2``) plus ``star`` and ``fold``.
    """
    star = extra_table["star"].to_numpy(np.int64)
    out = pd.DataFrame({"star": star, "fold": extra_table["fold"].to_numpy(),
                        "snr1": extra_table["snr"].to_numpy(float),
                        "snr2": cv["snr"].to_numpy(float)[star]})
    for n in label_names:
        out[f"delta_{n}"] = (extra_table[f"inferred_{n}"].to_numpy(float) -
                             cv[f"inferred_{n}"].to_numpy(float)[star])
        out[f"e1_{n}"] = extra_table[f"e_{n}_formal"].to_numpy(float)
        out[f"e2_{n}"] = cv[f"e_{n}_formal"].to_numpy(float)[star]
    if "flag" in extra_table and "flag" in cv:
        good = (extra_table["flag"].to_numpy() == 0) & (cv["flag"].to_numpy()[star] == 0)
        out = out[good].reset_index(drop=True)
    return out


def repeat_half(designation) -> np.ndarray:
    """``"fit"`` or ``"check"`` for each star: the parity of the first byte of
    ``blake2b(designation)``. A fixed, reproducible split of the survey's repeat-observed stars:
    notebook 04 fits the random errors on the ``"fit"`` half, notebook 05 checks them on the
    ``"check"`` half."""
    import hashlib

    d = np.asarray(designation).astype(str)
    odd = np.array([hashlib.blake2b(x.encode(), digest_size=2).digest()[0] % 2 for x in d], bool)
    return np.where(odd, "check", "fit")


def _fold_of(designation, k=12) -> np.ndarray:
    import hashlib

    d = np.asarray(designation).astype(str)
    return np.array([hashlib.blake2b(x.encode(), digest_size=2).digest()[1] % k for x in d],
                    np.int64)


def survey_repeat_pairs(models, lamost_catalog, spectra_dir, store_path, *, exclude=(),
                        half="fit", boundaries=None, n_workers=None) -> dict:
    """Repeat pairs of the survey's stars observed more than once, labelled by the full models.

    The survey's repeat observations reach far lower S/N (down to ~10) than the reference set's
    cross-validation, so they pin how the random error grows towards low S/N, where the CV cannot.
    Each observation is labelled by the model eq. 1 picks from its own LAMOST teff/logg; a pair
    needs both observations with the same model, a clean fit (``flag == 0``) and teff, logg and
    [Fe/H] inside the model's training range and inside their KDE extrapolation boundaries (the
    population ``quality_flag`` keeps: labels near and beyond the edges of the training set
    scatter more from visit to visit).

    Parameters
    ----------
    models : dict ``{"dwarf": CannonModel, "giant": CannonModel}``
    lamost_catalog : Table or DataFrame (``obsid``, ``designation``, ``filename``, ``teff``,
        ``logg``)
    spectra_dir : path of the catalogue's files
    store_path : spectra store for these observations (rebuilt when its files changed)
    exclude : designations left out (e.g. the reference stars, whose repeats the CV uses)
    half : ``"fit"``, ``"check"`` or None (all stars); see :func:`repeat_half`
    boundaries : dict name -> {label: (low, high)}, optional
        The KDE extrapolation boundaries of each model
        (:func:`lamostcannon.validation.extrapolation_boundaries`).

    Returns
    -------
    dict name -> DataFrame of pairs with ``designation``, ``fold`` (a hash of the designation
    modulo 12, for even/odd splits), ``snr1``, ``snr2`` and per label ``delta_<l>``, ``e1_<l>``,
    ``e2_<l>`` (formal errors): the ``pairs`` argument of
    :func:`lamostcannon.uncertainty.fit_error_model`.
    """
    import itertools

    from .catalog import _as_frame, choose_model
    from .real import load_spectra

    cat = _as_frame(lamost_catalog, ["obsid", "designation", "filename", "teff", "logg"])
    cat = cat.drop_duplicates("obsid")
    cat = cat[~cat["designation"].astype(str).isin(set(map(str, exclude)))]
    counts = cat["designation"].value_counts()
    cat = cat[cat["designation"].isin(counts.index[counts >= 2])]
    if half is not None:
        cat = cat[repeat_half(cat["designation"]) == half]
    giant, known = choose_model(cat["teff"].to_numpy(float), cat["logg"].to_numpy(float))
    cat = cat.assign(giant=giant)[known].sort_values("obsid").reset_index(drop=True)
    out = {name: pd.DataFrame() for name in models}
    if len(cat) == 0:
        return out
    files = [str(Path(spectra_dir) / f) for f in cat["filename"].astype(str)]
    # a file changed since it was stored (a regenerated mock) replaces its row: see store.py
    flux, ivar, meta = load_spectra(files, store_path, n_workers=n_workers)
    ok = meta["ok"].to_numpy(bool)
    snr = _ood.spectrum_snr(flux, ivar)
    for name, model in models.items():
        rows = np.flatnonzero(ok & (cat["giant"].to_numpy(bool) == (name == "giant")))
        if rows.size < 2:
            continue
        res = model.test(flux[rows], ivar[rows])
        names = list(model.label_names)
        lab = res.labels
        err = np.sqrt(np.clip(np.diagonal(res.cov, axis1=1, axis2=2), 0, None))
        good = res.flag == 0
        for n in ("teff", "logg", "fe_h"):
            if n in names:
                j = names.index(n)
                good &= (lab[:, j] >= model.label_range[0, j]) & (lab[:, j] <= model.label_range[1, j])
                if boundaries is not None and n in boundaries.get(name, {}):
                    lo, hi = boundaries[name][n]
                    lo = -np.inf if lo is None else lo
                    hi = np.inf if hi is None else hi
                    good &= (lab[:, j] >= lo) & (lab[:, j] <= hi)
        des = cat["designation"].to_numpy(str)[rows]
        pairs, gidx = [], np.flatnonzero(good)
        for members in pd.Series(gidx).groupby(des[gidx]).indices.values():
            pairs += list(itertools.combinations(sorted(gidx[members].tolist()), 2))
        if not pairs:
            continue
        i, j = np.array(pairs).T
        df = pd.DataFrame({"designation": des[i], "fold": _fold_of(des[i]),
                           "snr1": snr[rows][i], "snr2": snr[rows][j]})
        for k, n in enumerate(names):
            df[f"delta_{n}"] = lab[i, k] - lab[j, k]
            df[f"e1_{n}"], df[f"e2_{n}"] = err[i, k], err[j, k]
        out[name] = df
        log.info("%s: %d survey repeat pairs of %d stars", name, len(df), df["designation"].nunique())
    return out
